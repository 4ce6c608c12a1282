"""Which models export, checked before any graph is built (no onnx needed).

A :class:`rnnkern.Sequential` of ``OneHot | Embedding`` (first layer only), ``LSTM | GRU |
RNN``, ``Dropout``, ``Dense`` and ``LastStep``, whose sizes chain. Anything else raises
:class:`ExportError` naming the layers at fault.
"""
from __future__ import annotations

from ..layers import GRU, LSTM, RNN
from ..model import Sequential
from ..modules import Dense, Dropout, Embedding, LastStep, OneHot

SUPPORTED = (OneHot, Embedding, LSTM, GRU, RNN, Dropout, Dense, LastStep)
IDS_LAYERS = (OneHot, Embedding)
RECURRENT = (LSTM, GRU, RNN)


class ExportError(ValueError):
    """A model (or an option) that :func:`rnnkern.onnx.export` cannot write; the message
    says which layer and why. A ValueError, so ``except ValueError`` works."""


def _name(i, layer):
    return f"layers[{i}] ({type(layer).__name__})"


def _in_size(layer):
    """Features a layer reads per step, or None when it takes any."""
    if isinstance(layer, RECURRENT):
        return layer.input_size
    if isinstance(layer, Dense):
        return layer.in_features
    return None


def check(model):
    """Raise :class:`ExportError` unless ``model`` exports; return True for a model of ids
    (its first layer OneHot/Embedding), False for one of floats [B,T,I]."""
    if not isinstance(model, Sequential):
        raise ExportError(f"rnnkern.onnx.export takes a rnnkern.Sequential, got "
                          f"{type(model).__name__} (wrap a layer: Sequential([layer]))")
    names = ", ".join(cls.__name__ for cls in SUPPORTED)
    # exact types: a subclass may compute something else in its forward
    bad = [_name(i, layer) for i, layer in enumerate(model.layers)
           if type(layer) not in SUPPORTED]
    if bad:
        raise ExportError(f"cannot export {', '.join(bad)}: no ONNX form for "
                          f"{'it' if len(bad) == 1 else 'them'}; supported layers: {names}")
    ids = isinstance(model.layers[0], IDS_LAYERS)
    features = None       # what the previous layer outputs per step (None: not known)
    per_step = True       # [B,T,F] (False after LastStep: [B,F])
    last_step = None
    for i, layer in enumerate(model.layers):
        if isinstance(layer, IDS_LAYERS):
            if i:
                raise ExportError(f"{_name(i, layer)} reads integer ids, so it can only be "
                                  f"the first layer")
            features = layer.depth if isinstance(layer, OneHot) else layer.embedding_dim
            continue
        if isinstance(layer, (*RECURRENT, LastStep)) and not per_step:
            raise ExportError(f"{_name(i, layer)} needs [B,T,F] steps, but {last_step} "
                              f"before it leaves one vector [B,F] per row")
        need = _in_size(layer)
        if need is not None and features is not None and need != features:
            raise ExportError(f"{_name(i, layer)} reads {need} features, but the layer before "
                              f"it gives {features}")
        if isinstance(layer, RECURRENT):
            features = layer.output_size
        elif isinstance(layer, Dense):
            features = layer.out_features
        elif isinstance(layer, LastStep):
            per_step, last_step = False, _name(i, layer)
    return ids


def input_features(model):
    """I of a float-input model: the first layer that names its input size (None: any)."""
    for layer in model.layers:
        size = _in_size(layer)
        if size is not None:
            return size
    return None
