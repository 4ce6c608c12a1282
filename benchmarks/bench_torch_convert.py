"""A PyTorch training loop with ``nn.LSTM`` and the same model after ``rnnkern.torch.convert``.

    python benchmarks/bench_torch_convert.py                      # hihello, lab12-4, char-rnn
    python benchmarks/bench_torch_convert.py --only lab12-4 --repeats 7
    python benchmarks/bench_torch_convert.py --cells lstm gru rnn

Both contestants are the same ``torch.nn.Module`` (one-hot or ``nn.Embedding`` -> ``nn.LSTM``,
batch_first -> ``nn.Linear``), float32, trained by the same PyTorch loop: forward,
``F.cross_entropy``, backward, ``torch.optim.Adam`` (char-rnn also clips the gradient norm to 5
and carries the state between batches, detached). The second is a deep copy passed through
``rnnkern.torch.convert``, so both start from the same weights; their final losses are printed.
Shapes and recipes are ``bench_e2e.py``'s (its data loaders are reused):

* ``hihello``:  one-hot(5) -> LSTM(5) -> Linear 5, batch 1 x 6 steps, Adam 0.1
* ``lab12-4``:  one-hot(25) -> 2-layer LSTM(25) -> Linear 25, 170 windows x 10, Adam 0.1
* ``char-rnn``: Embedding(65, 128) -> 2-layer LSTM(128) -> Linear 65, tiny-shakespeare batches
  50 x 50, Adam 2e-3, clip 5, state carried

Each repeat times ``--steps`` steps of each contestant (their order alternating between
repeats) after one untimed warm-up step each; reported: ms per step, min and median over the
repeats, and the speed-up (PyTorch min / converted min). Thread counts are set before torch is
imported (``--threads`` for torch's intra-op pool, both contestants; ``--blas-threads`` for the
OpenBLAS pools as ``bench_e2e.py``). A further converted contestant runs with torch on one
thread (``--convert-threads``): the configuration that leaves the cores to rnnkern's kernels,
since the converted model's remaining torch ops are small. Where the time goes, measured in the
same process at each shape: the recurrent module alone (forward + backward of a fixed output
gradient) in torch and converted, the bare rnnkern seam calls at that shape
(``rnnkern.recurrent_stack`` forward + backward on NumPy arrays: the kernels alone), and the rest
of the step (head, loss, Adam) by difference.
"""
from __future__ import annotations

import argparse
import copy
import os
import platform
import sys
import time

import numpy as np

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
sys.path.insert(0, os.path.join(ROOT, "benchmarks"))

TARGETS = {"hihello": None, "lab12-4": 3.0, "char-rnn": 1.2}
STEPS = {"hihello": 400, "lab12-4": 100, "char-rnn": 20}
CELLS = {"lstm": "LSTM", "gru": "GRU", "rnn": "RNN"}


def build_model(torch, kind, C, H, L, embed):
    """one-hot(C) or Embedding(C, H) -> nn.LSTM/GRU/RNN (batch_first) -> Linear(H, C)."""
    nn = torch.nn

    class CharModel(nn.Module):
        def __init__(self):
            super().__init__()
            self.embed = nn.Embedding(C, H) if embed else None
            self.rnn = getattr(nn, CELLS[kind])(H if embed else C, H, L, batch_first=True)
            self.fc = nn.Linear(H, C)

        def forward(self, x, state=None):
            h = self.embed(x) if self.embed is not None else x
            out, state = self.rnn(h, state)
            return self.fc(out), state

    torch.manual_seed(0)
    return CharModel()


def trainer(torch, model, batches, C, lr, clip=None, stateful=False):
    """A step function over ``batches`` (cycled): forward, cross-entropy, backward, Adam."""
    F = torch.nn.functional
    opt = torch.optim.Adam(model.parameters(), lr=lr)
    params = list(model.parameters())
    pos, state = [0], [None]

    def step():
        x, y = batches[pos[0] % len(batches)]
        pos[0] += 1
        opt.zero_grad(set_to_none=True)
        logits, new_state = model(x, state[0] if stateful else None)
        loss = F.cross_entropy(logits.reshape(-1, C), y)
        loss.backward()
        if clip:
            torch.nn.utils.clip_grad_norm_(params, clip)
        opt.step()
        if stateful:
            state[0] = tuple(s.detach() for s in new_state) if isinstance(new_state, tuple) \
                else new_state.detach()
        return loss
    return step


