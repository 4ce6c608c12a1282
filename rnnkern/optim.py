"""Optimizers that update a ``{name: array}`` params dict in place from a matching grads dict.

    >>> opt = Adam(lr=0.1)
    >>> opt.step(model.params, model.grads)       # after model.backward(...)

Every optimizer follows ``torch.optim``'s update rule for its class (tested against it on the
same gradient sequences), except :class:`Adam`, whose default ``eps_mode="tf"`` follows TF1
``AdamOptimizer`` / Keras (see its docstring). Optimizer state is kept per parameter name, so it
survives a model whose arrays are replaced (e.g. ``LSTM.load_params``).

Gradient clipping (``clip_value``, then ``clip_norm``) happens inside :meth:`Optimizer.step`,
in place on the grads arrays, as ``torch.nn.utils.clip_grad_*_`` do.

On the GPU (parameters and gradients CuPy arrays, after ``model.to("cuda")``): clipping runs
there without reading anything back to the host, and each step's update is ONE launch of the
optimizer's fused kernel (``csrc/cuda/optim.cu``) over the flat parameter, gradient and state
buffers, the NumPy rule operation by operation (same bits), after a one-thread gate kernel that
counts the step on the device. Given the step's ``loss`` (a 0-d device array), the gate looks at
it there and a NaN/inf loss updates nothing -- parameters, state, step count -- with nothing
read back: how :class:`rnnkern.TrainStep` steps a model on the GPU. The state follows the
parameters: it moves to their device at the first step that sees them elsewhere
(:attr:`Optimizer.device`).
"""
from __future__ import annotations

import math
import numbers

import numpy as np

from .device import array_module, device_of, is_device_array, to_device, to_host


def _arrays_of(grads, what="grads"):
    """(list of the arrays of a dict or iterable, their array module); ValueError when they
    mix host and GPU arrays."""
    arrays = list(grads.values() if isinstance(grads, dict) else grads)
    devices = {device_of(a) for a in arrays}
    if len(devices) > 1:
        raise ValueError(f"{what} mix host and GPU arrays; put the model on one device with "
                         f"model.to(device)")
    return arrays, (array_module(arrays[0]) if arrays else np)


# ---------------------------------------------------------------------- clipping
def global_norm(grads):
    """sqrt(sum of squares) over every array in ``grads`` (a dict or iterable), in float64: a
    Python float, or for GPU arrays a 0-d float64 GPU array (nothing read back)."""
    arrays, xp = _arrays_of(grads)
    if xp is np:
        return math.sqrt(sum(float(np.vdot(g, g)) for g in arrays))
    return xp.sqrt(sum(xp.vdot(g, g).astype(np.float64) for g in arrays))


def clip_grad_norm(grads, max_norm):
    """Scale every gradient in place by ``max_norm / max(norm, max_norm)``; return the norm
    (as :func:`global_norm` gives it).

    This is TF's ``tf.clip_by_global_norm`` (char-rnn's ``grad_clip``). PyTorch's
    ``clip_grad_norm_`` differs only by using ``max_norm / (norm + 1e-6)``.
    """
    _check_positive("max_norm", max_norm)
    arrays, xp = _arrays_of(grads)
    norm = global_norm(arrays)
    if xp is np:
        if norm > max_norm:
            scale = max_norm / norm
            for g in arrays:
                g *= scale
        return norm
    # on the GPU, no branch on the norm (a host read): the scale is exactly 1 when
    # norm <= max_norm, and fmax skips a NaN norm as the host's `norm > max_norm` does; rounded
    # to each gradient's dtype as the host's Python float is, so the same bits for one norm
    scale = max_norm / xp.fmax(norm, max_norm)
    for g in arrays:
        g *= scale.astype(g.dtype)
    return norm


def clip_grad_value(grads, clip_value):
    """Clamp every gradient element to ``[-clip_value, clip_value]`` in place."""
    _check_positive("clip_value", clip_value)
    arrays, xp = _arrays_of(grads)
    for g in arrays:
        xp.clip(g, -clip_value, clip_value, out=g)


def _check_positive(name, value, allow_zero=False):
    ok = isinstance(value, numbers.Real) and not isinstance(value, bool) and math.isfinite(value)
    ok = ok and (value >= 0 if allow_zero else value > 0)
    if not ok:
        raise ValueError(f"{name} must be a finite number {'>=' if allow_zero else '>'} 0, "
                         f"got {value!r}")
    return float(value)


def _check_unit(name, value):
    if not (isinstance(value, numbers.Real) and 0.0 <= value < 1.0):
        raise ValueError(f"{name} must be a number in [0, 1), got {value!r}")
    return float(value)


