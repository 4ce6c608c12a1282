"""Autograd over rnnkern's kernels: the whole recurrent stack as one differentiable call.

:func:`recurrent_stack` is the only entry the modules use. Eagerly it runs
:class:`RecurrentStackFunction`, a ``torch.autograd.Function`` whose context keeps the forward's
:class:`~rnnkern.recurrent_stack.StackRecord` (so two forwards then two backwards each find their
own activations; nothing is kept on a shared layer object). Under ``torch.compile`` it calls the
custom operator ``torch.ops.rnnkern.recurrent_stack`` instead, registered with
``torch.library`` (fake shapes and autograd formula included), so Dynamo records one opaque node
instead of breaking the graph at NumPy code. Both run the same :mod:`rnnkern.recurrent_stack` code.

Why two entries: an eager call through the operator's dispatch costs several times the
Function's, a visible share of a small model's step, while compiled graphs need an operator.
A custom operator can only return tensors, so there the record travels as a one-element int64
"handle" tensor whose own memory owns the record's key: the record is dropped when the last
reference to that memory goes (when the compiled graph that saved it for the backward is freed).

Shape legend: B batch, T time steps, I input size, H hidden size, L layers, D directions.
"""
from __future__ import annotations

import itertools
import weakref
from functools import lru_cache
from typing import List, Optional, Tuple

import numpy as np
import torch

from rnnkern import backends
from rnnkern import recurrent_stack as stack
from rnnkern.cellspec import CellSpec
from rnnkern.device import to_device
from rnnkern.torch.crossing import device_scope, to_array, to_tensor
from rnnkern.torch.threads import KernelThreads

DOUBLE_BACKWARD_ERROR = (
    "rnnkern.torch: the gradient of a gradient (double backward, e.g. create_graph=True "
    "followed by another backward) is not supported by rnnkern's recurrent kernels; use "
    "torch.nn.LSTM/GRU/RNN (rnnkern.torch.revert) for higher-order gradients")


def _lengths_array(lengths, x):
    """lengths as int64 [B] beside array ``x`` (NumPy, or CuPy on x's device), or None."""
    if lengths is None:
        return None
    a = lengths.detach().to("cpu", torch.int64).contiguous().numpy()
    return a if isinstance(x, np.ndarray) else to_device(a, "cuda")


def _run_forward(cfg, x, h0, c0, lengths, masks, weights):
    """Tensors in, (out, h_n, c_n or None) tensors and the record out."""
    with device_scope(x.device):
        xa = to_array(x)
        backend = backends.resolve(cfg.backend, xa)
        with KernelThreads(backend):
            out, h_n, c_n, record = stack.forward(
                cfg, xa, to_array(h0), to_array(c0), _lengths_array(lengths, xa),
                [to_array(w) for w in weights],
                None if not masks else [to_array(m) for m in masks], backend)
        return to_tensor(out), to_tensor(h_n), to_tensor(c_n), record


def _contiguous(t):
    return None if t is None else t.contiguous()


def _run_backward(record, device, d_out, d_h, d_c):
    """Gradient tensors (None: zeros) in; dx, dh0, dc0 or None, weight grads list out."""
    with device_scope(device), KernelThreads(record.backend):
        dx, dh0, dc0, grads = stack.backward(
            record, to_array(_contiguous(d_out)), to_array(_contiguous(d_h)),
            to_array(_contiguous(d_c)))
        return to_tensor(dx), to_tensor(dh0), to_tensor(dc0), [to_tensor(g) for g in grads]


class _NoSecondDerivative(torch.autograd.Function):
    """Identity on first-order gradients computed under ``create_graph=True``; differentiating
    them again raises :data:`DOUBLE_BACKWARD_ERROR`. (``once_differentiable`` would say only
    "does not require grad" when the incoming gradients need none.)"""

    @staticmethod
    def forward(ctx, anchor, *grads):
        return tuple(None if g is None else g.clone() for g in grads)

    @staticmethod
    def backward(ctx, *_):
        raise RuntimeError(DOUBLE_BACKWARD_ERROR)


