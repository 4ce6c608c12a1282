"""The exported graph's inputs and outputs: their names, and the feeds and states that map
them to :class:`rnnkern.Sequential`'s own arguments (no onnx needed).

Inputs, in this order:

    input                 [batch, time] int64 ids (a model starting with OneHot/Embedding),
                          else [batch, time, I] floats of the model's dtype (batch-major)
    lengths               [batch] int64, when exported ``with_lengths``
    initial_h.{i}         [D*L, batch, H] for each recurrent layer i of the model (its index
    initial_c.{i}         in ``model.layers``), when exported ``with_state``; initial_c for LSTMs

Outputs: ``output`` (the model's output), then ``final_h.{i}`` (and ``final_c.{i}``) per
recurrent layer when exported ``with_state``. Layer i's state is ``(initial_h.{i},
initial_c.{i})`` for an LSTM and ``initial_h.{i}`` otherwise, in the layer's own layout
(``[L,B,H]``, ``[2L,B,H]`` when bidirectional, entry ``2*l + d``).
"""
from __future__ import annotations

import numpy as np

from ..device import to_host
from ..model import _is_recurrent

INPUT, LENGTHS, OUTPUT = "input", "lengths", "output"


def recurrent_layers(model):
    """``[(i, layer)]`` for every recurrent layer of the model, in order."""
    return [(i, layer) for i, layer in enumerate(model.layers) if _is_recurrent(layer)]


def state_names(i, layer, prefix):
    """Names of layer i's state tensors: ``[prefix_h.i]`` or ``[prefix_h.i, prefix_c.i]``."""
    parts = ("h", "c") if layer.spec.has_cell_state else ("h",)
    return [f"{prefix}_{p}.{i}" for p in parts]


def input_names(model, *, with_lengths=False, with_state=False):
    """The graph's input names, in order."""
    names = [INPUT] + ([LENGTHS] if with_lengths else [])
    if with_state:
        for i, layer in recurrent_layers(model):
            names += state_names(i, layer, "initial")
    return names


def output_names(model, *, with_state=False):
    """The graph's output names, in order."""
    names = [OUTPUT]
    if with_state:
        for i, layer in recurrent_layers(model):
            names += state_names(i, layer, "final")
    return names


def feeds(model, x, *, lengths=None, initial_state=None, with_state=False):
    """The input dict of an exported model for ``model.forward(x, initial_state, lengths)``:
    ``input`` (ids as int64, floats in the first layer's dtype), ``lengths`` (int64) when
    given, and, when ``with_state``, every ``initial_h.{i}``/``initial_c.{i}`` from
    ``initial_state`` (Sequential's tuple, one entry per layer; None or a None entry: zeros).
    Pass ``lengths`` exactly when the model was exported ``with_lengths``."""
    x = to_host(x)
    feed = {INPUT: x.astype(np.int64) if x.dtype.kind in "iu" else x.astype(input_dtype(model))}
    if lengths is not None:
        feed[LENGTHS] = to_host(lengths).astype(np.int64)
    if with_state:
        B = x.shape[0]
        for i, layer in recurrent_layers(model):
            s = None if initial_state is None else initial_state[i]
            parts = (s if s is not None else (None, None)) if layer.spec.has_cell_state else (s,)
            shape = (layer.num_directions * layer.num_layers, B, layer.hidden_size)
            for name, part in zip(state_names(i, layer, "initial"), parts):
                feed[name] = (np.zeros(shape, layer.dtype) if part is None
                              else to_host(part).astype(layer.dtype))
    return feed


def unpack_state(model, outputs):
    """Sequential's state tuple (one entry per layer, None for the non-recurrent ones) from an
    exported-``with_state`` model's outputs (the list a runtime returns, ``output`` first)."""
    rest = list(outputs[1:])
    state = [None] * len(model.layers)
    for i, layer in recurrent_layers(model):
        if layer.spec.has_cell_state:
            state[i], rest = (rest[0], rest[1]), rest[2:]
        else:
            state[i], rest = rest[0], rest[1:]
    return tuple(state)


def input_dtype(model):
    """The float dtype of a float-input model's ``input``: its first layer with a dtype."""
    for layer in model.layers:
        if hasattr(layer, "dtype"):
            return np.dtype(layer.dtype)
    return np.dtype(np.float32)
