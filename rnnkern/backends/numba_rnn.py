"""Numba Elman RNN kernels (tanh or relu): whole-layer forward and BPTT, one compiled call each.

Shape legend: B batch, T time steps, I input size, H hidden size. Math: :mod:`rnnkern.reference`;
structure and length handling as in :mod:`rnnkern.backends.numba_lstm`.
"""
from __future__ import annotations

import numpy as np
from numba import njit

from .numba_math import tanh, weight_grads


@njit(cache=True, nogil=True, error_model="numpy")
def rnn_forward(x, w_ih, w_hh, bias, relu, h0, lengths, out, h, acts, h_prev):
    """Forward over all T steps.

    In:  x [B,T,I], w_ih [H,I], w_hh [H,H], bias [H] (= b_ih + b_hh), relu (bool: relu, else
         tanh), h0 [B,H], lengths int64 [B].
    Out: out [B,T,H]; h [B,H] final state; saved: acts [B,T,H] the new hidden state of step t,
         h_prev [B,T,H] the hidden state entering step t.
    """
    B, T, I = x.shape
    H = h.shape[1]
    zero = x.dtype.type(0)
    np.dot(x.reshape(B * T, I), w_ih.T, acts.reshape(B * T, H))
    h[:] = h0
    gh = np.empty((B, H), x.dtype)
    for t in range(T):
        np.dot(h, w_hh.T, gh)
        for b in range(B):
            hb, hp, ob = h[b], h_prev[b, t], out[b, t]
            for j in range(H):
                hp[j] = hb[j]
            if t >= lengths[b]:
                for j in range(H):
                    ob[j] = zero
                continue
            a, g = acts[b, t], gh[b]
            if relu:
                for j in range(H):
                    a[j] = max(a[j] + g[j] + bias[j], zero)
            else:
                for j in range(H):
                    a[j] = tanh(a[j] + g[j] + bias[j])
            for j in range(H):
                hb[j] = a[j]
                ob[j] = a[j]


@njit(cache=True, nogil=True, error_model="numpy")
def rnn_backward(x, w_ih, w_hh, relu, acts, h_prev, lengths, d_out, has_d_out,
                 dx, dh, dw_ih, dw_hh, db_ih, db_hh, d_pre):
    """BPTT over all T steps, from the arrays :func:`rnn_forward` saved.

    In:  d_out [B,T,H] (read only if has_d_out); dh [B,H] holds d h_n on entry.
    Out: dx [B,T,I]; dh [B,H] holds d h0 on exit; dw_ih [H,I], dw_hh [H,H], db_ih, db_hh [H];
         d_pre [B,T,H] is scratch (pre-activation gradients).
    """
    B, T, I = x.shape
    H = dh.shape[1]
    zero = x.dtype.type(0)
    one = x.dtype.type(1)
    dg = np.empty((B, H), x.dtype)
    dh_rec = np.empty((B, H), x.dtype)
    for t in range(T - 1, -1, -1):
        for b in range(B):
            D, s = d_pre[b, t], dg[b]
            if t >= lengths[b]:
                for j in range(H):
                    D[j] = zero
                    s[j] = zero
                continue
            dhb = dh[b]
            if has_d_out:
                do = d_out[b, t]
                for j in range(H):
                    dhb[j] += do[j]
            a = acts[b, t]
            if relu:
                for j in range(H):
                    s[j] = dhb[j] if a[j] > zero else zero
            else:
                for j in range(H):
                    s[j] = dhb[j] * (one - a[j] * a[j])
            for j in range(H):
                D[j] = s[j]
        np.dot(dg, w_hh, dh_rec)
        for b in range(B):
            if t < lengths[b]:
                dh[b] = dh_rec[b]
    weight_grads(x, h_prev, d_pre, d_pre, w_ih, dx, dw_ih, dw_hh, db_ih, db_hh)
