"""Data-parallel char-rnn over MPI on this machine: one training epoch, time per step split into
compute and the gradient allreduce.

    python benchmarks/bench_mpi.py                              # 1x2, 2x1, 1x1, one epoch each
    python benchmarks/bench_mpi.py --configs 2x1 1x2 --max-batches 100 --repeats 3
    python benchmarks/bench_mpi.py --rnn-size 416 --max-batches 30   # a model ~10x larger

A config ``RxT`` is R ranks with T threads each (the C++ and Numba time loops' threads; OpenBLAS
on one thread, as the examples run it): 1-rank
configs run as one plain process (``distributed=None``, the baseline a user compares against),
the others under ``mpiexec -n R`` with ``distributed="mpi"``. The workload is
examples/char_rnn.py's: tiny-shakespeare, Embedding 128 -> 2-layer LSTM 128 -> Dense 65,
float32, batches 50 x 50 with the state carried, Adam 2e-3 clipped to norm 5; each rank trains on
its share of every batch (25 rows on 2 ranks). After 3 untimed warm-up steps, one epoch is timed
(validation left out). Reported per step:

* ``step``: the epoch's seconds / steps;
* ``allreduce wait``: time inside the gradient allreduce (rank 0; it includes waiting for the
  slower rank to arrive, i.e. load imbalance);
* ``allreduce alone``: the same allreduce, the ranks aligned by a barrier first, mean of 50
  (the communication itself);
* ``compute``: step - allreduce wait.

Each repeat runs every config in a rotating order (noisy VM: compare min and median).

``--plan`` measures the compute per batch row of one machine (1 rank x 2 threads, char-rnn's
model and one ~10x larger) and prints the scaling plan's table for N = 4..64 machines on 10 and
100 Gbit/s links (benchmarks/SCALING.md explains the model): bytes each rank sends per
allreduce, its time, and the rows per machine from which it costs <= 10% of the compute.
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)


def mpiexec():
    beside = os.path.join(os.path.dirname(sys.executable), "mpiexec")   # the mpich wheel's
    if os.path.exists(beside):
        return beside
    import shutil
    return shutil.which("mpiexec")


# ---------------------------------------------------------------------- one config (a worker)
def worker(args):
    import numpy as np
    import rnnkern as rk
    import rnnkern.config
    from rnnkern.blas_threads import limit_blas_threads
    from rnnkern.labs import load_example

    rk.config.CPP_THREADS = args.threads
    rk.config.NUMBA_THREADS = args.threads
    limit_blas_threads(1)       # as the examples run (--blas-threads 1): two OpenBLAS pools
                                # spinning against the time loops' threads cost more than they give
    group = rk.distributed.MPIGroup() if args.ranks > 1 else None
    cr = load_example("char_rnn")
    text = rk.datasets.tiny_shakespeare()
    vocab = rk.CharVocab.from_text(text)
    train, _ = cr.split_ids(vocab.encode(text), 0.05, 50, 50)
    n = min(len(train), args.max_batches) if args.max_batches else len(train)
    batches = [train[k] for k in range(n)]
    model = cr.build_model(len(vocab), dict(cr.DEFAULTS, rnn_size=args.rnn_size), seed=0)
    trainer = rk.Trainer(model, rk.sequence_loss, rk.Adam(2e-3, clip_norm=5.0), stateful=True,
                         progress=False, distributed=group)
    trainer.fit(batches[:3], epochs=1)                 # warm-up: plans, pools, pages
    waited = [0.0, 0] if group is None else list(group.timings["allreduce"])
    trainer.fit(batches, epochs=2)                     # epoch 2 of the counter: the timed one
    seconds = trainer.epoch_time
    result = {"ranks": args.ranks, "threads": args.threads, "steps": n, "epoch_s": seconds,
              "loss": trainer.history["loss"][-1], "params": model.num_params()}
    if group is not None:
        wait_s = group.timings["allreduce"][0] - waited[0]
        buf = np.zeros(model.num_params() + 1, np.float32)
        group._comm.Barrier()
        t0 = time.perf_counter()
        for _ in range(50):
            group.allreduce_sum(buf)
        alone = (time.perf_counter() - t0) / 50
        result.update(allreduce_wait_s=wait_s / n, allreduce_alone_s=alone,
                      allreduces=group.timings["allreduce"][1] - waited[1] - 50,
                      bytes=buf.nbytes)
    if group is None or group.is_root:
        print("RESULT " + json.dumps(result), flush=True)


# ---------------------------------------------------------------------- the table (driver)
def run_config(config, args):
    ranks, threads = (int(v) for v in config.split("x"))
    cmd = [sys.executable, os.path.abspath(__file__), "--worker", "--ranks", str(ranks),
           "--threads", str(threads), "--max-batches", str(args.max_batches),
           "--rnn-size", str(args.rnn_size)]
    if ranks > 1:
        cmd = [mpiexec(), "-n", str(ranks), *cmd]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=3600)
    if proc.returncode != 0:
        raise RuntimeError(f"{config} failed:\n{proc.stdout}\n{proc.stderr}")
    line = next(ln for ln in proc.stdout.splitlines() if ln.startswith("RESULT "))
    return json.loads(line[len("RESULT "):])


# ---------------------------------------------------------------------- the scaling plan
LINKS = {  # name: (bytes/s, per-message latency alpha in s)
    "10 Gbit/s (TCP)": (10e9 / 8, 20e-6),
    "100 Gbit/s (RDMA)": (100e9 / 8, 2e-6),
}


def allreduce_seconds(n, nbytes, bandwidth, alpha):
    """Bandwidth-optimal allreduce of ``nbytes`` over ``n`` ranks (ring, or MPICH's
    reduce-scatter + allgather for long messages): each rank sends 2(n-1)/n * nbytes; latency
    2*log2(n) messages (recursive halving/doubling; a ring pays 2(n-1))."""
    import math
    return 2 * (n - 1) / n * nbytes / bandwidth + 2 * math.log2(n) * alpha


def plan(args):
    rows = []
    for size in (args.rnn_size, args.big_rnn_size):
        sub = argparse.Namespace(**{**vars(args), "rnn_size": size})
        best = min((run_config("1x2", sub) for _ in range(args.repeats)),
                   key=lambda r: r["epoch_s"])
        ms_row = 1e3 * best["epoch_s"] / best["steps"] / 50
        rows.append((size, best["params"], ms_row))
        print(f"# H={size}: {best['params']:,} parameters, {ms_row:.3f} ms per row of 50 steps "
              f"(1 rank x 2 threads, {best['steps']} steps)", flush=True)
    print("\n| H (params) | machines N | link | MB sent per rank per step | allreduce ms | "
          "rows per machine for <= 10% | global batch then |")
    print("|---|---|---|---|---|---|---|")
    for size, params, ms_row in rows:
        nbytes = 4 * (params + 1)
        for n in (4, 8, 16, 32, 64):
            for link, (bw, alpha) in LINKS.items():
                t = allreduce_seconds(n, nbytes, bw, alpha)
                need = 10 * 1e3 * t / ms_row
                print(f"| {size} ({params:,}) | {n} | {link} | "
                      f"{2 * (n - 1) / n * nbytes / 1e6:.2f} | {1e3 * t:.2f} | "
                      f"{need:.0f} | {n * need:,.0f} |")
    return 0


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--configs", nargs="+", default=["1x2", "2x1", "1x1"],
                   help="RANKSxTHREADS per config (default: 1x2 2x1 1x1)")
    p.add_argument("--max-batches", type=int, default=0, help="batches per epoch (0: all)")
    p.add_argument("--repeats", type=int, default=1)
    p.add_argument("--rnn-size", type=int, default=128,
                   help="hidden size (default 128, char-rnn's; 416 gives ~10x the parameters)")
    p.add_argument("--plan", action="store_true",
                   help="measure compute per row and print the scaling plan's table")
    p.add_argument("--big-rnn-size", type=int, default=416,
                   help="--plan: the hidden size of the ~10x larger model (default 416)")
    p.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--ranks", type=int, default=1, help=argparse.SUPPRESS)
    p.add_argument("--threads", type=int, default=1, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.worker:
        return worker(args)
    if args.plan:
        return plan(args)
    print(f"# load average at the start: {os.getloadavg()}", flush=True)
    runs = {c: [] for c in args.configs}
    for r in range(args.repeats):
        order = args.configs[r % len(args.configs):] + args.configs[:r % len(args.configs)]
        for config in order:
            runs[config].append(run_config(config, args))
            print(f"# repeat {r + 1}: {config} {runs[config][-1]['epoch_s']:.2f} s", flush=True)
    print(f"\n# load average at the end: {os.getloadavg()}")
    first = runs[args.configs[0]][0]
    print(f"# {first['steps']} steps of 50x50, {first['params']:,} parameters (float32)\n")
    print("| ranks x threads | epoch s (min / median) | step ms | compute ms | allreduce wait ms "
          "| allreduce alone ms | final loss |")
    print("|---|---|---|---|---|---|---|")
    for config in args.configs:
        rs = sorted(runs[config], key=lambda r: r["epoch_s"])
        best, med = rs[0], rs[len(rs) // 2]
        step = 1e3 * best["epoch_s"] / best["steps"]
        wait = 1e3 * best.get("allreduce_wait_s", 0.0)
        alone = best.get("allreduce_alone_s")
        print(f"| {config} | {best['epoch_s']:.2f} / {med['epoch_s']:.2f} | {step:.2f} | "
              f"{step - wait:.2f} | {wait:.3f} | "
              f"{'-' if alone is None else f'{1e3 * alone:.3f}'} | {best['loss']:.4f} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
