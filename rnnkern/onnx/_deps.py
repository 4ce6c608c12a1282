"""The real ``onnx`` package, imported on first use with a clear error when it is missing.

Every module here imports ``onnx`` absolutely (Python 3 has no implicit relative imports), so
``import onnx`` inside ``rnnkern/onnx/`` gets the top-level package, not this one; a module
without ``helper`` (another package of that name) is refused.
"""
from __future__ import annotations

import importlib

INSTALL_HINT = "pip install 'rnnkern[onnx]' (or pip install onnx onnxruntime)"


def require():
    """The ``onnx`` module; ImportError naming the fix when it is missing or shadowed."""
    try:
        onnx = importlib.import_module("onnx")
    except ImportError as exc:
        raise ImportError(f"rnnkern.onnx needs the onnx package, which is not installed "
                          f"({exc}): {INSTALL_HINT}") from exc
    if not hasattr(onnx, "helper"):
        raise ImportError(f"'import onnx' found {getattr(onnx, '__file__', onnx)}, not the onnx "
                          f"package: {INSTALL_HINT}")
    return onnx