# ---------------------------------------------------------------------- schedules
class ExponentialDecay:
    """``lr(epoch) = initial_lr * rate ** epoch`` (char-rnn: 0.97 per epoch). Epochs count from 0."""

    def __init__(self, initial_lr, rate):
        self.initial_lr = _check_positive("initial_lr", initial_lr)
        self.rate = _check_positive("rate", rate)

    def __call__(self, epoch):
        return self.initial_lr * self.rate ** epoch

    def __repr__(self):
        return f"ExponentialDecay({self.initial_lr}, {self.rate})"


# ---------------------------------------------------------------------- optimizers
class Optimizer:
    """Base class: validation, clipping, per-name state, ``state_dict``.

    Args (every optimizer):
        lr:          learning rate (an attribute; schedules set ``opt.lr``)
        clip_norm:   clip the gradients' global norm to this (TF ``clip_by_global_norm``)
        clip_value:  clamp each gradient element to ``[-clip_value, clip_value]``

    The update rules are NumPy, once each; a training step on the C++ backend runs Adam's in C++
    instead, inside its call or after it (csrc/cpu/adam.h: the same operations, so the same
    bits), and parameters on the GPU run the rule's fused kernel (csrc/cuda/optim.cu: the same
    operations again, :meth:`_fused_update`).

    State placement: the state lives where the parameters it updates live. A step (or
    :meth:`step_flat`) on parameters of another device first moves the whole state there, so
    ``model.to("cuda")`` needs nothing of the optimizer. :meth:`state_dict` always gives host
    (NumPy) copies; :meth:`load_state_dict` puts the state on :attr:`device`, the device of the
    parameters it last stepped (the host before any step), and a later step on parameters
    elsewhere moves it.

    The step count on the GPU: every step there first launches the gate
    (``rk_step_gate``), which advances a device counter -- only when the step's ``loss``, if
    given, is finite -- and the update kernels read their step (Adam's ``t``) from it, so no
    step waits for the host. :attr:`iterations` reads that counter when asked (one
    device-to-host copy); setting it, or :meth:`load_state_dict`, writes it at the next step.
    On the host the count is the plain attribute ``_iterations``, which the host steps (and the
    C++ plan) update directly.
    """

    _slots = ()  # names of the per-parameter state arrays

    def __init__(self, lr, *, clip_norm=None, clip_value=None):
        self.lr = _check_positive("lr", lr, allow_zero=True)
        self.clip_norm = None if clip_norm is None else _check_positive("clip_norm", clip_norm)
        self.clip_value = None if clip_value is None else _check_positive("clip_value", clip_value)
        self._iterations = 0  # steps taken so far (Adam's t), while the count is on the host
        self.state = {}       # name -> {slot: array}
        self.last_grad_norm = None  # global norm before clipping, when clip_norm is set
                                    # (a float; a 0-d GPU array for parameters on the GPU)
        self._flat = None     # layout and flat state of the concatenated update (see step)
        self._device = "cpu"  # where the state lives (that of the last parameters stepped)
        # the fused (device) steps' own: the step counter [t, lazy slots written] and this
        # step's flags [go, first] (csrc/cuda/optim.cu), an upper bound on t, Adam's table, and
        # a count set on the host for the counter's next step
        self._clock = self._flags = self._bias = self._count_set = None
        self._t_bound = 0

    @property
    def iterations(self):
        """Steps taken so far (Adam's ``t``; skipped steps do not count). While the count lives
        on the device it is read from there (one device-to-host copy) unless set since."""
        if self._clock is None:
            return self._iterations
        if self._count_set is not None:
            return self._count_set
        return int(to_host(self._clock)[0])

    @iterations.setter
    def iterations(self, value):
        if self._clock is None:
            self._iterations = value
        else:                       # written into the device counter at the next step
            self._count_set = int(value)

    @property
    def device(self):
        """Where the state lives, "cpu" or "cuda": that of the parameters last stepped."""
        return self._device

    def _follow(self, device):
        """Move the state to ``device``, where the parameters it updates now live."""
        if device == self._device:
            return
        self._clock_home()
        self.state = {k: {s: to_device(a, device) for s, a in st.items()}
                      for k, st in self.state.items()}
        self._flat = None
        self._device = device

    def _clock_home(self):
        """The device step counter's count back on the host (``_iterations``)."""
        if self._clock is not None:
            count = self.iterations            # a value set since, or the counter's
            self._clock = self._flags = self._bias = self._count_set = None
            self._iterations = count

    def _hyper(self):
        return {}

    # Below this many elements in all, step() updates one concatenated copy of every parameter
    # instead of each array in turn: the same element-wise operations (so bitwise-identical
    # results) in ~10 ufunc calls instead of ~10 per array -- at lab sizes the per-call overhead
    # is the whole cost. Above it, concatenating would only add memory traffic.
    FLAT_MAX_ELEMENTS = 1 << 16

    def step(self, params, grads, *, loss=None, tally=None):
        """Update every ``params[name]`` in place using ``grads[name]`` (clipped in place first).

        ``loss``, ``tally``: as :meth:`step_flat`'s. On the device the parameters, gradients
        and state are concatenated for the one fused launch and the parameters copied back;
        :meth:`step_flat` over parameters that already live in one flat buffer (a training
        step's plan) does without both copies."""
        if grads.keys() != params.keys():
            raise ValueError(f"grads keys must match params keys: missing "
                             f"{sorted(set(params) - set(grads))}, unexpected "
                             f"{sorted(set(grads) - set(params))}")
        total, dtypes, devices = 0, set(), set()
        for k, p in params.items():
            g = grads[k]
            if not isinstance(p, np.ndarray) and not is_device_array(p) or p.dtype.kind != "f":
                raise TypeError(f"params[{k!r}] must be a floating-point NumPy or CuPy array")
            if g.shape != p.shape:
                raise ValueError(f"grads[{k!r}] must have shape {p.shape}, got {g.shape}")
            if device_of(g) != device_of(p):
                raise ValueError(f"grads[{k!r}] is on {device_of(g)!r} but params[{k!r}] is on "
                                 f"{device_of(p)!r}")
            total += p.size
            dtypes.add(p.dtype)
            devices.add(device_of(p))
        if len(devices) > 1:
            raise ValueError("params live on different devices; put the model on one device "
                             "with model.to(device)")
        device = devices.pop() if devices else self._device
        self._follow(device)
        if params and (device != "cpu" or _FUSED_ON_HOST):
            self._fused_step(params, grads, dtypes, loss, tally)
            return
        if (loss is not None or tally is not None) and not _host_gate(loss, tally):
            return
        if self.clip_value is not None:
            clip_grad_value(grads, self.clip_value)
        if self.clip_norm is not None:
            self.last_grad_norm = clip_grad_norm(grads, self.clip_norm)
        self._iterations += 1
        if len(dtypes) == 1 and total <= self.FLAT_MAX_ELEMENTS and self._step_flat(params, grads):
            return
        self._flat = None
        for k, p in params.items():
            st = self.state.get(k)
            if st is None:
                st = self.state[k] = self._init_state(p)
            self._update(p, np.asarray(grads[k], dtype=p.dtype), st)

    def _fused_step(self, params, grads, dtypes, loss, tally):
        """:meth:`step` on the device: one fused launch over concatenated copies (per name when
        dtypes differ or the state cannot be laid out flat, a launch each), after the gate."""
        first = next(iter(params.values()))
        xp = array_module(first)
        self._device_clock(xp)
        if self.clip_value is not None:
            clip_grad_value(grads, self.clip_value)
        norm = None if self.clip_norm is None else clip_grad_norm(grads, self.clip_norm)
        layout = tuple((k, p.shape) for k, p in params.items())
        flat = self._flat if len(dtypes) == 1 else None
        if len(dtypes) == 1 and (flat is None or flat["layout"] != layout
                                 or flat["dtype"] != first.dtype):
            flat = self._build_flat(layout, params)
        if flat is not None:
            dtype = first.dtype
            p_flat = xp.concatenate([p.reshape(-1) for p in params.values()])
            g_flat = xp.concatenate([xp.asarray(grads[k], dtype=dtype).reshape(-1)
                                     for k in params])
            runs = [(p_flat, g_flat, flat["state"])]
        else:
            self._flat = None
            runs = []
            for k, p in params.items():
                st = self.state.get(k)
                if st is None:
                    st = self.state[k] = self._init_state(p)
                runs.append((p, grads[k], st))
        slots = None if flat is None else len(flat["state"])
        self._open_step(xp, first.dtype, [(p, st) for p, _, st in runs], loss, tally, norm)
        for p, g, st in runs:
            self._fused_update(p, g, st)
        if flat is not None:
            if len(flat["state"]) != slots:     # a slot made lazily (SGD's momentum buffer)
                self._bind_views(flat)
            for (k, shape), (lo, hi) in zip(layout, flat["spans"]):
                xp.copyto(params[k], p_flat[lo:hi].reshape(shape))

    def step_flat(self, flat_params, flat_grads, layout, update=None, *, loss=None, tally=None):
        """:meth:`step` for parameters that live in one flat array, as a training step's plan
        keeps them (:class:`rnnkern.TrainStep`): the same clipping, update and per-name state.

        Args:
            flat_params, flat_grads: 1-D arrays of one float dtype, updated / clipped in place
            layout: ``((name, shape), ...)``, the parameters in the order they are concatenated
            update: None, or ``update(flat_params, flat_grads, flat_state)``, another
                    implementation of this optimizer's rule over the flat host arrays (the C++
                    plan's Adam); None: the NumPy rule. GPU arrays always take the rule's fused
                    kernel (one launch over the flat buffers, in place)
            loss:   None, or this step's loss: when it is NaN or infinite nothing is updated
                    (parameters, state, step count and ``last_grad_norm`` stay; the gradients
                    may be clipped in place all the same). On the GPU, a 0-d device array that
                    is never read on the host: the gate kernel looks at it on the device and the
                    update kernels leave everything untouched when it says non-finite.
            tally:  None, or a float64 [4] array on the parameters' device that the step adds
                    its loss to: [0] sum of the finite losses, [1] finite steps, [2]
                    non-finite steps, [3] the last loss (how :class:`rnnkern.Trainer` reads
                    the loss on the GPU every few steps instead of every step)
        """
        device = device_of(flat_params)
        self._follow(device)
        fused = device != "cpu" or _FUSED_ON_HOST
        if fused:
            xp = array_module(flat_params)
            self._device_clock(xp)
        elif (loss is not None or tally is not None) and not _host_gate(loss, tally):
            return
        if self.clip_value is not None:
            clip_grad_value([flat_grads], self.clip_value)
        norm = None
        if self.clip_norm is not None:
            norm = clip_grad_norm([flat_grads], self.clip_norm)
            if not fused:
                self.last_grad_norm = norm
        if not fused:
            self._iterations += 1
        rule = self._fused_update if fused else (update or self._update)
        flat = self._flat
        if flat is None or flat["layout"] != layout or flat["dtype"] != flat_params.dtype:
            views, lo = {}, 0     # name -> (param view, grad view)
            for k, shape in layout:
                n = int(np.prod(shape, dtype=np.int64))
                views[k] = (flat_params[lo:lo + n].reshape(shape),
                            flat_grads[lo:lo + n].reshape(shape))
                lo += n
            flat = self._build_flat(layout, {k: p for k, (p, _) in views.items()})
            if flat is None:  # per-name state that cannot be laid out flat: name by name
                self._flat = None
                runs = []
                for k, (p, g) in views.items():
                    st = self.state.get(k)
                    if st is None:
                        st = self.state[k] = self._init_state(p)
                    runs.append((p, g, st))
                if fused:
                    self._open_step(xp, flat_params.dtype, [(p, st) for p, _, st in runs],
                                    loss, tally, norm)
                for p, g, st in runs:
                    (self._fused_update if fused else self._update)(p, g, st)
                return
        st = flat["state"]
        slots = len(st)
        if fused:
            self._open_step(xp, flat_params.dtype, [(flat_params, st)], loss, tally, norm)
        rule(flat_params, flat_grads, st)
        if len(st) != slots:            # a slot created lazily (SGD's momentum buffer)
            self._bind_views(flat)

    def _step_flat(self, params, grads):
        """One update with the NumPy rule over concatenated params/grads; per-name state are
        views of flat state. Returns False (nothing done) when the per-name state cannot be
        laid out flat."""
        layout = tuple((k, p.shape) for k, p in params.items())
        dtype = next(iter(params.values())).dtype
        flat = self._flat
        if flat is None or flat["layout"] != layout or flat["dtype"] != dtype:
            flat = self._build_flat(layout, params)
            if flat is None:
                return False
        p_flat = np.concatenate([p.reshape(-1) for p in params.values()])
        g_flat = np.concatenate([np.asarray(grads[k], dtype=dtype).reshape(-1) for k in params])
        st = flat["state"]
        slots = len(st)
        self._update(p_flat, g_flat, st)
        if len(st) != slots:            # a slot created lazily (SGD's momentum buffer)
            self._bind_views(flat)
        for (k, shape), (lo, hi) in zip(layout, flat["spans"]):
            np.copyto(params[k], p_flat[lo:hi].reshape(shape))
        return True

    def _build_flat(self, layout, params):
        per_name = {k: self.state.get(k) or self._init_state(params[k]) for k, _ in layout}
        slots = {frozenset(st) for st in per_name.values()}
        if len(slots) != 1:
            return None
        spans, lo = [], 0
        for k, shape in layout:
            n = int(np.prod(shape, dtype=np.int64))
            spans.append((lo, lo + n))
            lo += n
        dtype = next(iter(params.values())).dtype
        xp = array_module(next(iter(params.values())))
        state = {s: xp.concatenate([xp.asarray(per_name[k][s], dtype=dtype).reshape(-1)
                                    for k, _ in layout]) for s in next(iter(slots))}
        flat = self._flat = {"layout": layout, "spans": spans, "state": state, "dtype": dtype}
        self._bind_views(flat)
        return flat

    def _bind_views(self, flat):
        for (k, shape), (lo, hi) in zip(flat["layout"], flat["spans"]):
            self.state[k] = {s: a[lo:hi].reshape(shape) for s, a in flat["state"].items()}

    def _init_state(self, p):
        return {s: array_module(p).zeros_like(p) for s in self._slots}

    def _lazy_slots(self):
        """State slots the rule makes at its first step rather than up front (SGD's momentum
        buffer); their first update differs from the later ones."""
        return ()

    def _update(self, p, g, st):  # pragma: no cover - abstract
        raise NotImplementedError

    # ------------------------------------------------------------------ the fused (device) step
    def _device_clock(self, xp):
        """The device step counter ``[t, lazy slots written]`` (int64 [2], made from the host
        count at the first fused step); a count set on the host since is written into it here
        (a fill: nothing read)."""
        if self._clock is None:
            count = self._iterations
            self._clock = xp.asarray(np.array([count, 1], np.int64))
            self._flags = xp.zeros(2, np.int32)
            self._t_bound = count
        elif self._count_set is not None:
            self._clock[0] = self._t_bound = self._count_set
            self._count_set = None
        return self._clock

    def _open_step(self, xp, dtype, runs, loss, tally, norm):
        """What a fused step does before its update launches: make the lazily made slots of
        ``runs`` (``[(like, state dict)]``) that do not exist yet (marked unwritten on the
        device), launch the gate on ``loss`` / ``tally``, and keep the clipping's ``norm`` as
        :attr:`last_grad_norm` where the gate lets the step through."""
        from .backends.cuda import elementwise
        made = False
        for like, st in runs:
            for s in self._lazy_slots():
                if s not in st:     # zeros, not garbage, until a step goes (state_dict skips it)
                    st[s] = xp.zeros_like(like)
                    made = True
        if made:
            self._clock[1] = 0
        if loss is not None:
            loss = xp.asarray(loss, dtype=np.float64)
            if loss.shape != ():
                raise ValueError(f"loss must be a scalar, got shape {loss.shape}")
        if tally is not None and (array_module(tally) is not xp or tally.dtype != np.float64
                                  or tally.shape != (4,) or not tally.flags.c_contiguous):
            raise ValueError(f"tally must be a C-contiguous float64 array of shape (4,) on the "
                             f"parameters' device, got {type(tally).__name__} "
                             f"{getattr(tally, 'dtype', None)} {getattr(tally, 'shape', None)}")
        flags = self._flags
        elementwise.launch("optim", "rk_step_gate", 1,
                           (flags if loss is None else loss, np.int32(loss is not None),
                            self._clock, flags, flags if tally is None else tally,
                            np.int32(tally is not None)), dtype)
        self._t_bound += 1
        if norm is not None:
            if loss is None:
                self.last_grad_norm = norm
            elif xp is np:               # the emulator's host arrays: the flag is right here
                self.last_grad_norm = norm if flags[0] else self.last_grad_norm
            else:                        # on the device, chosen there (nothing read back)
                prev = self.last_grad_norm
                self.last_grad_norm = xp.where(flags[0] != 0, norm,
                                               xp.nan if prev is None else prev)

    def _kernel_args(self, p, g, st, real):  # pragma: no cover - abstract
        """``(kernel name, arguments after n)`` of this rule's fused kernel in
        csrc/cuda/optim.cu; scalars rounded with ``real`` (the dtype's scalar type). The gate
        has run: ``self._flags`` and ``self._clock`` are this step's."""
        raise NotImplementedError

    def _fused_update(self, p, g, st):
        """:meth:`_update` as one launch of the rule's fused kernel (csrc/cuda/optim.cu) over
        ``p``, ``g`` and the state ``st`` (arrays of one shape on the kernels' device; the
        tests' host emulator runs it on NumPy arrays), after the gate (:meth:`_open_step`)."""
        from .backends.cuda import elementwise
        xp = array_module(p)
        work = p if p.flags.c_contiguous else xp.ascontiguousarray(p)
        g = xp.ascontiguousarray(g, dtype=p.dtype)
        name, args = self._kernel_args(work, g, st, p.dtype.type)
        elementwise.launch("optim", name, p.size, args, p.dtype)
        if work is not p:
            p[...] = work

    def state_dict(self):
        """Everything needed to continue exactly: hyper-parameters, lr, step count, state arrays
        (host copies, wherever the state lives; the step count read from the device, and
        lazily made slots left out while no step has gone since they were made, as on the
        host, where a skipped step makes nothing)."""
        iterations, unwritten = self._iterations, ()
        if self._clock is not None:
            iterations = self._count_set
            clock = to_host(self._clock)          # one read: the count and the written flag
            if iterations is None:
                iterations = int(clock[0])
            if not clock[1]:
                unwritten = self._lazy_slots()
        return {"class": type(self).__name__, "lr": self.lr, "iterations": iterations,
                "hyper": self._hyper(),
                "state": {k: {s: to_host(a, copy=True) for s, a in st.items()
                              if s not in unwritten}
                          for k, st in self.state.items()}}

    def load_state_dict(self, state):
        """Restore :meth:`state_dict`'s record; the arrays are copied to :attr:`device`."""
        if state["class"] != type(self).__name__:
            raise ValueError(f"state is for {state['class']}, not {type(self).__name__}")
        self.lr = float(state["lr"])
        self.iterations = int(state["iterations"])   # into the device counter at the next step
        self.state = {k: {s: to_device(to_host(a, copy=True), self._device) for s, a in st.items()}
                      for k, st in state["state"].items()}
        self._flat = None
        if self._clock is not None:
            self._clock[1] = 1   # the loaded slots hold values (missing ones: made, unwritten)

    def __repr__(self):
        hyper = ", ".join(f"{k}={v!r}" for k, v in self._hyper().items())
        return f"{type(self).__name__}(lr={self.lr!r}, {hyper})"


