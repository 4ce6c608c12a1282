"""How rnnkern's C++ kernels share the cores with torch's intra-op thread pool.

Inside a PyTorch training loop, torch's OpenMP workers spin on the other cores for a while
after each of torch's parallel ops (the head, the loss, the optimizer). A kernel call that cuts
its batch over rnnkern's own threads then waits for a thread that has no core until the
scheduler moves a spinner aside, which costs ~ms. So while torch's pool has more than one thread,
the bridge lets a layer call split only from a higher amount of work than rnnkern alone uses
(``rnnkern.config.CPP_SPLIT_MIN_WORK``): :data:`TORCH_SPLIT_MIN_WORK` multiply-adds as the C++
backend counts them (4*B*T*G*H*H): lab 12-4's layers (17M) then run on one thread, where a
split step measured about twice as slow, and char-rnn's (655M) still split, where the split
step is faster (benchmarks/bench_torch_convert.py; the figures are in the commit message).
"""
from __future__ import annotations

import torch

TORCH_SPLIT_MIN_WORK = 1 << 26


def _native():
    from rnnkern.backends import cpp
    return cpp._C


class KernelThreads:
    """Context for one bridge call on ``backend``: raises the C++ split threshold to
    :data:`TORCH_SPLIT_MIN_WORK` while torch's pool has workers (restored on exit); nothing for
    other backends or a torch on one thread."""

    __slots__ = ("_ext", "_previous")

    def __init__(self, backend):
        self._ext = None
        if getattr(backend, "name", None) == "cpp" and torch.get_num_threads() > 1:
            self._ext = _native()

    def __enter__(self):
        if self._ext is not None:
            self._previous = self._ext.split_min_work()
            self._ext.set_split_min_work(max(self._previous, TORCH_SPLIT_MIN_WORK))
        return self

    def __exit__(self, *exc):
        if self._ext is not None:
            self._ext.set_split_min_work(self._previous)
        return False
