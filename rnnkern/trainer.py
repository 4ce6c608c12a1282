"""A small training loop that knows nothing of the model's internals.

The model needs ``forward(x, lengths=..., initial_state=..., return_state=...)``, ``backward(d)``,
``params``/``grads`` dicts and ``train()``/``eval()`` (:class:`~rnnkern.Sequential` has them);
``get_rng_state()``/``set_rng_state()`` are used when present so that checkpoints capture dropout
masks' generators. The loss is ``loss(pred, target, return_grad=True[, weights=w]) -> (value,
d_pred)``, as :func:`rnnkern.sequence_loss` and :func:`rnnkern.sum_squares`.

Batches are ``(x, y)`` tuples or dicts with keys ``x``, ``y`` and optional ``lengths``,
``weights``. ``fit`` accepts a sequence of batches (re-used every epoch; ``shuffle=True`` permutes
it with the trainer's seeded generator), any re-iterable (e.g. :class:`rnnkern.StreamBatches`),
or a callable ``data(epoch) -> iterable of batches``.
"""
from __future__ import annotations

import math
import time

import numpy as np

from .checkpoint import (CheckpointError, _is_count, _is_real, load_checkpoint,
                         save_checkpoint)
from .optim import Optimizer
from .train_step import TrainStep, _check_not_empty


class Callback:
    """Base class for callbacks; override what you need. Each receives the trainer.

    Useful trainer attributes: ``epoch`` (0-based, current), ``global_step``, ``step_in_epoch``,
    ``last_loss``, ``history`` (``{"loss": [...], "val_loss": [...], "lr": [...]}`` per epoch),
    ``model``, ``optimizer``. Set ``trainer.stop_training = True`` to stop after this step/epoch.
    """

    def on_step_end(self, trainer):
        pass

    def on_epoch_end(self, trainer):
        pass


class LambdaCallback(Callback):
    """Callback from plain functions: ``LambdaCallback(on_epoch_end=lambda t: print(t.epoch))``."""

    def __init__(self, on_step_end=None, on_epoch_end=None):
        if on_step_end is not None:
            self.on_step_end = on_step_end
        if on_epoch_end is not None:
            self.on_epoch_end = on_epoch_end


class TerminateOnNaN(Callback):
    """Stop :meth:`Trainer.fit` after the first step whose loss is NaN or infinite (Keras'
    ``TerminateOnNaN``), for a trainer made with ``on_nonfinite="skip"`` (the default "raise"
    stops with :class:`~rnnkern.NonFiniteLossError` anyway). That step updated nothing, so the
    parameters, and a checkpoint written after it, are those of the last finite step.
    ``stopped_at`` is the trainer's ``global_step`` then (None while training goes on)."""

    def __init__(self):
        self.stopped_at = None

    def on_step_end(self, trainer):
        if trainer.last_loss is not None and not math.isfinite(trainer.last_loss):
            self.stopped_at = trainer.global_step
            trainer.stop_training = True


def _unpack(batch):
    if isinstance(batch, dict):
        if "x" not in batch or "y" not in batch:
            raise ValueError(f"a batch dict needs keys 'x' and 'y', got {sorted(batch)}")
        return batch["x"], batch["y"], batch.get("lengths"), batch.get("weights")
    if isinstance(batch, (tuple, list)) and len(batch) == 2:
        return batch[0], batch[1], None, None
    raise ValueError("a batch must be an (x, y) tuple or a dict with keys x, y[, lengths, weights]")


def _check_data(data):
    if isinstance(data, (tuple, dict)) or hasattr(data, "shape"):
        raise TypeError("data must be a collection of batches; wrap a single batch as [(x, y)]")


def _batch_size(x):
    return len(x)


def _state_batch_size(state):
    """B of a carried state (arrays are [L,B,H]), found without knowing the layers."""
    if state is None:
        return None
    if isinstance(state, (tuple, list)):
        for s in state:
            b = _state_batch_size(s)
            if b is not None:
                return b
        return None
    return state.shape[-2]


def _flatten_state(state, prefix, out):
    """Nested tuples of arrays/None -> JSON structure; arrays go into ``out`` by key."""
    if state is None:
        return None
    if isinstance(state, (tuple, list)):
        return [_flatten_state(s, f"{prefix}.{i}", out) for i, s in enumerate(state)]
    out[prefix] = np.asarray(state)
    return {"array": prefix}


def _unflatten_state(spec, arrays):
    if spec is None:
        return None
    if isinstance(spec, list):
        return tuple(_unflatten_state(s, arrays) for s in spec)
    return arrays[spec["array"]]


