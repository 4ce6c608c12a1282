"""Generation benchmark: sampling tokens from a char-rnn-sized model, rnnkern vs PyTorch, one
process, both on one thread.

    python benchmarks/bench_generate.py                      # LSTM, B = 1 and 32
    python benchmarks/bench_generate.py --cells lstm gru rnn --tokens 2000 --repeats 5

The model is char-rnn's: Embedding(65, 128) -> 2-layer LSTM/GRU/RNN(128) -> Dense(65), float32,
the same weights on both sides. Each contestant feeds a 20-id prime, then samples ``--tokens``
ids per sequence at temperature 1:

* rnnkern: ``rk.generate`` (for this model the compiled path: rnnkern.inference.Inference);
* PyTorch: the usual ``torch.no_grad()`` loop, one ``model(x_t, state)`` step per token, then
  ``softmax`` and ``torch.multinomial``.

Reported: microseconds per token (per step of the batch; min and median over repeats, the
contestants alternating which goes first), tokens per second over the whole batch, and the
speed-up (PyTorch min / rnnkern min).
"""
from __future__ import annotations

import argparse
import os
import platform
import sys
import time

import numpy as np

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
import rnnkern as rk  # noqa: E402
from rnnkern.labs import limit_blas_threads  # noqa: E402

V, E, H, L, PRIME = 65, 128, 128, 2, 20
CELLS = {"lstm": rk.LSTM, "gru": rk.GRU, "rnn": rk.RNN}


def rk_model(kind):
    return rk.Sequential([rk.Embedding(V, E, seed=0), CELLS[kind](E, H, L, seed=1),
                          rk.Dense(H, V, seed=2)])


def torch_model(torch, kind, model):
    """The same model in PyTorch, with rnnkern's weights (PyTorch's names and layouts)."""
    nn = torch.nn
    rnn_cls = {"lstm": nn.LSTM, "gru": nn.GRU, "rnn": nn.RNN}[kind]

    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.embed = nn.Embedding(V, E)
            self.rnn = rnn_cls(E, H, L, batch_first=True)
            self.head = nn.Linear(H, V)

        def forward(self, x, state=None):
            out, state = self.rnn(self.embed(x), state)
            return self.head(out), state

    net = Net().eval()
    with torch.no_grad():
        net.embed.weight.copy_(torch.from_numpy(model[0].params["weight"]))
        for name, value in model[1].params.items():
            getattr(net.rnn, name).copy_(torch.from_numpy(value))
        net.head.weight.copy_(torch.from_numpy(model[2].params["weight"]))
        net.head.bias.copy_(torch.from_numpy(model[2].params["bias"]))
    return net


def rk_run(model, prime, tokens):
    def run():
        return rk.generate(model, prime, tokens, rng=0)
    return run


def torch_run(torch, net, prime, tokens):
    gen = torch.Generator().manual_seed(0)
    x0 = torch.from_numpy(prime)

    def run():
        with torch.no_grad():
            logits, state = net(x0[:, :-1])
            x = x0[:, -1:]
            out = []
            for _ in range(tokens):
                logits, state = net(x, state)
                p = torch.softmax(logits[:, -1], dim=-1)
                x = torch.multinomial(p, 1, generator=gen)
                out.append(x)
        return torch.cat(out, dim=1).numpy()
    return run


def measure(contestants, repeats):
    times = {name: [] for name in contestants}
    for name, run in contestants.items():
        run()                                   # warm-up (builds, caches)
    order = list(contestants)
    for r in range(repeats):
        for name in (order if r % 2 == 0 else order[::-1]):
            t0 = time.perf_counter()
            contestants[name]()
            times[name].append(time.perf_counter() - t0)
    return times


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--cells", nargs="+", choices=list(CELLS), default=["lstm"])
    p.add_argument("--batches", nargs="+", type=int, default=[1, 32],
                   help="sequences generated at once (default 1 and 32)")
    p.add_argument("--tokens", type=int, default=1000, help="ids sampled per sequence")
    p.add_argument("--repeats", type=int, default=5)
    args = p.parse_args(argv)
    import torch
    torch.set_num_threads(1)
    limit_blas_threads(1)
    rk.config.CPP_THREADS = 1
    print(f"# rnnkern {rk.__version__} vs torch {torch.__version__}, 1 thread each; "
          f"{os.cpu_count()} CPUs, {platform.machine()}; load avg "
          f"{os.getloadavg()[0]:.1f}")
    print("| cell | B | rnnkern us/token (min / median) | PyTorch us/token (min / median) | "
          "rnnkern tokens/s | speed-up |")
    print("|---|---|---|---|---|---|")
    for kind in args.cells:
        model = rk_model(kind)
        net = torch_model(torch, kind, model)
        for B in args.batches:
            prime = np.random.default_rng(B).integers(0, V, (B, PRIME))
            times = measure({"rnnkern": rk_run(model, prime, args.tokens),
                             "torch": torch_run(torch, net, prime, args.tokens)}, args.repeats)
            per = {k: np.array(v) / args.tokens * 1e6 for k, v in times.items()}
            ours, theirs = per["rnnkern"], per["torch"]
            print(f"| {kind} | {B} | {ours.min():.1f} / {np.median(ours):.1f} | "
                  f"{theirs.min():.1f} / {np.median(theirs):.1f} | "
                  f"{B * 1e6 / ours.min():,.0f} | {theirs.min() / ours.min():.1f}x |",
                  flush=True)
    print(f"# load avg at the end {os.getloadavg()[0]:.1f}")


if __name__ == "__main__":
    main()
