"""Compiled pieces of the fused training step (:mod:`rnnkern.train_step`), imported lazily.

Shape legend: N = B*T rows, F features entering the dense head (the recurrent H), C classes,
V vocabulary, E input width (one-hot depth or embedding size).

The math is that of :class:`rnnkern.Dense`, :func:`rnnkern.sequence_loss` and
:class:`rnnkern.Embedding` (their docstrings; one row at a time here instead of whole-array NumPy
operations, so sums round in a different order: results agree to float rounding, not bitwise;
float32 softmax uses the fast exp of :mod:`rnnkern.backends.numba_math`, abs error <= 1.5e-7).
Numba's cache does not track that module: see its caveat.
"""
from __future__ import annotations

import numpy as np
from numba import njit

from .backends.numba_math import JIT, exp_nonpos


@njit(**JIT)
def gather_rows(ids, table, out):
    """out[n] = table[ids[n]] for ids [N] (int64), table [V,E], out [N,E].

    Returns -1 when every id lies in [0, V), else the position of the first one outside."""
    V = table.shape[0]
    for n in range(ids.shape[0]):
        if ids[n] < 0 or ids[n] >= V:
            return n
    E = table.shape[1]
    for n in range(ids.shape[0]):   # element loops: a row view per n cost ~4x the copy
        i = ids[n]
        for e in range(E):
            out[n, e] = table[i, e]
    return -1


@njit(**JIT)
def scatter_add_rows(ids, rows, out):
    """out = 0, then out[ids[n]] += rows[n]: an embedding table's gradient. ids [N], rows [N,E]."""
    out[:] = 0
    E = rows.shape[1]
    for n in range(ids.shape[0]):
        i = ids[n]
        for e in range(E):
            out[i, e] += rows[n, e]


@njit(**JIT)
def dense_sequence_loss(h, weight, bias, has_bias, targets, w, has_w, inv_total, d_logits, dw,
                        db, dh):
    """Dense head, sequence_loss and their backward over N rows (all rows, or one chunk of
    them: the loss is a sum over rows, so chunks add up).

    In:  h [N,F], weight [C,F], bias [C] (read if has_bias), targets int64 [N],
         w [N] position weights (read if has_w; else all ones), inv_total = 1 / (sum of all
         weights + 1e-12) over the whole batch.
    Out: d_logits [N,C] (the gradient of the loss w.r.t. the logits; scratch), dw [C,F],
         db [C] (written if has_bias), dh [N,F].
    Returns these rows' share of the loss (float64), or -1 - n when targets[n] is the first
    target outside [0, C).
    """
    N = h.shape[0]
    C = weight.shape[0]
    for n in range(N):
        if targets[n] < 0 or targets[n] >= C:
            return -1.0 - n
    np.dot(h, weight.T, d_logits)                        # logits
    loss = 0.0
    for n in range(N):
        z = d_logits[n]
        if has_bias:
            for j in range(C):
                z[j] += bias[j]
        m = z[0]
        for j in range(1, C):
            m = max(m, z[j])
        shifted_target = z[targets[n]] - m
        for j in range(C):
            z[j] = exp_nonpos(z[j] - m)
        s = z.dtype.type(0)
        for j in range(C):
            s += z[j]
        wn = w[n] if has_w else 1.0
        loss -= wn * (shifted_target - np.log(s))   # log softmax at the target
        scale = z.dtype.type(wn * inv_total) / s
        for j in range(C):
            z[j] *= scale
        z[targets[n]] -= z.dtype.type(wn * inv_total)
    np.dot(d_logits.T, h, dw)
    if has_bias:
        db[:] = 0
        for n in range(N):
            db += d_logits[n]
    np.dot(d_logits, weight, dh)
    return loss * inv_total
