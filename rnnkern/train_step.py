"""One training step (forward, loss, backward, optimizer update) as one object: :class:`TrainStep`.

Shape legend: B batch, T time steps, I input width, C classes.
"""
from __future__ import annotations

import math
from typing import NamedTuple

import numpy as np

from . import backends
from .device import array_module, is_device_array, to_host
from .distributed import resolve, shard_batch, split_streams
from .step_plan import FlatParameters, build_plan, model_form, plan_backend
from .step_plan.device import DevicePlan, device_plan_reason, gates_on_device

__all__ = ["TrainStep", "NonFiniteLossError", "StepTally"]


class NonFiniteLossError(FloatingPointError):
    """A training step's loss (or the model's output) is NaN or infinite: the parameters and the
    optimizer's state were left as they were. Usually the parameters hold NaN/inf already or
    training diverged (lower the learning rate, clip gradients)."""


_ON_NONFINITE = ("raise", "skip")


class StepTally(NamedTuple):
    """What :meth:`TrainStep.read` reads of a device step's tally since it was reset: the sum of
    the finite steps' losses and their number, the number of non-finite (skipped) steps, the last
    step's loss (NaN before any), and how many of each came since the previous read."""

    loss_sum: float
    steps: int
    nonfinite: int
    last_loss: float
    new_steps: int
    new_nonfinite: int


# Tests only: host batches take the GPU form of the step (its update through the fused kernels
# of the host emulator: rnnkern.optim._FUSED_ON_HOST), so its logic is checked without a GPU.
_DEVICE_FORM_ON_HOST = False


