"""A whole recurrent stack (L layers, D directions) over the backend seam, on plain arrays.

This is what :mod:`rnnkern.layers` does inside ``_forward_validated`` / ``_backward_validated``,
with three differences that the torch bridge needs: the inter-layer dropout masks come from the
caller (drawn with torch's RNG), the weights arrive as one flat list in PyTorch's parameter order
(``weight_ih, weight_hh, bias_ih, bias_hh`` per layer and direction, index ``D*k + d``), and the
forward's saved activations are returned in a :class:`StackRecord` for the caller to keep (the
autograd context) instead of being stored on a shared layer object. The bidirectional reversal
within each row's length is the layers' own (:func:`rnnkern.layers._reversal`).

Arrays are NumPy or CuPy (the backend follows the array type, :func:`rnnkern.backends.resolve`).
Shape legend: B batch, T time steps, I input size, H hidden size, L layers, D directions.
"""
from __future__ import annotations

from dataclasses import dataclass
from functools import lru_cache

from rnnkern import backends
from rnnkern.cellspec import CellSpec
from rnnkern.layers import _reversal, _reverse_rows, _xp

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


@lru_cache(maxsize=None)
def stack_config(kind, nonlinearity, num_layers, bidirectional, backend):
    """The (cached, hashable) :class:`StackConfig` of a torch-style stack: LSTM with
    ``forget_bias=0`` and GRU reset-after, as ``torch.nn`` computes them."""
    spec = CellSpec(kind, nonlinearity=nonlinearity, forget_bias=0.0, reset_after=True)
    return StackConfig(spec, int(num_layers), bool(bidirectional), backend)


@dataclass
class StackRecord:
    """What a forward keeps for its backward: its configuration and backend, each cell's saved
    activations ``saved[k][d]``, the dropout masks applied after layer k (None where none),
    the row reversal of the reverse direction, and whether an initial state was given (else
    the backward forms no gradient for it)."""

    cfg: StackConfig
    backend: object
    saved: list
    masks: list
    rev: object
    xp: object
    state_given: bool = True


def _stack(xp, arrays):
    """[N,B,H] from N arrays [B,H]; a view for one (the arrays are ours to give). Filled
    row by row: cheaper than ``xp.stack``'s general path, a visible share of a small step."""
    if len(arrays) == 1:
        return arrays[0][None]
    out = xp.empty((len(arrays),) + arrays[0].shape, arrays[0].dtype)
    for i, a in enumerate(arrays):
        out[i] = a
    return out


def forward(cfg, x, h0, c0, lengths, weights, masks=None, backend=None):
    """Run the stack.

    Args:
        cfg:     :class:`StackConfig`
        x:       [B,T,I] C-contiguous, float32 or float64
        h0, c0:  [D*L,B,H] C-contiguous (c0 None but for the LSTM), or both None for zeros
        lengths: int64 [B] in [0, T] on x's device, or None (every row full)
        weights: 4*D*L arrays in PyTorch's order, C-contiguous, x's dtype
        masks:   None, or L-1 arrays [B,T,D*H] multiplied into layer k's output (k < L-1)
        backend: the backend module, or None: ``backends.resolve(cfg.backend, x)``

    Returns:
        outputs [B,T,D*H], h_n [D*L,B,H], c_n [D*L,B,H] or None, and the :class:`StackRecord`.
    """
    xp = _xp(x)
    backend = backend or backends.resolve(cfg.backend, x)
    B, T, _ = x.shape
    D, spec = cfg.directions, cfg.spec
    state_given = h0 is not None
    if not state_given:   # zeros, made here: cheaper than a tensor's trip through the bridge
        shape = (D * cfg.num_layers, B, weights[1].shape[1])
        h0 = xp.zeros(shape, x.dtype)
        c0 = xp.zeros(shape, x.dtype) if spec.has_cell_state else None
    rev = _reversal(lengths, B, T, xp) if D == 2 else None
    layer_in = x
    h_n, c_n, saved, kept_masks = [], [], [], []
    for k in range(cfg.num_layers):
        outs, layer_saved = [], []
        for d in range(D):
            i = D * k + d
            w = weights[WEIGHTS_PER_CELL * i:WEIGHTS_PER_CELL * (i + 1)]
            out, h, c, s = backend.forward(
                spec, _reverse_rows(layer_in, rev, xp) if d else layer_in, *w, h0[i],
                None if c0 is None else c0[i], lengths)
            outs.append(_reverse_rows(out, rev, xp) if d else out)
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
    record = StackRecord(cfg, backend, saved, kept_masks, rev, xp, state_given)
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
                d_dir = (_reverse_rows(d_out[:, :, H:], rev, xp) if d else
                         xp.ascontiguousarray(d_out[:, :, :H]))
            dx_d, dh0[i], dc0[i], g = backend.backward(
                cfg.spec, record.saved[k][d], d_dir,
                None if d_h_n is None else d_h_n[i], None if d_c_n is None else d_c_n[i])
            grads[WEIGHTS_PER_CELL * i:WEIGHTS_PER_CELL * (i + 1)] = (
                g["w_ih"], g["w_hh"], g["b_ih"], g["b_hh"])
            dx = dx_d if not d else dx + _reverse_rows(dx_d, rev, xp)
        d_out = dx
    if not record.state_given:
        return d_out, None, None, grads
    return (d_out, _stack(xp, dh0), _stack(xp, dc0) if cfg.spec.has_cell_state else None,
            grads)
