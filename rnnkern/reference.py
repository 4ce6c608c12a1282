"""NumPy reference: the executable specification every backend is tested against.

One layer, one direction, whole sequence. Slow and obvious on purpose: a Python loop over time,
one step function per cell, masks written out. Nothing here is tuned.

Shape legend: B batch, T time steps, I input size, H hidden size, G gates (RNN 1, LSTM 4, GRU 3).

Gate layout follows PyTorch: weight rows are stacked gate blocks of H rows each,
LSTM ``i, f, g, o``; GRU ``r, z, n``.

Math (``a = x W_ih^T + b_ih + h W_hh^T + b_hh`` split into gate blocks)::

    RNN   h' = act(a)                               act = tanh | relu
    LSTM  i = s(a_i)  f = s(a_f + forget_bias)  g = tanh(a_g)  o = s(a_o)
          c' = f c + i g      h' = o tanh(c')
    GRU   r = s(a_r)  z = s(a_z)
          reset_after=True  (PyTorch/cuDNN): n = tanh(x W_in^T + b_in + r (h W_hn^T + b_hn))
          reset_after=False (TF1 GRUCell):   n = tanh(x W_in^T + b_in + (r h) W_hn^T + b_hn)
          h' = (1 - z) n + z h

Variable lengths follow TF ``dynamic_rnn``: at ``t >= lengths[b]`` the output is exactly zero and
the state is carried unchanged, so the final state is the one after the last valid step (the
initial state when ``lengths[b] == 0``); gradients arriving at those outputs are ignored.
"""
from __future__ import annotations

import numpy as np

from .cellspec import CellSpec


def sigmoid(a):
    return 1.0 / (1.0 + np.exp(-a))


def _split(a, parts):
    return np.split(a, parts, axis=-1)


# ----------------------------------------------------------------------------------------------
# one time step, forward: returns (h_new, c_new or None, cache for the backward step)

def _rnn_step(spec, gx, h, c, w_hh, b_hh):
    a = gx + h @ w_hh.T + b_hh
    h_new = np.tanh(a) if spec.nonlinearity == "tanh" else np.maximum(a, 0.0)
    return h_new, None, (h_new,)


def _lstm_step(spec, gx, h, c, w_hh, b_hh):
    a_i, a_f, a_g, a_o = _split(gx + h @ w_hh.T + b_hh, 4)
    i, f, g, o = sigmoid(a_i), sigmoid(a_f + spec.forget_bias), np.tanh(a_g), sigmoid(a_o)
    c_new = f * c + i * g
    tanh_c = np.tanh(c_new)
    return o * tanh_c, c_new, (i, f, g, o, tanh_c)


def _gru_step(spec, gx, h, c, w_hh, b_hh):
    H = h.shape[-1]
    gx_r, gx_z, gx_n = _split(gx, 3)
    gh_rz = h @ w_hh[: 2 * H].T + b_hh[: 2 * H]
    r = sigmoid(gx_r + gh_rz[:, :H])
    z = sigmoid(gx_z + gh_rz[:, H:])
    if spec.reset_after:
        gh_n = h @ w_hh[2 * H:].T + b_hh[2 * H:]
        n = np.tanh(gx_n + r * gh_n)
    else:
        gh_n = (r * h) @ w_hh[2 * H:].T + b_hh[2 * H:]
        n = np.tanh(gx_n + gh_n)
    h_new = (1.0 - z) * n + z * h
    return h_new, None, (r, z, n, gh_n)


# ----------------------------------------------------------------------------------------------
# one time step, backward: from dh_new (and dc_new) to
#   d_gx [B,G*H]   gradient of the input-to-hidden pre-activation (x W_ih^T + b_ih)
#   d_gh [B,G*H]   gradient of the hidden-to-hidden pre-activation (W_hh's output + b_hh)
#   dh_prev [B,H], dc_prev [B,H] or None
#   gh_input       what W_hh multiplied: h [B,H], or one [B,H] block per gate ([B,G*H])

def _rnn_step_back(spec, cache, h, c, dh_new, dc_new, w_hh):
    (h_new,) = cache
    da = dh_new * ((1.0 - h_new * h_new) if spec.nonlinearity == "tanh" else (h_new > 0))
    return da, da, da @ w_hh, None, h


def _lstm_step_back(spec, cache, h, c, dh_new, dc_new, w_hh):
    i, f, g, o, tanh_c = cache
    dc = dc_new + dh_new * o * (1.0 - tanh_c * tanh_c)
    d_a = np.concatenate(
        [dc * g * i * (1.0 - i), dc * c * f * (1.0 - f), dc * i * (1.0 - g * g),
         dh_new * tanh_c * o * (1.0 - o)], axis=-1)
    return d_a, d_a, d_a @ w_hh, dc * f, h


def _gru_step_back(spec, cache, h, c, dh_new, dc_new, w_hh):
    H = h.shape[-1]
    r, z, n, gh_n = cache
    d_an = dh_new * (1.0 - z) * (1.0 - n * n)
    d_az = dh_new * (h - n) * z * (1.0 - z)
    if spec.reset_after:
        d_ar = d_an * gh_n * r * (1.0 - r)
        d_gx = np.concatenate([d_ar, d_az, d_an], axis=-1)
        d_gh = np.concatenate([d_ar, d_az, d_an * r], axis=-1)
        return d_gx, d_gh, d_gh @ w_hh + dh_new * z, None, h
    d_rh = d_an @ w_hh[2 * H:]
    d_ar = d_rh * h * r * (1.0 - r)
    d_gx = np.concatenate([d_ar, d_az, d_an], axis=-1)
    dh_prev = dh_new * z + d_rh * r + np.concatenate([d_ar, d_az], axis=-1) @ w_hh[: 2 * H]
    # the n block of W_hh multiplies (r h), not h: hand back its own input
    return d_gx, d_gx, dh_prev, None, np.concatenate([h, h, r * h], axis=-1)