# Tests only: host (NumPy) arrays take the fused path too, its kernels run by the host emulator
# (tests/cuda_emu.py), so the device step's logic is checked without a GPU.
_FUSED_ON_HOST = False


def _host_gate(loss, tally):
    """The gate of a host step given ``loss`` / ``tally``: whether the step goes on (the loss
    finite, or none given); the tally counts it as rk_step_gate does on the device."""
    value = 0.0 if loss is None else float(loss)
    go = loss is None or math.isfinite(value)
    if tally is not None:
        if go:
            tally[0] += value
            tally[1] += 1.0
        else:
            tally[2] += 1.0
        tally[3] = value
    return go


class SGD(Optimizer):
    """SGD with optional (Nesterov) momentum and L2 ``weight_decay``; ``torch.optim.SGD``'s rule.

    ``buf = momentum*buf + g`` (``buf = g`` at the first step), ``p -= lr*buf`` (Nesterov:
    ``p -= lr*(g + momentum*buf)``). TF1 ``MomentumOptimizer`` is the same update.
    """

    def __init__(self, lr=0.01, momentum=0.0, *, nesterov=False, weight_decay=0.0, **kwargs):
        super().__init__(lr, **kwargs)
        self.momentum = _check_unit("momentum", momentum)
        self.nesterov = bool(nesterov)
        if self.nesterov and self.momentum == 0.0:
            raise ValueError("nesterov=True needs momentum > 0")
        self.weight_decay = _check_positive("weight_decay", weight_decay, allow_zero=True)

    def _hyper(self):
        return {"momentum": self.momentum, "nesterov": self.nesterov,
                "weight_decay": self.weight_decay}

    def _init_state(self, p):
        return {}

    def _update(self, p, g, st):
        if self.weight_decay:
            g = g + self.weight_decay * p
        if self.momentum:
            buf = st.get("momentum_buffer")
            if buf is None:
                buf = st["momentum_buffer"] = g.copy()
            else:
                buf *= self.momentum
                buf += g
            g = g + self.momentum * buf if self.nesterov else buf
        p -= self.lr * g

    def _lazy_slots(self):
        return ("momentum_buffer",) if self.momentum else ()

    def _kernel_args(self, p, g, st, real):
        # the kernel leaves buf alone without momentum; with it, the gate's `first` flag says
        # whether buf (made by _open_step) is written for the first time, as _update's g.copy()
        buf = st["momentum_buffer"] if self.momentum else p
        return "rk_sgd_update", (p, g, buf, self._flags, real(self.lr), real(self.momentum),
                                 real(self.weight_decay), np.int32(bool(self.weight_decay)),
                                 np.int32(bool(self.momentum)), np.int32(self.nesterov))


