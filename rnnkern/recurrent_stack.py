"""A whole recurrent stack (L layers, D directions) over the backend seam, on plain arrays: the
one loop that runs cells layer after layer and direction after direction, forward and back.

Its callers: :mod:`rnnkern.layers` (``LSTM/GRU/RNN.forward/backward/infer``, and so the step
plans' seam stack) and the torch bridge (:mod:`rnnkern.torch.function`, whose autograd context
keeps the :class:`StackRecord`). What differs between them comes in as arguments: the weights
as one flat list in PyTorch's parameter order (``weight_ih, weight_hh, bias_ih, bias_hh`` per
layer and direction, index ``D*k + d``), the inter-layer dropout masks drawn by the caller
(the layers' generator, or torch's RNG), and ``keep=False`` for inference (nothing saved, each
direction run in bounded time chunks: :func:`run_unsaved`).

A reverse direction runs each row reversed within its length (:func:`reversal`) through the
same one-direction seam, its outputs reversed back, so every backend runs it. Arrays are NumPy
or CuPy (the backend follows the array type, :func:`rnnkern.backends.resolve`).

Shape legend: B batch, T time steps, I input size, H hidden size, L layers, D directions,
G gates.
"""
from __future__ import annotations

import functools
from dataclasses import dataclass

import numpy as np

from . import backends, config
from .cellspec import CellSpec
from .device import array_module

WEIGHTS_PER_CELL = 4  # weight_ih, weight_hh, bias_ih, bias_hh


@dataclass(frozen=True)
class StackConfig:
    """What a stack call needs besides arrays: the cell, the stack's shape and the backend."""

    spec: CellSpec
    num_layers: int
    bidirectional: bool
    backend: str = "auto"

    @property
    def directions(self) -> int:
        return 2 if self.bidirectional else 1


@dataclass
class StackRecord:
    """What a forward keeps for its backward: its configuration and backend, each cell's saved
    activations ``saved[k][d]``, the dropout masks applied after layer k (None where none),
    the row reversal of the reverse direction, the batch's B and T, and whether an initial
    state was given (else the backward forms no gradient for it)."""

    cfg: StackConfig
    backend: object
    saved: list
    masks: list
    rev: object
    xp: object
    B: int
    T: int
    state_given: bool = True


def reversal(lengths, B, T, xp):
    """How to reverse each row of a [B,T,F] array within its length (the reverse direction of
    a bidirectional layer): None for a plain flip of the time axis (no lengths, or every row
    full on the host), else index arrays ``(rows [B,1], steps [B,T])`` on ``xp`` with
    ``steps[b,t] = lengths[b]-1-t`` for ``t < lengths[b]`` and ``t`` past it (padding stays in
    place, so the reversal is its own inverse and zeros past a length stay there)."""
    if lengths is None or (xp is np and B and int(lengths.min()) == T):
        return None
    t = xp.arange(T, dtype=np.int64)[None, :]
    n = lengths[:, None]
    return xp.arange(B, dtype=np.int64)[:, None], xp.where(t < n, n - 1 - t, t)


def reverse_rows(a, rev, xp):
    """``a`` [B,T,F] (any strides) with each row reversed within its length, as a new
    C-contiguous array: a flip or one vectorised gather (``rev`` from :func:`reversal`)."""
    if rev is None:
        return xp.ascontiguousarray(a[:, ::-1])
    rows, steps = rev
    return xp.ascontiguousarray(a[rows, steps])


