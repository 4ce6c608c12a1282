"""The Numba CPU backend: the seam of :mod:`rnnkern.backends` over compiled kernels.

This module only allocates and dispatches; the kernels live in ``numba_rnn``, ``numba_lstm`` and
``numba_gru`` (shared pieces in ``numba_math``). Importing this module does not import Numba;
the kernel modules are imported on first use, and each kernel compiles on its first call per
dtype (``cache=True``: later processes load it from ``__pycache__``).

Large saved activations and backward scratch come from a pool, and big enough runs are cut
into batch chunks on threads (weight gradients of the chunks are summed): both in
:mod:`rnnkern.backends.numba_runtime`. Results handed to the caller are always fresh arrays.
Input arrives validated (:mod:`rnnkern.backends`): the kernels do not bounds-check, so direct
callers go through :mod:`rnnkern.backends.checked`.

Shape legend: B batch, T time steps, I input size, H hidden size, G gates.
"""
from __future__ import annotations

import importlib

import numpy as np

from .. import config
from .numba_runtime import (POOL, clear_workspaces, launch, one_blas_thread, plan_chunks,
                            run_chunks, saved_record)

__all__ = ["available", "forward", "backward", "clear_workspaces"]

name = "numba"


def available():
    try:
        import numba
    except Exception as exc:  # ImportError, or a broken llvmlite raising something else
        return False, f"numba is not importable: {type(exc).__name__}: {exc}"
    return True, f"Numba {numba.__version__} JIT kernels"


_KERNEL_MODULES = {}


def _kernels(kind):
    """The kernel module of a cell kind, imported on first use (importing Numba with it)."""
    mod = _KERNEL_MODULES.get(kind)
    if mod is None:
        mod = _KERNEL_MODULES[kind] = importlib.import_module(f"rnnkern.backends.numba_{kind}")
    return mod


# ------------------------------------------------------------------------------ the seam

_FULL = {}


def _full_lengths(B, T):
    """An int64 [B] array of T, shared between calls (kernels only read lengths; a read-only
    flag would make Numba compile a second specialisation)."""
    key = (B, T)
    lens = _FULL.get(key)
    if lens is None:
        if len(_FULL) > 64:
            _FULL.clear()
        lens = np.full(B, T, np.int64)
        _FULL[key] = lens
    return lens


def saved_shapes(spec, B, T, H):
    """``{name: shape}`` of the arrays a forward saves for its backward (besides x, weights,
    lengths): ``acts`` [B,T,G*H] and ``h_prev`` [B,T,H] for every cell, plus the cell's own."""
    shapes = {"acts": (B, T, spec.gates * H), "h_prev": (B, T, H)}
    extra = {"lstm": ("c_prev", "tanh_c"), "gru": ("gh_n",) if spec.reset_after else ("rh",),
             "rnn": ()}[spec.kind]
    shapes.update((name, (B, T, H)) for name in extra)
    return shapes


def scratch_shapes(spec, B, T, H):
    """Shapes of the backward's scratch arrays, in the order its kernel takes them."""
    G = spec.gates * H
    if spec.kind == "gru":
        return [(B, T, G), (B, T, G)] if spec.reset_after else [(B, T, 2 * H), (B, T, H)]
    return [(B, T, G)]


