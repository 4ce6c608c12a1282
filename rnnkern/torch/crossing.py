"""Tensors to the arrays the backends take, and back, without copies.

CPU tensors become NumPy arrays over the same memory (``tensor.detach().numpy()``) and results
come back with ``torch.from_numpy``; CUDA tensors become CuPy arrays through DLPack (the ``cuda``
backend then runs, on torch's current stream) and come back the same way. Callers hand in
C-contiguous tensors (the modules make them so before the autograd function).
"""
from __future__ import annotations

import contextlib

import numpy as np
import torch

from rnnkern.device import cupy_module

_CUDA_TENSORS = "rnnkern.torch with CUDA tensors (run on rnnkern's 'cuda' backend)"


def to_array(t):
    """The NumPy (CPU) or CuPy (CUDA) array viewing tensor ``t``'s memory; None stays None."""
    if t is None:
        return None
    t = t.detach()
    if t.device.type == "cpu":
        return t.numpy()
    if t.device.type == "cuda":
        return cupy_module(_CUDA_TENSORS).from_dlpack(t)
    raise ValueError(f"rnnkern.torch runs CPU and CUDA tensors, got a tensor on {t.device}")


def to_tensor(a):
    """The tensor viewing array ``a`` (NumPy or CuPy); None stays None."""
    if a is None:
        return None
    if isinstance(a, np.ndarray):
        return torch.from_numpy(a)
    return torch.from_dlpack(a)


def device_scope(device):
    """A context in which CuPy works on torch ``device`` and torch's current stream there, so
    the kernels queue behind (and ahead of) torch's own work; nothing for the CPU."""
    if device.type != "cuda":
        return contextlib.nullcontext()
    cupy = cupy_module(_CUDA_TENSORS)
    scope = contextlib.ExitStack()
    scope.enter_context(cupy.cuda.Device(device.index))
    scope.enter_context(cupy.cuda.ExternalStream(torch.cuda.current_stream(device).cuda_stream))
    return scope
