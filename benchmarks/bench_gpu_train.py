"""A char-rnn epoch trained wholly on one device: rnnkern (``model.to(device)`` and its Trainer)
against PyTorch (``nn.Embedding -> nn.LSTM -> nn.Linear`` on cuDNN) with the same recipe, side by
side in one run (issue 23's end-to-end target: >= 1.5x on a GPU).

    python benchmarks/bench_gpu_train.py                       # on the GPU, 100 batches
    python benchmarks/bench_gpu_train.py --max-batches 0       # a full epoch (423 batches)
    python benchmarks/bench_gpu_train.py --device cpu --max-batches 5    # a smoke run anywhere

The recipe and both contestants are bench_e2e.py's char-rnn ones (examples/char_rnn.py's model
and Trainer; PyTorch's loop with Adam, clip 5 and the state carried), placed on ``--device``
with their batches before the clock starts; float32, TF32 off on both sides. PyTorch's loop
reads its loss every step; rnnkern's Trainer on the GPU every 50 (its ``log_every``) and at the
epoch's end. PyTorch starts from rnnkern's initial weights. Reported: seconds per epoch (min and
median over ``--repeats``, contestants alternating which goes first), the speed-up (PyTorch min
/ rnnkern min), and each side's mean training loss of its last epoch (close, not equal: float32
on different kernels, and Adam's eps in TF's place on rnnkern's side).
"""
from __future__ import annotations

import argparse
import os
import statistics
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from bench_e2e import char_rnn_data, rk_char_rnn, rk_lm_model, torch_char_rnn  # noqa: E402


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
    else:   # the smoke run: one thread, as 2-thread OpenMP barriers stall on a loaded machine
        torch.set_num_threads(1)
    batches, C = char_rnn_data(None, args.max_batches)
    runs = {"rnnkern": rk_char_rnn(batches, C, "lstm", device=args.device),
            "pytorch": torch_char_rnn(torch, batches, C, "lstm", init=rk_lm_model(C, "lstm"),
                                      device=args.device)}
    times = {name: [] for name in runs}
    losses = {}
    for r in range(args.repeats):
        for name in (list(runs) if r % 2 == 0 else list(runs)[::-1]):
            _sync(args.device, torch)
            t0 = time.perf_counter()
            losses[name] = runs[name]()
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
