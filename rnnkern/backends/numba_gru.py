"""Numba GRU kernels, both conventions: whole-layer forward and BPTT, one compiled call each.

Shape legend: B batch, T time steps, I input size, H hidden size; gate blocks r, z, n (3H).
Math: :mod:`rnnkern.reference`. The pointwise math of one batch row sits in its own small
function (``_*_row*``), where LLVM vectorises the H loop; ``numba_lstm`` instead runs its gate
math over all B*H cells of a step at once, which pays at small H (not yet done here).

``reset_after=True`` (PyTorch/cuDNN): one GEMM per step, ``h W_hh^T``, and ``b_hn`` stays inside
``r * (W_hn h + b_hn)``. ``reset_after=False`` (TF1): two GEMMs per step, because the n block
multiplies ``r h``, which needs r first; every bias folds into the input projection.
"""
from __future__ import annotations

import numpy as np
from numba import njit

from .numba_math import JIT, add_into, copy_into, column_sums, sigmoid, tanh, weight_grads


# ------------------------------------------------------------------------- reset_after=True

@njit(**JIT)
def _after_fwd_row(a, g, bias, b_hn, gh_n, h, out, H):
    """a [3H]: x W_ih^T in, r,z,n out; g [3H] = h W_hh^T; gh_n [H] out: W_hn h + b_hn;
    h [H]: state in, new state out; out [H] new state."""
    one = a.dtype.type(1)
    for j in range(H):
        r = sigmoid(a[j] + g[j] + bias[j])
        z = sigmoid(a[H + j] + g[H + j] + bias[H + j])
        hn = g[2 * H + j] + b_hn[j]
        n = tanh(a[2 * H + j] + bias[2 * H + j] + r * hn)
        hnew = (one - z) * n + z * h[j]
        a[j] = r
        a[H + j] = z
        a[2 * H + j] = n
        gh_n[j] = hn
        h[j] = hnew
        out[j] = hnew


@njit(**JIT)
def _after_back_row(a, gh_n, h_prev, dh, d_gx, d_gh, dh_z, H):
    """dh [H] total gradient reaching h_t; out: d_gx, d_gh [3H] pre-activation gradients of
    the input and hidden sides; dh_z [H] = dh * z, the direct path to h_{t-1}."""
    one = a.dtype.type(1)
    for j in range(H):
        r, z, n = a[j], a[H + j], a[2 * H + j]
        dht = dh[j]
        dan = dht * (one - z) * (one - n * n)
        daz = dht * (h_prev[j] - n) * z * (one - z)
        dar = dan * gh_n[j] * r * (one - r)
        d_gx[j] = dar
        d_gx[H + j] = daz
        d_gx[2 * H + j] = dan
        d_gh[j] = dar
        d_gh[H + j] = daz
        d_gh[2 * H + j] = dan * r
        dh_z[j] = dht * z


@njit(**JIT)
def gru_after_forward(x, w_ih, w_hh, bias, b_hn, h0, lengths, out, h, acts, gh_n, h_prev):
    """Forward over all T steps, ``reset_after=True``.

    In:  x [B,T,I], w_ih [3H,I], w_hh [3H,H], bias [3H] (b_ih, plus b_hh for the r and z
         blocks), b_hn [H] (the n block of b_hh), h0 [B,H], lengths int64 [B].
    Out: out [B,T,H]; h [B,H] final state; saved: acts [B,T,3H] gate activations (r,z,n),
         gh_n [B,T,H] = h W_hn^T + b_hn, h_prev [B,T,H] the hidden state entering step t.
    """
    B, T, I = x.shape
    H = h.shape[1]
    np.dot(x.reshape(B * T, I), w_ih.T, acts.reshape(B * T, 3 * H))
    copy_into(h.reshape(h.size), h0.reshape(h0.size))
    gh = np.empty((B, 3 * H), x.dtype)
    for t in range(T):
        np.dot(h, w_hh.T, gh)
        for b in range(B):
            copy_into(h_prev[b, t], h[b])
            if t < lengths[b]:
                _after_fwd_row(acts[b, t], gh[b], bias, b_hn, gh_n[b, t], h[b], out[b, t], H)
            else:
                out[b, t] = 0


