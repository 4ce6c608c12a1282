"""The step plan over any backend's seam (numpy, numba): the model's own modules, each input
checked once, and the flat update.

Stages: the encoder module (ids -> its table rows; floats go straight in), each recurrent layer
through the backend's seam one cell at a time (:meth:`rnnkern.layers._Recurrent.
_forward_validated`), the Dense head with :func:`rnnkern.sequence_loss` in NumPy, and the
optimizer's update over the flat parameters. The same arithmetic as the generic loop, so results
are bitwise equal to it; what the plan saves is the checks of every layer's input and the
per-name optimizer bookkeeping.

Shape legend: B batch, T time steps, H hidden size, C classes.
"""
from __future__ import annotations

import math

import numpy as np

from ..losses import sequence_loss
from ..modules import OneHot
from .plan import StepPlan, update_words


class SeamPlan(StepPlan):
    def __init__(self, form, flat, optimizer, backend, shape):
        super().__init__(form, flat, optimizer, backend, shape)
        enc = form.encoder
        cells = ", ".join(f"{type(r).__name__}({r.input_size}->{r.hidden_size}"
                          f"{f' x{r.num_layers}' if r.num_layers > 1 else ''})"
                          for r in form.recurrent)
        self.stages = {
            "input": ("floats [B,T,I] as given" if enc is None else
                      f"{type(enc).__name__} ids -> rows of its table (NumPy)"),
            "stack": f"{backend.name}, one seam call per cell: {cells}",
            "head": f"Dense({form.head.in_features}->{form.head.out_features}) + sequence_loss "
                    f"(NumPy)",
            "update": update_words(optimizer),
        }

    def run(self, x, y, initial_state=None, lengths=None, weights=None, return_state=False,
            loss_scale=1.0, exchange=None):
        form = self.form
        if form.encoder is not None:
            layer_in = form.encoder.forward(x)          # checks the ids
        else:
            layer_in, _ = form.recurrent[0]._check_x(x)
        lengths = self._lengths(lengths)
        states0 = self._initial_states(initial_state)
        B = self.shape[0]
        states = []
        for i, r in enumerate(form.recurrent):
            if states0 is None:
                h0 = np.zeros((r.num_layers, B, r.hidden_size), r.dtype)
                c0 = np.zeros_like(h0) if r.spec.has_cell_state else None
            else:
                h0, c0 = states0[i]
            layer_in, state = r._forward_validated(layer_in, h0, c0, lengths)
            states.append(state)
        if form.head_dropout is not None:
            layer_in = form.head_dropout.forward(layer_in)
        logits = form.head.forward(layer_in)
        try:
            value, d = sequence_loss(logits, y, weights, return_grad=True)
        except ValueError:
            if np.isfinite(logits).all():
                raise                   # bad targets or weights
            value = math.nan            # NaN or inf from the parameters: nothing is updated
        form.model._ran = False     # the plan leaves no forward for model.backward()
        if math.isfinite(value):
            if loss_scale != 1.0:
                value *= loss_scale
                d *= loss_scale
            d = form.head.backward(d)
            if form.head_dropout is not None:
                d = form.head_dropout.backward(d)
            for r in reversed(form.recurrent):
                d, _ = r._backward_validated(d)
            if form.encoder is not None and type(form.encoder) is not OneHot:
                form.encoder.backward(d)
            self.flat.collect_grads()
        if exchange is not None:
            value = exchange(value)
        if math.isfinite(value):        # else nothing is updated (TrainStep reports it)
            self._update()
        return (value, self._state_tuple(states)) if return_state else value