def workload(torch, name, kind, args):
    """(label, model, batches [(x, y)], C, lr, clip, stateful, rnn input [B,T,I] example)."""
    from bench_e2e import char_rnn_data, hihello_data, lab12_4_data
    F = torch.nn.functional
    if name == "char-rnn":
        raw, C = char_rnn_data(None, args.char_batches)
        batches = [(torch.from_numpy(np.asarray(x, np.int64)),
                    torch.from_numpy(np.asarray(y, np.int64)).reshape(-1)) for x, y in raw]
        model = build_model(torch, kind, C, 128, 2, embed=True)
        B, T = batches[0][0].shape
        return ("char-rnn (50x50, E=H=128, 2 layers)", model, batches, C, 2e-3, 5.0, True,
                torch.randn(B, T, 128))
    x, y, C = hihello_data() if name == "hihello" else lab12_4_data()
    L = 1 if name == "hihello" else 2
    xt = F.one_hot(torch.from_numpy(np.asarray(x, np.int64)), C).float()
    batches = [(xt, torch.from_numpy(np.asarray(y, np.int64)).reshape(-1))]
    B, T = xt.shape[:2]
    label = "hihello (1x6, H=5)" if name == "hihello" else "lab12-4 (170x10, H=25, 2 layers)"
    return label, build_model(torch, kind, C, C, L, embed=False), batches, C, 0.1, None, False, xt


def timed(fn, n):
    time.sleep(0.05)   # let the other contestant's idle worker threads stop spinning
    t0 = time.perf_counter()
    for _ in range(n):
        out = fn()
    dt = (time.perf_counter() - t0) / n
    return dt, out


def alternate(contestants, steps, repeats, torch=None):
    """{name: [seconds per call per repeat]}, order alternating between repeats; a contestant
    is a function, or (function, torch threads) run after ``torch.set_num_threads``."""
    times = {k: [] for k in contestants}
    order = list(contestants)
    for r in range(repeats):
        for k in (order if r % 2 == 0 else order[::-1]):
            fn = contestants[k]
            if isinstance(fn, tuple):
                fn, threads = fn
                torch.set_num_threads(threads)
            times[k].append(timed(fn, steps)[0])
    return times