class TrainStep:
    """``loss = step(x, y)``: one training step of ``model`` on a batch.

    For a model of the form ``Sequential([OneHot | Embedding (optional), LSTM/GRU/RNN layers
    ..., Dropout (optional), Dense])`` with :func:`rnnkern.sequence_loss` and an optimizer of
    :mod:`rnnkern.optim`, the step runs a *plan* (:mod:`rnnkern.step_plan`) built once per batch
    shape: on the C++ backend the whole step is one call; on the others the layers run through
    their backend a cell at a time, every input checked once. Any other model takes the generic
    loop every training script writes::

        pred = model.forward(x); loss, d = loss_fn(pred, y, return_grad=True)
        model.backward(d); optimizer.step(model.params, model.grads)

    Both compute the same function from the same kernels (results equal to float rounding,
    tests/test_train_step.py), and the recurrent layers run on the backend they resolve to when
    called directly.

    Args:
        model:     any model with ``forward``/``backward``/``params``/``grads`` (see
                   :class:`rnnkern.Trainer`)
        loss:      ``loss(pred, target, return_grad=True[, weights=w]) -> (value, d_pred)``
        optimizer: an object with ``step(params, grads)``
        generic:   True: always the generic loop (no plan)
        on_nonfinite: what a step whose loss (or model output) is NaN or infinite does; either
                   way nothing is updated (parameters, optimizer state and step count stay):
                   "raise" (default) raises :class:`NonFiniteLossError`; "skip" returns the
                   non-finite loss and counts the step in ``step.skipped``. On the device
                   both act at the next :meth:`read` (see "On the GPU")
        distributed: None (one process), "mpi" or an :class:`rnnkern.distributed.MPIGroup`:
                   data-parallel over MPI ranks (run under ``mpiexec``). Every rank calls the
                   step with the same global batch and trains on its contiguous share of the
                   rows (``step.rows(B)``); the gradients and loss are summed over the ranks,
                   each weighted by its share of the loss's normaliser, in one allreduce of the
                   flat gradient, so the update is one process's on the whole batch up to
                   rounding; clipping and the update follow on every rank alike. Rank 0's
                   parameters, optimizer state and dropout generators (rank r's jumped r times)
                   are broadcast at the first call (:meth:`synchronise`). ``initial_state`` and
                   the returned state are this rank's rows. An error on one rank ends the step
                   on every rank (:mod:`rnnkern.distributed`).

    Call: ``step(x, y, initial_state=None, lengths=None, weights=None, return_state=False)``
    with ``x`` as the model takes it (ids [B,T] or floats [B,T,I]), ``y`` the loss's targets,
    ``initial_state`` as ``model.forward`` takes it, ``lengths`` ints [B], ``weights`` passed to
    the loss. Returns the loss (float), and the final state when ``return_state``. An empty
    batch (B = 0 or T = 0) raises ValueError: it has no loss to step on.

    After a call, ``step.plan`` is the plan it ran (``print(step.plan)`` names each stage's
    implementation and where it runs), or None when it took the generic loop, and
    ``step.generic_reason`` says why (None when a plan ran).

    On the GPU (``model.to("cuda")``, an optimizer of :mod:`rnnkern.optim`), a step reads
    nothing back to the host: it returns the loss as a 0-d float64 device array (``float(loss)``
    reads it), and its plan is the GPU form (:mod:`rnnkern.step_plan.device`): the parameters
    and gradients are views of one flat device buffer and the update is the optimizer's fused
    kernel over it, gated on the device by the loss, so a NaN/inf step updates nothing there
    either. The step adds its loss to ``step.tally`` (loss sum, finite steps, skipped steps,
    last loss, on the device); :meth:`read` reads it in one copy and applies ``on_nonfinite``
    to the steps skipped since the previous read ("raise": :class:`NonFiniteLossError`;
    "skip": counted in ``skipped``), so ``skipped`` is current as of the last read.
    :class:`rnnkern.Trainer` reads every ``log_every`` steps. With any other optimizer the
    device step reads its loss every step, as on the host.

    Note: the first planned call replaces every array in the layers' ``params`` (and ``grads``)
    dicts by a view of one flat array holding the same values, as ``load_params`` replaces
    them; an array taken out of a dict before that no longer follows training, so read
    ``model.params`` afresh (in-place writes to the current arrays, e.g.
    ``Sequential.load_params`` or a checkpoint load, go straight into the flat array).

    Example (lab 12-1)::

        >>> step = TrainStep(model, sequence_loss, Adam(0.1))
        >>> for i in range(50):
        ...     loss = step(x_ids, y_ids)
        >>> print(step.plan)
    """

    def __init__(self, model, loss, optimizer, *, generic=False, on_nonfinite="raise",
                 distributed=None):
        if not callable(loss):
            raise TypeError("loss must be callable: loss(pred, target, return_grad=True)")
        if not hasattr(optimizer, "step"):
            raise TypeError("optimizer must have step(params, grads)")
        if on_nonfinite not in _ON_NONFINITE:
            raise ValueError(f"on_nonfinite must be one of {_ON_NONFINITE}, got {on_nonfinite!r}")
        self.model, self.loss, self.optimizer = model, loss, optimizer
        self.generic = bool(generic)
        self.on_nonfinite = on_nonfinite
        self.skipped = 0             # steps skipped for a non-finite loss (on_nonfinite="skip")
        self.plan = None             # the plan the last call ran (None: the generic loop)
        self.generic_reason = None   # why the last call took the generic loop
        self._form = None            # (model layers, ModelForm | None, reason)
        self._flat = None            # FlatParameters of the form's model
        self._plan = self._plan_reason = self._plan_key = None
        self.group = resolve(distributed)   # None, or the MPIGroup of a data-parallel step
        self._synchronised = False
        self._grad_buffer = None     # the generic loop's gradients packed for the allreduce
        self.tally = None            # device steps: float64 [4] on the device (see read)
        self._device_plan = None     # the GPU form's DevicePlan, kept while it serves
        self._tally_start = (0.0, 0)  # (loss sum, finite steps) the tally starts from
        self._tally_fresh = True     # the tally is to be (re)written from _tally_start
        self._seen = (0, 0)          # (finite, non-finite) steps of the tally already read
        self._device_reason = None   # why the GPU form updates the parameter dicts instead

    def __call__(self, x, y, initial_state=None, lengths=None, weights=None,
                 return_state=False):
        if self.group is not None:
            out = self._sharded(x, y, initial_state, lengths, weights, return_state)
        elif gates_on_device(self.optimizer) and (_DEVICE_FORM_ON_HOST or (
                is_device_array(x) and getattr(self.model, "device", "cpu") != "cpu")):
            # a batch and a model on the GPU: the GPU form (with one of them on the host, the
            # path below, whose forward names both devices)
            return self._device_step(x, y, initial_state, lengths, weights, return_state)
        else:
            plan = self._plan_for(x)
            if plan is not None:
                out = plan.run(x, y, initial_state, lengths, weights, return_state)
            else:
                out = self._generic(x, y, initial_state, lengths, weights, return_state)
        value = out[0] if return_state else out
        if not math.isfinite(value):   # neither path updated anything
            return self._nonfinite(value, out)
        return out

    def _nonfinite(self, value, out):
        if self.on_nonfinite == "raise":
            raise NonFiniteLossError(
                f"the loss is {value} at this step, so nothing was updated: {_DIVERGED}")
        self.skipped += 1
        return out

    def __repr__(self):
        if self.plan is not None:
            return f"TrainStep({self.plan})"
        return ("TrainStep(generic loop: model.forward -> loss -> model.backward -> "
                f"optimizer.step{f'; {self.generic_reason}' if self.generic_reason else ''})")

    # ------------------------------------------------------------------ data-parallel
    def rows(self, B):
        """The rows of a batch of ``B`` rows that this process trains on, a slice (all of them
        without ``distributed``)."""
        return slice(0, B) if self.group is None else self.group.rows(B)

    def synchronise(self):
        """Data-parallel: rank 0's parameters and optimizer state on every rank, and its
        dropout generators, rank r's jumped r times (independent masks for each rank's rows).
        The first call runs it; :class:`rnnkern.Trainer` runs it whenever ``fit`` starts."""
        group, model = self.group, self.model
        with group.failing_together():
            for p in model.params.values():
                group.broadcast(p)
            if hasattr(self.optimizer, "state_dict"):
                state = group.broadcast_object(self.optimizer.state_dict())
                if not group.is_root:
                    self.optimizer.load_state_dict(state)
            if hasattr(model, "get_rng_state") and hasattr(model, "set_rng_state"):
                rng = group.broadcast_object(model.get_rng_state())
                if not group.is_root:
                    model.set_rng_state(rng)
                split_streams(model, group.rank)
        self._synchronised = True

    def _sharded(self, x, y, initial_state, lengths, weights, return_state):
        """One data-parallel step on this rank's share of the global batch."""
        group = self.group
        device = getattr(self.model, "device", "cpu")
        if device != "cpu" or is_device_array(x):
            raise ValueError(f"distributed='mpi' trains on the host: the model is on {device!r} "
                             f"and x on {'cuda' if is_device_array(x) else 'cpu'!r}; move both "
                             f"with model.to('cpu') and host batches")
        _check_not_empty(np.shape(x) if not hasattr(x, "shape") else x.shape)
        share = shard_batch(group, self.loss, x, y, lengths, weights)  # same check on each rank
        if not self._synchronised:
            self.synchronise()
        with group.failing_together():
            plan = self._plan_for(share.x)
            if plan is not None:
                if "allreduce" not in plan.stages:   # say it, before the update
                    update = plan.stages.pop("update")
                    plan.stages["allreduce"] = (
                        f"the flat gradient and the loss summed over {group.size} ranks "
                        f"(one MPI Iallreduce, in place) once the backward is done")
                    plan.stages["update"] = update
                return plan.run(share.x, share.y, initial_state, share.lengths, share.weights,
                                return_state, loss_scale=share.fraction,
                                exchange=self._exchange_flat)
            return self._generic(share.x, share.y, initial_state, share.lengths, share.weights,
                                 return_state, loss_scale=share.fraction,
                                 exchange=self._exchange_dicts)

    def _exchange_flat(self, value):
        """The plan's flat gradient and ``value`` (in the slot after it) summed over the ranks."""
        buf = self._flat.reduce_buffer
        buf[-1] = value
        self.group.allreduce_sum(buf)
        return float(buf[-1])

    def _exchange_dicts(self, value):
        """The generic loop's: the model's gradient arrays packed into one buffer with
        ``value``, summed over the ranks, and unpacked."""
        grads = self.model.grads
        dtype = np.result_type(*grads.values())
        total = sum(g.size for g in grads.values())
        if self._grad_buffer is None or self._grad_buffer.shape != (total + 1,) \
                or self._grad_buffer.dtype != dtype:
            self._grad_buffer = np.empty(total + 1, dtype)
        buf, lo = self._grad_buffer, 0
        for g in grads.values():
            buf[lo:lo + g.size] = g.reshape(-1)
            lo += g.size
        buf[-1] = value
        self.group.allreduce_sum(buf)
        lo = 0
        for g in grads.values():
            g[...] = buf[lo:lo + g.size].reshape(g.shape)
            lo += g.size
        return float(buf[-1])

    # ------------------------------------------------------------------ the plan
    def _plan_for(self, x):
        """The plan for this call (also ``self.plan``), or None with ``self.generic_reason``
        saying why the generic loop runs. The plan is kept while the batch shape, the input's
        array type, the backend settings, the layers' training flags and the parameter arrays
        stay as they were."""
        if self.generic:
            self.plan, self.generic_reason = None, "generic=True"
            return None
        layers = getattr(self.model, "layers", None)
        if self._form is None or self._form[0] != layers:
            form, reason = model_form(self.model, self.loss, self.optimizer)
            self._form = (list(layers) if layers is not None else None, form, reason)
            self._flat, self._plan_key = None, None
        form = self._form[1]
        if form is None:
            self.plan, self.generic_reason = None, self._form[2]
            return None
        device = getattr(self.model, "device", "cpu")
        if device != "cpu":
            self.plan = None
            self.generic_reason = (
                f"the model is on {device!r} and " + (
                    "x is not: the GPU form takes batches on the device" if gates_on_device(
                        self.optimizer) else "the optimizer is not one of rnnkern.optim's: the "
                    "generic loop, every stage on the device, the loss read on the host every "
                    "step"))
            return None
        shape = x.shape if type(x) is np.ndarray else np.shape(x)
        hd = form.head_dropout
        key = (shape[:2], type(x), backends.preset(),
               tuple([(r.backend, r.training, r.dropout) for r in form.recurrent]),
               None if hd is None else (hd.training, hd.p))
        if key != self._plan_key:
            self._plan, self._plan_reason = self._new_plan(form, x, shape)
            self._plan_key = key
        elif self._plan is not None and not self._flat.still_bound():
            self._plan, self._plan_reason = self._new_plan(form, x, shape)
        self.plan, self.generic_reason = self._plan, self._plan_reason
        return self._plan

    def _new_plan(self, form, x, shape):
        if len(shape) < 2:
            return None, "x is not a batch [B,T,...]"   # the model's forward raises the error
        _check_not_empty(shape)
        backend, reason = plan_backend(form, x)
        if backend is None:
            return None, reason
        if self._flat is None or not self._flat.still_bound():
            self._flat = FlatParameters(self.model, form.dtype)
        return build_plan(form, self._flat, self.optimizer, backend, shape[:2]), None

    # ------------------------------------------------------------------ the GPU form
    def _device_step(self, x, y, initial_state, lengths, weights, return_state):
        """One step of a model on the device that reads nothing back: forward, loss (kept a 0-d
        device array), backward, and the optimizer's update gated on the device by the loss
        (over the flat buffers of the :class:`DevicePlan`, or the parameter dicts with
        ``generic=True`` or a model it cannot lay out flat). The output is not scanned for
        NaN (a read); a NaN there makes the loss NaN, which the gate stops."""
        xp = array_module(x)    # the model's device: the caller routed a device batch here
        plan = self._device_plan_for(xp)
        state, value, d_pred = self._forward_loss(x, y, initial_state, lengths, weights,
                                                  return_state, scan=False)
        if not (getattr(value, "dtype", None) == np.float64 and getattr(value, "shape", None)
                == () and array_module(value) is xp):
            value = xp.asarray(value, dtype=np.float64)   # a loss made on the host: no read
        if d_pred is not None:
            self.model.backward(d_pred)
        tally = self._device_tally(xp)
        if plan is not None:
            plan.update(value, tally)
        else:
            self.optimizer.step(self.model.params, self.model.grads, loss=value, tally=tally)
        return (value, state) if return_state else value

    def _device_plan_for(self, xp):
        """The :class:`DevicePlan` for this call (also ``self.plan``), or None with
        ``self.generic_reason`` saying why the parameter dicts are updated instead."""
        if self.generic:
            self.plan, self.generic_reason = None, ("generic=True (on the device: the update "
                                                    "gated there, the parameters concatenated)")
            return None
        plan = self._device_plan
        if plan is None or not plan.still_current(self.model):
            reason = device_plan_reason(self.model)
            plan = self._device_plan = (DevicePlan(self.model, self.loss, self.optimizer)
                                        if reason is None else None)
            self._device_reason = None if reason is None else (
                f"{reason}: the generic loop on the device, the update gated there")
        self.plan, self.generic_reason = plan, self._device_reason
        return plan

    def _device_tally(self, xp):
        """``self.tally`` on the device, written from the start values after a reset."""
        if self._tally_fresh:
            if self.tally is None or array_module(self.tally) is not xp:
                self.tally = xp.zeros(4, np.float64)
            loss_sum, steps = self._tally_start
            self.tally[0], self.tally[1] = loss_sum, steps    # fills, nothing read
            self.tally[2], self.tally[3] = 0.0, math.nan
            self._tally_fresh = False
        return self.tally

    def reset_tally(self, loss_sum=0.0, steps=0):
        """Start the device tally again from ``loss_sum`` over ``steps`` finite steps (the
        Trainer's epoch sums: zero, or a checkpoint's), no skipped steps and no last loss. Written
        on the device at the next step; nothing is read."""
        self._tally_start = (float(loss_sum), int(steps))
        self._tally_fresh = True
        self._seen = (int(steps), 0)

    def read(self, check=True):
        """Read the device tally (ONE device-to-host copy of four numbers) as a
        :class:`StepTally`, and apply ``on_nonfinite`` to the steps skipped since the previous
        read: "skip" adds them to ``skipped``; "raise" (when ``check``) raises
        :class:`NonFiniteLossError`. The gate skipped those steps' updates and the steps after
        them went on until this read, so the parameters are those of the last finite step.
        Before any device step (or right after :meth:`reset_tally`) nothing is read."""
        if self.tally is None or self._tally_fresh:
            loss_sum, steps = self._tally_start
            nonfinite, last = 0, math.nan
        else:
            host = to_host(self.tally)
            loss_sum, steps, nonfinite, last = (float(host[0]), int(host[1]), int(host[2]),
                                                float(host[3]))
        new_steps, new_nonfinite = steps - self._seen[0], nonfinite - self._seen[1]
        self._seen = (steps, nonfinite)
        tally = StepTally(loss_sum, steps, nonfinite, last, new_steps, new_nonfinite)
        if new_nonfinite:
            if self.on_nonfinite == "skip":
                self.skipped += new_nonfinite
            elif check:
                raise NonFiniteLossError(nonfinite_message(tally))
        return tally

    # ------------------------------------------------------------------ generic
    def _forward_loss(self, x, y, initial_state, lengths, weights, return_state, scan=True):
        """``(state, loss value, d_pred)`` of the batch; ``(state, nan, None)`` when a NaN or
        infinity arose inside the model (its parameters' doing, the input having been checked
        by the first layer): the output scanned for one when ``scan``, and a ValueError of the
        loss with non-finite parameters."""
        _check_not_empty(np.shape(x) if not hasattr(x, "shape") else x.shape)
        kwargs = {} if lengths is None else {"lengths": lengths}
        state, d_pred = None, None
        try:
            if return_state or initial_state is not None:
                pred, state = self.model.forward(x, initial_state=initial_state,
                                                 return_state=True, **kwargs)
            else:
                pred = self.model.forward(x, **kwargs)
            if scan and _holds_nonfinite(pred):
                value = math.nan
            elif weights is None:
                value, d_pred = self.loss(pred, y, return_grad=True)
            else:
                value, d_pred = self.loss(pred, y, weights=weights, return_grad=True)
        except ValueError:
            if all(_finite(p) for p in self.model.params.values()):
                raise                  # a bad input, not a numerical failure
            value, d_pred = math.nan, None
        return state, value, d_pred

    def _generic(self, x, y, initial_state, lengths, weights, return_state, loss_scale=1.0,
                 exchange=None):
        """The generic loop; a NaN or infinity that arises inside the model returns a NaN loss
        with nothing updated, as the plans do (:meth:`_forward_loss`). ``loss_scale``,
        ``exchange``: as a plan's (:meth:`rnnkern.step_plan.plan.StepPlan.run`)."""
        state, value, d_pred = self._forward_loss(x, y, initial_state, lengths, weights,
                                                  return_state)
        value = float(value)
        if math.isfinite(value):
            if loss_scale != 1.0:
                value, d_pred = value * loss_scale, d_pred * loss_scale
            self.model.backward(d_pred)
        if exchange is not None:
            value = exchange(value)
        if math.isfinite(value):
            self.optimizer.step(self.model.params, self.model.grads)
        return (value, state) if return_state else value


