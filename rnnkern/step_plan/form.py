"""The model form a step plan runs: ``Sequential([OneHot | Embedding (optional), recurrent
layers of any cells ..., Dropout (optional), Dense])`` with :func:`rnnkern.sequence_loss` and an
optimizer of :mod:`rnnkern.optim`, every layer of one dtype.

Shape legend: V vocabulary, E the encoder's width (one-hot depth or embedding size), H hidden
size, C classes.
"""
from __future__ import annotations

from dataclasses import dataclass

from ..layers import _Recurrent
from ..losses import sequence_loss
from ..model import Sequential
from ..modules import Dense, Dropout, Embedding, OneHot
from ..optim import Optimizer

_SHAPE = "layers are not [OneHot|Embedding], recurrent layers..., [Dropout], Dense"


@dataclass(frozen=True)
class Cell:
    """Stacked cell ``k`` of a recurrent layer: its parameter names and sizes."""

    layer: _Recurrent
    k: int

    @property
    def spec(self):
        return self.layer.spec

    @property
    def hidden(self):
        return self.layer.hidden_size

    @property
    def input(self):
        return self.layer.input_size if self.k == 0 else self.layer.hidden_size

    @property
    def names(self):
        """(weight_ih, weight_hh, bias_ih, bias_hh) names of this cell's parameters."""
        return tuple(f"{n}_l{self.k}" for n in ("weight_ih", "weight_hh", "bias_ih", "bias_hh"))

    @property
    def dropout_after(self):
        """Whether the layer drops this cell's output in training (between its cells only)."""
        return bool(self.layer.dropout) and self.k + 1 < self.layer.num_layers


@dataclass(frozen=True)
class ModelForm:
    """The parts of a model of the plan's form."""

    model: Sequential
    encoder: OneHot | Embedding | None
    recurrent: tuple
    head_dropout: Dropout | None
    head: Dense

    @property
    def dtype(self):
        return self.head.dtype

    @property
    def cells(self):
        """Every stacked cell, bottom up."""
        return tuple(Cell(r, k) for r in self.recurrent for k in range(r.num_layers))

    def table(self):
        """The encoder's [V,E] lookup table (one-hot: the identity)."""
        if type(self.encoder) is OneHot:
            return self.encoder._table
        return self.encoder.params["weight"]

    def recurrent_index(self, i):
        """The index in ``model.layers`` of recurrent layer ``i``."""
        return i + (self.encoder is not None)


def model_form(model, loss, optimizer):
    """``(ModelForm, None)``, or ``(None, reason)`` when the step plan does not apply."""
    if loss is not sequence_loss:
        return None, "loss is not rnnkern.sequence_loss"
    if not isinstance(optimizer, Optimizer) or type(optimizer).step is not Optimizer.step:
        return None, "optimizer is not one of rnnkern.optim's"
    return stack_form(model)


def stack_form(model):
    """The model's parts, as :func:`model_form` without the loss and optimizer (what the
    inference path, rnnkern/inference.py, runs): ``(ModelForm, None)`` or ``(None, reason)``."""
    if type(model) is not Sequential:
        return None, "model is not a Sequential"
    layers = list(model.layers)
    encoder = layers.pop(0) if layers and type(layers[0]) in (OneHot, Embedding) else None
    head_dropout = layers.pop(-2) if len(layers) >= 2 and type(layers[-2]) is Dropout else None
    if len(layers) < 2 or type(layers[-1]) is not Dense:
        return None, _SHAPE
    head, recurrent = layers[-1], tuple(layers[:-1])
    if not all(isinstance(r, _Recurrent) for r in recurrent):
        return None, _SHAPE
    if any(r.bidirectional for r in recurrent):
        return None, "bidirectional layers take the generic loop"
    if len({m.dtype for m in model.layers if hasattr(m, "dtype")}) != 1:
        return None, "layers have different dtypes"
    width = (encoder.depth if type(encoder) is OneHot else
             encoder.embedding_dim if type(encoder) is Embedding else recurrent[0].input_size)
    for r in recurrent:
        if r.input_size != width:
            return None, "a layer's input size does not match the previous layer's output"
        width = r.hidden_size
    if head.in_features != width:
        return None, "the Dense layer's in_features do not match the last hidden size"
    return ModelForm(model, encoder, recurrent, head_dropout, head), None
