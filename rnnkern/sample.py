"""Choosing the next id from logits, and generating a sequence one step at a time.

Shape legend: B batch, C classes (vocabulary size).
"""
from __future__ import annotations

import numbers

import numpy as np


def _check_logits(logits):
    logits = np.asarray(logits)
    if logits.dtype.kind != "f" or logits.ndim == 0 or logits.shape[-1] == 0:
        raise ValueError(f"logits must be a float array [..., C], got {logits.dtype} "
                         f"{logits.shape}")
    if not np.isfinite(logits).all():
        raise ValueError("logits contain NaN or infinity")
    return logits


def argmax(logits):
    """Greedy choice: ids of the largest logit over the last axis (first on ties);
    ``[C] -> int``, ``[..., C] -> int64 [...]`` (e.g. ``[B,T,C] -> [B,T]``)."""
    logits = _check_logits(logits)
    ids = np.argmax(logits, axis=-1)
    return int(ids) if logits.ndim == 1 else ids.astype(np.int64)


def sample_logits(logits, *, temperature=1.0, top_k=None, rng=None):
    """Draw ids from ``softmax(logits / temperature)``, optionally restricted to the ``top_k``
    largest logits (exactly k kept; ties broken by lower id). ``temperature=0`` is :func:`argmax`.

    ``rng``: a ``np.random.Generator`` or a seed (None: fresh entropy). One uniform draw per row,
    so a given generator state always gives the same ids. ``[C] -> int``, ``[..., C] -> [...]``.
    """
    logits = _check_logits(logits)
    if not isinstance(temperature, numbers.Real) or not temperature >= 0:
        raise ValueError(f"temperature must be a number >= 0, got {temperature!r}")
    C = logits.shape[-1]
    if top_k is not None and (isinstance(top_k, bool) or not isinstance(top_k, numbers.Integral)
                              or not 1 <= top_k):
        raise ValueError(f"top_k must be None or an int >= 1, got {top_k!r}")
    if temperature == 0:
        return argmax(logits)
    rng = rng if isinstance(rng, np.random.Generator) else np.random.default_rng(rng)
    z = logits.reshape(-1, C).astype(np.float64) / temperature
    if top_k is not None and top_k < C:
        # stable sort of -z: equal logits keep id order, so the lower ids win ties
        drop = np.argsort(-z, axis=-1, kind="stable")[:, top_k:]
        np.put_along_axis(z, drop, -np.inf, axis=-1)
    z -= z.max(axis=-1, keepdims=True)
    p = np.exp(z)
    cdf = np.cumsum(p, axis=-1)
    u = rng.random(len(z)) * cdf[:, -1]
    ids = (cdf <= u[:, None]).sum(axis=-1)          # first index whose cdf exceeds u
    ids = np.minimum(ids, C - 1).astype(np.int64)   # guard u == total after rounding
    return int(ids[0]) if logits.ndim == 1 else ids.reshape(logits.shape[:-1])


def generate(model, prime, length, *, temperature=1.0, top_k=None, rng=None):
    """Feed ``prime`` (ids, at least one) then sample ``length`` more ids, one step at a time.

    ``model`` needs ``forward(x, initial_state=..., return_state=True)`` and
    ``step(ids [B], state) -> (logits [B,C], state)`` (:class:`rnnkern.Sequential`). The prefix
    runs once as a sequence; each new id costs one :meth:`step`. The model is put in eval mode
    for the call and restored afterwards. Returns the ``length`` new ids (int64 [length]).
    ``temperature=0`` samples greedily.
    """
    prime = np.asarray(prime)
    if prime.ndim != 1 or prime.size == 0 or prime.dtype.kind not in "iu":
        raise ValueError("prime must be a non-empty 1-D array of integer ids")
    if isinstance(length, bool) or not isinstance(length, numbers.Integral) or length < 0:
        raise ValueError(f"length must be an int >= 0, got {length!r}")
    rng = rng if isinstance(rng, np.random.Generator) else np.random.default_rng(rng)
    was_training = getattr(model, "training", True)
    model.eval()
    try:
        state = None
        if prime.size > 1:
            _, state = model.forward(prime[None, :-1].astype(np.int64), initial_state=None,
                                     return_state=True)
        current = np.array([prime[-1]], dtype=np.int64)
        out = np.empty(length, dtype=np.int64)
        for t in range(length):
            logits, state = model.step(current, state)
            current[0] = sample_logits(logits[0], temperature=temperature, top_k=top_k, rng=rng)
            out[t] = current[0]
    finally:
        model.train(was_training)
    return out