class Trainer:
    """Fit a model with an optimizer, a progress bar, callbacks and exact checkpoint/resume.

    Args:
        model, loss, optimizer: see the module docstring
        lr_schedule:  None or ``callable(epoch) -> lr`` applied at the start of every epoch
                      (e.g. ``ExponentialDecay(2e-3, 0.97)``)
        stateful:     carry the recurrent state from one batch to the next within an epoch
                      (char-rnn's truncated BPTT over contiguous batches); reset every epoch and
                      whenever the batch size changes
        shuffle:      permute a sequence of batches every epoch (seeded by ``seed``)
        seed:         seeds the trainer's generator (shuffling)
        progress:     show a ``tqdm`` bar (loss, steps/s); False: silent
        callbacks:    objects with ``on_step_end(trainer)`` / ``on_epoch_end(trainer)``
        checkpoint:   None or a path written by :meth:`fit` (atomically)
        checkpoint_every: "epoch" (default) or an int N: every N optimizer steps
        checkpoint_meta:  JSON-serialisable data stored in every checkpoint :meth:`fit` writes
                      (e.g. ``{"vocab": vocab.to_list(), "hidden": 128}``); :meth:`load` returns it
        generic:      True: every step is the generic loop; False (default): each step is a
                      :class:`~rnnkern.TrainStep`, which runs a step plan where the model allows
                      (same results, less overhead)
        on_nonfinite: a step whose loss is NaN or infinite updates nothing, then "raise"
                      (default: :class:`~rnnkern.NonFiniteLossError` out of :meth:`fit`) or
                      "skip" (training goes on; the step counts in ``skipped_steps``, not in
                      ``global_step`` or the epoch's mean loss; add :class:`TerminateOnNaN` to
                      stop there instead)

    An empty batch (B = 0 or T = 0) raises ValueError from :meth:`fit` and :meth:`evaluate`.

    Example::

        >>> trainer = Trainer(model, sequence_loss, Adam(0.1), progress=False)
        >>> history = trainer.fit([(x, y)], epochs=50)
        >>> history["loss"][-1]
    """

    def __init__(self, model, loss, optimizer, *, lr_schedule=None, stateful=False,
                 shuffle=False, seed=0, progress=True, callbacks=(), checkpoint=None,
                 checkpoint_every="epoch", checkpoint_meta=None, generic=False,
                 on_nonfinite="raise"):
        for attr in ("forward", "backward", "params", "grads", "train", "eval"):
            if not hasattr(model, attr):
                raise TypeError(f"model has no {attr!r} (see rnnkern.trainer's docstring)")
        if not callable(loss):
            raise TypeError("loss must be callable: loss(pred, target, return_grad=True)")
        if not hasattr(optimizer, "step"):
            raise TypeError("optimizer must have step(params, grads)")
        if not (checkpoint_every == "epoch" or
                (isinstance(checkpoint_every, int) and checkpoint_every > 0)):
            raise ValueError(f"checkpoint_every must be 'epoch' or a positive int, "
                             f"got {checkpoint_every!r}")
        if stateful and shuffle:
            raise ValueError("stateful=True carries state between consecutive batches; "
                             "shuffle=True would break that order")
        self.model, self.loss, self.optimizer = model, loss, optimizer
        self._step = TrainStep(model, loss, optimizer, generic=generic,
                               on_nonfinite=on_nonfinite)
        self.lr_schedule = lr_schedule
        self.stateful = bool(stateful)
        self.shuffle = bool(shuffle)
        self.progress = bool(progress)
        self.callbacks = list(callbacks)
        self.checkpoint = checkpoint
        self.checkpoint_every = checkpoint_every
        self.checkpoint_meta = checkpoint_meta
        self.rng = np.random.default_rng(seed)
        self.epoch = 0              # index of the epoch being (or next to be) run
        self.global_step = 0        # optimizer steps taken
        self.skipped_steps = 0      # steps with a non-finite loss, skipped (on_nonfinite)
        self.step_in_epoch = 0      # batches done in the current epoch
        self.last_loss = None
        self.stop_training = False
        self.history = {"loss": [], "val_loss": [], "lr": []}
        self._epoch_rng_state = None  # the generator's state when the current epoch began
        self._loss_sum = 0.0          # running sums of the current epoch
        self._loss_count = 0
        self._state = None            # carried recurrent state (stateful=True)

    # ------------------------------------------------------------------ one step
    def _forward(self, x, state, lengths, want_state):
        kwargs = {}
        if lengths is not None:
            kwargs["lengths"] = lengths
        if want_state:
            return self.model.forward(x, initial_state=state, return_state=True, **kwargs)
        return self.model.forward(x, **kwargs), None

    def train_step(self, batch):
        """Forward, loss, backward and one optimizer step on ``batch``; returns the loss."""
        x, y, lengths, weights = _unpack(batch)
        state = self._state
        if state is not None and _state_batch_size(state) != _batch_size(x):
            state = None
        if self.stateful:
            value, state = self._step(x, y, state, lengths, weights, return_state=True)
        else:
            value = self._step(x, y, lengths=lengths, weights=weights)
        self._state = state
        self.last_loss = float(value)
        if math.isfinite(self.last_loss):
            self.global_step += 1
        else:                      # on_nonfinite="skip": nothing was updated
            self.skipped_steps += 1
        return self.last_loss

    def evaluate(self, data):
        """Mean loss over ``data`` (weighted by batch size) in eval mode, no updates.

        With ``stateful=True`` the state is carried across ``data``'s batches from zeros.
        """
        _check_data(data)
        was_training = getattr(self.model, "training", True)
        self.model.eval()
        try:
            total, count, state = 0.0, 0, None
            for batch in self._iterate(data, self.epoch, shuffle=False):
                x, y, lengths, weights = _unpack(batch)
                _check_not_empty(np.shape(x) if not hasattr(x, "shape") else x.shape)
                if state is not None and _state_batch_size(state) != _batch_size(x):
                    state = None
                pred, state = self._forward(x, state, lengths, self.stateful)
                value = self.loss(pred, y) if weights is None else self.loss(pred, y,
                                                                             weights=weights)
                n = _batch_size(x)
                total += float(value) * n
                count += n
        finally:
            self.model.train(was_training)
        if count == 0:
            raise ValueError("evaluate() got no batches")
        return total / count

    # ------------------------------------------------------------------ epochs
    def _iterate(self, data, epoch, shuffle):
        if callable(data) and not hasattr(data, "__iter__"):
            return iter(data(epoch))
        if shuffle:
            if not hasattr(data, "__getitem__") or not hasattr(data, "__len__"):
                raise TypeError("shuffle=True needs data that supports len() and indexing")
            order = self.rng.permutation(len(data))
            return (data[i] for i in order)
        return iter(data)

    def fit(self, data, epochs=1, *, val_data=None):
        """Train until ``epochs`` epochs are complete (counting epochs already done, as Keras'
        ``initial_epoch``: after :meth:`load` of an epoch-2 checkpoint, ``fit(data, epochs=4)``
        runs epochs 2 and 3). Returns :attr:`history`."""
        if isinstance(epochs, bool) or not isinstance(epochs, int) or epochs < 0:
            raise ValueError(f"epochs must be an int >= 0, got {epochs!r}")
        _check_data(data)
        self.stop_training = False
        bar = None
        if self.progress and self.epoch < epochs:
            from tqdm.auto import tqdm
            per_epoch = len(data) if hasattr(data, "__len__") else None
            total = None if per_epoch is None else (epochs - self.epoch) * per_epoch - self.step_in_epoch
            bar = tqdm(total=total, unit="step", dynamic_ncols=True, leave=True)
        try:
            while self.epoch < epochs and not self.stop_training:
                self._run_epoch(data, epochs, val_data, bar)
        finally:
            if bar is not None:
                bar.close()
        return self.history

    def _run_epoch(self, data, epochs, val_data, bar):
        skip = self.step_in_epoch  # > 0 only when resuming mid-epoch
        if skip:
            self.rng.bit_generator.state = self._epoch_rng_state   # replay this epoch's order
        else:
            self._epoch_rng_state = self.rng.bit_generator.state
            self._loss_sum, self._loss_count, self._state = 0.0, 0, None
        if self.lr_schedule is not None:
            self.optimizer.lr = float(self.lr_schedule(self.epoch))
        self.model.train()
        t0 = time.perf_counter()
        for i, batch in enumerate(self._iterate(data, self.epoch, self.shuffle)):
            if i < skip:
                continue
            loss = self.train_step(batch)
            self.step_in_epoch = i + 1
            stepped = math.isfinite(loss)
            if stepped:
                self._loss_sum += loss
                self._loss_count += 1
            if bar is not None:
                bar.update(1)
                bar.set_postfix(epoch=f"{self.epoch + 1}/{epochs}", loss=f"{loss:.4f}",
                                refresh=False)
            for cb in self.callbacks:
                if hasattr(cb, "on_step_end"):
                    cb.on_step_end(self)
            if (stepped and self.checkpoint is not None and self.checkpoint_every != "epoch"
                    and self.global_step % self.checkpoint_every == 0):
                self.save(self.checkpoint)
            if self.stop_training:
                return
        if self._loss_count == 0 and self.step_in_epoch == 0:
            raise ValueError("an epoch of data gave no batches")
        self.history["loss"].append(self._loss_sum / self._loss_count if self._loss_count
                                    else math.nan)   # every step skipped
        self.history["lr"].append(float(getattr(self.optimizer, "lr", math.nan)))
        self.history["val_loss"].append(None if val_data is None else self.evaluate(val_data))
        self.epoch_time = time.perf_counter() - t0
        # the epoch is complete before callbacks run, so a checkpoint they write resumes cleanly
        self.epoch += 1
        self.step_in_epoch = 0
        self._state = None
        for cb in self.callbacks:
            if hasattr(cb, "on_epoch_end"):
                cb.on_epoch_end(self)
        if self.checkpoint is not None and self.checkpoint_every == "epoch":
            self.save(self.checkpoint)

    # ------------------------------------------------------------------ checkpoints
    def save(self, path, user=None):
        """Write params, optimizer state, RNG states, counters and history atomically.

        ``user``: optional JSON-serialisable data stored alongside (e.g. a vocabulary);
        default: the trainer's ``checkpoint_meta``. Read it back with :meth:`load` or
        ``rk.load_checkpoint(path)["meta"]["user"]`` (parameters: ``[...]["params"]``).

        The file at ``path`` always holds a whole checkpoint, the previous one or this one: see
        :func:`~rnnkern.save_checkpoint` (temporary file, fsync, rename; temporary files that
        killed saves of ``path`` left behind are removed by a later save). Raises
        :class:`~rnnkern.CheckpointError`, writing nothing, when ``user`` is not
        JSON-serialisable; OSError when writing fails.
        """
        if user is None:
            user = self.checkpoint_meta
        arrays = {}
        state_spec = _flatten_state(self._state, "state", arrays)
        get_rng = getattr(self.model, "get_rng_state", None)
        meta = {
            "epoch": self.epoch, "global_step": self.global_step,
            "skipped_steps": self.skipped_steps,
            "step_in_epoch": self.step_in_epoch, "last_loss": self.last_loss,
            "loss_sum": self._loss_sum, "loss_count": self._loss_count,
            "history": self.history,
            "rng": self.rng.bit_generator.state,
            "epoch_rng": self._epoch_rng_state,
            "model_rng": get_rng() if get_rng is not None else None,
            "carried_state": state_spec,
            "user": user,
        }
        opt_state = self.optimizer.state_dict() if hasattr(self.optimizer, "state_dict") else None
        save_checkpoint(path, params=self.model.params, optimizer_state=opt_state,
                        arrays=arrays, meta=meta)

    def load(self, path):
        """Restore everything :meth:`save` wrote; a following :meth:`fit` continues exactly as
        the uninterrupted run would have. Returns the ``user`` data.

        All or nothing: the checkpoint is read and checked against this trainer first --
        parameter names, shapes and float dtypes; the optimizer's class and every state slot
        (Adam's ``m`` and ``v`` for each parameter, shaped like it); counters, history, RNG
        states, carried state -- and applied only then; should the model or optimizer still
        refuse its state while it is applied, what was applied is undone. The optimizer's own
        hyper-parameters (betas, momentum, ...) are kept; its ``lr`` and step count are restored.

        Raises:
            FileNotFoundError: nothing at ``path``.
            CheckpointError: (a ValueError) ``path`` is not a readable checkpoint (see
                :func:`~rnnkern.load_checkpoint`) or does not fit this trainer: other parameter
                names or shapes, another optimizer class (an Adam checkpoint into an SGD
                trainer), a missing optimizer slot, missing or ill-typed trainer state. A
                checkpoint of parameters alone (``rk.save_checkpoint(path, params=...)``) is
                refused too: load it with ``model.load_params(rk.load_checkpoint(path)
                ["params"])``. The model, optimizer and trainer are then exactly as before.
        """
        ck = load_checkpoint(path)
        meta = _checked_trainer_meta(path, ck["meta"], ck["arrays"], self.rng)
        params = _checked_params(path, ck["params"], self.model.params)
        opt_state = _checked_optimizer_state(path, ck["optimizer_state"], self.optimizer,
                                             self.model.params)
        self._restore_refusable(path, meta["model_rng"], opt_state)
        # checked above: nothing below can fail
        for k, dst in self.model.params.items():
            dst[...] = params[k]
        self.epoch, self.global_step = meta["epoch"], meta["global_step"]
        self.skipped_steps = meta.get("skipped_steps", 0)    # absent in older checkpoints
        self.step_in_epoch, self.last_loss = meta["step_in_epoch"], meta["last_loss"]
        self._loss_sum, self._loss_count = float(meta["loss_sum"]), meta["loss_count"]
        self.history = meta["history"]
        self.rng.bit_generator.state = meta["rng"]
        self._epoch_rng_state = meta["epoch_rng"]
        self._state = _unflatten_state(meta["carried_state"], ck["arrays"])
        return meta["user"]

    def _restore_refusable(self, path, model_rng, opt_state):
        """The two steps of :meth:`load` that the model or optimizer may still refuse (their
        formats are theirs): set both, or on failure undo both and raise CheckpointError."""
        undo, what = [], "the model's RNG state"
        set_rng = getattr(self.model, "set_rng_state", None)
        get_rng = getattr(self.model, "get_rng_state", None)
        try:
            if model_rng is not None and set_rng is not None:
                if get_rng is not None:
                    old_rng = get_rng()
                    undo.append(lambda: set_rng(old_rng))
                set_rng(model_rng)
            if opt_state is not None:
                what = f"the {type(self.optimizer).__name__} state"
                old_opt = self.optimizer.state_dict()
                undo.append(lambda: self.optimizer.load_state_dict(old_opt))
                self.optimizer.load_state_dict(opt_state)
        except Exception as e:
            for step in reversed(undo):
                step()
            raise CheckpointError(f"{path}: {what} could not be restored ({e}); nothing was "
                                  f"loaded") from e


