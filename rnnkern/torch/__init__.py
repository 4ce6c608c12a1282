"""rnnkern inside PyTorch: ``torch.nn.LSTM``/``GRU``/``RNN`` drop-ins running rnnkern's kernels.

    >>> import rnnkern.torch
    >>> model = rnnkern.torch.convert(model)   # every nn.LSTM/GRU/RNN inside -> rnnkern's twin
    >>> loss_fn(model(x), y).backward()        # the usual training loop, unchanged

Modules: :class:`LSTM`, :class:`GRU`, :class:`RNN` (``torch.nn``'s constructor, parameters and
``forward``); :func:`convert` / :func:`revert` swap them inside a model. Autograd runs rnnkern's
backward kernels (:mod:`rnnkern.torch.function`); ``torch.compile`` sees one custom operator.
``import rnnkern`` does not import this package or torch.
"""
try:
    import torch  # noqa: F401  (absolute: the real torch, never this package)
except ImportError as exc:  # pragma: no cover - exercised only without torch
    raise ImportError(
        'rnnkern.torch needs PyTorch, which is not importable here; install it with '
        'pip install "rnnkern[torch]" (or pip install torch)') from exc
if not hasattr(torch, "autograd"):   # rnnkern/ itself on sys.path: this package shadows torch
    raise ImportError(f"'import torch' found {getattr(torch, '__file__', torch)!r}, not "
                      f"PyTorch; run from outside the rnnkern/ folder")

from rnnkern.torch.convert import convert, revert
from rnnkern.torch.modules import GRU, LSTM, RNN

__all__ = ["LSTM", "GRU", "RNN", "convert", "revert"]
