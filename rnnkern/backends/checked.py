"""The seam with every argument checked, for callers of a backend's ``forward`` / ``backward``
other than the layer API (tests, experiments).

The layer API validates its input once and calls the backends directly; the backends then trust
the arrays (the Numba kernels do not bounds-check, the C++ bindings check only what keeps their
kernels in bounds). This wrapper does the layer's checks for a direct call, with errors naming
the argument, and remembers each forward's shapes so that its backward's gradients are checked
too. Shape legend: B batch, T time steps, I input size, H hidden size, G gates.

    >>> from rnnkern.backends import checked
    >>> out, h_n, c_n, saved = checked.forward("numba", spec, x, w_ih, w_hh, b_ih, b_hh, h0, c0)
    >>> dx, dh0, dc0, grads = checked.backward(saved, d_outputs)
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from . import get_backend


@dataclass(frozen=True)
class Saved:
    """A checked forward's record: its backend, spec, shapes and the backend's own saved."""

    backend: object
    spec: object
    B: int
    T: int
    H: int
    dtype: np.dtype
    xp: object
    inner: object


def _module(backend):
    return get_backend(backend) if isinstance(backend, str) else backend


def _array_module(backend):
    if backend.name == "cuda":
        import cupy
        return cupy
    return np


def _check(xp, dtype, name, a, shape, optional=False):
    if a is None:
        if optional:
            return
        raise ValueError(f"{name} must be an array, got None")
    if not isinstance(a, xp.ndarray):
        raise TypeError(f"{name} must be a {xp.__name__} array, got {type(a).__name__}")
    if a.dtype != dtype:
        raise TypeError(f"{name} must have dtype {np.dtype(dtype).name}, got {a.dtype}")
    if tuple(a.shape) != tuple(shape):
        raise ValueError(f"{name} must have shape {list(shape)}, got {list(a.shape)}")
    if not a.flags.c_contiguous:
        raise ValueError(f"{name} must be C-contiguous")


def forward(backend, spec, x, w_ih, w_hh, b_ih, b_hh, h0, c0=None, lengths=None):
    """``backend.forward`` (a name or module) after checking every argument; returns
    ``(outputs [B,T,H], h_n [B,H], c_n [B,H] | None, saved)``."""
    mod = _module(backend)
    xp = _array_module(mod)
    if not isinstance(x, xp.ndarray) or x.ndim != 3:
        raise ValueError(f"x must be a 3-D {xp.__name__} array [B,T,I]")
    if x.dtype not in (np.float32, np.float64):
        raise TypeError(f"x must have dtype float32 or float64, got {x.dtype}")
    B, T, I = x.shape
    if not isinstance(w_hh, xp.ndarray) or w_hh.ndim != 2:
        raise ValueError("w_hh must be a 2-D array [G*H,H]")
    H, GH, dt = w_hh.shape[1], spec.gates * w_hh.shape[1], x.dtype
    for name, a, shape in (("x", x, (B, T, I)), ("w_ih", w_ih, (GH, I)), ("w_hh", w_hh, (GH, H)),
                           ("b_ih", b_ih, (GH,)), ("b_hh", b_hh, (GH,)), ("h0", h0, (B, H))):
        _check(xp, dt, name, a, shape)
    if spec.has_cell_state:
        _check(xp, dt, "c0", c0, (B, H))
    elif c0 is not None:
        raise ValueError(f"c0 is for the LSTM only; pass None for a {spec.kind.upper()}")
    if lengths is not None:
        _check(xp, np.int64, "lengths", lengths, (B,))
        if B and (int(lengths.min()) < 0 or int(lengths.max()) > T):
            raise ValueError(f"lengths must lie in [0, T] = [0, {T}]")
    out, h_n, c_n, inner = mod.forward(spec, x, w_ih, w_hh, b_ih, b_hh, h0, c0, lengths)
    return out, h_n, c_n, Saved(mod, spec, B, T, H, dt, xp, inner)


def backward(saved, d_outputs=None, d_h_n=None, d_c_n=None):
    """``backend.backward`` for a :func:`forward`'s ``saved`` after checking the gradients;
    returns ``(dx, dh0, dc0 | None, {"w_ih", "w_hh", "b_ih", "b_hh"})``."""
    if not isinstance(saved, Saved):
        raise TypeError("saved must be what rnnkern.backends.checked.forward returned")
    s, xp = saved, saved.xp
    _check(xp, s.dtype, "d_outputs", d_outputs, (s.B, s.T, s.H), optional=True)
    _check(xp, s.dtype, "d_h_n", d_h_n, (s.B, s.H), optional=True)
    if s.spec.has_cell_state:
        _check(xp, s.dtype, "d_c_n", d_c_n, (s.B, s.H), optional=True)
    elif d_c_n is not None:
        raise ValueError(f"d_c_n is for the LSTM only; pass None for a {s.spec.kind.upper()}")
    return s.backend.backward(s.spec, s.inner, d_outputs, d_h_n, d_c_n)
