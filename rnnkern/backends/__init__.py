"""Backend registry and selection rules.

A backend is a module with three functions, the seam between the layer API and the kernels
(one layer, one direction, whole sequence; shape legend in :mod:`rnnkern.reference`)::

    available() -> (ok: bool, reason: str)
    forward(spec, x, w_ih, w_hh, b_ih, b_hh, h0, c0, lengths)
        -> outputs [B,T,H], h_n [B,H], c_n [B,H] | None, saved
    backward(spec, saved, d_outputs, d_h_n, d_c_n)
        -> dx [B,T,I], dh0 [B,H], dc0 [B,H] | None, {"w_ih", "w_hh", "b_ih", "b_hh"}

Inputs arrive validated: C-contiguous arrays of one float dtype (float32 or float64), ``c0``
only for LSTM, ``lengths`` None or int64 [B] within [0, T]; ``d_*`` may be None (zeros).
Returned arrays belong to the caller (no workspace aliases).

Selection: an explicit ``backend=`` wins, then :func:`set_backend` / ``RNNKERN_BACKEND``, then
automatic: CuPy arrays -> ``cuda``; NumPy arrays -> the first available of ``cpp``, ``numba``,
``numpy``: the order measured fastest over the sizes of ``benchmarks/bench_cpu.py`` (its table in
``benchmarks/README.md``), and ``cpp`` is the backend whose training step runs in one call
(:mod:`rnnkern.step_plan`).
A layer runs on the same backend inside :class:`rnnkern.TrainStep` as when called directly. An
explicitly requested backend that is unavailable raises with its reason.
"""
from __future__ import annotations

import importlib
import os

_MODULES = {
    "numpy": "rnnkern.backends.numpy_ref",
    "numba": "rnnkern.backends.numba_cpu",
    "cpp": "rnnkern.backends.cpp",
    "cuda": "rnnkern.backends.cuda",
}
BACKENDS = tuple(_MODULES)
_CPU_PREFERENCE = ("cpp", "numba", "numpy")
_chosen = None  # set by set_backend()
_imported = {}  # name -> backend module, or the ImportError its import raised
_answers = {}   # name -> (the module's available function, its answer)


class BackendUnavailable(RuntimeError):
    """An explicitly requested backend cannot run here; the message says why."""


def _module(name):
    try:
        return importlib.import_module(_MODULES[name])
    except ImportError as exc:  # the backend's module itself needs something missing
        return exc


def _probe(name):
    """(module or None, ok, reason). Import and probe once per process: availability does not
    change while it runs. The answer is keyed on the module's ``available`` function, so a test
    that patches it is asked afresh."""
    mod = _imported.get(name)
    if mod is None:
        mod = _imported[name] = _module(name)
    if isinstance(mod, Exception):
        return None, False, f"import failed: {mod}"
    probe = mod.available
    cached = _answers.get(name)
    if cached is None or cached[0] is not probe:
        ok, reason = probe()
        cached = _answers[name] = (probe, (bool(ok), reason))
    return (mod,) + cached[1]


def available_backends() -> dict:
    """``{name: (available, reason)}`` for every backend, in preference order."""
    return {name: _probe(name)[1:] for name in BACKENDS}


def _check_name(name):
    if name not in _MODULES:
        raise ValueError(f"backend must be one of {list(BACKENDS) + ['auto']}, got {name!r}")


def set_backend(name):
    """Choose the backend used by layers created with ``backend="auto"`` (None: automatic)."""
    global _chosen
    if name is not None and name != "auto":
        _check_name(name)
        get_backend(name)  # raise now, not at the first forward
    _chosen = None if name == "auto" else name


def get_backend(name):
    """The backend module ``name``; raises :class:`BackendUnavailable` with the reason."""
    _check_name(name)
    mod, ok, reason = _probe(name)
    if not ok:
        raise BackendUnavailable(f"backend {name!r} is unavailable: {reason}")
    return mod


def _environ_reader(name):
    """A function returning ``os.environ.get(name)``, read afresh at each call. Where CPython's
    environ keeps its encoded mapping, it reads that directly: ``os.environ.get`` encodes the key
    and decodes the value every time (~0.6 us), and a training step asks once per call."""
    data, encode = getattr(os.environ, "_data", None), getattr(os.environ, "encodekey", None)
    decode = getattr(os.environ, "decodevalue", None)
    if not (isinstance(data, dict) and encode and decode):
        return lambda: os.environ.get(name)
    key = encode(name)

    def read():
        value = data.get(key)
        return None if value is None else decode(value)
    return read


_env_backend = _environ_reader("RNNKERN_BACKEND")


def preset():
    """The backend set by :func:`set_backend` or ``RNNKERN_BACKEND``, or None (automatic)."""
    name = _chosen or _env_backend() or None
    return None if name == "auto" else name


def resolve(requested, x):
    """The backend module for ``requested`` ("auto" or a name) and input array ``x``."""
    if requested not in (None, "auto"):
        return get_backend(requested)
    name = preset()
    if name:
        return get_backend(name)
    if type(x).__module__.startswith("cupy"):
        return get_backend("cuda")
    for name in _CPU_PREFERENCE:
        mod, ok, _ = _probe(name)
        if ok:
            return mod
    raise BackendUnavailable("no CPU backend is available")  # numpy always is; unreachable