class Adam(Optimizer):
    r"""Adam (Kingma & Ba 2015). Defaults are TF's: ``beta1=0.9, beta2=0.999, eps=1e-8``.

    ``m = b1 m + (1-b1) g``, ``v = b2 v + (1-b2) g^2``, with ``t`` the step count:

    * ``eps_mode="tf"`` (default; TF1 ``AdamOptimizer``, Keras, the labs):
      ``p -= lr * sqrt(1-b2^t)/(1-b1^t) * m / (sqrt(v) + eps)`` -- the paper's "epsilon hat" form.
    * ``eps_mode="torch"`` (``torch.optim.Adam``):
      ``p -= lr/(1-b1^t) * m / (sqrt(v)/sqrt(1-b2^t) + eps)``.

    The two agree exactly when ``eps=0``; otherwise TF's form equals PyTorch's with
    ``eps_torch = eps / sqrt(1-b2^t)`` (larger early on). ``weight_decay`` adds ``wd*p`` to the
    gradient (L2, as ``torch.optim.Adam``; not AdamW).
    """

    _slots = ("m", "v")

    def __init__(self, lr=0.001, beta1=0.9, beta2=0.999, eps=1e-8, *, eps_mode="tf",
                 weight_decay=0.0, **kwargs):
        super().__init__(lr, **kwargs)
        self.beta1 = _check_unit("beta1", beta1)
        self.beta2 = _check_unit("beta2", beta2)
        self.eps = _check_positive("eps", eps, allow_zero=True)
        if eps_mode not in ("tf", "torch"):
            raise ValueError(f"eps_mode must be 'tf' or 'torch', got {eps_mode!r}")
        self.eps_mode = eps_mode
        self.weight_decay = _check_positive("weight_decay", weight_decay, allow_zero=True)

    def _hyper(self):
        return {"beta1": self.beta1, "beta2": self.beta2, "eps": self.eps,
                "eps_mode": self.eps_mode, "weight_decay": self.weight_decay}

    def _bias_correction(self, t=None):
        """``(1-b1^t, sqrt(1-b2^t), step size)`` of step t (default :attr:`iterations`), in
        Python floats: the step size is ``lr sqrt(1-b2^t)/(1-b1^t)`` (tf) or ``lr/(1-b1^t)``
        (torch). The device's table holds the first two for every t (:meth:`_bias_table`);
        rk_adam_update forms the step size from them as this does."""
        if t is None:
            t = self._iterations      # a host step's (a device step gives its t)
        bc1 = 1.0 - self.beta1 ** t
        bc2_sqrt = math.sqrt(1.0 - self.beta2 ** t)
        return bc1, bc2_sqrt, (self.lr * bc2_sqrt / bc1 if self.eps_mode == "tf"
                               else self.lr / bc1)

    # the bias table grows to at least this many rows, and doubles when it must grow
    BIAS_TABLE_MIN_ROWS = 64

    def _bias_table(self, xp):
        """``(table, R)``: the device's float64 [R,2] rows ``(1-b1^t, sqrt(1-b2^t))`` for
        t = 1..R, computed here by :meth:`_bias_correction` (Python's pow, whose bits the
        device's pow need not share). It covers every t the device counter can hold now
        (at most ``_t_bound``), or it ends where both columns reach 1.0 exactly, beyond which
        every row is that one (rk_adam_update reads row min(t, R)). Grown by doubling: an
        upload now and then (about log2 of the steps taken), no read."""
        key = (self.beta1, self.beta2, xp)
        table = self._bias
        if table is None or table["key"] != key:
            table = self._bias = {"key": key, "rows": [], "array": None, "full": False}
        rows = table["rows"]
        if len(rows) < self._t_bound and not table["full"]:
            goal = max(self.BIAS_TABLE_MIN_ROWS, 2 * len(rows), self._t_bound)
            while len(rows) < goal:
                bc1, bc2_sqrt, _ = self._bias_correction(len(rows) + 1)
                rows.append((bc1, bc2_sqrt))
                if bc1 == 1.0 and bc2_sqrt == 1.0:   # so for every later t too
                    table["full"] = True
                    break
            table["array"] = xp.asarray(np.array(rows, np.float64))
        return table["array"], len(rows)

    def _update(self, p, g, st):
        if self.weight_decay:
            g = g + self.weight_decay * p
        m, v = st["m"], st["v"]
        m *= self.beta1
        m += (1.0 - self.beta1) * g
        v *= self.beta2
        v += (1.0 - self.beta2) * (g * g)
        _, bc2_sqrt, step = self._bias_correction()
        denom = np.sqrt(v)
        if self.eps_mode == "torch":
            denom /= bc2_sqrt
        denom += self.eps
        p -= step * (m / denom)

    def _kernel_args(self, p, g, st, real):
        table, rows = self._bias_table(array_module(p))
        return "rk_adam_update", (p, g, st["m"], st["v"], self._flags, self._clock, table,
                                  np.int64(rows), np.float64(self.lr), real(self.beta1),
                                  real(1.0 - self.beta1), real(self.beta2),
                                  real(1.0 - self.beta2), real(self.eps), real(self.weight_decay),
                                  np.int32(bool(self.weight_decay)),
                                  np.int32(self.eps_mode == "torch"))


