"""What :meth:`rnnkern.Trainer.load` checks in a checkpoint before it applies anything: the
trainer state :meth:`~rnnkern.Trainer.save` writes, the parameters against the model's, the
optimizer state against the trainer's optimizer. Each check raises
:class:`~rnnkern.CheckpointError` naming the file and the field, so that a refused load changes
nothing.
"""
from __future__ import annotations

from .checkpoint import CheckpointError, _is_count, _is_real
from .optim import Optimizer


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


def checked_trainer_meta(path, meta, arrays, rng):
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


def checked_params(path, saved, params):
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


def checked_optimizer_state(path, state, optimizer, params):
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