# ---------------------------------------------------------------------- Trainer.load's checks
def _is_history(h):
    keys = ("loss", "val_loss", "lr")
    return (isinstance(h, dict) and all(isinstance(h.get(k), list) for k in keys)
            and all(v is None or _is_real(v) for k in keys for v in h[k]))


# what Trainer.save writes into the checkpoint's meta, and what each field must hold
_TRAINER_FIELDS = {
    "epoch": (_is_count, "an int >= 0"),
    "global_step": (_is_count, "an int >= 0"),
    "step_in_epoch": (_is_count, "an int >= 0"),
    "last_loss": (lambda v: v is None or _is_real(v), "a number or null"),
    "loss_sum": (_is_real, "a number"),
    "loss_count": (_is_count, "an int >= 0"),
    "history": (_is_history, 'an object with lists "loss", "val_loss", "lr" of numbers/null'),
    "rng": (lambda v: isinstance(v, dict), "a generator state (an object)"),
    "epoch_rng": (lambda v: v is None or isinstance(v, dict), "a generator state or null"),
    "model_rng": (lambda v: True, "anything (the model checks it)"),
    "carried_state": (lambda v: True, "checked by _check_carried_state"),
    "user": (lambda v: True, "anything"),
}


def _checked_trainer_meta(path, meta, arrays, rng):
    """``meta`` if it holds a whole trainer state that ``rng``'s generator accepts."""
    missing = [k for k in _TRAINER_FIELDS if k not in meta]
    if missing:
        raise CheckpointError(f"{path} lacks trainer state ({', '.join(missing)}): not a whole "
                              f"Trainer.save checkpoint; parameters alone load with "
                              f"model.load_params(rk.load_checkpoint(path)['params'])")
    for field, (ok, expected) in _TRAINER_FIELDS.items():
        if not ok(meta[field]):
            raise CheckpointError(f"{path}: trainer state {field!r} must be {expected}, got "
                                  f"{meta[field]!r:.60}")
    if "skipped_steps" in meta and not _is_count(meta["skipped_steps"]):
        raise CheckpointError(f"{path}: trainer state 'skipped_steps' must be an int >= 0, got "
                              f"{meta['skipped_steps']!r:.60}")
    for field in ("rng", "epoch_rng"):
        if meta[field] is not None:
            try:    # on a scratch generator: ours changes only once everything is checked
                type(rng.bit_generator)().state = meta[field]
            except (ValueError, TypeError, KeyError) as e:
                raise CheckpointError(f"{path}: trainer state {field!r} is not a "
                                      f"{type(rng.bit_generator).__name__} state ({e})") from e
    if meta["step_in_epoch"] and meta["epoch_rng"] is None:   # fit replays the epoch's order
        raise CheckpointError(f"{path}: trainer state 'epoch_rng' is null in mid-epoch "
                              f"(step_in_epoch={meta['step_in_epoch']})")
    _check_carried_state(path, meta["carried_state"], arrays)
    return meta