class RMSprop(Optimizer):
    """RMSprop with ``torch.optim.RMSprop``'s rule; ``rho`` is torch's ``alpha``.

    ``v = rho v + (1-rho) g^2``; ``avg = sqrt(v) + eps`` (centered: ``sqrt(v - mean_g^2) + eps``);
    ``p -= lr g/avg``, or with momentum ``buf = momentum buf + g/avg; p -= lr buf``.
    Defaults ``rho=0.9`` (Keras, TF1) and ``eps=1e-8``; note TF1 ``RMSPropOptimizer`` starts ``v``
    at 1 and puts eps inside the square root, so its first steps differ.
    """

    def __init__(self, lr=0.001, rho=0.9, eps=1e-8, *, momentum=0.0, centered=False, **kwargs):
        super().__init__(lr, **kwargs)
        self.rho = _check_unit("rho", rho)
        self.eps = _check_positive("eps", eps, allow_zero=True)
        self.momentum = _check_unit("momentum", momentum)
        self.centered = bool(centered)
        self._slots = ("square_avg",) + (("grad_avg",) if self.centered else ()) + \
            (("momentum_buffer",) if self.momentum else ())

    def _hyper(self):
        return {"rho": self.rho, "eps": self.eps, "momentum": self.momentum,
                "centered": self.centered}

    def _update(self, p, g, st):
        sq = st["square_avg"]
        sq *= self.rho
        sq += (1.0 - self.rho) * (g * g)
        if self.centered:
            ga = st["grad_avg"]
            ga *= self.rho
            ga += (1.0 - self.rho) * g
            avg = np.sqrt(sq - ga * ga)
        else:
            avg = np.sqrt(sq)
        avg += self.eps
        if self.momentum:
            buf = st["momentum_buffer"]
            buf *= self.momentum
            buf += g / avg
            p -= self.lr * buf
        else:
            p -= self.lr * (g / avg)

    def _kernel_args(self, p, g, st, real):
        # the kernel leaves grad_avg / momentum_buffer alone when their flag is 0
        return "rk_rmsprop_update", (p, g, st["square_avg"], st.get("grad_avg", p),
                                     st.get("momentum_buffer", p), self._flags, real(self.rho),
                                     real(1.0 - self.rho), real(self.eps), real(self.lr),
                                     real(self.momentum), np.int32(self.centered),
                                     np.int32(bool(self.momentum)))