def infer_run_steps(spec, B, H, itemsize):
    """K: the steps of one inference run whose activations fit ``config.INFER_CHUNK_BYTES``."""
    return max(1, int(config.INFER_CHUNK_BYTES) // max(1, B * (spec.gates + 3) * H * itemsize))


def run_unsaved(backend, spec, x, w_ih, w_hh, b_ih, b_hh, h0, c0, lengths, xp=np):
    """One direction's seam forward over x [B,T,I] in runs of K steps (:func:`infer_run_steps`),
    the state carried between runs (a row's length within a run: clip(lengths - t0, 0, K); a
    row already ended carries its state through untouched), each run's saved activations
    dropped as soon as it returns. Returns (outputs [B,T,H], h [B,H], c [B,H] | None, None)."""
    B, T, _ = x.shape
    K = infer_run_steps(spec, B, w_hh.shape[1], x.dtype.itemsize)
    if T <= K:
        out, h, c, _ = backend.forward(spec, x, w_ih, w_hh, b_ih, b_hh, h0, c0, lengths)
        return out, h, c, None
    out = xp.empty((B, T, w_hh.shape[1]), dtype=x.dtype)
    h, c = h0, c0
    for t0 in range(0, T, K):
        t1 = min(T, t0 + K)
        run_lengths = None if lengths is None else xp.clip(lengths - t0, 0, t1 - t0)
        out[:, t0:t1], h, c, _ = backend.forward(
            spec, xp.ascontiguousarray(x[:, t0:t1]), w_ih, w_hh, b_ih, b_hh, h, c, run_lengths)
    return out, h, c, None


def _stack(xp, arrays):
    """[N,B,H] from N arrays [B,H]; a view for one (the arrays are ours to give). Filled
    row by row: cheaper than ``xp.stack``'s general path, a visible share of a small step."""
    if len(arrays) == 1:
        return arrays[0][None]
    out = xp.empty((len(arrays),) + arrays[0].shape, arrays[0].dtype)
    for i, a in enumerate(arrays):
        out[i] = a
    return out


def forward(cfg, x, h0, c0, lengths, weights, masks=None, backend=None, keep=True):
    """Run the stack.

    Args:
        cfg:     :class:`StackConfig`
        x:       [B,T,I] C-contiguous, float32 or float64
        h0, c0:  [D*L,B,H] C-contiguous (c0 None but for the LSTM), or both None for zeros
        lengths: int64 [B] in [0, T] on x's device, or None (every row full)
        weights: 4*D*L arrays in PyTorch's order, C-contiguous, x's dtype
        masks:   None, or L-1 arrays [B,T,D*H] multiplied into layer k's output (k < L-1)
        backend: the backend module, or None: ``backends.resolve(cfg.backend, x)``
        keep:    False: inference, nothing saved (:func:`run_unsaved`; the record is None)

    Returns:
        outputs [B,T,D*H], h_n [D*L,B,H], c_n [D*L,B,H] or None, and the :class:`StackRecord`
        (None when not ``keep``).
    """
    xp = array_module(x)
    backend = backend or backends.resolve(cfg.backend, x)
    run = backend.forward if keep else functools.partial(run_unsaved, backend, xp=xp)
    B, T, _ = x.shape
    D, spec = cfg.directions, cfg.spec
    state_given = h0 is not None
    if not state_given:   # zeros, made here: cheaper than a tensor's trip through the bridge
        shape = (D * cfg.num_layers, B, weights[1].shape[1])
        h0 = xp.zeros(shape, x.dtype)
        c0 = xp.zeros(shape, x.dtype) if spec.has_cell_state else None
    rev = reversal(lengths, B, T, xp) if D == 2 else None
    layer_in = x
    h_n, c_n, saved, kept_masks = [], [], [], []
    for k in range(cfg.num_layers):
        outs, layer_saved = [], []
        for d in range(D):
            i = D * k + d
            w = weights[WEIGHTS_PER_CELL * i:WEIGHTS_PER_CELL * (i + 1)]
            out, h, c, s = run(
                spec, reverse_rows(layer_in, rev, xp) if d else layer_in, *w, h0[i],
                None if c0 is None else c0[i], lengths)
            outs.append(reverse_rows(out, rev, xp) if d else out)
            h_n.append(h)
            c_n.append(c)
            layer_saved.append(s)
        out = outs[0] if D == 1 else xp.concatenate(outs, axis=2)
        saved.append(layer_saved)
        mask = masks[k] if masks is not None and k + 1 < cfg.num_layers else None
        if mask is not None:
            out = out * mask
        kept_masks.append(mask)
        layer_in = out
    record = (StackRecord(cfg, backend, saved, kept_masks, rev, xp, B, T, state_given)
              if keep else None)
    return (layer_in, _stack(xp, h_n), _stack(xp, c_n) if spec.has_cell_state else None,
            record)


def backward(record, d_outputs, d_h_n=None, d_c_n=None):
    """Backprop through time for the :func:`forward` that returned ``record``.

    Args:
        d_outputs:    [B,T,D*H] C-contiguous or None (zeros)
        d_h_n, d_c_n: [D*L,B,H] C-contiguous or None (zeros)

    Returns:
        dx [B,T,I], dh0 [D*L,B,H], dc0 [D*L,B,H] or None (both None when the forward was given
        no initial state), and the weight gradients as a list in the order of ``weights``.
    """
    cfg, xp, backend, rev = record.cfg, record.xp, record.backend, record.rev
    L, D = cfg.num_layers, cfg.directions
    dh0, dc0 = [None] * (D * L), [None] * (D * L)
    grads = [None] * (WEIGHTS_PER_CELL * D * L)
    d_out = d_outputs
    for k in reversed(range(L)):
        if record.masks[k] is not None and d_out is not None:
            d_out = d_out * record.masks[k]
        dx = None
        for d in range(D):
            i = D * k + d
            d_dir = d_out
            if D == 2 and d_out is not None:
                H = d_out.shape[2] // 2
                d_dir = (reverse_rows(d_out[:, :, H:], rev, xp) if d else
                         xp.ascontiguousarray(d_out[:, :, :H]))
            dx_d, dh0[i], dc0[i], g = backend.backward(
                cfg.spec, record.saved[k][d], d_dir,
                None if d_h_n is None else d_h_n[i], None if d_c_n is None else d_c_n[i])
            grads[WEIGHTS_PER_CELL * i:WEIGHTS_PER_CELL * (i + 1)] = (
                g["w_ih"], g["w_hh"], g["b_ih"], g["b_hh"])
            dx = dx_d if not d else dx + reverse_rows(dx_d, rev, xp)
        d_out = dx
    if not record.state_given:
        return d_out, None, None, grads
    return (d_out, _stack(xp, dh0), _stack(xp, dc0) if cfg.spec.has_cell_state else None,
            grads)