def _check_carried_state(path, spec, arrays):
    """``spec`` (see _flatten_state) names float arrays that the checkpoint holds."""
    if spec is None:
        return
    if isinstance(spec, list):
        for s in spec:
            _check_carried_state(path, s, arrays)
        return
    key = spec.get("array") if isinstance(spec, dict) else None
    a = arrays.get(key) if isinstance(key, str) else None
    if a is None or a.dtype.kind != "f":
        raise CheckpointError(f"{path}: trainer state 'carried_state' refers to {spec!r:.60}, "
                              f"not a float array of the checkpoint")


def _checked_params(path, saved, params):
    """``saved`` if it has the model's parameter names and shapes, as floats."""
    if set(saved) != set(params):
        raise CheckpointError(f"{path}: the checkpoint's parameters do not match the model's: "
                              f"missing {sorted(set(params) - set(saved))}, unexpected "
                              f"{sorted(set(saved) - set(params))}")
    for k, dst in params.items():
        a = saved[k]
        if a.shape != dst.shape:
            raise CheckpointError(f"{path}: checkpoint parameter {k!r} has shape {a.shape}, the "
                                  f"model's has {dst.shape}")
        if a.dtype.kind != "f":
            raise CheckpointError(f"{path}: checkpoint parameter {k!r} has dtype {a.dtype}, "
                                  f"expected floating point")
    return saved