class RecurrentStackFunction(torch.autograd.Function):
    """``apply(cfg, x, h0, c0, lengths, masks, *weights)`` -> ``(out, h_n[, c_n])``.

    x [B,T,I], h0 and c0 [D*L,B,H] (c0 None but for the LSTM; both None: zeros), lengths int64
    [B] or None, masks None or L-1 tensors [B,T,D*H], weights 4*D*L tensors in PyTorch's
    parameter order; every tensor C-contiguous and of one float dtype. Returns out [B,T,D*H]
    and h_n (and c_n) [D*L,B,H]. First-order gradients only (a second derivative raises).
    """

    @staticmethod
    def forward(ctx, cfg, x, h0, c0, lengths, masks, *weights):
        out, h_n, c_n, record = _run_forward(cfg, x, h0, c0, lengths, masks, weights)
        ctx.record = record        # the activations live exactly as long as this graph node
        ctx.device = x.device      # for the backward's stream scope
        ctx.set_materialize_grads(False)   # unused outputs arrive as None: the kernels skip them
        return (out, h_n) if c_n is None else (out, h_n, c_n)

    @staticmethod
    def backward(ctx, d_out, d_h, d_c=None):
        with torch.no_grad():
            dx, dh0, dc0, grads = _run_backward(ctx.record, ctx.device, d_out, d_h, d_c)
        need = ctx.needs_input_grad
        result = [dx if need[1] else None, dh0 if need[2] else None, dc0 if need[3] else None]
        result += [g if n else None for g, n in zip(grads, need[6:])]
        if torch.is_grad_enabled():   # create_graph=True: these must not be differentiated
            result = _NoSecondDerivative.apply(torch.ones((), requires_grad=True), *result)
        return (None, *result[:3], None, None, *result[3:])


# ------------------------------------------------------------------ the custom operator

_RECORDS = {}                  # handle key -> StackRecord
_KEYS = itertools.count(1)


def _handle_for(record):
    """A one-element int64 CPU tensor naming ``record``; the record is forgotten when the
    tensor's memory is freed (its NumPy owner is collected)."""
    key = next(_KEYS)
    owner = np.array([key], dtype=np.int64)
    _RECORDS[key] = record
    weakref.finalize(owner, _RECORDS.pop, key, None)
    return torch.from_numpy(owner)


def _record_of(handle):
    record = _RECORDS.get(int(handle.reshape(-1)[0]))
    if record is None:
        raise RuntimeError("rnnkern.torch: the saved activations of this recurrent forward "
                           "are gone (its graph was freed); run the forward again")
    return record


@lru_cache(maxsize=None)
def stack_config(kind, nonlinearity, num_layers, bidirectional, backend):
    """The (cached, hashable) :class:`~rnnkern.recurrent_stack.StackConfig` of a torch-style
    stack: LSTM with ``forget_bias=0`` and GRU reset-after, as ``torch.nn`` computes them."""
    spec = CellSpec(kind, nonlinearity=nonlinearity, forget_bias=0.0, reset_after=True)
    return stack.StackConfig(spec, int(num_layers), bool(bidirectional), backend)



COMPILE_SUPPORTED = all(hasattr(torch.library, n) for n in
                        ("custom_op", "register_fake", "register_autograd"))

