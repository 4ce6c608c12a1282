"""``export``: a :class:`rnnkern.Sequential` as an ONNX model, built, checked and written.

The graph runs time-major inside: the batch-major input is transposed once at the start, the
output once at the end, and the recurrent operators read ``[T, B, F]`` as ONNX defines them
(onnxruntime takes no ``layout=1``). See :mod:`.steps` for the time axis, :mod:`.recurrent`
and :mod:`.blocks` for the layers, :mod:`.signature` for the inputs and outputs.
"""
from __future__ import annotations

import os

import numpy as np

from .. import __version__
from ..modules import Dense, Dropout, Embedding, LastStep, OneHot
from . import blocks, recurrent, signature, validate
from .graph import Graph, helper, onnx
from .steps import Steps
from .validate import ExportError

DEFAULT_OPSET = 17      # onnxruntime >= 1.13 and most other runtimes run it
MIN_OPSET = 14          # the recurrent operators' and Unsqueeze/Squeeze's current forms
FORMS = ("auto", "operator", "scan")


def _opset(opset):
    newest = onnx.defs.onnx_opset_version()
    if opset is None:
        return min(DEFAULT_OPSET, newest)
    if isinstance(opset, bool) or not isinstance(opset, (int, np.integer)) or not (
            MIN_OPSET <= opset <= newest):
        raise ExportError(f"opset must be an integer in [{MIN_OPSET}, {newest}] (the installed "
                          f"onnx {onnx.__version__} goes up to {newest}), got {opset!r}")
    return int(opset)


def _form(layer, recurrent_form):
    """"operator" or "scan" for this layer: "auto" takes ONNX's operator in float32 and the
    Scan form in float64 (no runtime we know runs the operators in float64)."""
    if recurrent_form == "auto":
        return "scan" if layer.dtype == np.float64 else "operator"
    return recurrent_form


def build_model(model, *, with_lengths=False, with_state=False, opset=None,
                recurrent_form="auto"):
    """The ``onnx.ModelProto`` of ``model`` (see :func:`export`), checked by
    ``onnx.checker``. ``recurrent_form``: "auto", "operator" (ONNX's LSTM/GRU/RNN; float64
    models then need a runtime with float64 kernels for them, which onnxruntime lacks) or
    "scan" (the cell written out in a Scan, any dtype)."""
    ids = validate.check(model)
    opset = _opset(opset)
    if recurrent_form not in FORMS:
        raise ExportError(f"recurrent_form must be one of {FORMS}, got {recurrent_form!r}")
    g = Graph()
    layers = model.layers
    if ids:
        x = g.input(signature.INPUT, np.int64, ["batch", "time"])
        x_tb, rank, dtype = g.op("Transpose", [x], perm=[1, 0]), 2, np.dtype(np.int64)
    else:
        dtype = signature.input_dtype(model)
        x = g.input(signature.INPUT, dtype,
                    ["batch", "time", validate.input_features(model) or "features"])
        x_tb, rank = g.op("Transpose", [x], perm=[1, 0, 2]), 3
    lengths = g.input(signature.LENGTHS, np.int64, ["batch"]) if with_lengths else None
    states = {}
    if with_state:
        for i, layer in signature.recurrent_layers(model):
            shape = [layer.num_directions * layer.num_layers, "batch", layer.hidden_size]
            states[i] = [g.input(n, layer.dtype, shape)
                         for n in signature.state_names(i, layer, "initial")]
    steps = Steps(g, x_tb, rank, lengths)
    states = {i: [steps.pad_state(s) for s in ss] for i, ss in states.items()}
    y = steps.x
    per_step, features = True, None
    finals = []
    for i, layer in enumerate(layers):
        kind = type(layer)
        if kind in (Dense, *validate.RECURRENT) and dtype != layer.dtype:
            y, dtype = blocks.cast(g, y, layer.dtype), np.dtype(layer.dtype)
        if kind is OneHot:
            y, dtype, features = blocks.one_hot(g, layer, y), layer.dtype, layer.depth
        elif kind is Embedding:
            y, dtype, features = blocks.embedding(g, layer, y), layer.dtype, layer.embedding_dim
        elif kind is Dense:
            y, features = blocks.dense(g, layer, y), layer.out_features
        elif kind is Dropout:
            pass                          # identity: the export is the model in eval mode
        elif kind is LastStep:
            y, per_step = blocks.last_step(g, steps, y, dtype), False
        else:
            h0, c0 = (states.get(i, []) + [None, None])[:2]
            y, hn, cn = recurrent.lower(g, steps, layer, y, h0, c0, with_state,
                                        _form(layer, recurrent_form))
            features = layer.output_size
            if with_state:
                finals += [(hn, layer), (cn, layer)] if layer.spec.has_cell_state else [
                    (hn, layer)]
    out_shape = ["batch", features or "features"]
    y = steps.unpad(y, per_step)          # the padding of T = 0 or B = 0 off
    if per_step:                          # back to batch-major
        y = g.op("Transpose", [y], [signature.OUTPUT], perm=[1, 0, 2])[0]
        out_shape.insert(1, "time")
    else:
        y = g.op("Identity", [y], [signature.OUTPUT])[0]
    g.output(y, dtype, out_shape)
    names = signature.output_names(model, with_state=with_state)[1:]
    for name, (tensor, layer) in zip(names, finals):
        steps.unpad_state(tensor, name)
        g.output(name, layer.dtype,
                 [layer.num_directions * layer.num_layers, "batch", layer.hidden_size])
    imports = [helper.make_opsetid("", opset)]
    proto = helper.make_model(g.make_graph("rnnkern_sequential"), opset_imports=imports,
                              producer_name="rnnkern", producer_version=__version__,
                              doc_string=repr(model))
    proto.ir_version = helper.find_min_ir_version_for(imports)
    onnx.checker.check_model(proto, full_check=True)
    return proto


def export(model, path, *, with_lengths=False, with_state=False, opset=None):
    """Write ``model`` to ``path`` as ONNX; return the ``onnx.ModelProto``.

    See :mod:`rnnkern.onnx` for the graph's inputs and outputs. The model is written as in
    eval mode (dropout off) whatever its mode. Raises :class:`ExportError` (a ValueError) for a
    model that cannot be exported, naming the layer, or an opset outside what is supported.
    """
    proto = build_model(model, with_lengths=with_lengths, with_state=with_state, opset=opset)
    save(proto, path)
    return proto


def save(proto, path):
    """Write ``proto`` to ``path`` (its folder created when missing)."""
    path = os.fspath(path)
    folder = os.path.dirname(os.path.abspath(path))
    os.makedirs(folder, exist_ok=True)
    onnx.save(proto, path)
