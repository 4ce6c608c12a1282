"""CPU benchmark: rnnkern's CPU backends vs torch.nn.LSTM/GRU, side by side in one process.

    python benchmarks/bench_cpu.py                        # every available CPU backend, LSTM+GRU
    python benchmarks/bench_cpu.py --cells lstm --sizes char-rnn --repeats 40
    python benchmarks/bench_cpu.py --compile-times        # also first-call compile / warm start
    python benchmarks/bench_cpu.py --plot speedup.png     # also speed-up against size (matplotlib)

Every contestant runs the same (B,T,I,H,L) in float32 with the same thread count; one repeat runs
each contestant for a short block of calls, in an order that rotates, so machine noise hits all
alike (this VM moves 1.6-2x between minutes). Reported: median and min time per call in ms, speed-up vs PyTorch
(median / median), and GFLOP/s from the GEMM flop count (fwd 2*B*T*G*H*(I+H) per layer, fwd+bwd
three times that; pointwise work not counted) next to a measured float32 GEMM rate.

Backends come from ``rk.available_backends()`` (CPU ones: numba, cpp): a backend built later
joins the table without edits here. Shape legend: B batch, T time, I input, H hidden, L layers.
"""
from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
import time

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import rnnkern as rk  # noqa: E402

SIZES = {  # name: (B, T, I, H, L)
    "lab": (1, 6, 5, 5, 1),
    "lab-batch": (170, 10, 25, 25, 2),
    "char-rnn": (50, 50, 65, 128, 2),
    "large": (64, 100, 512, 512, 1),
}
CPU_BACKENDS = ("numba", "cpp")
GATES = {"lstm": 4, "gru": 3}


def gemm_flops(cell, B, T, I, H, L):
    """Forward GEMM flops of an L-layer stack: x W_ih^T plus h W_hh^T at every step."""
    G = GATES[cell]
    return sum(2 * B * T * G * H * ((I if k == 0 else H) + H) for k in range(L))


def cpu_backends(requested=None):
    """Available CPU backends (all of CPU_BACKENDS that import and run here, or ``requested``)."""
    status = rk.available_backends()
    names = requested or [b for b in CPU_BACKENDS if status.get(b, (False,))[0]]
    for b in names:
        if not status[b][0]:
            sys.exit(f"backend {b!r} is unavailable: {status[b][1]}")
    return names


def make_rk(cell, backend, B, T, I, H, L, seed=0):
    """A run(mode) callable for an rnnkern layer; mode 'fwd' or 'fwdbwd'."""
    cls = rk.LSTM if cell == "lstm" else rk.GRU
    opts = dict(forget_bias=0.0) if cell == "lstm" else {}
    layer = cls(I, H, L, dtype="float32", backend=backend, seed=seed, **opts)
    rng = np.random.default_rng(seed)
    x = rng.standard_normal((B, T, I)).astype(np.float32)
    d_out = rng.standard_normal((B, T, H)).astype(np.float32)

    def run(mode):
        layer(x)
        if mode == "fwdbwd":
            layer.backward(d_out)
    return run


def make_torch(cell, B, T, I, H, L, seed=0):
    """The same for torch.nn.LSTM/GRU (batch_first, float32, input requires grad like rk's dx)."""
    import torch
    torch.manual_seed(seed)
    mod = (torch.nn.LSTM if cell == "lstm" else torch.nn.GRU)(I, H, L, batch_first=True)
    rng = np.random.default_rng(seed)
    x = torch.from_numpy(rng.standard_normal((B, T, I)).astype(np.float32)).requires_grad_(True)
    d_out = torch.from_numpy(rng.standard_normal((B, T, H)).astype(np.float32))

    def run(mode):
        if mode == "fwd":
            mod(x)
            return
        mod.zero_grad(set_to_none=True)
        x.grad = None
        out, _ = mod(x)
        out.backward(d_out)
    return run


def measure_gemm_rate(repeats=5):
    """float32 GEMM GFLOP/s of the BLAS the Numba kernels call (np.dot inside @njit = SciPy's
    OpenBLAS), at the shape of the large config's input projection, [6400,512] @ [512,2048]."""
    from numba import njit

    @njit
    def dot(a, b, c):
        np.dot(a, b.T, c)

    rng = np.random.default_rng(0)
    a = rng.standard_normal((6400, 512)).astype(np.float32)
    b = rng.standard_normal((2048, 512)).astype(np.float32)
    c = np.empty((6400, 2048), np.float32)
    dot(a, b, c)
    best = min(_time(lambda: dot(a, b, c)) for _ in range(repeats))
    return 2 * 6400 * 512 * 2048 / best / 1e9


def measure_torch_gemm_rate(repeats=5):
    import torch
    a, b = torch.randn(6400, 512), torch.randn(2048, 512)
    torch.mm(a, b.T)
    best = min(_time(lambda: torch.mm(a, b.T)) for _ in range(repeats))
    return 2 * 6400 * 512 * 2048 / best / 1e9


