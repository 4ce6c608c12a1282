"""One training step (forward, loss, backward, optimizer update) as one object: :class:`TrainStep`.

Shape legend: B batch, T time steps, V vocabulary, E input width, H hidden size, C classes,
N = B*T rows.

The generic step is the four lines every loop writes::

    pred = model(x); loss, d = loss_fn(pred, y, return_grad=True)
    model.backward(d); optimizer.step(model.params, model.grads)

For the most common recurrent model the step is also *fused*: ``Sequential([OneHot | Embedding
(optional), LSTM/GRU/RNN ..., Dense])`` with :func:`rnnkern.sequence_loss`, any optimizer of
:mod:`rnnkern.optim`, recurrent layers on a CPU backend (dropout between stacked cells included:
the same masks from the layer's generator as its own forward draws). The fused step computes
the same function from the same kernels, without the per-layer Python around them: a batch is
validated once, the dense head, loss and their backward are one compiled call (rows split over
the threads), and the parameters, gradients and optimizer state live in flat arrays (the
layers' ``params``/``grads`` and the optimizer's per-name state are views of them, so
everything that reads them -- checkpoints, ``state_dict``, the generic path -- sees the same
values).

Recurrent cells run either on Numba with their argument lists kept between steps (and ids fed
to the first cell through a [V,G*H] table W_ih^T instead of a GEMM), or through the seam of
another CPU backend. Layers left on ``backend="auto"`` take the first below
``config.TRAIN_STEP_NUMBA_MAX_FLOPS`` of recurrent work a step, where per-call overhead rules
(lab 12-1: 175 us a step generic, ~46 us fused), and the backend "auto" picks for their cell
above it, or when that is the C++ whole-stack call (lab 12-1: ~13 us a step). On the C++
backend, a model whose cells are all LSTMs fed by ids runs the whole step -- every layer's
forward, the head and loss, every backward -- as ONE kernel call
(``_C.LstmStackStepF32/F64``, csrc/cpu/lstm_stack.h: each batch chunk runs all of it on its
thread, the chunks meet once); with one-hot input and a plain Adam the call ends with the
optimizer's update too (csrc/cpu/adam.h, the same bits as rnnkern.optim's); other models call
the seam once per layer. Figures: benchmarks/README.md.
Results agree with the generic step to float rounding (tests/test_train_step.py).
"""
from __future__ import annotations

import contextlib
import inspect

import numpy as np

from . import backends, config
from .layers import _Recurrent, dropout_mask
from .losses import sequence_loss
from .model import Sequential
from .modules import Dense, Dropout, Embedding, OneHot
from .optim import Adam, Optimizer

__all__ = ["TrainStep"]

# The C++ backend runs an all-LSTM model fed by ids as one whole-stack kernel call per step
# (_FusedPlan._stack_step); False: one call per layer, as for every other model (tests compare).
FUSE_WHOLE_STACK = True
# ... and, with one-hot input (every gradient final inside that call) and a plain Adam, the
# optimizer's update at the end of the call, on its threads (_FusedPlan._kernel_update);
# False: rnnkern.optim's update after it (tests compare the bits).
FUSE_OPTIMIZER = True


class TrainStep:
    """``loss = step(x, y)``: one training step of ``model`` on a batch, fused where possible.

    Args:
        model:     any model with ``forward``/``backward``/``params``/``grads`` (see
                   :class:`rnnkern.Trainer`); a :class:`~rnnkern.Sequential` of the form in the
                   module docstring gets the fused step
        loss:      ``loss(pred, target, return_grad=True[, weights=w]) -> (value, d_pred)``
        optimizer: an object with ``step(params, grads)``
        fused:     None (default): fuse when the model, loss and optimizer allow it;
                   False: always the generic step

    Call: ``step(x, y, lengths=None, weights=None, initial_state=None, return_state=False)``
    with ``x`` as the model takes it (ids [B,T] or floats [B,T,I]), ``y`` the loss's targets,
    ``weights`` passed to the loss when given, ``initial_state`` as ``model.forward`` takes it.
    Returns the loss (float), and the final state when ``return_state``.

    ``fused_reason`` says why the last call was not fused (None when it was).

    Note: the first fused call replaces every array in the layers' ``params`` (and ``grads``)
    dicts by a view of one flat array holding the same values, as ``load_params`` replaces
    them; an array taken out of a dict before that no longer follows training, so read
    ``model.params`` afresh (in-place writes to the current arrays, e.g. ``Sequential.load_params``
    or a checkpoint load, go straight into the flat array).

    Example (lab 12-1)::

        >>> step = TrainStep(model, sequence_loss, Adam(0.1))
        >>> for i in range(50):
        ...     loss = step(x_ids, y_ids)
    """

    def __init__(self, model, loss, optimizer, *, fused=None):
        if fused not in (None, False):
            raise ValueError(f"fused must be None (automatic) or False, got {fused!r}")
        if not callable(loss):
            raise TypeError("loss must be callable: loss(pred, target, return_grad=True)")
        if not hasattr(optimizer, "step"):
            raise TypeError("optimizer must have step(params, grads)")
        self.model, self.loss, self.optimizer = model, loss, optimizer
        self.fused = fused
        self.fused_reason = None
        self._plan = None   # _FusedPlan while the model keeps the fused form

    def __call__(self, x, y, lengths=None, weights=None, initial_state=None,
                 return_state=False):
        plan = self._plan
        if (plan is not None and plan.repeat_key is not None and self.fused is None
                and lengths is None and weights is None and initial_state is None
                and not return_state):
            loss = plan.repeat(x, y)
            if loss is not None:
                return loss
        reason = self._why_not_fused(x)
        self.fused_reason = reason
        if reason is None:
            return self._plan.step(x, y, lengths, weights, initial_state, return_state)
        return self._generic(x, y, lengths, weights, initial_state, return_state)

    # ------------------------------------------------------------------ generic
    def _generic(self, x, y, lengths, weights, initial_state, return_state):
        kwargs = {} if lengths is None else {"lengths": lengths}
        state = None
        if return_state or initial_state is not None:
            pred, state = self.model.forward(x, initial_state=initial_state, return_state=True,
                                             **kwargs)
        else:
            pred = self.model.forward(x, **kwargs)
        if weights is None:
            value, d_pred = self.loss(pred, y, return_grad=True)
        else:
            value, d_pred = self.loss(pred, y, weights=weights, return_grad=True)
        self.model.backward(d_pred)
        self.optimizer.step(self.model.params, self.model.grads)
        return (float(value), state) if return_state else float(value)

    # ------------------------------------------------------------------ eligibility
    def _why_not_fused(self, x):
        """None if the fused step applies now, else a short reason."""
        if self.fused is False:
            return "fused=False"
        plan = self._plan
        if plan is not None and plan.still_valid():
            return plan.why_not(x)
        self._plan = None
        reason = _structure_reason(self.model, self.loss, self.optimizer)
        if reason is not None:
            return reason
        self._plan = _FusedPlan(self.model, self.optimizer)
        return self._plan.why_not(x)


