"""Losses with their gradients, NumPy: sequence cross-entropy, mean/sum of squares, one-hot.

Shape legend: B batch, T time steps, C classes.

``sequence_loss`` follows TF1 ``tf.contrib.seq2seq.sequence_loss`` with its defaults
(``average_across_timesteps=True, average_across_batch=True``)::

    ce[b,t] = logsumexp(logits[b,t,:]) - logits[b,t,targets[b,t]]
    loss    = sum(w * ce) / (sum(w) + 1e-12)      # TF's 1e-12: all-zero weights give 0

so with ``weights=None`` (ones) it is the mean cross-entropy over all B*T positions, and
``d loss / d logits[b,t,:] = w[b,t] * (softmax(logits[b,t,:]) - one_hot(targets[b,t])) / (sum(w) + 1e-12)``.
"""
from __future__ import annotations

import numbers

import numpy as np

__all__ = ["sequence_loss", "mse", "sum_squares", "one_hot"]

_EPS = 1e-12  # TF sequence_loss adds it to the weight total


def _float_array(value, name, allow_int=False):
    """A float array from ``value``; Python lists become float64. Integer/bool arrays are
    refused unless ``allow_int`` (masks, integer targets), which casts them to float64."""
    if hasattr(value, "dtype") and hasattr(value, "shape"):
        a = np.asarray(value.get() if type(value).__module__.startswith("cupy") else value)
        if allow_int and a.dtype.kind in "biu":
            a = a.astype(np.float64)
        if a.dtype.kind != "f":
            raise TypeError(f"{name} must be a floating-point array, got dtype {a.dtype}")
    else:
        try:
            a = np.asarray(value, dtype=np.float64)
        except (TypeError, ValueError) as exc:
            raise TypeError(f"{name} must be an array of numbers: {exc}") from None
    if a.size and not np.isfinite(a).all():
        raise ValueError(f"{name} contains NaN or infinity")
    return a


def _int_array(value, name):
    a = np.asarray(value.get() if type(value).__module__.startswith("cupy") else value)
    if a.dtype.kind not in "iu":
        raise TypeError(f"{name} must be an integer array, got dtype {a.dtype}")
    return a


def _log_softmax(z):
    """Stable log-softmax over the last axis: shift by the row max before exp."""
    z = z - z.max(axis=-1, keepdims=True)
    return z - np.log(np.exp(z).sum(axis=-1, keepdims=True))


def sequence_loss(logits, targets, weights=None, return_grad=False):
    """Weighted softmax cross-entropy averaged over batch and time (TF seq2seq semantics).

    Args:
        logits:  [B,T,C] unnormalised scores (float32/float64; lists become float64)
        targets: [B,T] integer class ids in [0, C)
        weights: [B,T] per-position weights (float, or an int/bool mask), or None for ones
        return_grad: also return ``d_logits`` [B,T,C] (dtype of ``logits``)

    Returns:
        ``loss`` (Python float), or ``(loss, d_logits)`` when ``return_grad``.

    Example (lab 12 "rnn basics")::

        >>> sequence_loss([[[0.2, 0.7], [0.6, 0.2], [0.2, 0.9]]], [[1, 1, 1]])  # 0.596759...
    """
    logits = _float_array(logits, "logits")
    if logits.ndim != 3:
        raise ValueError(f"logits must have 3 dimensions [B,T,C], got shape {logits.shape}")
    B, T, C = logits.shape
    if C < 1:
        raise ValueError(f"logits must have at least one class (C >= 1), got shape {logits.shape}")
    targets = _int_array(targets, "targets")
    if targets.shape != (B, T):
        raise ValueError(f"targets must have shape [B,T] = {(B, T)}, got {targets.shape}")
    if targets.size and (targets.min() < 0 or targets.max() >= C):
        raise ValueError(f"targets must lie in [0, C) = [0, {C}), got min {targets.min()} "
                         f"and max {targets.max()}")
    w = None
    if weights is not None:
        w = _float_array(weights, "weights", allow_int=True)  # 0/1 masks are common
        if w.shape != (B, T):
            raise ValueError(f"weights must have shape [B,T] = {(B, T)}, got {w.shape}")
        w = w.astype(logits.dtype, copy=False)
    # flat fancy indexing: far cheaper than take/put_along_axis at small sizes
    rows = np.arange(B * T)
    cols = targets.reshape(-1).astype(np.intp, copy=False)
    logp = _log_softmax(logits).reshape(B * T, C)
    ce = -logp[rows, cols]
    if w is None:
        total = B * T + _EPS
        loss = float(ce.sum(dtype=np.float64) / total)
    else:
        total = w.sum(dtype=np.float64) + _EPS
        loss = float((w.reshape(-1) * ce).sum(dtype=np.float64) / total)
    if not return_grad:
        return loss
    d = np.exp(logp)
    d[rows, cols] -= 1.0
    d *= (1.0 / total) if w is None else (w.reshape(-1, 1) / total)
    return loss, d.reshape(B, T, C).astype(logits.dtype, copy=False)


def _pair(pred, target):
    pred = _float_array(pred, "pred")
    target = _float_array(target, "target", allow_int=True)
    # no broadcasting: [B,1] vs [B] silently broadcasting to [B,B] is a classic bug
    if pred.shape != target.shape:
        raise ValueError(f"pred and target must have the same shape, got {pred.shape} "
                         f"and {target.shape}")
    return pred, target.astype(pred.dtype, copy=False)


def mse(pred, target, return_grad=False):
    """Mean of squared differences, ``mean((pred - target)**2)``; with ``return_grad`` also
    ``d_pred = 2 (pred - target) / N`` (N elements, dtype of ``pred``)."""
    pred, target = _pair(pred, target)
    if pred.size == 0:
        raise ValueError("mse of empty arrays is undefined")
    diff = pred - target
    loss = float(np.mean(np.square(diff, dtype=np.float64)))
    if not return_grad:
        return loss
    return loss, (2.0 / diff.size * diff).astype(pred.dtype, copy=False)


def sum_squares(pred, target, return_grad=False):
    """``sum((pred - target)**2)`` (TF lab 12-5: ``tf.reduce_sum(tf.square(Y_pred - Y))``);
    with ``return_grad`` also ``d_pred = 2 (pred - target)``."""
    pred, target = _pair(pred, target)
    diff = pred - target
    loss = float(np.sum(np.square(diff, dtype=np.float64)))
    if not return_grad:
        return loss
    return loss, (2.0 * diff).astype(pred.dtype, copy=False)


def one_hot(indices, depth, dtype="float32"):
    """``indices.shape + (depth,)`` array with 1 at each index (like ``tf.one_hot``, except that
    indices outside [0, depth) raise instead of giving a zero row)."""
    if isinstance(depth, bool) or not isinstance(depth, numbers.Integral) or depth < 1:
        raise ValueError(f"depth must be an integer >= 1, got {depth!r}")
    indices = _int_array(indices, "indices")
    if indices.size and (indices.min() < 0 or indices.max() >= depth):
        raise ValueError(f"indices must lie in [0, depth) = [0, {depth}), got min "
                         f"{indices.min()} and max {indices.max()}")
    out = np.zeros(indices.shape + (int(depth),), dtype=np.dtype(dtype))
    np.put_along_axis(out, indices[..., None].astype(np.intp), 1, axis=-1)
    return out
