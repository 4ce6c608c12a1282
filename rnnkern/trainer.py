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

``distributed="mpi"`` trains data-parallel over MPI ranks (``mpiexec -n N python train.py``):
every rank runs the same script with the same data; see :class:`Trainer`.
"""
from __future__ import annotations

import contextlib
import math
import time

import numpy as np

from .checkpoint import CheckpointError, load_checkpoint, save_checkpoint
from .device import device_of, to_device, to_host
from .distributed import shard_batch
from .resume_checks import checked_optimizer_state, checked_params, checked_trainer_meta
from .train_step import NonFiniteLossError, TrainStep, _check_not_empty, nonfinite_message

# steps between two reads of the loss on the device when log_every is None (each read waits
# for the device to finish the steps queued before it)
DEVICE_LOG_EVERY = 50


class Callback:
    """Base class for callbacks; override what you need. Each receives the trainer.

    Useful trainer attributes: ``epoch`` (0-based, current), ``global_step``, ``step_in_epoch``,
    ``last_loss``, ``history`` (``{"loss": [...], "val_loss": [...], "lr": [...]}`` per epoch),
    ``model``, ``optimizer``. Set ``trainer.stop_training = True`` to stop after this step/epoch.

    On the GPU the trainer reads the loss every ``log_every`` steps (see :class:`Trainer`), and
    ``on_step_end`` runs at each read, after the steps it covers: ``last_loss`` is then the
    last of them, ``global_step`` / ``skipped_steps`` count them all, and ``read_skipped`` says
    how many of them were skipped for a non-finite loss.
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
    ``stopped_at`` is the trainer's ``global_step`` then (None while training goes on).

    On the GPU it sees the loss at each read (every ``log_every`` steps): it stops at the first
    read that covers a skipped step, and the finite steps between that step and the read have
    updated the parameters."""

    def __init__(self):
        self.stopped_at = None

    def on_step_end(self, trainer):
        if (trainer.last_loss is not None and not math.isfinite(trainer.last_loss)
                or getattr(trainer, "read_skipped", 0)):
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
    out[prefix] = to_host(state)
    return {"array": prefix}


def _map_state(fn, state):
    """``state`` with ``fn`` applied to each array (nested tuples of arrays/None)."""
    if state is None:
        return None
    if isinstance(state, (tuple, list)):
        return tuple(_map_state(fn, s) for s in state)
    return fn(state)


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
                      stop there instead). On the GPU, "raise" raises at the first read that
                      sees such a step (``log_every``); the steps up to that read ran, the
                      skipped ones updating nothing, so the parameters are those of the last
                      finite step
        log_every:    on the GPU, read the loss every this many steps (default None: 50); see
                      below. On the host every step's loss is a Python float already and is
                      used at once, whatever this is
        distributed:  None (one process), "mpi" or an :class:`rnnkern.distributed.MPIGroup`:
                      data-parallel training over MPI ranks. Every rank makes the trainer and
                      calls ``fit`` with the same data; each trains on its contiguous share of
                      every batch's rows, the gradients summed over the ranks before the update
                      (:class:`~rnnkern.TrainStep`), so the result is one process's on the same
                      batches, up to rounding. ``fit`` first broadcasts rank 0's parameters and
                      optimizer state; the carried state (``stateful``) is each rank's rows;
                      validation losses are summed over the ranks; only rank 0 shows progress
                      and writes checkpoints (call :meth:`save` on every rank: the carried state
                      is gathered); :meth:`load` reads on rank 0 and works with a checkpoint of
                      any number of ranks. ``is_root`` tells a callback whether to print. An
                      error on one rank ends ``fit`` on every rank with
                      :class:`~rnnkern.DistributedError` naming it.

    An empty batch (B = 0 or T = 0) raises ValueError from :meth:`fit` and :meth:`evaluate`.

    On the GPU (a model moved with ``model.to("cuda")`` and an optimizer of
    :mod:`rnnkern.optim`) a step reads nothing back (:class:`~rnnkern.TrainStep`): the epoch's
    loss sum and its numbers of finite and skipped steps accumulate on the device, and the
    trainer reads them -- one device-to-host copy -- every ``log_every`` steps, at the end of
    an epoch, before a checkpoint every ``checkpoint_every`` steps, and before :meth:`save`.
    ``last_loss``, ``global_step``, ``skipped_steps``, the progress bar and the callbacks'
    ``on_step_end`` follow those reads; the history is the same as on the host. Validation
    losses are summed on the device too (one read per :meth:`evaluate`).

    Example::

        >>> trainer = Trainer(model, sequence_loss, Adam(0.1), progress=False)
        >>> history = trainer.fit([(x, y)], epochs=50)
        >>> history["loss"][-1]
    """

    def __init__(self, model, loss, optimizer, *, lr_schedule=None, stateful=False,
                 shuffle=False, seed=0, progress=True, callbacks=(), checkpoint=None,
                 checkpoint_every="epoch", checkpoint_meta=None, generic=False,
                 on_nonfinite="raise", distributed=None, log_every=None):
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
        if log_every is not None and (isinstance(log_every, bool) or not isinstance(log_every, int)
                                      or log_every < 1):
            raise ValueError(f"log_every must be None or an int >= 1, got {log_every!r}")
        if stateful and shuffle:
            raise ValueError("stateful=True carries state between consecutive batches; "
                             "shuffle=True would break that order")
        self.model, self.loss, self.optimizer = model, loss, optimizer
        self._step = TrainStep(model, loss, optimizer, generic=generic,
                               on_nonfinite=on_nonfinite, distributed=distributed)
        self.group = self._step.group     # None, or the ranks of a data-parallel trainer
        self.is_root = self.group is None or self.group.is_root
        self.lr_schedule = lr_schedule
        self.stateful = bool(stateful)
        self.shuffle = bool(shuffle)
        self.progress = bool(progress) and self.is_root
        self.callbacks = list(callbacks)
        self.checkpoint = checkpoint
        self.checkpoint_every = checkpoint_every
        self.checkpoint_meta = checkpoint_meta
        self.log_every = log_every
        self.rng = np.random.default_rng(seed)
        self.epoch = 0              # index of the epoch being (or next to be) run
        self.global_step = 0        # optimizer steps taken
        self.skipped_steps = 0      # steps with a non-finite loss, skipped (on_nonfinite)
        self.step_in_epoch = 0      # batches done in the current epoch
        self.last_loss = None
        self.read_skipped = 0       # steps skipped among those the last device read covered
        self.stop_training = False
        self.history = {"loss": [], "val_loss": [], "lr": []}
        self._epoch_rng_state = None  # the generator's state when the current epoch began
        self._loss_sum = 0.0          # running sums of the current epoch
        self._loss_count = 0
        self._state = None            # carried recurrent state (stateful=True): this rank's rows
        self._state_rows = None       # ... of a batch of this many rows
        self._pending = 0             # device steps since the last read of the loss

    # ------------------------------------------------------------------ one step
    def _forward(self, x, state, lengths, want_state):
        """The model's output for evaluation: through ``model.infer`` when it has one (nothing
        kept for a backward: :meth:`rnnkern.Sequential.infer`), else ``model.forward``."""
        run = getattr(self.model, "infer", self.model.forward)
        kwargs = {}
        if lengths is not None:
            kwargs["lengths"] = lengths
        if want_state:
            return run(x, initial_state=state, return_state=True, **kwargs)
        return run(x, **kwargs), None

    def _on_model_device(self, x, y, lengths, weights):
        """A batch for a model on the GPU copied there (host batches are what loaders give);
        on the host, as it is (a device batch then meets the layers' device check)."""
        device = getattr(self.model, "device", "cpu")
        if device == "cpu":
            return x, y, lengths, weights
        return tuple(None if a is None else to_device(a, device) for a in (x, y, lengths, weights))

    def train_step(self, batch):
        """Forward, loss, backward and one optimizer step on ``batch``; returns the loss: a
        float, or on the GPU a 0-d device array, not read (the counters follow at the next read
        of :meth:`fit`'s loop, or of :meth:`save`)."""
        x, y, lengths, weights = self._on_model_device(*_unpack(batch))
        state = self._state
        if state is not None and self._state_rows != _batch_size(x):
            state = None
        if self.stateful:
            value, state = self._step(x, y, state, lengths, weights, return_state=True)
        else:
            value = self._step(x, y, lengths=lengths, weights=weights)
        self._state, self._state_rows = state, _batch_size(x)
        if not isinstance(value, float):   # a device step's loss: read every log_every steps
            self._pending += 1
            return value
        if self._pending:                  # device steps before this host one (a model moved)
            self._read_device()
        self.last_loss = float(value)
        if math.isfinite(self.last_loss):
            self.global_step += 1
        else:                      # on_nonfinite="skip": nothing was updated
            self.skipped_steps += 1
        return self.last_loss

    def evaluate(self, data):
        """Mean loss over ``data`` (weighted by batch size) in eval mode, no updates.

        With ``stateful=True`` the state is carried across ``data``'s batches from zeros.
        Data-parallel, every rank evaluates its rows of each batch (call it on every rank); the
        ranks' shares of each batch's loss are summed, so the result is one process's.
        """
        _check_data(data)
        was_training = getattr(self.model, "training", True)
        self.model.eval()
        try:
            with self._failing_together():
                total, count, state = 0.0, 0, None
                for batch in self._iterate(data, self.epoch, shuffle=False):
                    x, y, lengths, weights = self._on_model_device(*_unpack(batch))
                    _check_not_empty(np.shape(x) if not hasattr(x, "shape") else x.shape)
                    n, fraction = _batch_size(x), 1.0
                    if self.group is not None:    # this rank's rows, its share of the loss
                        share = shard_batch(self.group, self.loss, x, y, lengths, weights)
                        x, y, lengths, weights = share.x, share.y, share.lengths, share.weights
                        fraction = share.fraction
                    if state is not None and _state_batch_size(state) != _batch_size(x):
                        state = None
                    pred, state = self._forward(x, state, lengths, self.stateful)
                    value = self.loss(pred, y) if weights is None else self.loss(pred, y,
                                                                                 weights=weights)
                    # a float, or on the GPU a 0-d device array: summed there, read once below
                    total = total + value * fraction * n
                    count += n
                if self.group is not None:
                    total = self.group.sum(total)
        finally:
            self.model.train(was_training)
        if count == 0:
            raise ValueError("evaluate() got no batches")
        return float(total) / count

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
        with self._failing_together():
            if self.group is not None:
                self._step.synchronise()
            bar = None
            if self.progress and self.epoch < epochs:
                from tqdm.auto import tqdm
                per_epoch = len(data) if hasattr(data, "__len__") else None
                total = (None if per_epoch is None else
                         (epochs - self.epoch) * per_epoch - self.step_in_epoch)
                bar = tqdm(total=total, unit="step", dynamic_ncols=True, leave=True)
            try:
                while self.epoch < epochs and not self.stop_training:
                    self._run_epoch(data, epochs, val_data, bar)
            finally:
                if bar is not None:
                    bar.close()
        return self.history

    def _failing_together(self):
        """Data-parallel: an error in the block is told to the other ranks (which then stop
        with a DistributedError naming it) before it propagates here."""
        return contextlib.nullcontext() if self.group is None else self.group.failing_together()

    def _run_epoch(self, data, epochs, val_data, bar):
        if self._pending:          # device steps of train_step calls outside fit: counted
            self._read_device()
        skip = self.step_in_epoch  # > 0 only when resuming mid-epoch
        if skip:
            self.rng.bit_generator.state = self._epoch_rng_state   # replay this epoch's order
        else:
            self._epoch_rng_state = self.rng.bit_generator.state
            self._loss_sum, self._loss_count, self._state = 0.0, 0, None
        # device steps add to a tally on the device from the epoch's sums (so far)
        self._step.reset_tally(self._loss_sum, self._loss_count)
        self._pending = 0
        if self.lr_schedule is not None:
            self.optimizer.lr = float(self.lr_schedule(self.epoch))
        self.model.train()
        t0 = time.perf_counter()
        every = DEVICE_LOG_EVERY if self.log_every is None else self.log_every
        for i, batch in enumerate(self._iterate(data, self.epoch, self.shuffle)):
            if i < skip:
                continue
            loss = self.train_step(batch)
            self.step_in_epoch = i + 1
            if self._pending:         # a device step: its loss is read every `every` steps
                if bar is not None:
                    bar.update(1)
                if self._pending >= every or self._checkpoint_due():
                    self._after_read(bar, epochs)
                if self.stop_training:
                    return
                continue
            stepped = math.isfinite(loss)
            if stepped:
                self._loss_sum += loss
                self._loss_count += 1
            if bar is not None:
                bar.update(1)
            self._after_step(bar, epochs, loss, stepped)
            if self.stop_training:
                return
        if self._pending:             # the epoch's last device steps
            self._after_read(bar, epochs)
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

    def _after_read(self, bar, epochs):
        """Device steps: read them (:meth:`_read_device`), then what a host step does after
        each step -- the progress bar's loss, the callbacks, and a checkpoint when no step was
        skipped and ``global_step`` reached a multiple of ``checkpoint_every``."""
        stepped = self._read_device() == 0
        self._after_step(bar, epochs, self.last_loss, stepped)

    def _after_step(self, bar, epochs, loss, stepped):
        """After a host step, or a read of device steps: the progress bar's loss, the
        callbacks, and a checkpoint when the step(s) were finite and ``global_step`` reached a
        multiple of ``checkpoint_every``."""
        if bar is not None:
            bar.set_postfix(epoch=f"{self.epoch + 1}/{epochs}", loss=f"{loss:.4f}",
                            refresh=False)
        for cb in self.callbacks:
            if hasattr(cb, "on_step_end"):
                cb.on_step_end(self)
        if (stepped and self.checkpoint is not None and self.checkpoint_every != "epoch"
                and self.global_step % self.checkpoint_every == 0):
            self.save(self.checkpoint)

    def _checkpoint_due(self):
        """Device steps: whether the steps since the last read could have brought
        ``global_step`` to a checkpoint (all of them finite), so a read must say. After a read
        that finds a skipped step, the next step where the count could get there reads again:
        the checkpoint is written after the same step as on the host."""
        return (self.checkpoint is not None and self.checkpoint_every != "epoch"
                and (self.global_step + self._pending) % self.checkpoint_every == 0)

    def _read_device(self):
        """One read of the device steps' tally since the previous (:meth:`TrainStep.read`):
        the counters, the epoch's sums and ``last_loss`` from it; returns the number of steps
        it found skipped, or raises NonFiniteLossError for them with ``on_nonfinite="raise"``
        (after the counters, so they say where training stopped)."""
        tally = self._step.read(check=False)
        self._pending = 0
        self.global_step += tally.new_steps
        self._loss_sum, self._loss_count = tally.loss_sum, tally.steps
        if tally.new_steps or tally.new_nonfinite:
            self.last_loss = tally.last_loss
        self.read_skipped = tally.new_nonfinite
        if tally.new_nonfinite:
            if self._step.on_nonfinite == "raise":
                raise NonFiniteLossError(nonfinite_message(tally))
            self.skipped_steps += tally.new_nonfinite
        return tally.new_nonfinite

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

        Data-parallel, call it on every rank: each rank's rows of the carried state are
        gathered, and rank 0 writes the file (the others write nothing).
        """
        if user is None:
            user = self.checkpoint_meta
        if self._pending:             # device steps not yet read: the counters first
            self._read_device()
        with self._failing_together():
            self._save(path, user)

    def _save(self, path, user):
        state = self._state
        if self.group is not None:   # every rank's rows of the carried state; rank 0 writes
            state = _map_state(lambda a: self.group.gather_rows(a, self._state_rows), state)
            if not self.group.is_root:
                return
        arrays = {}
        state_spec = _flatten_state(state, "state", arrays)
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

        Data-parallel, call it on every rank: rank 0 reads the file and sends its contents
        (or its error) to every rank; each takes its rows of the carried state, so a
        checkpoint of any number of ranks (or of one process) resumes on any number.
        """
        ck = (load_checkpoint(path) if self.group is None else
              self.group.from_root(lambda: load_checkpoint(path)))   # every rank, rank 0's read
        meta = checked_trainer_meta(path, ck["meta"], ck["arrays"], self.rng)
        state = _unflatten_state(meta["carried_state"], ck["arrays"])
        state_rows = _state_batch_size(state)
        if self.group is not None and state is not None:   # this rank's rows of it
            rows = self.group.rows(state_rows)
            state = _map_state(lambda a: a[..., rows, :], state)
        params = checked_params(path, ck["params"], self.model.params)
        opt_state = checked_optimizer_state(path, ck["optimizer_state"], self.optimizer,
                                             self.model.params)
        self._restore_refusable(path, meta["model_rng"], opt_state)
        # checked above: nothing below can fail
        for k, dst in self.model.params.items():
            dst[...] = to_device(params[k], device_of(dst))
        device = getattr(self.model, "device", "cpu")
        if device != "cpu":                  # the carried state goes where the model is
            state = _map_state(lambda a: to_device(a, device), state)
        self.epoch, self.global_step = meta["epoch"], meta["global_step"]
        self.skipped_steps = meta.get("skipped_steps", 0)    # absent in older checkpoints
        self.step_in_epoch, self.last_loss = meta["step_in_epoch"], meta["last_loss"]
        self._loss_sum, self._loss_count = float(meta["loss_sum"]), meta["loss_count"]
        self.history = meta["history"]
        self.rng.bit_generator.state = meta["rng"]
        self._epoch_rng_state = meta["epoch_rng"]
        self._state, self._state_rows = state, state_rows
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
