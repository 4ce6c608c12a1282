"""Inference without the training forward's bookkeeping: a model stepped one id at a time.

:class:`Inference` (``model.inference(batch)``) steps a model of the step plan's form
(``Sequential([OneHot | Embedding, recurrent layers..., [Dropout], Dense])``, every recurrent
layer on the C++ backend) through one compiled stack (``_C.InferStack``, csrc/cpu/infer.h):

- the weights are packed once, when it is made, so it is a snapshot: make a new one after the
  parameters change;
- a step costs each layer's cell step and the head's product, with no validation of arrays
  already checked and nothing saved for a backward (O(B*H) per layer);
- :meth:`Inference.generate` runs a whole generation, the sampling of each next id included, in
  one call.

The logits are those of the training forward (``model(ids)``) to the bit; the draws are those of
:func:`rnnkern.sample_logits` with the same generator. :func:`rnnkern.generate` uses it when the
model allows, and :meth:`rnnkern.Sequential.step` otherwise.

Shape legend: B batch (sequences at once), P prime length, V vocabulary, C classes, H_l units of
layer l.
"""
from __future__ import annotations

import numpy as np

from . import backends
from .modules import _check_ids

__all__ = ["Inference", "inference_reason"]


def inference_reason(model):
    """None when :class:`Inference` can run ``model``, else why not (a sentence)."""
    return _form(model)[1]


def _form(model):
    from .step_plan.form import stack_form   # step_plan imports the layers: import it late
    form, reason = stack_form(model)
    if form is None:
        return None, reason
    if form.encoder is None:
        return None, "the model has no OneHot or Embedding input: there are no ids to feed"
    if getattr(model, "device", "cpu") != "cpu":
        return None, "the model is on the GPU (the compiled stack runs on the CPU)"
    for r in form.recurrent:
        if backends.resolve(r.backend, np.zeros(1)).name != "cpp":
            return None, "a recurrent layer does not run on the C++ backend"
    return form, None


class Inference:
    """A model of the step plan's form, stepped one id at a time by one compiled stack.

    Args:
        model: ``Sequential([OneHot | Embedding, recurrent layers..., [Dropout], Dense])`` whose
               recurrent layers run on the C++ backend (:func:`inference_reason` says why not);
               run in eval mode (no dropout), with its parameters as they are now (a snapshot)
        batch: B, the sequences stepped at once

    ``step(ids [B]) -> logits [B,C]`` moves every layer's state on; ``state`` is each recurrent
    layer's state (the structure :meth:`rnnkern.Sequential.forward` returns, copies);
    ``reset()`` sets it to zeros; ``generate(ids, length, ...)`` samples ``length`` ids per
    sequence in one call.

    Example::

        >>> inf = model.inference(batch=1)
        >>> for i in vocab.encode("ROMEO:")[:-1]:
        ...     inf.step([i])
        >>> ids = inf.generate([vocab.encode(":")[0]], 200, temperature=0.8, rng=0)
    """

    def __init__(self, model, batch=1):
        form, reason = _form(model)
        if form is None:
            raise ValueError(f"Inference cannot run this model: {reason}")
        if isinstance(batch, bool) or not isinstance(batch, (int, np.integer)) or batch < 1:
            raise ValueError(f"batch must be an int >= 1, got {batch!r}")
        from .backends.cpp import _C, native_spec
        self._form, self.batch = form, int(batch)
        self.num_classes = form.head.out_features
        self._vocab = form.table().shape[0]
        def snapshot(a):   # the stack reads some arrays in place: give it its own copies
            return None if a is None else np.array(a, dtype=form.dtype, order="C", copy=True)

        layers = [(native_spec(c.spec), *(snapshot(c.layer.params[n]) for n in c.names))
                  for c in form.cells]
        head = form.head
        make = _C.InferStackF32 if form.dtype == np.float32 else _C.InferStackF64
        self._stack = make(layers, batch=self.batch, table=snapshot(form.table()),
                           weight=snapshot(head.params["weight"]),
                           bias=snapshot(head.params.get("bias")))

    def _ids(self, ids, name="ids"):
        ids = np.ascontiguousarray(_check_ids(ids, self._vocab, type(self._form.encoder).__name__),
                                   dtype=np.int64)
        if ids.shape != (self.batch,):
            raise ValueError(f"{name} must have shape [B] = ({self.batch},), got {ids.shape}")
        return ids

    def step(self, ids):
        """One step from ids [B]: returns the logits [B,C]; the state moves on."""
        return self._stack.step(self._ids(ids))

    def reset(self):
        """Every layer's state to zeros (a new sequence)."""
        self._stack.reset()

    @property
    def state(self):
        """The state tuple of ``Sequential.forward(..., return_state=True)`` (copies)."""
        views = self._stack.state
        cells = iter(range(len(views) // 2))
        per_layer = []
        for r in self._form.recurrent:
            idx = [next(cells) for _ in range(r.num_layers)]
            h = np.stack([views[2 * i] for i in idx])
            per_layer.append((h, np.stack([views[2 * i + 1] for i in idx]))
                             if r.spec.has_cell_state else h)
        out = [None] * len(self._form.model.layers)
        for i, s in enumerate(per_layer):
            out[self._form.recurrent_index(i)] = s
        return tuple(out)

    def generate(self, ids, length, *, temperature=1.0, top_k=None, rng=None):
        """``length`` steps from ids [B], each next id drawn from the step's logits as
        :func:`rnnkern.sample_logits` draws it (one uniform draw per sequence and step from
        ``rng``; ``temperature=0``: argmax, no draw) and fed to the next step, all in one call.
        Returns the new ids, int64 [B, length]. Arguments as :func:`rnnkern.generate`."""
        from .sample import _check_length, _check_temperature, _check_top_k
        ids = self._ids(ids)
        length = _check_length(length)
        temperature, top_k = _check_temperature(temperature), _check_top_k(top_k)
        u = None
        if temperature > 0:
            rng = rng if isinstance(rng, np.random.Generator) else np.random.default_rng(rng)
            u = rng.random((length, self.batch))
        out = self._stack.generate(ids, length, u=u, temperature=temperature,
                                   top_k=0 if top_k is None else top_k)
        return np.ascontiguousarray(out.T)
