"""Choosing the next id from logits, and generating a sequence one step at a time.

Shape legend: B batch, C classes (vocabulary size).
"""
from __future__ import annotations

import numbers

import numpy as np

from .device import to_device, to_host


def _check_logits(logits):
    """Float logits [..., C]. -inf is a mask ("never", as with torch.softmax), so it is allowed
    while every row keeps a finite logit; NaN and +inf mean a diverged model: ValueError."""
    logits = np.asarray(logits)
    if logits.dtype.kind != "f" or logits.ndim == 0 or logits.shape[-1] == 0:
        raise ValueError(f"logits must be a float array [..., C], got {logits.dtype} "
                         f"{logits.shape}")
    if not np.isfinite(logits).all():      # the common case skips the two finer checks
        if np.isnan(logits).any() or np.isposinf(logits).any():
            raise ValueError("logits contain NaN or +infinity (a diverged model?)")
        if np.isneginf(logits).all(axis=-1).any():
            raise ValueError("every logit of a row is -inf: nothing left to choose")
    return logits


def _check_temperature(temperature):
    # bool is an Integral, so True would silently mean 1; NaN fails `>= 0`
    if (isinstance(temperature, (bool, np.bool_)) or not isinstance(temperature, numbers.Real)
            or not temperature >= 0):
        raise ValueError(f"temperature must be a number >= 0 (0: greedy), got {temperature!r}")
    return float(temperature)


def _check_top_k(top_k):
    if top_k is not None and (isinstance(top_k, (bool, np.bool_))
                              or not isinstance(top_k, numbers.Integral) or top_k < 1):
        raise ValueError(f"top_k must be None (no limit) or an int >= 1, got {top_k!r}")
    return None if top_k is None else int(top_k)


def _tempered_weights(z, temperature):
    """``exp((z - max) / temperature)`` per row, unnormalised; the max gets weight 1.

    Shifting before dividing keeps every exponent <= 0 (or -inf): dividing first
    overflows to inf for a tiny temperature (inf - inf = NaN, which drew id 0 every time).
    Overflow to -inf (a tiny temperature, or a span beyond float64) is the right limit: weight 0.
    """
    with np.errstate(over="ignore", invalid="ignore"):
        z = z - z.max(axis=-1, keepdims=True)
        z = np.where(np.isneginf(z), -np.inf, z / temperature)   # -inf / inf would be NaN
    return np.exp(z)


def argmax(logits):
    """Greedy choice: ids of the largest logit over the last axis (first on ties);
    ``[C] -> int``, ``[..., C] -> int64 [...]`` (e.g. ``[B,T,C] -> [B,T]``)."""
    logits = _check_logits(logits)
    ids = np.argmax(logits, axis=-1)
    return int(ids) if logits.ndim == 1 else ids.astype(np.int64)


def sample_logits(logits, *, temperature=1.0, top_k=None, rng=None):
    """Draw ids from ``softmax(logits / temperature)``, optionally restricted to the ``top_k``
    largest logits (exactly k kept; ties broken by lower id). ``temperature=0`` is :func:`argmax`
    (deterministic); a tiny positive one tends to it (uniform over tied maxima), ``inf`` is
    uniform over the kept ids. ``-inf`` logits are never drawn (a mask).

    Bad arguments raise ValueError naming them: temperature < 0 or NaN, top_k not None or an
    int >= 1, NaN or +inf logits, or a row whose logits are all -inf.

    ``rng``: a ``np.random.Generator`` or a seed (None: fresh entropy). One uniform draw per row,
    so a given generator state always gives the same ids. ``[C] -> int``, ``[..., C] -> [...]``.
    """
    logits = _check_logits(logits)
    temperature = _check_temperature(temperature)
    top_k = _check_top_k(top_k)
    if temperature == 0:
        return argmax(logits)
    rng = rng if isinstance(rng, np.random.Generator) else np.random.default_rng(rng)
    C = logits.shape[-1]
    z = logits.reshape(-1, C).astype(np.float64)
    if top_k is not None and top_k < C:
        # on the logits, not the scaled values (which may tie at -inf); a stable sort of -z keeps
        # equal logits in id order, so the lower ids win ties
        drop = np.argsort(-z, axis=-1, kind="stable")[:, top_k:]
        np.put_along_axis(z, drop, -np.inf, axis=-1)
    p = _tempered_weights(z, temperature)
    cdf = np.cumsum(p, axis=-1)
    u = rng.random(len(z)) * cdf[:, -1]
    ids = (cdf <= u[:, None]).sum(axis=-1)          # first index whose cdf exceeds u
    ids = np.minimum(ids, C - 1).astype(np.int64)   # guard u == total after rounding
    return int(ids[0]) if logits.ndim == 1 else ids.reshape(logits.shape[:-1])


