"""Numba GRU kernels, both conventions: whole-layer forward and BPTT, one compiled call each.

Shape legend: B batch, T time steps, I input size, H hidden size; gate blocks r, z, n (3H).
Math: :mod:`rnnkern.reference`; structure and length handling as in
:mod:`rnnkern.backends.numba_lstm`.

``reset_after=True`` (PyTorch/cuDNN): one GEMM per step, ``h W_hh^T``, and ``b_hn`` stays inside
``r * (W_hn h + b_hn)``. ``reset_after=False`` (TF1): two GEMMs per step, because the n block
multiplies ``r h``, which needs r first; every bias folds into the input projection.
"""
from __future__ import annotations

import numpy as np
from numba import njit

from .numba_math import column_sums, sigmoid, tanh, weight_grads


@njit(cache=True, nogil=True, error_model="numpy")
def gru_after_forward(x, w_ih, w_hh, bias, b_hn, h0, lengths, out, h, acts, gh_n, h_prev):
    """Forward over all T steps, ``reset_after=True``.

    In:  x [B,T,I], w_ih [3H,I], w_hh [3H,H], bias [3H] (b_ih, plus b_hh for the r and z
         blocks), b_hn [H] (the n block of b_hh), h0 [B,H], lengths int64 [B].
    Out: out [B,T,H]; h [B,H] final state; saved: acts [B,T,3H] gate activations (r,z,n),
         gh_n [B,T,H] = h W_hn^T + b_hn, h_prev [B,T,H] the hidden state entering step t.
    """
    B, T, I = x.shape
    H = h.shape[1]
    zero = x.dtype.type(0)
    one = x.dtype.type(1)
    np.dot(x.reshape(B * T, I), w_ih.T, acts.reshape(B * T, 3 * H))
    h[:] = h0
    gh = np.empty((B, 3 * H), x.dtype)
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
            a, g, ghn = acts[b, t], gh[b], gh_n[b, t]
            for j in range(H):
                r = sigmoid(a[j] + g[j] + bias[j])
                z = sigmoid(a[H + j] + g[H + j] + bias[H + j])
                hn = g[2 * H + j] + b_hn[j]
                n = tanh(a[2 * H + j] + bias[2 * H + j] + r * hn)
                hnew = (one - z) * n + z * hb[j]
                a[j] = r
                a[H + j] = z
                a[2 * H + j] = n
                ghn[j] = hn
                hb[j] = hnew
                ob[j] = hnew


@njit(cache=True, nogil=True, error_model="numpy")
def gru_after_backward(x, w_ih, w_hh, acts, gh_n, h_prev, lengths, d_out, has_d_out,
                       dx, dh, dw_ih, dw_hh, db_ih, db_hh, d_gx, d_gh):
    """BPTT over all T steps, ``reset_after=True``, from what :func:`gru_after_forward` saved.

    In:  d_out [B,T,H] (read only if has_d_out); dh [B,H] holds d h_n on entry.
    Out: dx [B,T,I]; dh [B,H] holds d h0 on exit; dw_ih [3H,I], dw_hh [3H,H], db_ih, db_hh [3H].
         Scratch: d_gx, d_gh [B,T,3H] gradients of the input- and hidden-side pre-activations
         (they differ in the n block by the factor r).
    """
    B, T, I = x.shape
    H = dh.shape[1]
    zero = x.dtype.type(0)
    one = x.dtype.type(1)
    dg = np.empty((B, 3 * H), x.dtype)  # this step's d_gh, contiguous for the GEMM
    dh_z = np.empty((B, H), x.dtype)    # the direct path dh * z
    dh_rec = np.empty((B, H), x.dtype)
    for t in range(T - 1, -1, -1):
        for b in range(B):
            Dx, Dh, s = d_gx[b, t], d_gh[b, t], dg[b]
            if t >= lengths[b]:
                for j in range(3 * H):
                    Dx[j] = zero
                    Dh[j] = zero
                    s[j] = zero
                continue
            dhb = dh[b]
            if has_d_out:
                do = d_out[b, t]
                for j in range(H):
                    dhb[j] += do[j]
            a, ghn, hp, dz = acts[b, t], gh_n[b, t], h_prev[b, t], dh_z[b]
            for j in range(H):
                r, z, n = a[j], a[H + j], a[2 * H + j]
                dht = dhb[j]
                dan = dht * (one - z) * (one - n * n)
                daz = dht * (hp[j] - n) * z * (one - z)
                dar = dan * ghn[j] * r * (one - r)
                Dx[j] = dar
                Dx[H + j] = daz
                Dx[2 * H + j] = dan
                Dh[j] = dar
                Dh[H + j] = daz
                Dh[2 * H + j] = dan * r
                s[j] = dar
                s[H + j] = daz
                s[2 * H + j] = dan * r
                dz[j] = dht * z
        np.dot(dg, w_hh, dh_rec)
        for b in range(B):
            if t < lengths[b]:
                for j in range(H):
                    dh[b, j] = dh_rec[b, j] + dh_z[b, j]
    weight_grads(x, h_prev, d_gx, d_gh, w_ih, dx, dw_ih, dw_hh, db_ih, db_hh)


