"""ONNX forms of the layers around the recurrent ones (rnnkern/modules.py), time-major.

Each function takes the graph, the layer and its input tensor, and returns the output tensor:
[T',B,F] per step, or [B,F] after ``LastStep``.
"""
from __future__ import annotations

import numpy as np

from .graph import elem_type
from ..device import to_host


def one_hot(g, layer, ids):
    """``OneHot(V)``: ids [T',B] -> [T',B,V] of the layer's dtype (ONNX OneHot in float32,
    then a Cast, exact for 0 and 1: onnxruntime has no float64 OneHot)."""
    y = g.op("OneHot", [ids, g.const(np.int64(layer.depth)),
                        g.const(np.array([0, 1], np.float32))], axis=-1, hint="one_hot")
    if layer.dtype != np.float32:
        y = cast(g, y, layer.dtype)
    return y


def embedding(g, layer, ids):
    """``Embedding(V, E)``: a Gather of the table's rows, [T',B] -> [T',B,E]."""
    table = g.const(to_host(layer.params["weight"]).astype(layer.dtype), hint="embedding")
    return g.op("Gather", [table, ids], axis=0, hint="embedded")


def dense(g, layer, x):
    """``Dense(F, O)``: ``x W^T + b`` on the last axis, any leading axes."""
    w_t = g.const(to_host(layer.params["weight"]).astype(layer.dtype).T, hint="dense_weight_t")
    y = g.op("MatMul", [x, w_t], hint="dense")
    if "bias" in layer.params:
        y = g.op("Add", [y, g.const(to_host(layer.params["bias"]).astype(layer.dtype),
                                    hint="dense_bias")], hint="dense")
    return y


def last_step(g, steps, x, dtype):
    """``LastStep``: x [T',B,F] of ``dtype`` -> [B,F], row b's step ``L[b]-1``; zeros for a row of length
    0 (every row when T = 0), as ``LastStep.forward``."""
    L = steps.L
    idx = g.op("Max", [g.op("Sub", [L, g.const(np.int64(1))]), g.const(np.int64(0))])
    shape = g.op("Concat", [g.ints(1), steps.Bp, g.shape_dim(x, 2)], axis=0)
    idx = g.op("Expand", [g.unsqueeze(idx, 0, 2), shape])
    y = g.squeeze(g.op("GatherElements", [x, idx], axis=0, hint="last"), 0)
    nonempty = g.unsqueeze(g.op("Greater", [L, g.const(np.int64(0))]), 1)
    return g.op("Where", [nonempty, y, g.zero(dtype)], hint="last_step")


def cast(g, x, dtype):
    """``x`` cast to ``dtype`` (float32 or float64)."""
    return g.op("Cast", [x], hint="cast", to=elem_type(dtype))
