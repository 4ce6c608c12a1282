"""Numba LSTM kernels: a layer's whole forward, and its whole BPTT, each one compiled call.

Shape legend: B batch, T time steps, I input size, H hidden size; gate blocks i, f, g, o (4H).
Math: :mod:`rnnkern.reference`. Outputs are written into caller-allocated arrays (no allocation
in the time loop); ``np.dot`` inside ``@njit`` calls BLAS directly, so the only GEMM per step is
``h @ W_hh^T`` (forward) or ``dG @ W_hh`` (backward); the input projection and the weight
gradients are single GEMMs over all B*T rows outside the loop.

Variable lengths: at ``t >= lengths[b]`` the output row is zero, the state is carried, and the
backward writes zero gate gradients so those steps add nothing to the weight gradients.
"""
from __future__ import annotations

import numpy as np
from numba import njit

from .numba_math import sigmoid, tanh, weight_grads


@njit(cache=True, nogil=True, error_model="numpy")
def lstm_forward(x, w_ih, w_hh, bias, forget_bias, h0, c0, lengths,
                 out, h, c, acts, c_prev, tanh_c, h_prev):
    """Forward over all T steps.

    In:  x [B,T,I], w_ih [4H,I], w_hh [4H,H], bias [4H] (= b_ih + b_hh), forget_bias (x's dtype),
         h0, c0 [B,H], lengths int64 [B].
    Out: out [B,T,H]; h, c [B,H] final state; saved for the backward: acts [B,T,4H] gate
         activations (i,f,g,o), c_prev [B,T,H] cell state entering step t, tanh_c [B,T,H]
         tanh of the cell state leaving step t, h_prev [B,T,H] hidden state entering step t.
    """
    B, T, I = x.shape
    H = h.shape[1]
    zero = x.dtype.type(0)
    # x W_ih^T for all B*T rows at once, written straight into acts (overwritten by activations)
    np.dot(x.reshape(B * T, I), w_ih.T, acts.reshape(B * T, 4 * H))
    h[:] = h0
    c[:] = c0
    gh = np.empty((B, 4 * H), x.dtype)  # h W_hh^T of one step
    for t in range(T):
        np.dot(h, w_hh.T, gh)
        for b in range(B):
            hb, cb = h[b], c[b]
            hp, cp, ob = h_prev[b, t], c_prev[b, t], out[b, t]
            for j in range(H):
                hp[j] = hb[j]
                cp[j] = cb[j]
            if t >= lengths[b]:
                for j in range(H):
                    ob[j] = zero
                continue
            a, g, tc = acts[b, t], gh[b], tanh_c[b, t]
            for j in range(H):
                ig = sigmoid(a[j] + g[j] + bias[j])
                fg = sigmoid(a[H + j] + g[H + j] + bias[H + j] + forget_bias)
                gg = tanh(a[2 * H + j] + g[2 * H + j] + bias[2 * H + j])
                og = sigmoid(a[3 * H + j] + g[3 * H + j] + bias[3 * H + j])
                cn = fg * cb[j] + ig * gg
                tcn = tanh(cn)
                hn = og * tcn
                a[j] = ig
                a[H + j] = fg
                a[2 * H + j] = gg
                a[3 * H + j] = og
                cb[j] = cn
                tc[j] = tcn
                hb[j] = hn
                ob[j] = hn


@njit(cache=True, nogil=True, error_model="numpy")
def lstm_backward(x, w_ih, w_hh, acts, c_prev, tanh_c, h_prev, lengths, d_out, has_d_out,
                  dx, dh, dc, dw_ih, dw_hh, db_ih, db_hh, d_gates):
    """BPTT over all T steps, from the arrays :func:`lstm_forward` saved.

    In:  d_out [B,T,H] (read only if has_d_out); dh, dc [B,H] hold d h_n, d c_n on entry.
    Out: dx [B,T,I]; dh, dc [B,H] hold d h0, d c0 on exit; dw_ih [4H,I], dw_hh [4H,H],
         db_ih, db_hh [4H] (equal for an LSTM); d_gates [B,T,4H] is scratch
         (pre-activation gradients, kept for the weight GEMMs after the loop).
    """
    B, T, I = x.shape
    H = dh.shape[1]
    zero = x.dtype.type(0)
    one = x.dtype.type(1)
    dg = np.empty((B, 4 * H), x.dtype)  # this step's d_gates, contiguous for the GEMM
    dh_rec = np.empty((B, H), x.dtype)  # dg @ W_hh
    for t in range(T - 1, -1, -1):
        for b in range(B):
            D, s = d_gates[b, t], dg[b]
            if t >= lengths[b]:
                for j in range(4 * H):
                    D[j] = zero
                    s[j] = zero
                continue
            dhb, dcb = dh[b], dc[b]
            if has_d_out:
                do = d_out[b, t]
                for j in range(H):
                    dhb[j] += do[j]
            a, cp, tc = acts[b, t], c_prev[b, t], tanh_c[b, t]
            for j in range(H):
                ig, fg, gg, og = a[j], a[H + j], a[2 * H + j], a[3 * H + j]
                tcj = tc[j]
                dct = dcb[j] + dhb[j] * og * (one - tcj * tcj)
                dai = dct * gg * ig * (one - ig)
                daf = dct * cp[j] * fg * (one - fg)
                dag = dct * ig * (one - gg * gg)
                dao = dhb[j] * tcj * og * (one - og)
                D[j] = dai
                D[H + j] = daf
                D[2 * H + j] = dag
                D[3 * H + j] = dao
                s[j] = dai
                s[H + j] = daf
                s[2 * H + j] = dag
                s[3 * H + j] = dao
                dcb[j] = dct * fg
        np.dot(dg, w_hh, dh_rec)
        for b in range(B):
            if t < lengths[b]:
                dh[b] = dh_rec[b]
    weight_grads(x, h_prev, d_gates, d_gates, w_ih, dx, dw_ih, dw_hh, db_ih, db_hh)