def _checked_optimizer_state(path, state, optimizer, params):
    """The checkpoint's optimizer state (or None) if ``optimizer`` can take it whole."""
    name = type(optimizer).__name__
    restorable = hasattr(optimizer, "state_dict") and hasattr(optimizer, "load_state_dict")
    if state is None:
        if restorable:
            raise CheckpointError(f"{path} has no optimizer state; the trainer's {name} needs it "
                                  f"to resume")
        return None
    saved = state.get("class", "unnamed")
    if not restorable:
        raise CheckpointError(f"{path} holds {saved} optimizer state; the trainer's {name} "
                              f"cannot take it (no state_dict/load_state_dict)")
    if saved != name:
        raise CheckpointError(f"{path} holds {saved} optimizer state; the trainer's optimizer is "
                              f"{name}")
    if not isinstance(optimizer, Optimizer):
        return state        # not ours: its load_state_dict checks the rest
    missing = [f for f in ("lr", "iterations", "hyper") if f not in state]
    if missing:
        raise CheckpointError(f"{path}: the {name} record lacks {', '.join(missing)}")
    slots = state["state"]
    if slots and set(slots) != set(params):  # empty before the first step
        raise CheckpointError(f"{path}: the {name} state covers parameters {sorted(slots)}, the "
                              f"model has {sorted(params)}")
    first = None
    for k, st in slots.items():
        _check_slots(path, name, k, st, optimizer, params[k])
        if first is not None and set(st) != first:
            raise CheckpointError(f"{path}: the {name} state of {k!r} has slots {sorted(st)}, "
                                  f"the other parameters' have {sorted(first)}")
        first = set(st)
    return state


def _check_slots(path, name, k, st, optimizer, p):
    """Parameter ``k``'s state ``st`` has every slot ``optimizer`` keeps, shaped like ``p``."""
    required = set(optimizer._init_state(p))
    # SGD with momentum makes its buffer at the first step, after _init_state
    allowed = required | ({"momentum_buffer"} if getattr(optimizer, "momentum", 0) else set())
    if required - set(st):
        raise CheckpointError(f"{path}: the {name} state of {k!r} lacks slot(s) "
                              f"{sorted(required - set(st))}; {name} keeps {sorted(required)} "
                              f"for every parameter")
    if set(st) - allowed:
        raise CheckpointError(f"{path}: the {name} state of {k!r} has unexpected slot(s) "
                              f"{sorted(set(st) - allowed)}; this {name} keeps {sorted(allowed)}")
    for s, a in st.items():
        if a.shape != p.shape or a.dtype.kind != "f":
            raise CheckpointError(f"{path}: {name} slot {s!r} of {k!r} has shape {a.shape} and "
                                  f"dtype {a.dtype}, expected {p.shape} and floating point")