if COMPILE_SUPPORTED:
    @torch.library.custom_op("rnnkern::recurrent_stack", mutates_args=())
    def recurrent_stack_op(x: torch.Tensor, h0: Optional[torch.Tensor],
                           c0: Optional[torch.Tensor], lengths: Optional[torch.Tensor],
                           masks: List[torch.Tensor], weights: List[torch.Tensor], kind: str,
                           nonlinearity: str, num_layers: int, bidirectional: bool, backend: str
                           ) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        """The stack's forward as an operator: (out, h_n, c_n (empty but for the LSTM),
        handle)."""
        cfg = stack_config(kind, nonlinearity, num_layers, bidirectional, backend)
        out, h_n, c_n, record = _run_forward(cfg, x, h0, c0, lengths, masks, weights)
        return out, h_n, (h_n.new_empty(0) if c_n is None else c_n), _handle_for(record)

    def _state_shape(x, weights):
        """[D*L,B,H] from x [B,T,I] and the 4*D*L weights (weight_hh_l0 [G*H,H])."""
        return (len(weights) // stack.WEIGHTS_PER_CELL, x.shape[0], weights[1].shape[1])

    @recurrent_stack_op.register_fake
    def _recurrent_stack_fake(x, h0, c0, lengths, masks, weights, kind, nonlinearity,
                              num_layers, bidirectional, backend):
        shape = _state_shape(x, weights)
        DH = (2 if bidirectional else 1) * shape[2]
        c_n = x.new_empty(shape if kind == "lstm" else (0,))
        return (x.new_empty((x.shape[0], x.shape[1], DH)), x.new_empty(shape), c_n,
                torch.empty(1, dtype=torch.int64))

    @torch.library.custom_op("rnnkern::recurrent_stack_backward", mutates_args=())
    def recurrent_stack_backward_op(handle: torch.Tensor, d_out: Optional[torch.Tensor],
                                    d_h: Optional[torch.Tensor], d_c: Optional[torch.Tensor],
                                    x: torch.Tensor, weights: List[torch.Tensor],
                                    kind: str, state_given: bool
                                    ) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor,
                                               List[torch.Tensor]]:
        """The stack's backward: (dx, dh0, dc0, weight grads); dh0 and dc0 are empty where
        no initial state was given, dc0 but for the LSTM."""
        dx, dh0, dc0, grads = _run_backward(_record_of(handle), x.device, d_out, d_h, d_c)
        return (dx, x.new_empty(0) if dh0 is None else dh0,
                x.new_empty(0) if dc0 is None else dc0, grads)

    @recurrent_stack_backward_op.register_fake
    def _recurrent_stack_backward_fake(handle, d_out, d_h, d_c, x, weights, kind, state_given):
        shape = _state_shape(x, weights)
        dh0 = x.new_empty(shape if state_given else (0,))
        dc0 = x.new_empty(shape if state_given and kind == "lstm" else (0,))
        return x.new_empty(x.shape), dh0, dc0, [w.new_empty(w.shape) for w in weights]

    def _setup_context(ctx, inputs, output):
        x, h0, c0, _, masks, weights, kind, _, _, _, _ = inputs
        ctx.save_for_backward(output[3], x, *weights)
        ctx.kind, ctx.state_given, ctx.n_masks = kind, h0 is not None, len(masks)

    def _backward(ctx, d_out, d_h, d_c, _d_handle):
        handle, x, *weights = ctx.saved_tensors
        if ctx.kind != "lstm" or (d_c is not None and d_c.numel() == 0):
            d_c = None
        dx, dh0, dc0, grads = recurrent_stack_backward_op(handle, d_out, d_h, d_c, x, weights,
                                                          ctx.kind, ctx.state_given)
        lstm_state = ctx.state_given and ctx.kind == "lstm"
        return (dx, dh0 if ctx.state_given else None, dc0 if lstm_state else None, None,
                [None] * ctx.n_masks, grads, None, None, None, None, None)

    recurrent_stack_op.register_autograd(_backward, setup_context=_setup_context)

    def _no_double_backward(ctx, *grads):
        raise RuntimeError(DOUBLE_BACKWARD_ERROR)

    recurrent_stack_backward_op.register_autograd(
        _no_double_backward, setup_context=lambda ctx, inputs, output: None)


def recurrent_stack(cfg, x, h0, c0, lengths, masks, weights):
    """``(out [B,T,D*H], h_n [D*L,B,H], c_n [D*L,B,H] or None)``, differentiable w.r.t. x, h0,
    c0 and the weights. Arguments as :class:`RecurrentStackFunction`'s (cfg a
    :class:`~rnnkern.recurrent_stack.StackConfig`)."""
    if COMPILE_SUPPORTED and torch.compiler.is_compiling():
        spec = cfg.spec
        out, h_n, c_n, _ = recurrent_stack_op(
            x, h0, c0, lengths, list(masks or ()), list(weights), spec.kind, spec.nonlinearity,
            cfg.num_layers, cfg.bidirectional, cfg.backend)
        return out, h_n, (c_n if spec.has_cell_state else None)
    res = RecurrentStackFunction.apply(cfg, x, h0, c0, lengths, masks, *weights)
    return res if len(res) == 3 else (res[0], res[1], None)
