"""Numba Elman RNN kernels (tanh or relu): whole-layer forward and BPTT, one compiled call each.

Shape legend: B batch, T time steps, I input size, H hidden size. Math: :mod:`rnnkern.reference`.
The pointwise math of one batch row sits in its own small function (``_fwd_row``, ``_back_row``),
where LLVM vectorises the H loop; ``numba_lstm`` instead runs its gate math over all B*H cells
of a step at once, which pays at small H (not yet done here).
"""
from __future__ import annotations

import numpy as np
from numba import njit

from .numba_math import JIT, add_into, copy_into, tanh, weight_grads


@njit(**JIT)
def _fwd_row(a, g, bias, relu, h, out, H):
    """a [H]: x W_ih^T in, the new hidden state out; g [H] = h W_hh^T; h, out [H] new state."""
    zero = a.dtype.type(0)
    if relu:
        for j in range(H):
            a[j] = max(a[j] + g[j] + bias[j], zero)
    else:
        for j in range(H):
            a[j] = tanh(a[j] + g[j] + bias[j])
    for j in range(H):
        h[j] = a[j]
        out[j] = a[j]


@njit(**JIT)
def _back_row(a, relu, dh, d, H):
    """a [H] the saved new state, dh [H] gradient reaching it; d [H] out: pre-activation grad."""
    zero = a.dtype.type(0)
    one = a.dtype.type(1)
    if relu:
        for j in range(H):
            d[j] = dh[j] if a[j] > zero else zero
    else:
        for j in range(H):
            d[j] = dh[j] * (one - a[j] * a[j])


@njit(**JIT)
def rnn_forward(x, w_ih, w_hh, bias, relu, h0, lengths, out, h, acts, h_prev):
    """Forward over all T steps.

    In:  x [B,T,I], w_ih [H,I], w_hh [H,H], bias [H] (= b_ih + b_hh), relu (bool: relu, else
         tanh), h0 [B,H], lengths int64 [B].
    Out: out [B,T,H]; h [B,H] final state; saved: acts [B,T,H] the new hidden state of step t,
         h_prev [B,T,H] the hidden state entering step t.
    """
    B, T, I = x.shape
    H = h.shape[1]
    np.dot(x.reshape(B * T, I), w_ih.T, acts.reshape(B * T, H))
    copy_into(h.reshape(h.size), h0.reshape(h0.size))
    gh = np.empty((B, H), x.dtype)
    for t in range(T):
        np.dot(h, w_hh.T, gh)
        for b in range(B):
            copy_into(h_prev[b, t], h[b])
            if t < lengths[b]:
                _fwd_row(acts[b, t], gh[b], bias, relu, h[b], out[b, t], H)
            else:
                out[b, t] = 0


@njit(**JIT)
def rnn_backward(x, w_ih, w_hh, relu, acts, h_prev, lengths, d_out, has_d_out,
                 dx, dh, dw_ih, dw_hh, db_ih, db_hh, d_pre):
    """BPTT over all T steps, from the arrays :func:`rnn_forward` saved.

    In:  d_out [B,T,H] (read only if has_d_out); dh [B,H] holds d h_n on entry.
    Out: dx [B,T,I]; dh [B,H] holds d h0 on exit; dw_ih [H,I], dw_hh [H,H], db_ih, db_hh [H];
         d_pre [B,T,H] is scratch (pre-activation gradients).
    """
    B, T, I = x.shape
    H = dh.shape[1]
    dg = np.empty((B, H), x.dtype)
    dh_rec = np.empty((B, H), x.dtype)
    for t in range(T - 1, -1, -1):
        for b in range(B):
            if t >= lengths[b]:
                dg[b] = 0
                d_pre[b, t] = 0
                continue
            if has_d_out:
                add_into(dh[b], d_out[b, t])
            _back_row(acts[b, t], relu, dh[b], dg[b], H)
            copy_into(d_pre[b, t], dg[b])
        np.dot(dg, w_hh, dh_rec)
        for b in range(B):
            if t < lengths[b]:
                copy_into(dh[b], dh_rec[b])
    weight_grads(x, h_prev, d_pre, d_pre, True, w_ih, dx, dw_ih, dw_hh, db_ih, db_hh)
