"""Where arrays live: the host (NumPy, ``"cpu"``) or an NVIDIA GPU (CuPy, ``"cuda"``).

One place for the array-module logic every layer, module, loss and optimizer shares:

- :func:`array_module` -- NumPy, or CuPy for a CuPy array (CuPy is imported only then, so
  ``import rnnkern`` never imports it);
- :func:`device_of` -- ``"cpu"`` or ``"cuda"`` for an array;
- :func:`to_device` / :func:`to_host` -- copies between them (a missing CuPy raises
  ImportError naming the package to install);
- :func:`check_device` -- validates a ``device`` argument;
- :func:`check_same_device` -- the error for an input on another device than the parameters;
- :func:`check_finite` / :func:`check_range` -- the value checks of inputs, made on the host
  always and on the GPU only when ``config.CHECK_FINITE_ON_DEVICE`` asks (:func:`scanned`: the
  answer is a device-to-host read, which stalls the host until the GPU is done).

    >>> from rnnkern.device import to_device
    >>> x_gpu = to_device(x, "cuda")          # what model.to("cuda") takes as input
"""
from __future__ import annotations

import numpy as np

__all__ = ["DEVICES", "CUPY_MISSING", "array_module", "is_device_array", "device_of",
           "check_device", "cupy_module", "to_device", "to_host", "check_same_device",
           "scanned", "check_finite", "check_range"]

DEVICES = ("cpu", "cuda")

# the words of the cuda backend's probe (rnnkern.backends.cuda.runtime), one copy
CUPY_MISSING = "CuPy is not installed (pip install cupy-cuda12x or cupy-cuda13x)"


def is_device_array(a):
    """True for a CuPy array (without importing CuPy)."""
    return type(a).__module__.startswith("cupy")


def array_module(a):
    """The array module of ``a``: CuPy for CuPy arrays, NumPy for anything else."""
    if is_device_array(a):
        import cupy
        return cupy
    return np


def device_of(a):
    """``"cuda"`` for a CuPy array, ``"cpu"`` for anything else."""
    return "cuda" if is_device_array(a) else "cpu"


def check_device(device, name="device"):
    """``device`` if it is one of :data:`DEVICES`, else ValueError naming ``name``."""
    if not isinstance(device, str) or device not in DEVICES:
        raise ValueError(f"{name} must be 'cpu' or 'cuda', got {device!r}")
    return device


def cupy_module(what="the 'cuda' device"):
    """CuPy, or ImportError saying that ``what`` needs it and how to install it."""
    try:
        import cupy
    except ImportError as exc:
        raise ImportError(f"{what} needs CuPy: {CUPY_MISSING}") from exc
    return cupy


def to_device(a, device, copy=False):
    """``a`` on ``device`` ("cpu": a NumPy array, "cuda": a CuPy array on the current GPU).

    An array already there is returned as it is (``copy=True``: a copy); None stays None.
    Anything else array-like (lists, scalars) becomes an array there."""
    device = check_device(device)
    if a is None:
        return None
    on_device = is_device_array(a)
    if device == "cpu":
        if on_device:
            return a.get()                      # a new host array
        return np.array(a, copy=True) if copy else np.asarray(a)
    cupy = cupy_module()
    if on_device:
        return a.copy() if copy else a
    return cupy.asarray(a)                      # a new device array


def to_host(a, copy=False):
    """``to_device(a, "cpu", copy)``: a NumPy array (None stays None)."""
    return to_device(a, "cpu", copy)


def check_same_device(a, device, what, owner):
    """ValueError when ``a`` (named ``what``) is not on ``device``, where ``owner``'s
    parameters are; the message names both devices and how to move either."""
    got = device_of(a)
    if got != device:
        raise ValueError(f"{owner}: {what} is on {got!r} but the parameters are on {device!r}; "
                         f"move the input with rnnkern.device.to_device({what}, {device!r}) "
                         f"or the model with .to({got!r})")


def scanned(a):
    """Whether ``a``'s values are checked: a non-empty host array always, a device array only
    when ``config.CHECK_FINITE_ON_DEVICE`` is set."""
    from . import config
    return bool(a.size) and (not is_device_array(a) or config.CHECK_FINITE_ON_DEVICE)


def check_finite(a, name):
    """ValueError naming ``name`` when ``a`` (if :func:`scanned`) holds NaN or infinity."""
    if scanned(a) and not bool(array_module(a).isfinite(a).all()):
        raise ValueError(f"{name} contains NaN or infinity")


def check_range(a, name, low, high, what):
    """ValueError naming ``name`` unless every value of integer array ``a`` (if
    :func:`scanned`) lies in [low, high); ``what`` writes that range for the message."""
    if scanned(a):
        lo, hi = int(a.min()), int(a.max())
        if lo < low or hi >= high:
            raise ValueError(f"{name} must lie in {what}, got min {lo} and max {hi}")
