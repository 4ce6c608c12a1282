"""The step plan on the C++ backend: the whole step as one ``_C.StackStep`` call.

One call per step runs, over each thread's chunk of the batch, every layer's forward, the dense
head and softmax cross-entropy, every layer's backward, then the gradient sums and, for a plain
Adam whose every gradient is final inside the call, Adam's update (csrc/cpu/stack.h). Python
around it loads the batch into the call's buffers, draws the dropout masks (from the same
generators, in the same order, as the layers' own forward), and finishes what the call leaves:
an embedding's gradients, clipping, and the update -- Adam's still in C++ (``_C.adam``), any
other optimizer's in NumPy. In a data-parallel step (:mod:`rnnkern.distributed`) the update
never runs inside the call: the flat gradient is summed over the ranks first, once the call has
returned and the embedding's gradients are formed.

Input stage, by the encoder and the batch: ids with V <= B*T read their rows of a table
[V, G*H_0] inside the call -- for one-hot input that table is W_ih itself, read transposed, and
its gradient goes straight into dW_ih; for an embedding E it is E W_ih^T, formed per step, and
the call returns its gradient, from which dW_ih and dE are two GEMMs. With more ids than rows
(V > B*T), or floats, the first layer reads floats [B,T,E] (the ids' rows gathered here).

Shape legend: B batch, T time steps, N = B*T, V vocabulary, E encoder width, G gates, H hidden
size of a cell (H_0: the first), C classes.
"""
from __future__ import annotations

import math

import numpy as np

from ..backends import cpp as cpp_backend
from ..layers import dropout_mask
from ..modules import Embedding, OneHot
from ..optim import Adam
from .plan import StepPlan, update_words

_INT64 = np.dtype(np.int64)
_INT64_MAX = np.iinfo(np.int64).max