_STEP = {"rnn": _rnn_step, "lstm": _lstm_step, "gru": _gru_step}
_STEP_BACK = {"rnn": _rnn_step_back, "lstm": _lstm_step_back, "gru": _gru_step_back}


def _valid_mask(lengths, B, T):
    """[T,B,1] booleans: step t of sequence b is valid."""
    if lengths is None:
        return np.ones((T, B, 1), dtype=bool)
    return (np.arange(T)[:, None] < np.asarray(lengths)[None, :])[:, :, None]


def forward(spec: CellSpec, x, w_ih, w_hh, b_ih, b_hh, h0, c0=None, lengths=None):
    """Run one layer over a whole batch of sequences.

    Args:
        spec:    the cell (:class:`CellSpec`)
        x:       [B,T,I] inputs
        w_ih:    [G*H,I]   w_hh: [G*H,H]   b_ih, b_hh: [G*H]
        h0:      [B,H] initial hidden state;  c0: [B,H] initial cell state (LSTM only)
        lengths: None (every sequence has T steps) or ints [B] in [0, T]

    Returns:
        outputs [B,T,H] (zero past each length), h_n [B,H], c_n [B,H] or None, and ``saved``,
        the activations :func:`backward` needs.
    """
    B, T, _ = x.shape
    H = w_hh.shape[1]
    step = _STEP[spec.kind]
    gx_all = x @ w_ih.T + b_ih                      # [B,T,G*H], hoisted out of the time loop
    valid = _valid_mask(lengths, B, T)
    h, c = h0, (c0 if spec.has_cell_state else None)
    outputs = np.zeros((B, T, H), dtype=x.dtype)
    hs, cs, caches = [], [], []
    for t in range(T):
        h_new, c_new, cache = step(spec, gx_all[:, t], h, c, w_hh, b_hh)
        hs.append(h)
        cs.append(c)
        caches.append(cache)
        outputs[:, t] = np.where(valid[t], h_new, 0.0)
        h = np.where(valid[t], h_new, h)
        if c is not None:
            c = np.where(valid[t], c_new, c)
    saved = dict(spec=spec, x=x, w_ih=w_ih, w_hh=w_hh, hs=hs, cs=cs, caches=caches,
                 valid=valid)
    return outputs, h, c, saved


def backward(spec: CellSpec, saved, d_outputs=None, d_h_n=None, d_c_n=None):
    """Backprop through time for the last :func:`forward` whose ``saved`` is given.

    Args:
        d_outputs: [B,T,H] or None (zeros);  d_h_n, d_c_n: [B,H] or None (zeros)

    Returns:
        dx [B,T,I], dh0 [B,H], dc0 [B,H] or None, and a dict of weight gradients
        ``w_ih [G*H,I], w_hh [G*H,H], b_ih [G*H], b_hh [G*H]``.
    """
    x, w_ih, w_hh, valid = saved["x"], saved["w_ih"], saved["w_hh"], saved["valid"]
    B, T, _ = x.shape
    H = w_hh.shape[1]
    step_back = _STEP_BACK[spec.kind]
    dh = np.zeros((B, H), x.dtype) if d_h_n is None else np.array(d_h_n, dtype=x.dtype)
    dc = None
    if spec.has_cell_state:
        dc = np.zeros((B, H), x.dtype) if d_c_n is None else np.array(d_c_n, dtype=x.dtype)
    d_gx_all = np.zeros(x.shape[:2] + (w_ih.shape[0],), dtype=x.dtype)
    dw_hh = np.zeros_like(w_hh)
    db_hh = np.zeros(w_hh.shape[0], dtype=x.dtype)
    for t in reversed(range(T)):
        m = valid[t]
        dh_new = dh + (d_outputs[:, t] if d_outputs is not None else 0.0)
        dh_new = np.where(m, dh_new, 0.0)
        dc_new = np.where(m, dc, 0.0) if dc is not None else None
        d_gx, d_gh, dh_prev, dc_prev, gh_input = step_back(
            spec, saved["caches"][t], saved["hs"][t], saved["cs"][t], dh_new, dc_new, w_hh)
        d_gx_all[:, t] = d_gx
        dw_hh += _outer_by_block(d_gh, gh_input, H)
        db_hh += d_gh.sum(axis=0)
        dh = np.where(m, dh_prev, dh)
        if dc is not None:
            dc = np.where(m, dc_prev, dc)
    dx = d_gx_all @ w_ih
    grads = dict(w_ih=np.einsum("btg,bti->gi", d_gx_all, x), w_hh=dw_hh,
                 b_ih=d_gx_all.sum(axis=(0, 1)), b_hh=db_hh)
    return dx, dh, dc, grads


def _outer_by_block(d_gh, gh_input, H):
    """sum_b d_gh[b]^T gh_input[b]; gh_input is [B,H] or one [B,H] input per gate block."""
    if gh_input.shape[-1] == H:
        return d_gh.T @ gh_input
    G = d_gh.shape[-1] // H
    return np.concatenate([d_gh[:, k * H:(k + 1) * H].T @ gh_input[:, k * H:(k + 1) * H]
                           for k in range(G)], axis=0)
