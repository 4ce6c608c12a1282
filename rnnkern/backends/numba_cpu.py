"""The Numba CPU backend: the seam of :mod:`rnnkern.backends` over compiled kernels.

This module only allocates results and dispatches; the kernels live in ``numba_rnn``,
``numba_lstm`` and ``numba_gru`` (shared pieces in ``numba_math``). Importing this module does not
import Numba; the kernel modules are imported on first use, and each kernel compiles on its first
call per dtype (``cache=True``: later processes load it from ``__pycache__``).

Shape legend: B batch, T time steps, I input size, H hidden size, G gates.
"""
from __future__ import annotations

import importlib

import numpy as np

name = "numba"


def available():
    try:
        import numba
    except Exception as exc:  # ImportError, or a broken llvmlite raising something else
        return False, f"numba is not importable: {type(exc).__name__}: {exc}"
    return True, f"Numba {numba.__version__} JIT kernels"


def _kernels(kind):
    return importlib.import_module(f"rnnkern.backends.numba_{kind}")


def forward(spec, x, w_ih, w_hh, b_ih, b_hh, h0, c0=None, lengths=None):
    """See :mod:`rnnkern.backends`: outputs [B,T,H], h_n [B,H], c_n [B,H] | None, saved."""
    B, T, _ = x.shape
    H = w_hh.shape[1]
    G = spec.gates
    dt = x.dtype
    lens = np.full(B, T, np.int64) if lengths is None else lengths
    out = np.empty((B, T, H), dt)
    h = np.empty((B, H), dt)
    c = None
    acts = np.empty((B, T, G * H), dt)       # input projection, then gate activations
    h_prev = np.empty((B, T, H), dt)
    saved = dict(spec=spec, x=x, w_ih=w_ih, w_hh=w_hh, lengths=lens, acts=acts, h_prev=h_prev)
    K = _kernels(spec.kind)
    if spec.kind == "lstm":
        c = np.empty((B, H), dt)
        saved["c_prev"] = c_prev = np.empty((B, T, H), dt)
        saved["tanh_c"] = tanh_c = np.empty((B, T, H), dt)
        K.lstm_forward(x, w_ih, w_hh, b_ih + b_hh, dt.type(spec.forget_bias), h0, c0, lens,
                       out, h, c, acts, c_prev, tanh_c, h_prev)
    elif spec.kind == "gru" and spec.reset_after:
        bias = b_ih.copy()
        bias[:2 * H] += b_hh[:2 * H]
        saved["gh_n"] = gh_n = np.empty((B, T, H), dt)
        K.gru_after_forward(x, w_ih, w_hh, bias, np.ascontiguousarray(b_hh[2 * H:]), h0, lens,
                            out, h, acts, gh_n, h_prev)
    elif spec.kind == "gru":
        saved["rh"] = rh = np.empty((B, T, H), dt)
        K.gru_before_forward(x, w_ih, w_hh, b_ih + b_hh, h0, lens, out, h, acts, rh, h_prev)
    else:
        K.rnn_forward(x, w_ih, w_hh, b_ih + b_hh, spec.nonlinearity == "relu", h0, lens,
                      out, h, acts, h_prev)
    return out, h, c, saved


def backward(spec, saved, d_outputs=None, d_h_n=None, d_c_n=None):
    """See :mod:`rnnkern.backends`: dx [B,T,I], dh0 [B,H], dc0 [B,H] | None, weight grads."""
    x, w_ih, w_hh, lens = saved["x"], saved["w_ih"], saved["w_hh"], saved["lengths"]
    acts, h_prev = saved["acts"], saved["h_prev"]
    B, T, _ = x.shape
    H = w_hh.shape[1]
    dt = x.dtype
    has_d_out = d_outputs is not None
    d_out = d_outputs if has_d_out else np.empty((1, 1, 1), dt)  # never read
    dh = np.zeros((B, H), dt) if d_h_n is None else np.array(d_h_n, dtype=dt, order="C")
    dc = None
    dx = np.empty(x.shape, dt)
    g = dict(w_ih=np.empty_like(w_ih), w_hh=np.empty_like(w_hh),
             b_ih=np.empty(w_ih.shape[0], dt), b_hh=np.empty(w_ih.shape[0], dt))
    K = _kernels(spec.kind)
    common = (dx, dh)
    grads = (g["w_ih"], g["w_hh"], g["b_ih"], g["b_hh"])
    if spec.kind == "lstm":
        dc = np.zeros((B, H), dt) if d_c_n is None else np.array(d_c_n, dtype=dt, order="C")
        K.lstm_backward(x, w_ih, w_hh, acts, saved["c_prev"], saved["tanh_c"], h_prev, lens,
                        d_out, has_d_out, *common, dc, *grads, np.empty_like(acts))
    elif spec.kind == "gru" and spec.reset_after:
        K.gru_after_backward(x, w_ih, w_hh, acts, saved["gh_n"], h_prev, lens, d_out,
                             has_d_out, *common, *grads, np.empty_like(acts),
                             np.empty_like(acts))
    elif spec.kind == "gru":
        K.gru_before_backward(x, w_ih, w_hh, acts, saved["rh"], h_prev, lens, d_out, has_d_out,
                              *common, *grads, np.empty((B, T, 2 * H), dt),
                              np.empty((B, T, H), dt))
    else:
        K.rnn_backward(x, w_ih, w_hh, spec.nonlinearity == "relu", acts, h_prev, lens, d_out,
                       has_d_out, *common, *grads, np.empty_like(acts))
    return dx, dh, dc, g