def _structure_reason(model, loss, optimizer):
    """Why ``model``/``loss``/``optimizer`` do not have the fused form (None if they do)."""
    if type(model) is not Sequential:
        return "model is not a Sequential"
    if loss is not sequence_loss:
        return "loss is not rnnkern.sequence_loss"
    if not isinstance(optimizer, Optimizer) or type(optimizer).step is not Optimizer.step:
        return "optimizer is not one of rnnkern.optim's"
    layers = list(model.layers)
    if layers and type(layers[0]) in (OneHot, Embedding):
        layers = layers[1:]
    if len(layers) >= 2 and type(layers[-2]) is Dropout:
        layers = layers[:-2] + layers[-1:]
    if len(layers) < 2 or type(layers[-1]) is not Dense:
        return "layers are not [OneHot|Embedding], recurrent layers..., [Dropout], Dense"
    recurrent = layers[:-1]
    if not all(isinstance(r, _Recurrent) for r in recurrent):
        return "layers are not [OneHot|Embedding], recurrent layers..., [Dropout], Dense"
    dtypes = {m.dtype for m in model.layers if hasattr(m, "dtype")}
    if len(dtypes) != 1:
        return "layers have different dtypes"
    sizes = [model.layers[0].depth if type(model.layers[0]) is OneHot else
             model.layers[0].embedding_dim if type(model.layers[0]) is Embedding else None]
    sizes += [r.hidden_size for r in recurrent]
    for r, n_in in zip(recurrent, sizes):
        if n_in is not None and n_in != r.input_size:
            return "a layer's input size does not match the previous layer's output"
    if layers[-1].in_features != recurrent[-1].hidden_size:
        return "the Dense layer's in_features do not match the last hidden size"
    return None


class _Cell:
    """One stacked cell ``k`` of a recurrent layer: its parameter names and, per batch shape,
    its workspace and the kernels' argument lists (kept between steps: every array in them is
    either a workspace the step refills or a parameter/gradient view of the flat arrays)."""

    def __init__(self, layer, k):
        self.layer, self.spec, self.k = layer, layer.spec, k
        self.H = layer.hidden_size
        self.I = layer.input_size if k == 0 else layer.hidden_size
        self.names = tuple(f"{n}_l{k}" for n in ("weight_ih", "weight_hh", "bias_ih", "bias_hh"))


