"""Export rnnkern models to ONNX: ``rnnkern.onnx.export(model, "model.onnx")``.

A :class:`rnnkern.Sequential` of ``OneHot | Embedding`` (first), ``LSTM | GRU | RNN``
(stacked, bidirectional, every cell option), ``Dropout`` (identity), ``Dense`` and
``LastStep`` becomes standard ONNX operators, batch and time dynamic, the same function as
``model.forward`` in eval mode (outputs zero past each row's length, ``LastStep`` at each
row's last valid step, T = 0 giving the initial state)::

    >>> import rnnkern.onnx
    >>> rnnkern.onnx.export(model, "model.onnx", with_lengths=True, with_state=True)
    >>> import onnxruntime as ort
    >>> sess = ort.InferenceSession("model.onnx")
    >>> outs = sess.run(None, rnnkern.onnx.feeds(model, ids, lengths=lengths,
    ...                                          initial_state=state, with_state=True))
    >>> logits, state = outs[0], rnnkern.onnx.unpack_state(model, outs)

Inputs and outputs: see :mod:`rnnkern.onnx.signature`. float32 models use ONNX's
``LSTM``/``GRU``/``RNN`` operators; float64 models a ``Scan`` over the cell written out in
elementary operators, because onnxruntime has no float64 kernel for those three
(:mod:`rnnkern.onnx.recurrent`).

Needs the ``onnx`` package (``pip install 'rnnkern[onnx]'``, which brings onnxruntime too);
``import rnnkern.onnx`` works without it, and :func:`export` then raises an ImportError that
says what to install. ``python -m rnnkern export --checkpoint X --onnx model.onnx`` exports a
checkpoint of ``python -m rnnkern train``.
"""
from __future__ import annotations

from .signature import feeds, input_names, output_names, unpack_state
from .validate import ExportError

__all__ = ["export", "build_model", "ExportError", "feeds", "unpack_state", "input_names",
           "output_names"]


def export(model, path, *, with_lengths=False, with_state=False, opset=None):
    """Write ``model`` (a :class:`rnnkern.Sequential`) to ``path`` as ONNX and return the
    ``onnx.ModelProto``.

    Args:
        with_lengths: add the input ``lengths`` (int64 [batch]), as ``forward``'s ``lengths``
        with_state:   add each recurrent layer's initial state as inputs and its final state
                      as outputs after ``output`` (``initial_h.{i}``, ``initial_c.{i}`` for
                      LSTMs; ``final_h.{i}``, ``final_c.{i}``; i its index in the model)
        opset:        ONNX opset, 14 up to the installed onnx's newest (default 17)

    Raises ExportError (a ValueError) naming the layer for a model that cannot be exported,
    ImportError when onnx is not installed."""
    from .exporter import export as _export       # imports onnx (clear ImportError without)
    return _export(model, path, with_lengths=with_lengths, with_state=with_state, opset=opset)


def build_model(model, *, with_lengths=False, with_state=False, opset=None,
                recurrent_form="auto"):
    """The checked ``onnx.ModelProto`` that :func:`export` writes; ``recurrent_form``
    "operator" or "scan" forces one form of the recurrent layers (see
    :mod:`rnnkern.onnx.recurrent`; "auto": operators in float32, Scan in float64)."""
    from .exporter import build_model as _build
    return _build(model, with_lengths=with_lengths, with_state=with_state, opset=opset,
                  recurrent_form=recurrent_form)