@njit(**JIT)
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
    dg = np.empty((B, 3 * H), x.dtype)  # this step's d_gh, contiguous for the GEMM
    dh_z = np.empty((B, H), x.dtype)    # the direct path dh * z
    dh_rec = np.empty((B, H), x.dtype)
    for t in range(T - 1, -1, -1):
        for b in range(B):
            if t >= lengths[b]:
                dg[b] = 0
                d_gx[b, t] = 0
                d_gh[b, t] = 0
                continue
            if has_d_out:
                add_into(dh[b], d_out[b, t])
            _after_back_row(acts[b, t], gh_n[b, t], h_prev[b, t], dh[b], d_gx[b, t], dg[b],
                            dh_z[b], H)
            copy_into(d_gh[b, t], dg[b])
        np.dot(dg, w_hh, dh_rec)
        for b in range(B):
            if t < lengths[b]:
                copy_into(dh[b], dh_rec[b])
                add_into(dh[b], dh_z[b])
    weight_grads(x, h_prev, d_gx, d_gh, False, w_ih, dx, dw_ih, dw_hh, db_ih, db_hh)


# ------------------------------------------------------------------------ reset_after=False

@njit(**JIT)
def _before_fwd_row_rz(a, g, bias, h, rh, H):
    """a [3H]: r and z blocks from x W_ih^T to activations; g [2H] = h W_hrz^T; rh [H] = r h."""
    for j in range(H):
        r = sigmoid(a[j] + g[j] + bias[j])
        a[j] = r
        a[H + j] = sigmoid(a[H + j] + g[H + j] + bias[H + j])
        rh[j] = r * h[j]


@njit(**JIT)
def _before_fwd_row_n(a, g, bias, h, out, H):
    """a [3H]: n block to its activation; g [H] = (r h) W_hn^T; h, out [H]: the new state."""
    one = a.dtype.type(1)
    for j in range(H):
        z = a[H + j]
        n = tanh(a[2 * H + j] + g[j] + bias[2 * H + j])
        hnew = (one - z) * n + z * h[j]
        a[2 * H + j] = n
        h[j] = hnew
        out[j] = hnew


@njit(**JIT)
def _before_back_row_nz(a, h_prev, dh, d_n, d_rz, direct, H):
    """dh [H] total gradient reaching h_t; out: d_n [H], the z half of d_rz [2H], and
    direct [H] = dh * z (the path to h_{t-1} that skips the GEMMs)."""
    one = a.dtype.type(1)
    for j in range(H):
        z, n = a[H + j], a[2 * H + j]
        dht = dh[j]
        d_n[j] = dht * (one - z) * (one - n * n)
        d_rz[H + j] = dht * (h_prev[j] - n) * z * (one - z)
        direct[j] = dht * z


@njit(**JIT)
def _before_back_row_r(a, h_prev, d_rh, d_rz, direct, H):
    """d_rh [H] = d_n W_hn, gradient reaching r h; out: the r half of d_rz [2H], and
    direct [H] += d_rh * r."""
    one = a.dtype.type(1)
    for j in range(H):
        r = a[j]
        d_rz[j] = d_rh[j] * h_prev[j] * r * (one - r)
        direct[j] += d_rh[j] * r


