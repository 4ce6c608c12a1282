"""Every parameter and gradient of a model in one flat array each, bound into the layers.

The layers' ``params`` and ``grads`` dicts hold views of the two flat arrays, so the optimizer
updates all parameters in one pass (``Optimizer.step_flat``), a kernel writes gradients straight
where the optimizer reads them, and everything that reads the dicts -- checkpoints, the generic
step, ``state_dict`` -- sees the same values. The flat arrays live where the parameters do: host
arrays for the host plans, one device buffer each for the GPU form of the step
(:mod:`.device`).
"""
from __future__ import annotations

import numpy as np

from ..device import array_module


class FlatParameters:
    """``params`` / ``grads`` [P]: the model's parameters, layer by layer in ``layout`` order;
    ``layout``: ``((name, shape), ...)`` with the model's ``"{i}.{name}"`` names;
    ``reduce_buffer`` [P+1]: ``grads`` and a slot for the loss; ``xp``: their array module
    (that of the model's parameters)."""

    def __init__(self, model, dtype):
        self.layout = tuple((f"{i}.{k}", v.shape) for i, layer in enumerate(model.layers)
                            for k, v in layer.params.items())
        total = sum(int(np.prod(s, dtype=np.int64)) for _, s in self.layout)
        first = next((v for layer in model.layers for v in layer.params.values()), None)
        self.xp = xp = np if first is None else array_module(first)
        self.params = xp.empty(total, dtype)
        # the gradient and one slot after it: a data-parallel step (rnnkern.distributed) sums
        # the ranks' gradients and loss shares in one allreduce over this buffer
        self.reduce_buffer = xp.zeros(total + 1, dtype)
        self.grads = self.reduce_buffer[:total]
        self._bound = []   # (layer, name, param view, grad view)
        lo = 0
        for layer in model.layers:
            for name in list(layer.params):
                value = xp.asarray(layer.params[name])
                p = self.params[lo:lo + value.size].reshape(value.shape)
                g = self.grads[lo:lo + value.size].reshape(value.shape)
                p[...] = value
                layer.params[name], layer.grads[name] = p, g
                self._bound.append((layer, name, p, g))
                lo += value.size

    def grad(self, layer, name):
        """The flat gradient's view for ``layer.params[name]``."""
        return next(g for y, n, _, g in self._bound if y is layer and n == name)

    def still_bound(self):
        """Whether the layers still hold the parameter views (``load_params`` or an assignment
        replaces them: then a new FlatParameters must be made from the new values). In the same
        pass, points their ``grads`` at the flat gradient again (a generic backward replaces
        those arrays)."""
        for layer, name, p, g in self._bound:
            if layer.params.get(name) is not p:
                return False
            layer.grads[name] = g
        return True

    def collect_grads(self):
        """Copy gradients a backward left in new arrays into the flat gradient (rebinding it)."""
        for layer, name, _, g in self._bound:
            got = layer.grads[name]
            if got is not g:
                self.xp.copyto(g, got)
                layer.grads[name] = g