def breakdown(torch, rkt_stack, base_rnn, conv_rnn, x_example, steps, repeats):
    """ms per call (min over repeats) of the recurrent module alone, forward + backward of a
    fixed output gradient, in torch and converted, and of the bare seam calls (under the bridge's
    thread rule, as the converted module's calls run)."""
    from rnnkern.backends import resolve
    from rnnkern.torch.threads import KernelThreads
    x = x_example
    with torch.no_grad():
        d_out = torch.randn(base_rnn(x)[0].shape)

    def module_step(m):
        def run():
            for p in m.parameters():
                p.grad = None
            out, _ = m(x)
            out.backward(d_out)
        return run

    cfg = conv_rnn._stack_config
    xa = np.ascontiguousarray(x.numpy())
    weights = [w.detach().numpy() for w in conv_rnn._weights()]
    d_a = d_out.numpy()

    backend = resolve(cfg.backend, xa)

    def seam():
        with KernelThreads(backend):
            # no initial state, as the module is called (hx=None): no state gradients formed
            record = rkt_stack.forward(cfg, xa, None, None, None, weights, backend=backend)[3]
            rkt_stack.backward(record, d_a)
    fns = {"torch module": module_step(base_rnn), "converted module": module_step(conv_rnn),
           "seam": seam}
    for f in fns.values():
        f()
    times = alternate(fns, steps, repeats)
    return {k: min(v) * 1e3 for k, v in times.items()}


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--only", nargs="+", choices=list(TARGETS), default=list(TARGETS))
    p.add_argument("--cells", nargs="+", choices=list(CELLS), default=["lstm"])
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--steps", type=int, default=0,
                   help="steps per repeat (default: hihello 400, lab12-4 100, char-rnn 20)")
    p.add_argument("--char-batches", type=int, default=40,
                   help="char-rnn batches of the text cycled through (default %(default)s)")
    p.add_argument("--threads", type=int, default=2,
                   help="torch.set_num_threads of both contestants (default 2)")
    p.add_argument("--convert-threads", type=int, nargs="*", default=None,
                   help="more converted contestants, each with its own torch.set_num_threads "
                        "(default: 1 when --threads > 1: torch's ops on one thread leave the "
                        "cores to rnnkern's kernels)")
    p.add_argument("--blas-threads", type=int, default=1,
                   help="NumPy's and SciPy's OpenBLAS pools (default 1; 0: unchanged)")
    p.add_argument("--rk-threads", type=int, default=None,
                   help="rnnkern.config.CPP_THREADS (default: rnnkern's own choice)")
    args = p.parse_args(argv)
    if args.blas_threads:
        from rnnkern.labs import limit_blas_threads
        limit_blas_threads(args.blas_threads)
    import torch
    torch.set_num_threads(args.threads)
    import rnnkern as rk
    import rnnkern.torch as rkt
    from rnnkern import config
    from rnnkern.backends import resolve
    from rnnkern import recurrent_stack as rkt_stack
    if args.rk_threads is not None:
        config.CPP_THREADS = args.rk_threads
    backend = resolve("auto", np.zeros(1)).name
    print(f"# rnnkern {rk.__version__} (auto -> {backend}, CPP_THREADS {config.CPP_THREADS}) "
          f"vs torch {torch.__version__} ({args.threads} threads); {os.cpu_count()} CPUs, "
          f"{platform.processor() or platform.machine()}; --blas-threads "
          f"{args.blas_threads or 'unchanged'}; load avg {os.getloadavg()[0]:.1f}", flush=True)

    extra = args.convert_threads if args.convert_threads is not None else \
        ([1] if args.threads > 1 else [])
    rows, parts = [], []
    for name in args.only:
        for kind in args.cells:
            label, base, batches, C, lr, clip, stateful, x_rnn = workload(torch, name, kind, args)
            if kind != "lstm":
                label += f" [{CELLS[kind]}]"
            conv = rkt.convert(copy.deepcopy(base))
            assert type(conv.rnn).__module__.startswith("rnnkern.torch")
            steps = args.steps or STEPS[name]
            contestants = {"torch": (trainer(torch, base, batches, C, lr, clip, stateful),
                                     args.threads),
                           "converted": (trainer(torch, conv, batches, C, lr, clip, stateful),
                                         args.threads)}
            for n in extra:
                model = rkt.convert(copy.deepcopy(base))
                contestants[f"converted, torch {n}t"] = (
                    trainer(torch, model, batches, C, lr, clip, stateful), n)
            for f, n in contestants.values():
                torch.set_num_threads(n)
                f()   # warm-up: oneDNN primitives, the kernels' first call
            times = alternate(contestants, steps, args.repeats, torch)
            torch.set_num_threads(args.threads)
            losses = {k: float(f().detach()) for k, (f, _) in contestants.items()}
            rows.append((label, times, losses, TARGETS[name]))
            print(f"# {label}: " + ", ".join(
                f"{k} {min(v) * 1e3:.3f} ms/step" for k, v in times.items()), flush=True)
            parts.append((label, min(times["torch"]) * 1e3, min(times["converted"]) * 1e3,
                          breakdown(torch, rkt_stack, base.rnn, conv.rnn, x_rnn,
                                    max(steps // 2, 5), args.repeats)))

    print(f"\n# load avg at the end {os.getloadavg()[0]:.1f}")
    others = [f"converted, torch {n}t" for n in extra]
    print(f"| workload | PyTorch {args.threads}t ms/step (min / median) | converted "
          f"ms/step (min / median) | speed-up | target | "
          + "".join(f"{k} ms/step (min) | its speed-up | " for k in others)
          + "final loss PyTorch / converted |")
    print("|---" * (6 + 2 * len(others)) + "|")
    for label, times, losses, target in rows:
        t, c = times["torch"], times["converted"]
        ratio = min(t) / min(c)
        verdict = "-" if target is None else \
            f">= {target:g}x {'met' if ratio >= target else 'NOT met'}"
        more = "".join(f"{min(times[k]) * 1e3:.3f} | {min(t) / min(times[k]):.2f}x | "
                       for k in others)
        print(f"| {label} | {min(t) * 1e3:.3f} / {np.median(t) * 1e3:.3f} | "
              f"{min(c) * 1e3:.3f} / {np.median(c) * 1e3:.3f} | {ratio:.2f}x | {verdict} | "
              f"{more}{losses['torch']:.4f} / {losses['converted']:.4f} |")
    print("\nWhere the time goes (ms, min over repeats; module = forward + backward of the "
          "recurrent module alone; bridge = converted module - seam; rest = step - module):")
    print("| workload | torch step | torch module | torch rest | converted step | "
          "converted module | seam (kernels) | bridge | converted rest |")
    print("|---|---|---|---|---|---|---|---|---|")
    for label, t_step, c_step, b in parts:
        tm, cm, seam = b["torch module"], b["converted module"], b["seam"]
        print(f"| {label} | {t_step:.3f} | {tm:.3f} | {t_step - tm:.3f} | {c_step:.3f} | "
              f"{cm:.3f} | {seam:.3f} | {cm - seam:.3f} | {c_step - cm:.3f} |")
    return rows, parts


if __name__ == "__main__":
    main()
