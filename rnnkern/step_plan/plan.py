"""What every step plan shares: the four stages it reports, the batch's state and lengths
checked once, and the optimizer's update over the flat parameters.

A plan is built once per (model, loss, optimizer, batch shape, dtype, backend) and runs one
training step per call: input -> recurrent stack -> head + loss -> optimizer update. Its
``stages`` say in words which implementation runs each stage where.

Shape legend: B batch, T time steps, L stacked cells of a layer, H hidden size.
"""
from __future__ import annotations

import numpy as np


class StepPlan:
    """Base of the plans (:mod:`.seam`, :mod:`.cpp`). ``form``: the model's parts
    (:class:`.form.ModelForm`); ``flat``: its :class:`.flat.FlatParameters`; ``backend``: the
    module every recurrent layer resolves to; ``shape``: the batch's (B, T)."""

    def __init__(self, form, flat, optimizer, backend, shape):
        self.form, self.flat, self.optimizer = form, flat, optimizer
        self.backend, self.shape = backend, tuple(shape)
        self.stages = {}   # stage -> what runs it, in words; filled by the subclass

    def __str__(self):
        B, T = self.shape
        lines = [f"step plan for batches [B,T] = [{B},{T}], {np.dtype(self.form.dtype).name}, "
                 f"backend {self.backend.name}:"]
        lines += [f"  {stage:7s} {what}" for stage, what in self.stages.items()]
        return "\n".join(lines)

    def run(self, x, y, initial_state=None, lengths=None, weights=None, return_state=False,
            loss_scale=1.0, exchange=None):
        """One training step; returns the loss (and the final state with ``return_state``).

        Data-parallel steps (:mod:`rnnkern.distributed`) pass ``loss_scale``, this rank's share
        of the loss's normaliser, which scales its loss and gradients, and ``exchange(value) ->
        value``, which sums the flat gradient and the loss over the ranks once the gradients
        are final (also when this rank's loss is not finite: every rank takes part); the
        update then follows where the sum is finite."""
        raise NotImplementedError

    # ---------------------------------------------------------------- shared pieces
    def _lengths(self, lengths):
        """lengths checked once (int64 [B] or None), for every layer."""
        return self.form.recurrent[0]._check_lengths(lengths, *self.shape)

    def _initial_states(self, initial_state):
        """Per recurrent layer, (h0 [L,B,H], c0 [L,B,H] | None) checked, or None: zeros."""
        if initial_state is None:
            return None
        n = len(self.form.model.layers)
        if not isinstance(initial_state, (tuple, list)) or len(initial_state) != n:
            raise ValueError(f"initial_state must be a tuple with one entry per layer ({n}), "
                             f"as returned by forward(..., return_state=True)")
        B = self.shape[0]
        return [r._split_state(initial_state[self.form.recurrent_index(i)], B, np)
                for i, r in enumerate(self.form.recurrent)]

    def _state_tuple(self, states):
        """The state tuple of ``Sequential.forward(..., return_state=True)`` from each recurrent
        layer's state, in order."""
        out = [None] * len(self.form.model.layers)
        for i, s in enumerate(states):
            out[self.form.recurrent_index(i)] = s
        return tuple(out)

    def _update(self):
        """The update stage: the optimizer's rule over the flat parameters."""
        self.optimizer.step_flat(self.flat.params, self.flat.grads, self.flat.layout)


def update_words(optimizer):
    return f"{type(optimizer).__name__}.step_flat over the flat parameters (NumPy)"