class CppPlan(StepPlan):
    def __init__(self, form, flat, optimizer, backend, shape):
        super().__init__(form, flat, optimizer, backend, shape)
        _C = cpp_backend._C
        B, T = self.shape
        N, dt = B * T, form.dtype
        enc, cells, head = form.encoder, form.cells, form.head
        V = None if enc is None else form.table().shape[0]
        self.table_mode = V is not None and V <= N
        self.one_hot = type(enc) is OneHot
        self.embedded = type(enc) is Embedding
        self.inv_n = 1.0 / (N + 1e-12)   # TF's sequence_loss: 1 / (the weight total + 1e-12)
        first = cells[0]
        GH = first.spec.gates * first.hidden
        # buffers the call keeps: states, masks, position weights and lengths (the batch's ids
        # and targets it reads in place, each run)
        self.weights = np.zeros(N, dt)
        self.lens = np.zeros(B, np.int64)
        self.h0 = [np.zeros((B, c.hidden), dt) for c in cells]
        self.c0 = [np.zeros((B, c.hidden), dt) if c.spec.has_cell_state else None for c in cells]
        self.h_n = [np.empty((B, c.hidden), dt) for c in cells]
        self.c_n = [np.empty((B, c.hidden), dt) if c.spec.has_cell_state else None for c in cells]
        # the layers' dropout between their cells, and the Dropout module before the head, as
        # they stand now (a change of train/eval or of p makes a new plan: TrainStep's key)
        self.masks = [np.empty((B, T, c.hidden), dt) if c.dropout_after and c.layer.training
                      else None for c in cells]
        hd = form.head_dropout
        self.head_mask = (np.empty((B, T, head.in_features), dt)
                          if hd is not None and hd.training and hd.p > 0 else None)
        self.draws_masks = self.head_mask is not None or any(m is not None for m in self.masks)
        p, g = self._params, self._grads
        layers = [_C.StackLayer(
            spec=cpp_backend.native_spec(c.spec), **{k: p(c.layer, n) for k, n in zip(
                ("w_ih", "w_hh", "b_ih", "b_hh"), c.names)},
            **{k: g(c.layer, n) for k, n in zip(("dw_ih", "dw_hh", "db_ih", "db_hh"), c.names)},
            h0=self.h0[i], c0=self.c0[i], h_n=self.h_n[i], c_n=self.c_n[i], mask=self.masks[i])
            for i, c in enumerate(cells)]
        self.x_in = self.dx_in = self.table = self.d_table = None
        inputs = {}
        if self.table_mode and self.one_hot:     # W_ih is the table, read transposed
            inputs = dict(table=p(first.layer, first.names[0]),
                          d_table=g(first.layer, first.names[0]), table_transposed=True)
            words = f"OneHot ids -> columns of W_ih [{GH},{V}], read inside the call"
        elif self.table_mode:                    # the table E W_ih^T, formed each step
            self.table, self.d_table = np.empty((V, GH), dt), np.empty((V, GH), dt)
            inputs = dict(table=self.table, d_table=self.d_table)
            words = (f"Embedding ids -> rows of E W_ih^T [{V},{GH}] (NumPy GEMM), read inside "
                     f"the call; its gradient -> dW_ih, dE (NumPy GEMMs)")
        else:
            self.x_in = np.empty((B, T, first.input), dt)
            if type(enc) is Embedding:
                self.dx_in = np.empty_like(self.x_in)
            inputs = dict(x=self.x_in, dx=self.dx_in)
            words = ("floats [B,T,I], copied in" if enc is None else
                     f"{type(enc).__name__} ids -> table rows gathered (NumPy), floats into the "
                     f"call" + ("; their gradient scattered into dE" if self.dx_in is not None
                                else ""))
        make = _C.StackStepF32 if dt == np.float32 else _C.StackStepF64
        self.call = make(layers, batch=self.shape, **inputs, weight=p(head, "weight"),
                         bias=head.params.get("bias"), dw=g(head, "weight"),
                         db=g(head, "bias") if "bias" in head.params else None,
                         weights=self.weights, lengths=self.lens, head_mask=self.head_mask)
        # Adam inside the call: possible for this optimizer and input (_adam_inside checks the
        # rest each step); the flat state and eps mode handed to the call, or None
        self.adam_may = type(optimizer) is Adam and type(enc) is not Embedding
        self.adam_flat, self.adam_eps_mode = None, None
        kinds = ", ".join(f"{type(r).__name__}({r.input_size}->{r.hidden_size}"
                          f"{f' x{r.num_layers}' if r.num_layers > 1 else ''})"
                          for r in form.recurrent)
        self.stages = {
            "input": words,
            "stack": f"cpp, one call for the whole stack: {kinds}",
            "head": f"Dense({head.in_features}->{head.out_features}) + sequence_loss inside "
                    f"the call",
        }
        self.stages["update"] = self._update_words()  # or inside the call: _adam_inside

    def _params(self, layer, name):
        return layer.params[name]

    def _grads(self, layer, name):
        return self.flat.grad(layer, name)

    # ---------------------------------------------------------------- a step
    def run(self, x, y, initial_state=None, lengths=None, weights=None, return_state=False,
            loss_scale=1.0, exchange=None):
        ids = self._load_input(x)
        targets = self._targets(y)
        if weights is not None:
            self._load_weights(weights)
        lens = None if lengths is None else self._lengths(lengths)
        if lens is not None:
            self.lens[:] = lens
        states0 = None if initial_state is None else self._initial_states(initial_state)
        if states0 is not None:
            self._load_states(states0)
        if self.draws_masks:            # before the generators move, what the call would refuse:
            if ids is not None:          # a bad batch changes nothing
                self._check_ids(ids)
            self._check_targets(targets)
            self._draw_masks()
        opt = self.optimizer
        if exchange is not None:         # data-parallel: the update waits for the gradient sum
            self._adam_off()
            t = 0
        else:
            # the optimizer's host count (Optimizer.iterations without the property's cost;
            # a host plan's optimizer never holds a device counter)
            t = opt._iterations + 1 if self.adam_may and self._adam_inside() else 0
        if self.table is not None:       # the first layer's input projection per id
            first = self.form.cells[0]
            np.dot(self.form.table(), first.layer.params[first.names[0]].T, out=self.table)
        inv_total = loss_scale * (self.inv_n if weights is None
                                  else 1.0 / (float(self.weights.sum(dtype=np.float64)) + 1e-12))
        try:
            value = self.call.run(None if self.x_in is not None else ids, targets,
                                  lens is not None, weights is not None, inv_total,
                                  states0 is not None, t, opt.lr, *self._adam_hyper(t))
        except ValueError:
            if ids is not None:
                self._check_ids(ids)     # name the encoder, as its forward would
            raise
        self.form.model._ran = False     # the plan left no forward for model.backward()
        if math.isfinite(value) and not t and self.embedded:
            self._embedding_grads(ids)
        if exchange is not None:         # every gradient final: summed over the ranks
            value = exchange(value)
        if not math.isfinite(value):     # the call updated nothing; TrainStep reports it
            pass
        elif t:
            opt._iterations = t          # what step_flat counts
        else:
            self._update()
        if return_state:
            return value, self._final_states()
        return value

    def _update(self):
        """The update after the call: Adam's rule on the C++ threads (clipping, if any, first in
        NumPy), any other optimizer's in NumPy."""
        opt = self.optimizer
        self.stages["update"] = self._update_words()
        if not self._adam_after():
            return super()._update()
        opt.step_flat(self.flat.params, self.flat.grads, self.flat.layout, update=self._adam)

    def _adam_after(self):
        return type(self.optimizer) is Adam and not self.optimizer.weight_decay

    def _update_words(self):
        if self._adam_after():
            return "Adam.step_flat over the flat parameters, its rule in C++ after the call"
        return update_words(self.optimizer)

    def _adam(self, p, g, state):
        opt = self.optimizer
        cpp_backend._C.adam(p, g, state["m"], state["v"], t=opt._iterations, lr=opt.lr,
                            b1=opt.beta1, b2=opt.beta2, eps=opt.eps, tf_form=opt.eps_mode == "tf")

    def _adam_hyper(self, t):
        opt = self.optimizer
        return (opt.beta1, opt.beta2, opt.eps) if t else (0.0, 0.0, 0.0)

    def _load_input(self, x):
        """The batch's ids, int64 [B,T] (their range: the call checks it; gathered here into
        rows when the first layer reads floats), or its floats copied in; returns the ids (None
        without an encoder)."""
        enc = self.form.encoder
        if enc is None:
            x, _ = self.form.recurrent[0]._check_x(x)
            np.copyto(self.x_in, x)
            return None
        if not (type(x) is np.ndarray and x.dtype == _INT64 and x.flags.c_contiguous):
            x = np.asarray(x)
            if x.dtype.kind not in "iu":
                raise TypeError(f"{type(enc).__name__} input must be integer ids, got dtype "
                                f"{x.dtype}")
            if x.dtype.kind == "u" and x.size and x.max() > _INT64_MAX:
                self._check_ids(x)       # no int64 holds it: refused with its value
            x = np.ascontiguousarray(x, dtype=np.int64)
        if x.shape != self.shape:
            raise ValueError(f"{type(enc).__name__} ids must have shape [B,T] = {self.shape}, "
                             f"got {x.shape}")
        if self.x_in is not None:        # gathered here: checked first
            self._check_ids(x)
            np.take(self.form.table(), x, axis=0, out=self.x_in)
        return x

    def _check_ids(self, ids):
        V = self.form.table().shape[0]
        if ids.size and (ids.min() < 0 or ids.max() >= V):
            bad = ids.reshape(-1)[np.flatnonzero((ids.reshape(-1) < 0) |
                                                 (ids.reshape(-1) >= V))[0]]
            raise ValueError(f"{type(self.form.encoder).__name__} ids must lie in [0, {V}), "
                             f"got {bad}")

    def _check_targets(self, targets):
        C = self.form.head.out_features
        if targets.size and (targets.min() < 0 or targets.max() >= C):
            raise ValueError(f"targets must lie in [0, C) = [0, {C}), got min {targets.min()} "
                             f"and max {targets.max()}")

    def _targets(self, y):
        """The targets as int64 [B,T] (their range: the call checks it)."""
        if type(y) is np.ndarray and y.dtype == _INT64 and y.flags.c_contiguous \
                and y.shape == self.shape:
            return y
        targets = np.asarray(y)
        if targets.dtype.kind not in "iu":
            raise TypeError(f"targets must be an integer array, got dtype {targets.dtype}")
        if targets.shape != self.shape:
            raise ValueError(f"targets must have shape [B,T] = {self.shape}, got "
                             f"{targets.shape}")
        if targets.dtype.kind == "u" and targets.size and targets.max() > _INT64_MAX:
            self._check_targets(targets)  # no int64 holds it: refused with its value
        return np.ascontiguousarray(targets, dtype=np.int64)

    def _load_weights(self, weights):
        w = np.asarray(weights)
        if w.dtype.kind not in "biuf":
            raise TypeError(f"weights must be a floating-point array, got dtype {w.dtype}")
        if w.shape != self.shape:
            raise ValueError(f"weights must have shape [B,T] = {self.shape}, got {w.shape}")
        if w.size and not np.isfinite(w).all():
            raise ValueError("weights contains NaN or infinity")
        np.copyto(self.weights, w.reshape(-1), casting="unsafe")

    def _load_states(self, states0):
        cells = iter(range(len(self.form.cells)))
        for h0, c0 in states0:
            for k in range(h0.shape[0]):
                i = next(cells)
                self.h0[i][...] = h0[k]
                if c0 is not None:
                    self.c0[i][...] = c0[k]

    def _draw_masks(self):
        """The dropout masks, drawn as the layers' own forward and Dropout.forward draw them."""
        for c, mask in zip(self.form.cells, self.masks):
            if mask is not None:
                dropout_mask(c.layer._rng, mask.shape, c.layer.dropout, mask.dtype, out=mask)
        if self.head_mask is not None:
            hd = self.form.head_dropout
            dropout_mask(hd._rng, self.head_mask.shape, hd.p, self.head_mask.dtype,
                         out=self.head_mask)

    def _embedding_grads(self, ids):
        """What the call leaves of the first layer's input gradients: an embedding's dE (and
        dW_ih from the table's gradient)."""
        form = self.form
        first = form.cells[0]
        E = form.encoder
        dE = self.flat.grad(E, "weight")
        if self.table is not None:
            w_ih = first.layer.params[first.names[0]]
            np.dot(self.d_table.T, E.params["weight"], out=self.flat.grad(first.layer,
                                                                           first.names[0]))
            np.dot(self.d_table, w_ih, out=dE)
        else:
            E.scatter_rows(ids, self.dx_in, out=dE)

    def _adam_inside(self):
        """Whether the call runs the update this step: a plain Adam (no clipping, no weight
        decay) whose flat state exists (its first step, or one after ``load_state_dict``,
        builds it through step_flat), every gradient final inside the call (no embedding).
        Hands the call Adam's state arrays when they changed."""
        opt = self.optimizer
        flat = opt._flat
        if (flat is None or opt.clip_norm is not None or opt.clip_value is not None
                or opt.weight_decay):
            return self._adam_off()
        if flat is not self.adam_flat or opt.eps_mode != self.adam_eps_mode:
            if flat["layout"] != self.flat.layout or flat["dtype"] != self.form.dtype:
                return self._adam_off()
            self.call.set_adam(self.flat.params, self.flat.grads, flat["state"]["m"],
                               flat["state"]["v"], opt.eps_mode == "tf")
            self.adam_flat, self.adam_eps_mode = flat, opt.eps_mode
            self.stages["update"] = "Adam inside the call, over the flat parameters (C++)"
        return True

    def _adam_off(self):
        if self.adam_flat is not None:
            self.call.set_adam(None, None, None, None, False)
            self.adam_flat = None
        self.stages["update"] = self._update_words()
        return False

    def _final_states(self):
        states, cells = [], iter(range(len(self.form.cells)))
        for r in self.form.recurrent:
            idx = [next(cells) for _ in range(r.num_layers)]
            h = np.stack([self.h_n[i] for i in idx])
            states.append((h, np.stack([self.c_n[i] for i in idx]))
                          if r.spec.has_cell_state else h)
        return self._state_tuple(states)