class _FusedPlan:
    """The fused form of one model: flat parameters bound into the layers, and workspaces."""

    def __init__(self, model, optimizer):
        from .backends import numba_cpu
        self.nc = numba_cpu
        self.model, self.optimizer = model, optimizer
        layers = list(model.layers)
        self.encoder = layers[0] if type(layers[0]) in (OneHot, Embedding) else None
        self.head = layers[-1]
        self.head_dropout = layers[-2] if type(layers[-2]) is Dropout else None
        self.recurrent = layers[1 if self.encoder else 0:-2 if self.head_dropout else -1]
        self.dtype = self.head.dtype
        self.cells = [_Cell(r, k) for r in self.recurrent for k in range(r.num_layers)]
        self._bind_flat()
        self._ws_key = None
        self._checked = None      # (key, reason) of the last why_not()
        self.backend = None       # the backend module the recurrent layers resolve to
        self._kernels = None
        self.repeat_key = None    # _repeat_key() of the last plain whole-stack step, or None
        self._repeat_flat = None  # the optimizer's flat state at that step

    # ---------------------------------------------------------------- flat parameters
    def _bind_flat(self):
        """Copy every parameter into one flat array and make the layers' dicts views of it."""
        model = self.model
        self.layout = tuple((f"{i}.{k}", v.shape) for i, layer in enumerate(model.layers)
                            for k, v in layer.params.items())
        total = sum(int(np.prod(s, dtype=np.int64)) for _, s in self.layout)
        self.flat_params = np.empty(total, self.dtype)
        self.flat_grads = np.zeros(total, self.dtype)
        self.bound = []   # (layer, key, param view, grad view)
        lo = 0
        for layer in model.layers:
            for k in list(layer.params):
                value = np.asarray(layer.params[k])
                n = value.size
                p = self.flat_params[lo:lo + n].reshape(value.shape)
                g = self.flat_grads[lo:lo + n].reshape(value.shape)
                p[...] = value
                layer.params[k] = p
                layer.grads[k] = g
                self.bound.append((layer, k, p, g))
                lo += n

    def still_valid(self):
        """The layers still hold our parameter views (``load_params`` or an assignment replaces
        them; then the plan is rebuilt from the new values). In the same pass, points their
        ``grads`` at the flat gradient again (a generic backward replaces those arrays)."""
        for layer, k, p, g in self.bound:
            if layer.params.get(k) is not p:
                return False
            layer.grads[k] = g
        return True

    def why_not(self, x):
        """Per-call condition: the backend the layers resolve to (cached per shape and setting).

        Layers left on "auto" with no backend preset run on Numba's kept argument lists when a
        step's recurrent GEMM work is below ``config.TRAIN_STEP_NUMBA_MAX_FLOPS`` (per-call
        overhead dominates there) and the C++ whole-stack step would not take the model, else
        on the backend "auto" picks for their cell."""
        shape = x.shape if type(x) is np.ndarray else np.shape(x)
        if len(shape) < 2:
            return None  # the step raises the input error
        if shape[0] * shape[1] == 0:
            return "empty batch (B*T = 0)"
        preset = backends.preset()
        key = (shape[:2], preset, config.TRAIN_STEP_NUMBA_MAX_FLOPS,
               tuple([r.backend for r in self.recurrent]))
        if self._checked is not None and self._checked[0] == key:
            return self._checked[1]
        B, T = shape[:2]
        names = {backends.resolve(r.backend, x, r.kind).name for r in self.recurrent}
        flops = sum(2 * B * T * c.spec.gates * c.H * (c.I + c.H) for c in self.cells)
        if (preset is None and all(r.backend == "auto" for r in self.recurrent)
                and flops < config.TRAIN_STEP_NUMBA_MAX_FLOPS
                and backends.available_backends()["numba"][0]
                and not (names == {"cpp"} and self._whole_stack_fits(B * T))):
            names = {"numba"}
        reason = None
        if len(names) > 1:
            reason = f"recurrent layers on different backends ({', '.join(sorted(names))})"
        elif names - {"numba", "cpp", "numpy"}:
            reason = f"recurrent layers on the {names.pop()} backend (CPU backends only)"
        else:
            self.backend = backends.get_backend(names.pop())
        self._checked = (key, reason)
        return reason

    def _whole_stack_fits(self, N):
        """Whether, on the C++ backend, a step of N = B*T rows runs as the whole-stack kernel
        call (_stack_step; _workspace: the first cell reads its table by ids when V <= N). Its
        repeat path beats Numba's kept argument lists even at the smallest sizes: lab 12-1,
        blocks alternating in one process, 12.8 vs 45.9 us a step (median)."""
        return (FUSE_WHOLE_STACK and self.encoder is not None
                and all(c.spec.kind == "lstm" for c in self.cells)
                and self._table().shape[0] <= N)

    def _table(self):
        """The encoder's [V,E] lookup table (one-hot: the identity)."""
        if type(self.encoder) is OneHot:
            return self.encoder._table
        return self.encoder.params["weight"]

    # ---------------------------------------------------------------- workspaces
    def _workspace(self, B, T):
        """Buffers for a [B,T] batch and the kernels' argument lists over them."""
        # dropout after cell k of a layer (not its last), as _Recurrent.forward applies it
        drops = tuple(bool(c.layer.dropout and c.layer.training and c.k + 1 < c.layer.num_layers)
                      for c in self.cells)
        hd = self.head_dropout
        head_drop = hd is not None and hd.training and hd.p > 0
        # Numba: the kernels' argument lists are kept here; other backends: their seam per call
        self.kept = self.backend is self.nc
        key = (B, T, drops, head_drop, self.backend.name, config.SPLIT_MIN_FLOPS,
               config.SPLIT_MIN_ROWS, config.THREADS, config.BLAS_ONE_THREAD_MIN_FLOPS)
        if self._ws_key == key:
            return
        dt, nc = self.dtype, self.nc
        N = B * T
        first = self.cells[0]
        V = None if self.encoder is None else self._table().shape[0]
        # ids in: the first cell's input projection x W_ih^T is a row of table W_ih^T [V,G*H],
        # computed once per step instead of once per row, when there are fewer ids than rows
        # (Numba's kernels take it precomputed)
        self.project = (V is not None and V <= N
                        and (self.kept or _seam_takes_projected(self.backend, first.spec)))
        # The table's rows are read in place by a seam that takes ids (its backward then gives
        # the table's gradient), else gathered into x_in here and the gradient scattered after
        # (a serial pass each: ~50 us apiece at lab 12-4 size, 1700 rows of 100)
        self.by_ids = self.project and not self.kept and _seam_takes_ids(self.backend)
        GH = first.spec.gates * first.H
        self.x_in = None if self.by_ids else np.empty((B, T, GH if self.project else first.I), dt)
        self.proj_table = np.empty((V, GH), dt) if self.project else None
        self.proj_grad = np.empty((V, GH), dt) if self.project and not self.by_ids else None
        self.lens = np.empty(B, np.int64)
        self.targets = np.empty(N, np.int64)
        self.targets2d = self.targets.reshape(B, T)
        self.weights = np.empty(N, dt)
        layer_in = self.x_in
        for c in self.cells:
            projected = self.project and c is first
            p, g = c.layer.params, c.layer.grads
            c.h0 = np.zeros((B, c.H), dt)
            c.c0 = np.zeros((B, c.H), dt) if c.spec.has_cell_state else None
            c.h = np.empty((B, c.H), dt)
            c.c = np.empty((B, c.H), dt) if c.spec.has_cell_state else None
            c.out = np.empty((B, T, c.H), dt)
            # the Numba backend's batch chunks (threads), as its seam would cut them; the head
            # cuts its rows as the last cell's
            c.chunks = nc.plan_chunks(c.spec, B, T, c.I, c.H)
            c.dropped = np.empty_like(c.out) if drops[self.cells.index(c)] else None
            c.x = layer_in
            layer_in = c.out if c.dropped is None else c.dropped
            if not self.kept:
                continue
            c.bias = np.empty(c.spec.gates * c.H, dt)
            c.saved = {n: np.empty(s, dt) for n, s in nc.saved_shapes(c.spec, B, T, c.H).items()}
            kernel, args = nc.forward_call(c.spec, c.x, *(p[n] for n in c.names), c.h0,
                                           c.c0, self.lens, c.out, c.h, c.c, c.saved, c.bias,
                                           projected)
            c.forward = (kernel, *zip(*args))
        # the Dropout module before the head, when active: its input, masked
        self.head_dropped = np.empty((B, T, self.head.in_features), dt) if head_drop else None
        self.d_logits = np.empty((N, self.head.out_features), dt)
        d_out = np.empty((B, T, self.head.in_features), dt)
        self.d_head = d_out
        for c in reversed(self.cells if self.kept else ()):
            p, g = c.layer.params, c.layer.grads
            projected = self.project and c is first
            c.dx = np.empty(c.x.shape, dt)
            c.dh = np.empty((B, c.H), dt)
            c.dc = np.empty((B, c.H), dt) if c.spec.has_cell_state else None
            kernel, args = nc.backward_call(c.spec, c.x, p[c.names[0]], p[c.names[1]], self.lens,
                                            c.saved, d_out, True, c.dx, c.dh, c.dc, projected)
            scratch = [np.empty(s, dt) for s in nc.scratch_shapes(c.spec, B, T, c.H)]
            c.backward = (kernel, args, tuple(g[n] for n in c.names), scratch)
            c.backward_values = [a for a, _ in args] + list(c.backward[2]) + scratch
            d_out = c.dx
        self._states_dirty = False       # h0/c0 buffers hold zeros
        self.blas_hold = _blas_hold(nc, self.cells, B, T)
        self.table_in_place = False   # the stack step reads W_ih as the one-hot table (below)
        self.stack = self._stack_step(B, T)
        self._ws_key = key

    def _stack_step(self, B, T):
        """The C++ backend's whole-stack step (csrc/cpu/lstm_stack.h: every layer's forward, the
        head and every backward in one split of the batch) over this workspace's buffers, when
        every cell is an LSTM and the first reads the table by ids; else None."""
        if not (self.by_ids and self.backend.name == "cpp" and self._whole_stack_fits(B * T)):
            return None
        from . import _C
        dt = self.dtype
        grad = {(id(layer), k): g for layer, k, _, g in self.bound}   # the flat gradient's views
        cells = []
        for c in self.cells:
            p = c.layer.params
            g = [grad[id(c.layer), n] for n in c.names]
            c.mask = None if c.dropped is None else np.empty(c.dropped.shape, dt)
            cells.append((*(p[n] for n in c.names), c.h0, c.c0, c.h, c.c, *g,
                          float(c.spec.forget_bias), c.mask))
        self.ids_in = np.empty((B, T), np.int64)
        self.head_mask = (None if self.head_dropped is None
                          else np.empty(self.head_dropped.shape, dt))
        self.stack_masks = (self.head_mask is not None
                            or any(c.mask is not None for c in self.cells))
        # one-hot: the table W_ih^T is read as W_ih itself, and its gradient written into dW_ih,
        # inside the kernel's packing and sums (no transposed copies in NumPy each step)
        self.table_in_place = type(self.encoder) is OneHot
        self.proj_grad = None if self.table_in_place else np.empty_like(self.proj_table)
        self.adam_scalars = np.empty(7, dt)
        self.adam_bound = None    # (m, v, eps_mode) given to the kernel's Adam, or None
        table, d_table = self.proj_table, self.proj_grad
        if self.table_in_place:
            first = self.cells[0]
            table = first.layer.params[first.names[0]]
            d_table = grad[id(first.layer), first.names[0]]
        head = self.head
        make = _C.LstmStackStepF32 if dt == np.float32 else _C.LstmStackStepF64
        return make(cells, table, self.ids_in, d_table, head.params["weight"],
                    head.params.get("bias"), grad[id(head), "weight"],
                    grad.get((id(head), "bias")), self.targets, self.weights, self.lens,
                    self.head_mask, table_transposed=self.table_in_place)

    def _kernel_update(self):
        """Whether the whole-stack call will also run the optimizer's update (csrc/cpu/adam.h):
        with one-hot input (every gradient final in the call), a plain Adam (no clipping, no
        weight decay, compiled updates allowed) whose flat state exists (its first step, or one
        after ``load_state_dict``, builds it through ``step_flat``). Gives the kernel the state
        arrays when they changed, and this step's scalars."""
        opt = self.optimizer
        if not (FUSE_OPTIMIZER and self.table_in_place and type(opt) is Adam
                and opt.jit is not False and opt.clip_norm is None and opt.clip_value is None
                and not opt.weight_decay):
            return self._bind_adam(None)
        flat = opt._flat
        if flat is None or flat["layout"] != self.layout or flat["dtype"] != self.dtype:
            return self._bind_adam(None)
        bound = (flat["state"]["m"], flat["state"]["v"], opt.eps_mode)
        if self.adam_bound is None or any(a is not b for a, b in zip(bound, self.adam_bound)):
            self._bind_adam(bound)
        opt.step_scalars(self.adam_scalars, opt.iterations + 1)
        return True

    def _bind_adam(self, bound):
        """Give the kernel Adam's flat (m, v, eps_mode), or take it away (None); returns
        whether it has one."""
        if bound is None:
            if self.adam_bound is not None:
                self.stack.set_adam(None, None, None, None, None, False)
                self.adam_bound = None
            return False
        m, v, eps_mode = bound
        self.stack.set_adam(self.flat_params, self.flat_grads, m, v, self.adam_scalars,
                            eps_mode == "tf")
        self.adam_bound = bound
        return True

    def _run_stack(self, B, T, ids, lengths, has_w):
        """One step through the whole-stack kernel (ids: [B,T] integers); returns the loss."""
        if self.stack_masks:
            bad = _first_outside(ids, self._table().shape[0])  # before the generators move
            if bad >= 0:
                self._raise_bad_id(ids, bad)
            for c in self.cells:  # the dropout masks, drawn as the layers' own forward does
                if c.mask is not None:
                    dropout_mask(c.layer._rng, c.mask.shape, c.layer.dropout, c.mask.dtype,
                                 out=c.mask)
            if self.head_mask is not None:  # as Dropout.forward draws it
                dropout_mask(self.head_dropout._rng, self.head_mask.shape, self.head_dropout.p,
                             self.head_mask.dtype, out=self.head_mask)
        np.copyto(self.ids_in, ids, casting="unsafe")  # the kernel checks the range
        try:
            # clean h0/c0 buffers are zeros: the kernel need not read them
            return self.stack.run(lengths is not None, has_w, self._inv_total(B, T, has_w),
                                  self._states_dirty)
        except ValueError:   # the kernel checked ids (then targets, lengths) before any work
            bad = _first_outside(ids, self._table().shape[0])
            if bad >= 0:
                self._raise_bad_id(ids, bad)
            raise

    def _inv_total(self, B, T, has_w):
        """1 / the loss's weight total (TF's 1e-12: all-zero weights give a zero loss)."""
        if not has_w:
            return 1.0 / (B * T + 1e-12)
        return 1.0 / (float(self.weights.sum(dtype=np.float64)) + 1e-12)

    # ---------------------------------------------------------------- the step
    def _load_inputs(self, x, y, lengths, weights):
        """Validate the batch (as the layers and sequence_loss would) into the workspace;
        returns (B, T, ids): ids flat [N] int64, or as given [B,T] for the whole-stack step
        (whose kernel checks their range), or None without an encoder."""
        K = self._kernels
        ids = None
        if self.encoder is not None:
            ids = np.asarray(x)
            if ids.dtype.kind not in "iu":
                raise TypeError(f"{type(self.encoder).__name__} input must be integer ids, "
                                f"got dtype {ids.dtype}")
            if ids.ndim != 2:
                raise ValueError(f"x must be ids [B,T], got shape {ids.shape}")
            B, T = ids.shape
            self._workspace(B, T)
            self._table_in()
            table = self.proj_table if self.project else self._table()
            if self.stack is not None:  # checked by its run, or _run_stack before drawing masks
                return self._load_targets(y, weights, lengths, B, T, ids)
            ids = np.ascontiguousarray(ids, dtype=np.int64).reshape(-1)
            if self.by_ids:
                bad = _first_outside(ids, table.shape[0])
            else:
                bad = K.gather_rows(ids, table, self.x_in.reshape(B * T, -1))
            if bad >= 0:
                self._raise_bad_id(ids, bad)
        else:
            x, _ = self.recurrent[0]._check_x(x)
            B, T, _ = x.shape
            self._workspace(B, T)
            np.copyto(self.x_in, x)
        return self._load_targets(y, weights, lengths, B, T, ids)

    def _load_targets(self, y, weights, lengths, B, T, ids):
        """The rest of _load_inputs: targets, weights and lengths."""
        targets = np.asarray(y)
        if targets.dtype.kind not in "iu":
            raise TypeError(f"targets must be an integer array, got dtype {targets.dtype}")
        if targets.shape != (B, T):
            raise ValueError(f"targets must have shape [B,T] = {(B, T)}, got {targets.shape}")
        np.copyto(self.targets2d, targets, casting="unsafe")  # range: in the kernel
        if weights is not None:
            w = np.asarray(weights)
            if w.dtype.kind not in "biuf":
                raise TypeError(f"weights must be a floating-point array, got dtype {w.dtype}")
            if w.shape != (B, T):
                raise ValueError(f"weights must have shape [B,T] = {(B, T)}, got {w.shape}")
            if w.size and not np.isfinite(w).all():
                raise ValueError("weights contains NaN or infinity")
            np.copyto(self.weights, w.reshape(-1), casting="unsafe")
        lens = self.recurrent[0]._check_lengths(lengths, B, T)
        if lens is not None:
            self.lens[:] = lens
        elif self.kept:   # Numba's kept argument lists read them (the other paths take None)
            self.lens[:] = T
        return B, T, ids

    def _raise_bad_id(self, ids, bad):
        """bad: a flat index into ids."""
        raise ValueError(f"{type(self.encoder).__name__} ids must lie in "
                         f"[0, {self._table().shape[0]}), got {np.ravel(ids)[bad]}")

    def _load_states(self, initial_state, B):
        """Copy the initial state (validated by each layer) into the cells' h0/c0 (zeros for
        None)."""
        if initial_state is None:
            if self._states_dirty:
                for c in self.cells:
                    c.h0.fill(0)
                    if c.c0 is not None:
                        c.c0.fill(0)
                self._states_dirty = False
            return
        n = len(self.model.layers)
        if not isinstance(initial_state, (tuple, list)) or len(initial_state) != n:
            raise ValueError(f"initial_state must be a tuple with one entry per layer "
                             f"({n}), as returned by forward(..., return_state=True)")
        offset = 1 if self.encoder is not None else 0
        cells = iter(self.cells)
        for i, r in enumerate(self.recurrent):
            s0 = initial_state[offset + i]
            h0, c0 = (None, None) if s0 is None else r._split_state(s0, B, np)
            for k in range(r.num_layers):
                c = next(cells)
                self._states_dirty = True
                c.h0[...] = 0 if h0 is None else h0[k]
                if c.c0 is not None:
                    c.c0[...] = 0 if c0 is None else c0[k]

    def step(self, x, y, lengths, weights, initial_state, return_state):
        self.repeat_key = None    # set again at the end if this call completes as a plain one
        if self._kernels is None:
            from . import _train_numba
            self._kernels = _train_numba
        K = self._kernels
        B, T, ids = self._load_inputs(x, y, lengths, weights)
        self._load_states(initial_state, B)
        flat_state = self.optimizer._flat   # as _kernel_update sees it
        with self.blas_hold:
            if self.stack is not None:
                updated = self._kernel_update()
                loss = self._run_stack(B, T, ids, lengths, weights is not None)
                self._table_out(self.proj_grad)
            else:
                updated = False
                loss, S = self._layer_by_layer(B, T, ids, lengths, weights is not None)
                if self.project:
                    self._table_out(S)
                elif type(self.encoder) is Embedding:
                    K.scatter_add_rows(ids, self.cells[0].dx.reshape(B * T, -1),
                                       self.encoder.grads["weight"])
            self._update(updated)
        self.model._ran = False   # the layers hold no forward of this batch for backward()
        value = float(loss)
        if return_state:
            return value, self._final_states()
        if (self.stack is not None and lengths is None and weights is None
                and initial_state is None):   # the next such call may skip the checks
            self.repeat_key = self._repeat_key(x, y)
            self._repeat_flat = flat_state   # (step_flat's first call builds one: not this)
        return value

    def repeat(self, x, y):
        """A plain whole-stack step (``step(x, y)``, nothing else given) after another: the
        same work without the checks whose outcome cannot have changed -- the parameters are
        still ours (still_valid), and every setting the checks read and the arrays' shapes and
        dtypes are as at the last call (_repeat_key). Returns the loss, or None when the full
        path must run. lab 12-4, the Python around the kernel call (its caches cold after
        the kernel's): ~85 -> ~46 us a step; the step, blocks alternated in one process:
        30-40 us faster."""
        if (type(x) is not np.ndarray or type(y) is not np.ndarray or not self.still_valid()
                or self.optimizer._flat is not self._repeat_flat
                or self._repeat_key(x, y) != self.repeat_key):
            return None
        B, T = x.shape
        np.copyto(self.targets2d, y, casting="unsafe")
        with self.blas_hold:
            self._table_in()
            updated = self.adam_bound is not None   # as _kernel_update found (the same key)
            if updated:
                self.optimizer.step_scalars(self.adam_scalars, self.optimizer.iterations + 1)
            loss = self._run_stack(B, T, x, None, False)
            self._table_out(self.proj_grad)
            self._update(updated)
        self.model._ran = False
        return float(loss)

    def _repeat_key(self, x, y):
        """Everything the checks of a plain whole-stack step read besides the parameters: the
        arrays' shapes and dtypes, and the settings why_not(), _workspace() and
        _kernel_update() decide by (with the optimizer's flat state, compared apart)."""
        opt, hd = self.optimizer, self.head_dropout
        return (x.shape, x.dtype, y.shape, y.dtype, backends.preset(),
                config.TRAIN_STEP_NUMBA_MAX_FLOPS, config.SPLIT_MIN_FLOPS,
                config.SPLIT_MIN_ROWS, config.THREADS, config.BLAS_ONE_THREAD_MIN_FLOPS,
                FUSE_OPTIMIZER, [(r.backend, r.training, r.dropout) for r in self.recurrent],
                hd and (hd.training, hd.p), type(opt), opt.jit, opt.clip_norm, opt.clip_value,
                getattr(opt, "weight_decay", None), getattr(opt, "eps_mode", None))

    def _table_in(self):
        """The first cell's input rows per id, table W_ih^T [V,G*H], into proj_table (one-hot
        read in place by the stack step: nothing to do)."""
        if not self.project or self.table_in_place:
            return
        w_ih = self.cells[0].layer.params["weight_ih_l0"]
        if type(self.encoder) is OneHot:
            np.copyto(self.proj_table, w_ih.T)
        else:
            np.dot(self.encoder.params["weight"], w_ih.T, out=self.proj_table)

    def _table_out(self, S):
        """S: d table W_ih^T [V,G*H], summed per id; gives d W_ih and d table (one-hot written
        in place by the stack step: nothing to do)."""
        if not self.project or self.table_in_place:
            return
        d_w_ih = self.cells[0].layer.grads["weight_ih_l0"]
        if type(self.encoder) is OneHot:
            np.copyto(d_w_ih, S.T)
        else:
            np.dot(S.T, self.encoder.params["weight"], out=d_w_ih)
            np.dot(S, self.cells[0].layer.params["weight_ih_l0"],
                   out=self.encoder.grads["weight"])

    def _update(self, updated):
        """The optimizer's update of the flat parameters (updated: the kernel call did it)."""
        if updated:
            self.optimizer.iterations += 1   # what step_flat counts
        else:
            self.optimizer.step_flat(self.flat_params, self.flat_grads, self.layout)

    def _layer_by_layer(self, B, T, ids, lengths, has_w):
        """Forward, head and backward one layer call at a time; returns (loss, d table or
        None)."""
        K, nc = self._kernels, self.nc
        lens = self.lens if self.kept or lengths is not None else None
        layer_in = self.x_in
        for c in self.cells:
            p = c.layer.params
            if self.kept:
                nc.combine_bias(c.spec, p[c.names[2]], p[c.names[3]], c.bias)
                kernel, values, batched = c.forward
                if len(c.chunks) == 1:
                    kernel(*values)
                else:
                    nc.launch(kernel, c.chunks, values, batched)
            else:
                extra = {}
                if self.project and c is self.cells[0]:
                    extra = {"projected": True}
                    if self.by_ids:
                        layer_in, extra["ids"] = self.proj_table, ids.reshape(B, T)
                c.out, c.h, c.c, c.saved = self.backend.forward(
                    c.spec, layer_in, *(p[n] for n in c.names), c.h0, c.c0, lens, **extra)
            if c.dropped is not None:
                c.mask = dropout_mask(c.layer._rng, c.out.shape, c.layer.dropout, c.out.dtype)
                np.multiply(c.out, c.mask, out=c.dropped)
            layer_in = c.out if c.dropped is None else c.dropped
        if self.head_dropped is not None:   # as Dropout.forward draws it
            self.head_mask = dropout_mask(self.head_dropout._rng, layer_in.shape,
                                          self.head_dropout.p, layer_in.dtype)
            np.multiply(layer_in, self.head_mask, out=self.head_dropped)
            layer_in = self.head_dropped
        self.head_in = layer_in
        loss = self._head(B, T, has_w)
        d_out = self.d_head
        if self.head_dropped is not None:
            np.multiply(d_out, self.head_mask, out=d_out)
        for i in reversed(range(len(self.cells))):
            c = self.cells[i]
            if c.dropped is not None:      # d out = d (dropped out) * mask
                np.multiply(d_out, c.mask, out=d_out)
            if self.kept:
                c.dh.fill(0)
                if c.dc is not None:
                    c.dc.fill(0)
                if len(c.chunks) == 1:
                    c.backward[0](*c.backward_values)
                else:
                    nc.run_backward(*c.backward[:2], c.chunks, *c.backward[2:])
            else:
                c.dx, _, _, g = self.backend.backward(c.spec, c.saved, d_out, None, None)
                grads = c.layer.grads
                for name, short in zip(c.names, ("w_ih", "w_hh", "b_ih", "b_hh")):
                    np.copyto(grads[name], g[short])
            d_out = c.dx
        if not self.project:
            return loss, None
        if self.by_ids:  # the seam's dx is it
            return loss, self.cells[0].dx
        K.scatter_add_rows(ids, self.cells[0].dx.reshape(B * T, -1), self.proj_grad)
        return loss, self.proj_grad

    def _head(self, B, T, has_w):
        """Dense head + sequence_loss + their backward. With the C++ backend: one _C call
        (csrc/cpu/head.cpp, rows split over its threads); else the Numba kernel, rows cut as the
        last cell's batch chunks, on threads (the loss is a sum over rows; dw, db summed over
        chunks)."""
        head = self.head
        N = B * T
        inv = self._inv_total(B, T, has_w)
        if self.backend.name == "cpp":
            return self.backend.dense_softmax_xent(
                self.head_in.reshape(N, -1), head.params["weight"], head.params.get("bias"),
                self.targets, self.weights if has_w else None, inv, self.d_logits,
                head.grads["weight"], head.grads.get("bias"), self.d_head.reshape(N, -1))
        grads = [(head.grads["weight"], head.grads.get("bias", self.weights))]
        chunks = self.cells[-1].chunks
        if len(chunks) == 1:
            return self._head_rows(0, B, T, has_w, inv, grads[0])
        grads += [(np.empty_like(grads[0][0]), np.empty_like(grads[0][1])) for _ in chunks[1:]]
        parts = [0.0] * len(chunks)

        def rows(lo, hi):
            k = chunks.index((lo, hi))
            parts[k] = self._head_rows(lo, hi, T, has_w, inv, grads[k])
        self.nc.run_chunks(chunks, rows)
        total_dw, total_db = grads[0]
        for dw, db in grads[1:]:
            total_dw += dw
            if "bias" in head.params:
                total_db += db
        return sum(parts)

    def _head_rows(self, lo, hi, T, has_w, inv, grads):
        """The head kernel over batch rows [lo, hi) (rows lo*T .. hi*T of the flat arrays)."""
        head = self.head
        r = slice(lo * T, hi * T)
        has_bias = "bias" in head.params
        loss = self._kernels.dense_sequence_loss(
            self.head_in[lo:hi].reshape((hi - lo) * T, -1), head.params["weight"],
            head.params["bias"] if has_bias else self.weights, has_bias, self.targets[r],
            self.weights[r], has_w, inv, self.d_logits[r], grads[0], grads[1],
            self.d_head[lo:hi].reshape((hi - lo) * T, -1))
        if loss < 0:
            n = lo * T + int(-1.0 - loss)
            raise ValueError(f"targets must lie in [0, C) = [0, {head.out_features}), "
                             f"got {self.targets[n]}")
        return loss

    def _final_states(self):
        """The state tuple of ``Sequential.forward(..., return_state=True)``, fresh arrays."""
        state = [None] * len(self.model.layers)
        offset = 1 if self.encoder is not None else 0
        for i, r in enumerate(self.recurrent):
            cells = [c for c in self.cells if c.layer is r]
            h = np.stack([c.h for c in cells])
            if r.spec.has_cell_state:
                state[offset + i] = (h, np.stack([c.c for c in cells]))
            else:
                state[offset + i] = h
        return tuple(state)


def _seam_takes_projected(backend, spec):
    """Whether ``backend``'s seam takes the first cell's input as the projection x W_ih^T
    (``forward(..., projected=True)``; then its backward's dx is that projection's gradient):
    the C++ LSTM does."""
    return spec.kind == "lstm" and "projected" in inspect.signature(backend.forward).parameters


def _seam_takes_ids(backend):
    """Whether a projected first cell on ``backend``'s seam can read its rows from the table in
    place (``forward(table, ..., projected=True, ids=ids)``; its backward's dx is then the
    table's gradient [V,G*H]): the C++ LSTM can."""
    return "ids" in inspect.signature(backend.forward).parameters


def _first_outside(ids, V):
    """Index of the first id outside [0, V), or -1."""
    if ids.size == 0 or (ids.min() >= 0 and ids.max() < V):
        return -1
    return int(np.flatnonzero((ids < 0) | (ids >= V))[0])


def _blas_hold(nc, cells, B, T):
    """The Numba backend's one-BLAS-thread hold if any cell's GEMMs are big enough for it."""
    holds = [nc.one_blas_thread(c.spec, B, T, c.I, c.H) for c in cells]
    return next((h for h in holds if not isinstance(h, contextlib.nullcontext)), holds[0])
