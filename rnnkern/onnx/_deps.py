"""The real ``onnx`` package, imported on first use with a clear error when it is missing.

Every module here imports ``onnx`` absolutely (Python 3 has no implicit relative imports), so
``import onnx`` inside ``rnnkern/onnx/`` gets the top-level package, not this one. The check in
:func:`require` also catches the one way it could still go wrong: a ``sys.path`` entry that is
``rnnkern/`` itself, where ``import onnx`` would find this folder.
"""
from __future__ import annotations

import importlib
import os

INSTALL_HINT = "pip install 'rnnkern[onnx]' (or pip install onnx onnxruntime)"


def require():
    """The ``onnx`` module; ImportError naming the fix when it is missing or shadowed."""
    try:
        onnx = importlib.import_module("onnx")
    except ImportError as exc:
        raise ImportError(f"rnnkern.onnx needs the onnx package, which is not installed "
                          f"({exc}): {INSTALL_HINT}") from exc
    here = os.path.dirname(os.path.abspath(__file__))
    where = os.path.dirname(os.path.abspath(getattr(onnx, "__file__", "") or here))
    if where == here or not hasattr(onnx, "helper"):
        raise ImportError(f"'import onnx' found {where}, not the onnx package: a sys.path entry "
                          f"points inside rnnkern/; run from elsewhere, and {INSTALL_HINT}")
    return onnx