_DIVERGED = ("the model's parameters hold NaN or infinity, or training diverged (lower the "
             "learning rate or clip the gradients; on_nonfinite='skip' skips such steps instead)")


def nonfinite_message(tally):
    """The words of a device read (a :class:`StepTally`) that found skipped steps."""
    return (f"{tally.new_nonfinite} step(s) since the previous read had a NaN or infinite loss "
            f"(the last loss: {tally.last_loss}); on the device their updates were skipped and "
            f"training went on until this read, so the parameters are those of the last finite "
            f"step: {_DIVERGED}")


def _check_not_empty(shape):
    """ValueError for a batch with no positions (B = 0 or, for sequences, T = 0): it has no loss,
    and an update from it would move the parameters on momentum alone."""
    dims = tuple(shape[:2])
    if dims and 0 in dims:
        raise ValueError(f"x is an empty batch (shape {tuple(shape)}): a training step needs "
                         f"B >= 1 and T >= 1")


def _finite(a):
    """False when the NumPy or CuPy array ``a`` holds NaN or infinity (a read, on the device)."""
    if not (hasattr(a, "dtype") and hasattr(a, "shape")) or a.dtype.kind not in "fc":
        return True
    return bool(array_module(a).isfinite(a).all())


def _holds_nonfinite(pred):
    arrays = pred if isinstance(pred, (tuple, list)) else (pred,)
    return not all(_finite(a) for a in arrays)