@njit(cache=True, nogil=True, error_model="numpy")
def gru_before_forward(x, w_ih, w_hh, bias, h0, lengths, out, h, acts, rh, h_prev):
    """Forward over all T steps, ``reset_after=False`` (TF1 ``GRUCell``).

    In:  x [B,T,I], w_ih [3H,I], w_hh [3H,H], bias [3H] (= b_ih + b_hh), h0 [B,H],
         lengths int64 [B].
    Out: out [B,T,H]; h [B,H] final state; saved: acts [B,T,3H] gate activations (r,z,n),
         rh [B,T,H] = r * h_prev (what W_hn multiplied), h_prev [B,T,H].
    """
    B, T, I = x.shape
    H = h.shape[1]
    zero = x.dtype.type(0)
    one = x.dtype.type(1)
    w_rz, w_n = w_hh[:2 * H], w_hh[2 * H:]
    np.dot(x.reshape(B * T, I), w_ih.T, acts.reshape(B * T, 3 * H))
    h[:] = h0
    g_rz = np.empty((B, 2 * H), x.dtype)
    rh_t = np.empty((B, H), x.dtype)
    g_n = np.empty((B, H), x.dtype)
    for t in range(T):
        np.dot(h, w_rz.T, g_rz)
        for b in range(B):
            hb, hp, rhs, rhb = h[b], h_prev[b, t], rh_t[b], rh[b, t]
            for j in range(H):
                hp[j] = hb[j]
            if t >= lengths[b]:
                for j in range(H):
                    rhs[j] = zero
                    rhb[j] = zero  # finite: the dW_hh GEMM multiplies it by a zero gradient
                continue
            a, g = acts[b, t], g_rz[b]
            for j in range(H):
                r = sigmoid(a[j] + g[j] + bias[j])
                a[j] = r
                a[H + j] = sigmoid(a[H + j] + g[H + j] + bias[H + j])
                rhs[j] = r * hb[j]
                rhb[j] = rhs[j]
        np.dot(rh_t, w_n.T, g_n)
        for b in range(B):
            hb, ob = h[b], out[b, t]
            if t >= lengths[b]:
                for j in range(H):
                    ob[j] = zero
                continue
            a, g = acts[b, t], g_n[b]
            for j in range(H):
                z = a[H + j]
                n = tanh(a[2 * H + j] + g[j] + bias[2 * H + j])
                hnew = (one - z) * n + z * hb[j]
                a[2 * H + j] = n
                hb[j] = hnew
                ob[j] = hnew