def _time(fn):
    t0 = time.perf_counter()
    fn()
    return time.perf_counter() - t0


def bench_config(cell, size, backends, repeats, use_torch=True, pause=0.1):
    """{contestant: {mode: [seconds per call...]}} for one cell and size.

    Contestants alternate in blocks of calls (a block lasts >= ~30 ms), in a rotating order,
    with ``pause`` seconds of sleep before each block: OpenBLAS worker threads spin ~0.1 s after
    a call and libgomp's spin too, so without the pause each library's idle spinners would steal
    one of the two cores from whichever contestant runs next.
    """
    B, T, I, H, L = SIZES[size]
    runners = {b: make_rk(cell, b, B, T, I, H, L) for b in backends}
    if use_torch:
        runners["torch"] = make_torch(cell, B, T, I, H, L)
    times = {name: {"fwd": [], "fwdbwd": []} for name in runners}
    names = list(runners)
    block = {}
    for name in names:  # warm-up: compile, allocate, let thread pools start; size the blocks
        for mode in ("fwd", "fwdbwd"):
            runners[name](mode)
            once = min(_time(lambda: runners[name](mode)) for _ in range(3))
            block[name, mode] = max(1, min(repeats, int(0.03 / max(once, 1e-6))))
    done = {key: 0 for key in block}
    r = 0
    while any(done[key] < repeats for key in done):
        order = names[r % len(names):] + names[:r % len(names)]
        r += 1
        for mode in ("fwd", "fwdbwd"):
            for name in order:
                n = min(block[name, mode], repeats - done[name, mode])
                if n <= 0:
                    continue
                time.sleep(pause)
                for _ in range(n):
                    times[name][mode].append(_time(lambda: runners[name](mode)))
                done[name, mode] += n
    return times


def default_repeats(size):
    return {"lab": 200, "lab-batch": 60, "char-rnn": 20, "large": 5}[size]


def compile_times(cells=("lstm", "gru")):
    """First-call (cold cache) and warm-cache new-process times of the numba backend, measured
    in fresh subprocesses sharing a private NUMBA_CACHE_DIR."""
    code = r"""
import time, sys
t0 = time.perf_counter()
import numpy as np, rnnkern as rk, numba
t1 = time.perf_counter()
cls = rk.LSTM if sys.argv[1] == "lstm" else rk.GRU
layer = cls(5, 5, dtype="float32", backend="numba")
x = np.ones((1, 6, 5), np.float32)
t2 = time.perf_counter(); out, _ = layer(x); t3 = time.perf_counter()
layer.backward(out); t4 = time.perf_counter()
print(f"{t1 - t0:.2f} {t3 - t2:.2f} {t4 - t3:.2f}")
"""
    rows = []
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    with tempfile.TemporaryDirectory() as cache:
        env = dict(os.environ, NUMBA_CACHE_DIR=cache, PYTHONPATH=root)
        for cell in cells:
            for state in ("cold cache (compile)", "warm cache (new process)"):
                out = subprocess.run([sys.executable, "-c", code, cell], env=env, cwd=root,
                                     capture_output=True, text=True, check=True).stdout.split()
                rows.append((cell, state, *map(float, out)))
    return rows