def combine_bias(spec, b_ih, b_hh, out):
    """Write the bias the forward kernel adds to the input projection into ``out`` [G*H]:
    ``b_ih + b_hh``, except GRU ``reset_after`` (``b_hh``'s n block stays inside ``r * (...)``,
    so only the r, z blocks combine). Returns ``out``."""
    if spec.kind == "gru" and spec.reset_after:
        two_h = 2 * (b_ih.shape[0] // 3)
        np.add(b_ih[:two_h], b_hh[:two_h], out=out[:two_h])
        out[two_h:] = b_ih[two_h:]
    else:
        np.add(b_ih, b_hh, out=out)
    return out


def forward_call(spec, x, w_ih, w_hh, b_ih, b_hh, h0, c0, lens, out, h, c, saved):
    """The kernel and its ``[(arg, batch_major)]`` list for one layer's forward over arrays the
    caller allocated (``saved``: those of :func:`saved_shapes`)."""
    K = _kernels(spec.kind)
    acts, h_prev = saved["acts"], saved["h_prev"]
    bias = combine_bias(spec, b_ih, b_hh, np.empty_like(b_ih))
    if spec.kind == "lstm":
        return K.lstm_forward, [
            (x, 1), (w_ih, 0), (w_hh, 0), (bias, 0), (x.dtype.type(spec.forget_bias), 0),
            (h0, 1), (c0, 1), (lens, 1), (out, 1), (h, 1), (c, 1), (acts, 1),
            (saved["c_prev"], 1), (saved["tanh_c"], 1), (h_prev, 1)]
    if spec.kind == "gru" and spec.reset_after:
        H = w_hh.shape[1]
        return K.gru_after_forward, [
            (x, 1), (w_ih, 0), (w_hh, 0), (bias, 0), (b_hh[2 * H:], 0), (h0, 1), (lens, 1),
            (out, 1), (h, 1), (acts, 1), (saved["gh_n"], 1), (h_prev, 1)]
    if spec.kind == "gru":
        return K.gru_before_forward, [
            (x, 1), (w_ih, 0), (w_hh, 0), (bias, 0), (h0, 1), (lens, 1), (out, 1),
            (h, 1), (acts, 1), (saved["rh"], 1), (h_prev, 1)]
    return K.rnn_forward, [
        (x, 1), (w_ih, 0), (w_hh, 0), (bias, 0), (spec.nonlinearity == "relu", 0),
        (h0, 1), (lens, 1), (out, 1), (h, 1), (acts, 1), (h_prev, 1)]


def backward_call(spec, x, w_ih, w_hh, lens, saved, d_out, has_d_out, dx, dh, dc):
    """The kernel and its ``[(arg, batch_major)]`` list for one layer's backward, without the
    trailing weight-gradient and scratch arrays (:func:`run_backward` appends those)."""
    K = _kernels(spec.kind)
    head = [(x, 1), (w_ih, 0), (w_hh, 0)]
    tail = [(lens, 1), (d_out, 1), (has_d_out, 0), (dx, 1), (dh, 1)]
    acts, h_prev = saved["acts"], saved["h_prev"]
    if spec.kind == "lstm":
        return K.lstm_backward, head + [(acts, 1), (saved["c_prev"], 1), (saved["tanh_c"], 1),
                                        (h_prev, 1)] + tail + [(dc, 1)]
    if spec.kind == "gru" and spec.reset_after:
        return K.gru_after_backward, head + [(acts, 1), (saved["gh_n"], 1), (h_prev, 1)] + tail
    if spec.kind == "gru":
        return K.gru_before_backward, head + [(acts, 1), (saved["rh"], 1), (h_prev, 1)] + tail
    return K.rnn_backward, head + [(spec.nonlinearity == "relu", 0), (acts, 1), (h_prev, 1)] + tail


def run_backward(kernel, args, chunks, grads, scratch):
    """Run a backward kernel over the forward's batch chunks.

    ``grads`` (dw_ih, dw_hh, db_ih, db_hh) receive the weight gradients: the first chunk's
    written there directly, the others' into temporaries summed in after. ``scratch``: the
    kernel's scratch arrays over the whole batch (each chunk takes its rows).
    """
    values, batched = (list(v) for v in zip(*args))
    if len(chunks) == 1:
        kernel(*values, *grads, *scratch)
        return
    sets = [grads] + [tuple(np.empty_like(g) for g in grads) for _ in chunks[1:]]

    def call(lo, hi):
        k = chunks.index((lo, hi))
        kernel(*[a[lo:hi] if cut else a for a, cut in zip(values, batched)], *sets[k],
               *[a[lo:hi] for a in scratch])
    run_chunks(chunks, call)
    for other in sets[1:]:
        for total, part in zip(grads, other):
            total += part


def forward(spec, x, w_ih, w_hh, b_ih, b_hh, h0, c0=None, lengths=None):
    """See :mod:`rnnkern.backends`: outputs [B,T,H], h_n [B,H], c_n [B,H] | None, saved."""
    B, T, I = x.shape
    H = w_hh.shape[-1]
    GH = spec.gates * H
    dt = x.dtype
    lens = _full_lengths(B, T) if lengths is None else lengths
    out = np.empty((B, T, H), dt)
    h = np.empty((B, H), dt)
    c = np.empty((B, H), dt) if spec.has_cell_state else None
    # arrays too small for the pool skip it (per-call overhead matters at lab sizes)
    take = np.empty if B * T * GH * dt.itemsize < config.NUMBA_POOL_MIN_BYTES else POOL.take
    pooled = {k: take(shape, dt) for k, shape in saved_shapes(spec, B, T, H).items()}
    kernel, args = forward_call(spec, x, w_ih, w_hh, b_ih, b_hh, h0, c0, lens, out, h, c, pooled)
    chunks = plan_chunks(spec, B, T, I, H)
    with one_blas_thread(spec, B, T, I, H):
        launch(kernel, chunks, *zip(*args))
    # the backward must cut the same chunks: the LSTM kernels store a chunk's saved arrays in a
    # private layout (numba_lstm) that only the same chunk boundaries read back correctly
    saved = saved_record(pooled, spec=spec, x=x, w_ih=w_ih, w_hh=w_hh, lengths=lens,
                         chunks=chunks)
    return out, h, c, saved


def backward(spec, saved, d_outputs=None, d_h_n=None, d_c_n=None):
    """See :mod:`rnnkern.backends`: dx [B,T,I], dh0 [B,H], dc0 [B,H] | None, weight grads."""
    x, w_ih, w_hh, lens = saved["x"], saved["w_ih"], saved["w_hh"], saved["lengths"]
    acts = saved["acts"]
    B, T, I = x.shape
    H = w_hh.shape[1]
    dt = x.dtype
    has_d_out = d_outputs is not None
    d_out = d_outputs if has_d_out else np.empty((B, 1, 1), dt)  # never read
    dh = np.zeros((B, H), dt) if d_h_n is None else np.array(d_h_n, dtype=dt, order="C")
    dc = None
    if spec.has_cell_state:
        dc = np.zeros((B, H), dt) if d_c_n is None else np.array(d_c_n, dtype=dt, order="C")
    dx = np.empty(x.shape, dt)
    chunks = saved["chunks"]
    grads = (np.empty_like(w_ih), np.empty_like(w_hh), np.empty(w_ih.shape[0], dt),
             np.empty(w_ih.shape[0], dt))
    take = np.empty if acts.nbytes < config.NUMBA_POOL_MIN_BYTES else POOL.take
    scratch = [take(shape, dt) for shape in scratch_shapes(spec, B, T, H)]
    kernel, args = backward_call(spec, x, w_ih, w_hh, lens, saved, d_out, has_d_out, dx, dh, dc)
    with one_blas_thread(spec, B, T, I, H):
        run_backward(kernel, args, chunks, grads, scratch)
    if take is not np.empty:
        POOL.give(scratch)
    g = dict(zip(("w_ih", "w_hh", "b_ih", "b_hh"), grads))
    return dx, dh, dc, g