def _check_prime(prime):
    what = "prime must be a non-empty array of integer ids, [P] or [B,P]"
    if isinstance(prime, str):      # ValueError, as for every bad argument of generate
        raise ValueError(f"{what}, got str: encode text with CharVocab.encode first")
    prime = np.asarray(prime)
    if prime.dtype.kind not in "iu" and prime.size:
        raise ValueError(f"{what}, got dtype {prime.dtype}")
    if prime.ndim not in (1, 2) or prime.size == 0:
        raise ValueError(f"{what}, got shape {prime.shape}")
    if prime.min() < 0:
        raise ValueError(f"prime ids must be >= 0, got {prime.min()}")
    return prime.astype(np.int64, copy=False)


def _check_length(length):
    if isinstance(length, bool) or not isinstance(length, numbers.Integral) or length < 0:
        raise ValueError(f"length must be an int >= 0, got {length!r}")
    return int(length)


def generate(model, prime, length, *, temperature=1.0, top_k=None, rng=None):
    """Feed ``prime`` (ids, at least one) then sample ``length`` more ids, one step at a time.

    ``prime``: ids [P] for one sequence, or [B,P] for B sequences generated at once (batched
    generation: B times the tokens per step for little more time). Returns the new ids, int64
    [length] (or [B, length]). ``temperature=0`` samples greedily; ``top_k`` as in
    :func:`sample_logits`, whose draws these are (one uniform draw per sequence and step from
    ``rng``).

    A model of the step plan's form on the C++ backend runs through
    :class:`rnnkern.inference.Inference`: the prime one step at a time, then the whole
    generation, sampling included, in one compiled call. Any other model needs
    ``forward(x, initial_state=..., return_state=True)`` and ``step(ids [B], state) ->
    (logits [B,C], state)`` (:class:`rnnkern.Sequential`): the prime runs once as a sequence, then
    one :meth:`step` per id. Both give the same ids. The model is put in eval mode for the call
    and restored afterwards.

    A model on the GPU (``model.to("cuda")``) runs the second way: each step's ids go to the
    device and its logits come back to the host for the draw, so the ids are those the same
    model gives on the CPU with the same generator (up to float rounding of the logits).

    Every argument is checked before the model runs; a bad one raises ValueError naming it
    (prime, length, temperature, top_k as in :func:`sample_logits`). Ids the model does not
    know raise its own ValueError (e.g. ``Embedding ids must lie in [0, V)``).
    """
    prime = _check_prime(prime)
    length = _check_length(length)
    temperature, top_k = _check_temperature(temperature), _check_top_k(top_k)
    rng = rng if isinstance(rng, np.random.Generator) else np.random.default_rng(rng)
    batch = prime if prime.ndim == 2 else prime[None]
    was_training = getattr(model, "training", True)
    model.eval()
    try:
        from .inference import Inference, inference_reason
        if inference_reason(model) is None:
            inf = Inference(model, batch=batch.shape[0])
            for t in range(batch.shape[1] - 1):
                inf.step(batch[:, t])
            out = inf.generate(batch[:, -1], length, temperature=temperature, top_k=top_k,
                               rng=rng)
        else:
            out = _generate_stepwise(model, batch, length, temperature, top_k, rng)
    finally:
        model.train(was_training)
    return out if prime.ndim == 2 else out[0]


def _generate_stepwise(model, batch, length, temperature, top_k, rng):
    """generate() through model.forward and model.step: any model, any backend, any device
    (ids go to the model's device, logits come back to the host for the draw)."""
    device = getattr(model, "device", None) or "cpu"
    state = None
    if batch.shape[1] > 1:
        _, state = model.forward(to_device(batch[:, :-1], device), initial_state=None,
                                 return_state=True)
    current = np.ascontiguousarray(batch[:, -1])
    out = np.empty((batch.shape[0], length), dtype=np.int64)
    for t in range(length):
        logits, state = model.step(to_device(current, device), state)
        current = np.asarray(sample_logits(to_host(logits), temperature=temperature,
                                           top_k=top_k, rng=rng), dtype=np.int64).reshape(-1)
        out[:, t] = current
    return out
