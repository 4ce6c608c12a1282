"""A thin composition of layers: :class:`Sequential`.

Shape legend: B batch, T time steps, I input size, H hidden size, L layers, C classes/outputs.
"""
from __future__ import annotations

import numpy as np

from .device import check_device, device_of, to_device
from .layers import _Recurrent


def _is_recurrent(layer):
    return isinstance(layer, _Recurrent)


class Sequential:
    """Layers applied in order; recurrent layers carry state, the others act per time step.

    Layers are :class:`~rnnkern.LSTM`/:class:`~rnnkern.GRU`/:class:`~rnnkern.RNN` and the
    modules of :mod:`rnnkern.modules` (``Dense``, ``Embedding``, ``OneHot``, ``Dropout``,
    ``LastStep``), or any object with ``forward(x, lengths)``, ``backward(dy)``, ``params``,
    ``grads``, ``train(mode)``.

    State: a tuple with one entry per layer, the recurrent layer's state (LSTM ``(h, c)``, GRU/RNN
    ``h``, each [L,B,H]) or None for the other layers. ``initial_state=None`` (or a None entry)
    means zeros.

    Parameters are exposed as one flat dict ``params`` with names ``"{index}.{name}"``, e.g.
    ``"0.weight_ih_l0"``, ``"1.weight"``; ``grads`` has the same keys. Both are rebuilt on each
    access from the layers' current arrays, so an optimizer that updates ``params[k]`` in place
    updates the layer.

    Example (lab 12-1, hihello)::

        >>> model = Sequential([OneHot(5), LSTM(5, 5, seed=0), Dense(5, 5, seed=1)])
        >>> logits = model(x_ids)                   # [B,T] ints -> [B,T,5]
        >>> loss, d_logits = sequence_loss(logits, y_ids, return_grad=True)
        >>> model.backward(d_logits)                # fills model.grads
        >>> y_t, state = model.step(ids_t, state)   # one step, carrying state ([B] ints -> [B,5])
    """

    def __init__(self, layers):
        layers = list(layers)
        if not layers:
            raise ValueError("Sequential needs at least one layer")
        for i, layer in enumerate(layers):
            for attr in ("forward", "backward", "params", "grads", "train"):
                if not hasattr(layer, attr):
                    raise TypeError(f"layers[{i}] ({type(layer).__name__}) has no {attr!r}")
        self.layers = layers
        self.training = True
        self.d_initial_state = None  # gradient w.r.t. initial_state after backward()
        self._ran = False
        self._device = "cpu"         # where to() last put the model (layers without arrays)

    # ------------------------------------------------------------------ container
    def __len__(self):
        return len(self.layers)

    def __getitem__(self, i):
        return self.layers[i]

    def __iter__(self):
        return iter(self.layers)

    def __repr__(self):
        body = "".join(f"\n  ({i}): {layer!r}" for i, layer in enumerate(self.layers))
        return f"Sequential({body}\n)"

    # ------------------------------------------------------------------ parameters
    @property
    def params(self):
        """Flat ``{"{i}.{name}": array}`` of every layer's parameters (live arrays)."""
        return {f"{i}.{k}": v for i, layer in enumerate(self.layers) for k, v in layer.params.items()}

    @property
    def grads(self):
        """Flat gradients, same keys as :attr:`params`; filled by :meth:`backward`."""
        return {f"{i}.{k}": v for i, layer in enumerate(self.layers) for k, v in layer.grads.items()}

    def num_params(self):
        return int(sum(v.size for v in self.params.values()))

    def load_params(self, params):
        """Copy values into the existing parameter arrays (same keys and shapes required), on
        the model's device whichever device the values come from (a checkpoint's host arrays
        go to the GPU of a model there)."""
        mine = self.params
        if set(params) != set(mine):
            missing, extra = sorted(set(mine) - set(params)), sorted(set(params) - set(mine))
            raise ValueError(f"params keys differ: missing {missing}, unexpected {extra}")
        for k, dst in mine.items():
            src = params[k] if hasattr(params[k], "shape") else np.asarray(params[k])
            if tuple(src.shape) != tuple(dst.shape):
                raise ValueError(f"params[{k!r}] must have shape {dst.shape}, got {src.shape}")
        for k, dst in mine.items():
            dst[...] = to_device(params[k], device_of(dst))

    # ------------------------------------------------------------------ device
    @property
    def device(self):
        """Where the layers' arrays live: "cpu" (NumPy) or "cuda" (CuPy). Inputs must live
        there too (``rnnkern.device.to_device(x, model.device)``); layers without arrays
        (Dropout, LastStep) run wherever their input is. RuntimeError when layers were moved
        to different devices one by one."""
        found = {}
        for i, layer in enumerate(self.layers):
            d = getattr(layer, "device", None)
            if d is not None:
                found.setdefault(d, []).append(i)
        if len(found) > 1:
            raise RuntimeError("the layers live on different devices ("
                               + ", ".join(f"{d}: layers {v}" for d, v in sorted(found.items()))
                               + "); put the whole model on one with model.to(device)")
        return next(iter(found), self._device)

    def to(self, device):
        """Move every layer's parameters, gradients and fixed tables to ``device`` ("cpu" or
        "cuda", which needs CuPy); returns the model. Parameter arrays are replaced, so read
        ``model.params`` afresh afterwards; an optimizer's state follows the parameters at its
        next step (:class:`rnnkern.optim.Optimizer`)."""
        device = check_device(device)
        for i, layer in enumerate(self.layers):
            if not hasattr(layer, "to"):
                raise TypeError(f"layers[{i}] ({type(layer).__name__}) has no to(device)")
        for layer in self.layers:
            layer.to(device)
        self._device = device
        self._ran = False
        return self

    def get_rng_state(self):
        """The state of every layer's random generator (dropout masks), for checkpoints."""
        states = {}
        for i, layer in enumerate(self.layers):
            rng = getattr(layer, "_rng", None)
            if isinstance(rng, np.random.Generator):
                states[str(i)] = rng.bit_generator.state
        return states

    def set_rng_state(self, states):
        for i, layer in enumerate(self.layers):
            if str(i) in states:
                layer._rng.bit_generator.state = states[str(i)]

    # ------------------------------------------------------------------ modes
    def train(self, mode=True):
        self.training = bool(mode)
        for layer in self.layers:
            layer.train(mode)
        return self

    def eval(self):
        return self.train(False)

    # ------------------------------------------------------------------ forward / backward
    def __call__(self, x, initial_state=None, lengths=None, return_state=False):
        return self.forward(x, initial_state, lengths, return_state)

    def forward(self, x, initial_state=None, lengths=None, return_state=False):
        """Run every layer.

        Args:
            x:             input of the first layer: [B,T,I] floats, or [B,T] ids for
                           ``Embedding``/``OneHot``
            initial_state: None, or a tuple with one entry per layer (see class docstring)
            lengths:       None or ints [B]; passed to recurrent layers and ``LastStep``
            return_state:  also return the final state tuple

        Returns:
            the last layer's output (e.g. logits [B,T,C]), and the state if ``return_state``.
        """
        y, state = self._run(x, initial_state, lengths, keep=True)
        self._ran = True
        return (y, state) if return_state else y

    def infer(self, x, initial_state=None, lengths=None, return_state=False):
        """:meth:`forward` for inference: in eval mode for this call (no dropout), and nothing
        kept for a backward. Same arguments and results as :meth:`forward` (:meth:`backward`
        then needs a forward of its own). Layer by layer, each recurrent layer through its
        :meth:`~rnnkern.LSTM.infer` (its time loop in runs of steps whose activations fit
        ``config.INFER_CHUNK_BYTES``, nothing saved): besides each layer's output, bounded
        memory whatever T is, on every backend."""
        y, state = self._run_eval(x, initial_state, lengths)
        self._ran = False
        return (y, state) if return_state else y

    def _run_eval(self, x, initial_state, lengths):
        """Every layer in eval mode for this call, nothing kept for a backward."""
        was_training = self.training
        self.train(False)
        try:
            return self._run(x, initial_state, lengths, keep=False)
        finally:
            self.train(was_training)

    def _run(self, x, initial_state, lengths, keep):
        n = len(self.layers)
        if initial_state is not None:
            if not isinstance(initial_state, (tuple, list)) or len(initial_state) != n:
                raise ValueError(f"initial_state must be a tuple with one entry per layer "
                                 f"({n}), as returned by forward(..., return_state=True)")
        state = [None] * n
        y = x
        for i, layer in enumerate(self.layers):
            if _is_recurrent(layer):
                s0 = None if initial_state is None else initial_state[i]
                y, state[i] = (layer.forward if keep else layer.infer)(y, s0, lengths)
            else:
                y = layer.forward(y, lengths)
            if not keep:
                _release(layer)
        return y, tuple(state)

    def backward(self, d_out, d_state=None):
        """Backpropagate ``d_out`` (gradient w.r.t. the output of :meth:`forward`).

        ``d_state``: None, or per-layer gradients w.r.t. the final state (tuple as the state).
        Fills :attr:`grads` (overwrites; no accumulation) and :attr:`d_initial_state`.
        Returns the gradient w.r.t. ``x`` (None when ``x`` was integer ids).
        """
        if not self._ran:
            raise RuntimeError("backward() needs a forward() call first")
        n = len(self.layers)
        if d_state is not None and (not isinstance(d_state, (tuple, list)) or len(d_state) != n):
            raise ValueError(f"d_state must be a tuple with one entry per layer ({n})")
        d_init = [None] * n
        d = d_out
        for i in reversed(range(n)):
            layer = self.layers[i]
            if _is_recurrent(layer):
                d, d_init[i] = layer.backward(d, None if d_state is None else d_state[i])
            else:
                d = layer.backward(d)
        self.d_initial_state = tuple(d_init)
        return d

    def step(self, x_t, state=None):
        """One time step, carrying state: ``x_t`` [B,I] floats or [B] ids -> ``(y_t, state)``.

        ``y_t`` is the output at that step (e.g. logits [B,C]). Equivalent to running
        :meth:`infer` over the whole prefix, without re-running it: eval mode (no dropout), the
        current parameters, nothing kept for a backward, every check. For many steps
        :meth:`inference` is faster (one compiled call a step, over a snapshot of the weights).
        """
        x_t = x_t if hasattr(x_t, "shape") else np.asarray(x_t)
        y, state = self._run_eval(x_t[:, None], state, None)
        self._ran = False
        return (y[:, 0] if y.ndim == 3 else y), state

    def inference(self, batch=1):
        """A :class:`rnnkern.inference.Inference` of this model for ``batch`` sequences: one
        compiled step per id over a snapshot of the current parameters (models of the step
        plan's form whose recurrent layers run on the C++ backend; ValueError says why not)."""
        from .inference import Inference
        return Inference(self, batch)


def _release(layer):
    """Drop what a layer kept for its backward (its saved activations or masks)."""
    for attr in ("_saved", "_mask", "_x", "_ids"):
        if getattr(layer, attr, None) is not None:
            setattr(layer, attr, None)