def plot_speedups(results, path):
    """Draw each (cell, backend)'s fwd+bwd speed-up over PyTorch (median / median) against the
    size into the PNG ``path``; ``results`` as main() collects them. The x axis is a size's
    forward GEMM work per gate, B*T*H*(I+H) summed over layers, the same for every cell."""
    from rnnkern.plotting import new_figure
    torch_med = {(c, sh): md["fwdbwd"] for c, sh, n, md, _ in results if n == "torch"}
    lines = {}
    for cell, shape, name, med, _ in results:
        if name != "torch" and (cell, shape) in torch_med:
            work = gemm_flops(cell, *shape) // (2 * GATES[cell])
            lines.setdefault((cell, name), []).append(
                (work, torch_med[cell, shape] / med["fwdbwd"], shape))
    if not lines:
        raise ValueError("no speed-up to plot: the run has no PyTorch contestant")
    fig = new_figure((8, 5))
    ax = fig.add_subplot()
    for (cell, name), points in sorted(lines.items()):
        points.sort()
        ax.plot([w for w, _, _ in points], [r for _, r, _ in points], marker="o",
                label=f"{cell} {name}")
    for work, shape in sorted({(w, sh) for pts in lines.values() for w, _, sh in pts}):
        ax.annotate(str(shape), (work, 1.0), textcoords="offset points", xytext=(0, -14),
                    ha="center", fontsize=7)
    ax.axhline(1.0, color="grey", linewidth=0.8)
    ax.set_xscale("log")
    ax.set_yscale("log")
    ax.set_xlabel("size: B*T*H*(I+H) per layer, summed; (B,T,I,H,L) under the 1x line")
    ax.set_ylabel("speed-up over torch.nn (fwd+bwd, median)")
    ax.set_title("rnnkern CPU backends vs PyTorch, float32")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=100)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--cells", nargs="+", default=["lstm", "gru"], choices=list(GATES))
    p.add_argument("--sizes", nargs="+", default=list(SIZES), choices=list(SIZES))
    p.add_argument("--backends", nargs="+", default=None,
                   help="default: every available CPU backend (%s)" % ", ".join(CPU_BACKENDS))
    p.add_argument("--threads", type=int, default=2, help="torch.set_num_threads (default 2)")
    p.add_argument("--repeats", type=int, default=None, help="default: per size")
    p.add_argument("--no-torch", action="store_true")
    p.add_argument("--pause", type=float, default=0.1,
                   help="seconds of sleep before each block of calls (lets spinning pools idle)")
    p.add_argument("--compile-times", action="store_true")
    p.add_argument("--plot", default="", metavar="PNG",
                   help="also draw the fwd+bwd speed-up over PyTorch against size into this PNG "
                        "(needs matplotlib)")
    args = p.parse_args(argv)
    if args.plot:
        if args.no_torch:
            p.error("--plot draws speed-ups over PyTorch: drop --no-torch")
        from rnnkern.plotting import new_figure
        new_figure()   # without matplotlib: the error naming the extra, before the long run

    backends = cpu_backends(args.backends)
    use_torch = not args.no_torch
    if use_torch:
        import torch
        torch.set_num_threads(args.threads)
    print(f"# backends: {', '.join(backends)}{' + torch ' + __import__('torch').__version__ if use_torch else ''}"
          f"; threads {args.threads}; float32; cpu count {os.cpu_count()}")
    gemm = measure_gemm_rate()  # re-measured before every config; the best rate seen is kept
    torch_gemm = measure_torch_gemm_rate() if use_torch else 0.0
    results = []  # (cell, shape, name, med, low); printed at the end against the best GEMM rate
    for cell in args.cells:
        for size in args.sizes:
            shape = SIZES[size]
            reps = args.repeats or default_repeats(size)
            gemm = max(gemm, measure_gemm_rate(2))
            times = bench_config(cell, size, backends, reps, use_torch, args.pause)
            for name, t in times.items():
                results.append((cell, shape, name, {m: float(np.median(v)) for m, v in t.items()},
                                {m: float(np.min(v)) for m, v in t.items()}))
            print(f"# done {cell} {shape}", file=sys.stderr, flush=True)
    gemm = max(gemm, measure_gemm_rate(2))
    print("| cell | (B,T,I,H,L) | backend | fwd ms med / min | fwd+bwd ms med / min | "
          "vs torch fwd (med / min) | vs torch fwd+bwd (med / min) | fwd+bwd GFLOP/s (min) | "
          "% of GEMM rate |")
    print("|---|---|---|---|---|---|---|---|---|")
    torch_rows = {(c, sh): (md, lw) for c, sh, n, md, lw in results if n == "torch"}
    for cell, shape, name, med, low in results:
        rate = 3 * gemm_flops(cell, *shape) / low["fwdbwd"] / 1e9
        vs = {m: "-" for m in ("fwd", "fwdbwd")}
        if (cell, shape) in torch_rows and name != "torch":
            t_med, t_low = torch_rows[cell, shape]
            vs = {m: f"{t_med[m] / med[m]:.2f}x / {t_low[m] / low[m]:.2f}x" for m in vs}
        print(f"| {cell} | {shape} | {name} | {med['fwd'] * 1e3:.3f} / {low['fwd'] * 1e3:.3f} | "
              f"{med['fwdbwd'] * 1e3:.3f} / {low['fwdbwd'] * 1e3:.3f} | {vs['fwd']} | "
              f"{vs['fwdbwd']} | {rate:.1f} | {100 * rate / gemm:.0f}% |")
    print()
    line = f"float32 GEMM [6400,512]x[512,2048], best of the run: numba/OpenBLAS {gemm:.0f} GFLOP/s"
    if use_torch:
        line += f", torch/MKL {max(torch_gemm, measure_torch_gemm_rate()):.0f} GFLOP/s"
    print(line)
    print(f"load average at the end: {' '.join(f'{v:.1f}' for v in os.getloadavg())}")
    if args.plot:
        plot_speedups(results, args.plot)
        print(f"speed-up plot: {args.plot}")
    if args.compile_times:
        print()
        print("| cell | numba kernel cache | import s | first fwd s | first bwd s |")
        print("|---|---|---|---|---|")
        for cell, state, imp, fwd, bwd in compile_times(args.cells):
            print(f"| {cell} | {state} | {imp:.2f} | {fwd:.2f} | {bwd:.2f} |")


if __name__ == "__main__":
    main()