class Adagrad(Optimizer):
    """Adagrad with ``torch.optim.Adagrad``'s rule: ``s += g^2; p -= lr g/(sqrt(s) + eps)``.

    ``initial_accumulator_value=0.1, eps=0`` gives TF1 ``AdagradOptimizer``.
    """

    _slots = ("sum",)

    def __init__(self, lr=0.01, *, initial_accumulator_value=0.0, eps=1e-10, **kwargs):
        super().__init__(lr, **kwargs)
        self.initial_accumulator_value = _check_positive(
            "initial_accumulator_value", initial_accumulator_value, allow_zero=True)
        self.eps = _check_positive("eps", eps, allow_zero=True)

    def _hyper(self):
        return {"initial_accumulator_value": self.initial_accumulator_value, "eps": self.eps}

    def _init_state(self, p):
        return {"sum": array_module(p).full_like(p, self.initial_accumulator_value)}

    def _update(self, p, g, st):
        s = st["sum"]
        s += g * g
        std = np.sqrt(s)
        std += self.eps
        p -= self.lr * (g / std)

    def _kernel_args(self, p, g, st, real):
        return "rk_adagrad_update", (p, g, st["sum"], self._flags, real(self.lr),
                                     real(self.eps))


# Each optimizer's docstring stands alone: the arguments they all take, written once.
_SHARED_ARGS = """
    Keyword arguments of every optimizer: ``clip_norm`` clips the gradients' global norm (TF
    ``clip_by_global_norm``); ``clip_value`` clamps each element to ``[-clip_value, clip_value]``
    (both in place, before the update). ``lr`` is an attribute that schedules may change.
"""
for _cls in (SGD, Adam, RMSprop, Adagrad):
    _cls.__doc__ = _cls.__doc__.rstrip() + "\n" + _SHARED_ARGS
del _cls