@njit(cache=True, nogil=True, error_model="numpy")
def gru_before_backward(x, w_ih, w_hh, acts, rh, h_prev, lengths, d_out, has_d_out,
                        dx, dh, dw_ih, dw_hh, db_ih, db_hh, d_rz, d_n):
    """BPTT over all T steps, ``reset_after=False``, from what :func:`gru_before_forward` saved.

    In:  d_out [B,T,H] (read only if has_d_out); dh [B,H] holds d h_n on entry.
    Out: dx [B,T,I]; dh [B,H] holds d h0 on exit; dw_ih [3H,I], dw_hh [3H,H], db_ih, db_hh [3H].
         Scratch: d_rz [B,T,2H], d_n [B,T,H] pre-activation gradients of the r,z and n blocks
         (separate arrays because W_hn's input, r h, differs from the other blocks' input, h).
    """
    B, T, I = x.shape
    H = dh.shape[1]
    zero = x.dtype.type(0)
    one = x.dtype.type(1)
    w_rz, w_n = w_hh[:2 * H], w_hh[2 * H:]
    s_n = np.empty((B, H), x.dtype)        # this step's d_n
    s_rz = np.empty((B, 2 * H), x.dtype)   # this step's d_rz
    d_rh = np.empty((B, H), x.dtype)       # d (r h) = d_n W_hn
    direct = np.empty((B, H), x.dtype)     # dh * z + d_rh * r
    dh_rec = np.empty((B, H), x.dtype)
    for t in range(T - 1, -1, -1):
        for b in range(B):
            Drz, Dn, sn, srz = d_rz[b, t], d_n[b, t], s_n[b], s_rz[b]
            if t >= lengths[b]:
                for j in range(H):
                    Dn[j] = zero
                    sn[j] = zero
                for j in range(2 * H):
                    Drz[j] = zero
                    srz[j] = zero
                continue
            dhb = dh[b]
            if has_d_out:
                do = d_out[b, t]
                for j in range(H):
                    dhb[j] += do[j]
            a, hp, dr = acts[b, t], h_prev[b, t], direct[b]
            for j in range(H):
                z, n = a[H + j], a[2 * H + j]
                dht = dhb[j]
                dan = dht * (one - z) * (one - n * n)
                daz = dht * (hp[j] - n) * z * (one - z)
                Dn[j] = dan
                sn[j] = dan
                Drz[H + j] = daz
                srz[H + j] = daz
                dr[j] = dht * z
        np.dot(s_n, w_n, d_rh)
        for b in range(B):
            if t >= lengths[b]:
                continue
            a, hp, Drz, srz, dr, drh = acts[b, t], h_prev[b, t], d_rz[b, t], s_rz[b], \
                direct[b], d_rh[b]
            for j in range(H):
                r = a[j]
                dar = drh[j] * hp[j] * r * (one - r)
                Drz[j] = dar
                srz[j] = dar
                dr[j] += drh[j] * r
        np.dot(s_rz, w_rz, dh_rec)
        for b in range(B):
            if t < lengths[b]:
                for j in range(H):
                    dh[b, j] = dh_rec[b, j] + direct[b, j]
    # weight gradients, one GEMM per gate group over all B*T rows
    BT = B * T
    X, D_rz, D_n = x.reshape(BT, I), d_rz.reshape(BT, 2 * H), d_n.reshape(BT, H)
    dX = dx.reshape(BT, I)
    np.dot(D_rz, w_ih[:2 * H], dX)
    dX += np.dot(D_n, w_ih[2 * H:])
    np.dot(D_rz.T, X, dw_ih[:2 * H])
    np.dot(D_n.T, X, dw_ih[2 * H:])
    np.dot(D_rz.T, h_prev.reshape(BT, H), dw_hh[:2 * H])
    np.dot(D_n.T, rh.reshape(BT, H), dw_hh[2 * H:])
    column_sums(D_rz, db_ih[:2 * H])
    column_sums(D_n, db_ih[2 * H:])
    db_hh[:] = db_ih