@njit(**JIT)
def gru_before_forward(x, w_ih, w_hh, bias, h0, lengths, out, h, acts, rh, h_prev):
    """Forward over all T steps, ``reset_after=False`` (TF1 ``GRUCell``).

    In:  x [B,T,I], w_ih [3H,I], w_hh [3H,H], bias [3H] (= b_ih + b_hh), h0 [B,H],
         lengths int64 [B].
    Out: out [B,T,H]; h [B,H] final state; saved: acts [B,T,3H] gate activations (r,z,n),
         rh [B,T,H] = r * h_prev (what W_hn multiplied), h_prev [B,T,H].
    """
    B, T, I = x.shape
    H = h.shape[1]
    w_rz, w_n = w_hh[:2 * H], w_hh[2 * H:]
    np.dot(x.reshape(B * T, I), w_ih.T, acts.reshape(B * T, 3 * H))
    copy_into(h.reshape(h.size), h0.reshape(h0.size))
    g_rz = np.empty((B, 2 * H), x.dtype)
    rh_t = np.empty((B, H), x.dtype)
    g_n = np.empty((B, H), x.dtype)
    for t in range(T):
        np.dot(h, w_rz.T, g_rz)
        for b in range(B):
            copy_into(h_prev[b, t], h[b])
            if t < lengths[b]:
                _before_fwd_row_rz(acts[b, t], g_rz[b], bias, h[b], rh_t[b], H)
            else:
                rh_t[b] = 0  # finite: the dW_hh GEMM multiplies it by a zero gradient
            copy_into(rh[b, t], rh_t[b])
        np.dot(rh_t, w_n.T, g_n)
        for b in range(B):
            if t < lengths[b]:
                _before_fwd_row_n(acts[b, t], g_n[b], bias, h[b], out[b, t], H)
            else:
                out[b, t] = 0


@njit(**JIT)
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
    w_rz, w_n = w_hh[:2 * H], w_hh[2 * H:]
    s_n = np.empty((B, H), x.dtype)        # this step's d_n
    s_rz = np.empty((B, 2 * H), x.dtype)   # this step's d_rz
    d_rh = np.empty((B, H), x.dtype)       # d (r h) = d_n W_hn
    direct = np.empty((B, H), x.dtype)     # dh * z + d_rh * r
    dh_rec = np.empty((B, H), x.dtype)
    for t in range(T - 1, -1, -1):
        for b in range(B):
            if t >= lengths[b]:
                s_n[b] = 0
                s_rz[b] = 0
                d_n[b, t] = 0
                d_rz[b, t] = 0
                continue
            if has_d_out:
                add_into(dh[b], d_out[b, t])
            _before_back_row_nz(acts[b, t], h_prev[b, t], dh[b], s_n[b], s_rz[b], direct[b], H)
            copy_into(d_n[b, t], s_n[b])
        np.dot(s_n, w_n, d_rh)
        for b in range(B):
            if t < lengths[b]:
                _before_back_row_r(acts[b, t], h_prev[b, t], d_rh[b], s_rz[b], direct[b], H)
                copy_into(d_rz[b, t], s_rz[b])
        np.dot(s_rz, w_rz, dh_rec)
        for b in range(B):
            if t < lengths[b]:
                copy_into(dh[b], dh_rec[b])
                add_into(dh[b], direct[b])
    # weight gradients, one GEMM per gate group over all B*T rows
    BT = B * T
    X, D_rz, D_n = x.reshape(BT, I), d_rz.reshape(BT, 2 * H), d_n.reshape(BT, H)
    dX = dx.reshape(BT, I)
    np.dot(D_rz, w_ih[:2 * H], dX)
    add_into(dX.reshape(BT * I), np.dot(D_n, w_ih[2 * H:]).reshape(BT * I))
    np.dot(D_rz.T, X, dw_ih[:2 * H])
    np.dot(D_n.T, X, dw_ih[2 * H:])
    np.dot(D_rz.T, h_prev.reshape(BT, H), dw_hh[:2 * H])
    np.dot(D_n.T, rh.reshape(BT, H), dw_hh[2 * H:])
    column_sums(D_rz, db_ih[:2 * H])
    column_sums(D_n, db_ih[2 * H:])
    copy_into(db_hh, db_ih)
