"""A char-rnn epoch trained wholly on one device: rnnkern (``model.to(device)`` and its Trainer)
against PyTorch (``nn.Embedding -> nn.LSTM -> nn.Linear`` on cuDNN) with the same recipe, side by
side in one run (issue 23's end-to-end target: >= 1.5x on a GPU).

    python benchmarks/bench_gpu_train.py                       # on the GPU, 100 batches
    python benchmarks/bench_gpu_train.py --max-batches 0       # a full epoch (423 batches)
    python benchmarks/bench_gpu_train.py --device cpu --max-batches 5    # a smoke run anywhere

Recipe (examples/char_rnn.py's): tiny-shakespeare, batches of 50 sequences x 50 steps, Embedding
128 -> 2-layer LSTM 128 -> Dense 65, softmax cross-entropy, Adam 2e-3 with PyTorch's eps,
global-norm clip 5, the state carried between batches (truncated BPTT), float32, TF32 off on
both sides. Both start from the same weights (rnnkern's, copied with ``rk.interop.to_torch``);
the batches are on the device before the clock starts, and both read the loss every step.
Reported: seconds per epoch (min and median over ``--repeats``, contestants alternating which
goes first), the speed-up (PyTorch min / rnnkern min), and each side's mean training loss of
its last epoch (the two should agree to a few 1e-3: float32 on different kernels).
"""
from __future__ import annotations

import argparse
import os
import statistics
import sys
import time

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from bench_e2e import TorchCharModel, char_rnn_data, load_rk_weights, rk_lm_model  # noqa: E402

import rnnkern as rk  # noqa: E402
from rnnkern.device import to_device  # noqa: E402


def rk_epoch(batches, C, device):
    """One epoch per call of examples/char_rnn.py's model and Trainer, on ``device``."""
    model = rk_lm_model(C, "lstm").to(device)
    trainer = rk.Trainer(model, rk.sequence_loss, rk.Adam(2e-3, clip_norm=5.0, eps_mode="torch"),
                         stateful=True, progress=False)
    data = [(to_device(x, device), to_device(y, device)) for x, y in batches]
    trainer.train_step(data[0])      # warm-up: kernels compiled, buffers made
    trainer._state = None

    def run():
        trainer.fit(data, epochs=trainer.epoch + 1)
        return trainer.history["loss"][-1]
    return run, model


def torch_epoch(torch, batches, C, device, init):
    """PyTorch's side: the same model from ``init``'s weights, the same loop."""
    F = torch.nn.functional
    model = TorchCharModel(torch, C, 128, 2, embed=True)
    load_rk_weights(torch, model, init)
    for m in model.modules:
        m.to(device)
    params = model.parameters()
    opt = torch.optim.Adam(params, lr=2e-3)
    data = [(torch.from_numpy(x).to(device), torch.from_numpy(y).reshape(-1).to(device))
            for x, y in batches]

    def step(x, y, state):
        opt.zero_grad(set_to_none=True)
        logits, state = model(x, state)
        loss = F.cross_entropy(logits.reshape(-1, C), y)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 5.0)
        opt.step()
        return float(loss.detach()), tuple(s.detach() for s in state)

    step(*data[0], None)             # warm-up (cuDNN plans, allocator)

    def run():
        state, total = None, 0.0
        for x, y in data:
            loss, state = step(x, y, state)
            total += loss
        return total / len(data)
    return run


def _sync(device, torch):
    if device == "cuda":
        import cupy
        cupy.cuda.Device().synchronize()
        torch.cuda.synchronize()


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--device", choices=["cuda", "cpu"], default="cuda")
    p.add_argument("--max-batches", type=int, default=100,
                   help="batches per epoch (0: the whole epoch, 423; default %(default)s)")
    p.add_argument("--repeats", type=int, default=3)
    args = p.parse_args(argv)
    import torch
    if args.device == "cuda":
        if not torch.cuda.is_available():
            sys.exit("bench_gpu_train: torch.cuda is not available here (use --device cpu)")
        torch.backends.cuda.matmul.allow_tf32 = False
        torch.backends.cudnn.allow_tf32 = False
    batches, C = char_rnn_data(None, args.max_batches)
    rk_run, init = rk_epoch(batches, C, args.device)
    # the PyTorch side starts from rnnkern's initial weights (taken before rnnkern trains)
    init_host = rk_lm_model(C, "lstm")
    th_run = torch_epoch(torch, batches, C, args.device, init_host)
    times = {"rnnkern": [], "pytorch": []}
    losses = {}
    for r in range(args.repeats):
        order = [("rnnkern", rk_run), ("pytorch", th_run)]
        for name, run in (order if r % 2 == 0 else order[::-1]):
            _sync(args.device, torch)
            t0 = time.perf_counter()
            losses[name] = run()
            _sync(args.device, torch)
            times[name].append(time.perf_counter() - t0)
    print(f"char-rnn epoch on {args.device} ({len(batches)} batches 50x50, "
          f"2x128 LSTM, float32), seconds over {args.repeats} repeats")
    print(f"{'':10} {'min':>8} {'median':>8} {'last loss':>10}")
    for name in times:
        print(f"{name:10} {min(times[name]):8.3f} {statistics.median(times[name]):8.3f} "
              f"{losses[name]:10.4f}")
    print(f"speed-up (PyTorch min / rnnkern min): "
          f"{min(times['pytorch']) / min(times['rnnkern']):.2f}x (target >= 1.5x on a GPU)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
