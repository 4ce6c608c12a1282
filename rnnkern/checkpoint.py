"""Checkpoints: one ``.npz`` file with named arrays and a JSON metadata record.

Written atomically: the data goes to a temporary file in the same directory, is flushed and
fsync'ed, then ``os.replace``'d over the target, so a crash mid-save leaves the previous
checkpoint intact, never a truncated one. A crash (kill -9, power loss) can leave that temporary
file behind; the next save of the same checkpoint removes it (see :func:`save_checkpoint`).

Arrays on the GPU are saved as host copies and loaded as host arrays: a model saved from the GPU
loads on the CPU, and ``model.load_params(load_checkpoint(path)["params"])`` puts the values on
the model's current device.

Loading uses ``allow_pickle=False``: a checkpoint cannot run code. Every file that cannot be read
as a checkpoint -- empty, truncated, bit-flipped, another format, a directory -- raises
:class:`CheckpointError` (a ValueError) naming the file and what is wrong; a missing file raises
FileNotFoundError, as ``open`` does.

Layout (keys inside the npz)::

    params/<name>                 model parameters
    optim/<name>/<slot>           optimizer state arrays (Adam's m, v, ...)
    arrays/<name>                 anything else (e.g. a carried recurrent state)
    __meta__                      UTF-8 JSON: optimizer scalars, RNG states, epoch, step, user data
"""
from __future__ import annotations

import json
import numbers
import os
import re
import stat
import struct
import tempfile
import time
import zipfile
import zlib

import numpy as np

FORMAT = "rnnkern-checkpoint-1"

# A temporary file of a save is only removed by a later save once it is at least this old (and
# its writer is gone): a writer that is alive keeps touching its file, even one on another host.
STALE_TEMP_SECONDS = 60.0

# What a damaged zip/npy member raises from inside zipfile/numpy (bad CRC, short read, a flipped
# size, compression or encryption bit, an unparsable npy header).
_READ_ERRORS = (zipfile.BadZipFile, zlib.error, EOFError, OSError, ValueError, KeyError,
                struct.error, NotImplementedError, RuntimeError, OverflowError)


class CheckpointError(ValueError):
    """A checkpoint cannot be written, read or used; the message names the file and the problem.

    Raised by :func:`save_checkpoint` (an array that would need pickling), :func:`load_checkpoint`
    (a file that is not an intact checkpoint) and :meth:`rnnkern.Trainer.load` (a checkpoint that
    does not fit the trainer's model or optimizer). A ValueError, so ``except ValueError`` works.
    """


# ---------------------------------------------------------------------- save
def _blob(path, key, value):
    """``value`` as a host array that np.save writes without pickling, else CheckpointError.
    GPU (CuPy) arrays are copied to the host: a checkpoint holds host arrays only, so one saved
    from a model on the GPU loads on a CPU-only machine."""
    if type(value).__module__.startswith("cupy"):
        # rnnkern.device.to_host, inlined: this module stays loadable on its own (no imports
        # from the package), as the crash tests load it
        value = value.get()
    try:
        a = np.asarray(value)
    except (ValueError, TypeError) as e:       # ragged nested lists
        raise CheckpointError(f"{path}: {key!r} is not an array ({e}); nothing was written") from e
    if a.dtype.hasobject:
        raise CheckpointError(f"{path}: {key!r} has dtype {a.dtype}, which would be pickled; "
                              f"checkpoints hold numeric, bool and string arrays only; nothing "
                              f"was written")
    return a


def _temp_prefix(path):
    """Temporary files of ``path`` are ``.<name>.tmp-<pid>-<random>.npz`` in its directory."""
    return f".{os.path.basename(path)}.tmp-{os.getpid()}-"


def _pid_alive(pid):
    if os.name != "posix":   # no harmless liveness probe (os.kill would terminate): assume alive
        return True
    try:
        os.kill(pid, 0)
    except (ProcessLookupError, OverflowError):   # no such process (or beyond any pid)
        return False
    except OSError:          # EPERM: another user's process; anything else: keep its file
        return True
    return True


def stale_temp_files(path):
    """Temporary files that crashed saves of ``path`` left behind, safe to delete.

    A file qualifies only if all hold: its name is this checkpoint's own pattern
    ``.<name>.tmp-<pid>-<random>.npz`` (other checkpoints' and foreign files never match); it is
    a regular file (not a link or directory); the process ``<pid>`` is not running on this
    machine and is not this one; and it was last modified at least :data:`STALE_TEMP_SECONDS`
    ago (a writer on another host or in another PID namespace keeps its file fresh while
    writing). Without a POSIX process check (Windows) nothing qualifies.
    """
    directory, base = os.path.split(os.path.abspath(os.fspath(path)))
    pattern = re.compile(r"\." + re.escape(base) + r"\.tmp-(\d+)-[a-z0-9_]+\.npz\Z")
    now = time.time()
    try:
        names = os.listdir(directory)
    except OSError:
        return []
    stale = []
    for name in names:
        m = pattern.match(name)
        if m is None or int(m.group(1)) == os.getpid() or _pid_alive(int(m.group(1))):
            continue
        full = os.path.join(directory, name)
        try:
            st = os.lstat(full)
        except OSError:          # removed meanwhile
            continue
        if stat.S_ISREG(st.st_mode) and now - st.st_mtime >= STALE_TEMP_SECONDS:
            stale.append(full)
    return sorted(stale)


def _remove_stale_temps(path):
    for tmp in stale_temp_files(path):
        try:
            os.unlink(tmp)
        except OSError:          # another save removed it first, or no permission: harmless
            pass


def save_checkpoint(path, *, params, optimizer_state=None, arrays=None, meta=None):
    """Write a checkpoint atomically.

    Args:
        path:            destination file (conventionally ``*.npz``)
        params:          ``{name: array}`` model parameters
        optimizer_state: an ``Optimizer.state_dict()`` or None
        arrays:          extra ``{name: array}`` to store
        meta:            JSON-serialisable dict (RNG states, epoch, step, vocabulary, ...)

    Raises:
        CheckpointError: an array that np.save would pickle (object dtype, ragged lists), an
            optimizer slot name with "/", or ``meta`` that is not JSON-serialisable; checked
            before anything is written, so the file at ``path`` is untouched.
        OSError: writing failed (disk full, no permission); the previous checkpoint is intact.

    Safety: the data goes to ``.<name>.tmp-<pid>-<random>.npz`` next to ``path``, is fsync'ed
    and renamed over ``path`` (then the directory is fsync'ed), so ``path`` always holds either
    the previous checkpoint or the new one, whole. A failed save removes its temporary file; one
    killed outright cannot, so every save first deletes this checkpoint's temporary files that
    :func:`stale_temp_files` deems abandoned (writer not running, untouched for
    :data:`STALE_TEMP_SECONDS`). Temporary files of other checkpoints are never touched.
    """
    path = os.fspath(path)
    blobs = {f"params/{k}": _blob(path, f"params/{k}", v) for k, v in params.items()}
    record = {"format": FORMAT, "meta": meta or {}}
    if optimizer_state is not None:
        scalars = {k: v for k, v in optimizer_state.items() if k != "state"}
        record["optimizer"] = scalars
        for name, slots in optimizer_state["state"].items():
            for slot, a in slots.items():
                if "/" in str(slot):     # the key's last "/" separates name and slot
                    raise CheckpointError(f"{path}: optimizer slot {slot!r} of {name!r} contains "
                                          f"'/'; nothing was written")
                key = f"optim/{name}/{slot}"
                blobs[key] = _blob(path, key, a)
    for k, v in (arrays or {}).items():
        blobs[f"arrays/{k}"] = _blob(path, f"arrays/{k}", v)
    try:
        text = json.dumps(record)
    except (TypeError, ValueError) as e:
        raise CheckpointError(f"{path}: meta and optimizer scalars must be JSON-serialisable "
                              f"({e}); nothing was written") from e
    blobs["__meta__"] = np.frombuffer(text.encode("utf-8"), dtype=np.uint8)
    directory = os.path.dirname(os.path.abspath(path))
    _remove_stale_temps(path)
    fd, tmp = tempfile.mkstemp(prefix=_temp_prefix(path), suffix=".npz", dir=directory)
    try:
        with os.fdopen(fd, "wb") as f:
            np.savez(f, **blobs)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise
    try:  # make the rename itself durable (POSIX); harmless where directories can't be opened
        dfd = os.open(directory, os.O_RDONLY)
        try:
            os.fsync(dfd)
        finally:
            os.close(dfd)
    except OSError:
        pass


# ---------------------------------------------------------------------- load
def _open_zip(path):
    """``path`` opened for reading, if it is a non-empty file that starts like a zip (an npz).

    The file is ours to close: np.load leaks the handle it opens when the zip is damaged."""
    if os.path.isdir(path):
        raise CheckpointError(f"{path} is a directory, not a checkpoint file")
    try:
        f = open(path, "rb")
    except FileNotFoundError:
        raise
    except OSError as e:
        raise CheckpointError(f"{path} cannot be read: {e.strerror or e}") from e
    try:
        head = f.read(4)
        if not head:
            raise CheckpointError(f"{path} is empty (0 bytes), not a checkpoint")
        if head not in (b"PK\x03\x04", b"PK\x05\x06"):
            raise CheckpointError(f"{path} is not an rnnkern checkpoint: not an .npz (zip) file "
                                  f"(starts with {head!r})")
        f.seek(0)
    except BaseException:
        f.close()
        raise
    return f


def _read(path, z, key):
    """Array ``key`` of the open npz; CheckpointError if it is damaged or holds objects."""
    try:
        a = z[key]
    except ValueError as e:
        if "allow_pickle" in str(e):   # numpy's hint to unpickle: never take it
            raise CheckpointError(f"{path}: array {key!r} holds Python objects; checkpoints are "
                                  f"never unpickled (not written by save_checkpoint?)") from e
        raise CheckpointError(f"{path}: array {key!r} is damaged ({e})") from e
    except _READ_ERRORS as e:
        raise CheckpointError(f"{path}: array {key!r} is damaged ({e})") from e
    if not isinstance(a, np.ndarray):  # a zip member that is not an .npy
        raise CheckpointError(f"{path}: member {key!r} is not a NumPy array")
    return a


def _is_real(v):
    return isinstance(v, numbers.Real) and not isinstance(v, bool)


def _is_count(v):
    return isinstance(v, int) and not isinstance(v, bool) and v >= 0


# optional fields of the optimizer record (an Optimizer.state_dict() without "state")
_OPTIMIZER_FIELDS = {"class": (lambda v: isinstance(v, str), "a string"),
                     "lr": (_is_real, "a number"),
                     "iterations": (_is_count, "an int >= 0"),
                     "hyper": (lambda v: isinstance(v, dict), "a JSON object")}


def _record(path, z):
    """The parsed and checked ``__meta__`` record."""
    if "__meta__" not in z.files:
        raise CheckpointError(f"{path} is not an rnnkern checkpoint (no __meta__ record)")
    raw = _read(path, z, "__meta__")
    if raw.dtype != np.uint8 or raw.ndim != 1:
        raise CheckpointError(f"{path}: the __meta__ record must be 1-D uint8 (UTF-8 JSON), got "
                              f"{raw.dtype} of shape {raw.shape}")
    try:
        record = json.loads(raw.tobytes().decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError, RecursionError) as e:
        raise CheckpointError(f"{path}: the __meta__ record is not valid UTF-8 JSON ({e})") from e
    if not isinstance(record, dict):
        raise CheckpointError(f"{path}: the __meta__ record must be a JSON object, got "
                              f"{type(record).__name__}")
    if record.get("format") != FORMAT:
        raise CheckpointError(f"{path}: unknown checkpoint format {record.get('format')!r} "
                              f"(expected {FORMAT!r})")
    if not isinstance(record.get("meta"), dict):
        raise CheckpointError(f"{path}: the __meta__ record's 'meta' field must be a JSON object, "
                              f"got {record.get('meta', 'nothing')!r:.60}")
    opt = record.get("optimizer")
    if "optimizer" in record:
        if not isinstance(opt, dict):
            raise CheckpointError(f"{path}: the __meta__ record's 'optimizer' field must be a "
                                  f"JSON object, got {opt!r:.60}")
        for field, (ok, expected) in _OPTIMIZER_FIELDS.items():
            if field in opt and not ok(opt[field]):
                raise CheckpointError(f"{path}: optimizer field {field!r} must be {expected}, "
                                      f"got {opt[field]!r:.60}")
    return record


def load_checkpoint(path):
    """Read a checkpoint: ``{"params", "optimizer_state" (or None), "arrays", "meta"}``.

    Never unpickles (``allow_pickle=False``): a checkpoint cannot run code.

    Raises:
        FileNotFoundError: nothing at ``path``.
        CheckpointError: (a ValueError) anything else that makes ``path`` unreadable as a
            checkpoint, named in the message: a directory, an empty, truncated or corrupted
            file (bad CRC, damaged zip or array header), another file type, an array holding
            Python objects, or a missing or ill-typed ``__meta__`` record (format, ``meta``,
            optimizer fields).
    """
    path = os.fspath(path)
    try:
        with _open_zip(path) as f, np.load(f, allow_pickle=False) as z:
            record = _record(path, z)
            params, arrays, optim = {}, {}, {}
            for key in z.files:
                if key.startswith("params/"):
                    params[key[len("params/"):]] = _read(path, z, key)
                elif key.startswith("arrays/"):
                    arrays[key[len("arrays/"):]] = _read(path, z, key)
                elif key.startswith("optim/"):
                    name, sep, slot = key[len("optim/"):].rpartition("/")
                    if not sep:
                        raise CheckpointError(f"{path}: optimizer key {key!r} is not "
                                              f"optim/<parameter>/<slot>")
                    optim.setdefault(name, {})[slot] = _read(path, z, key)
                elif key != "__meta__":  # corruption (a flipped name) or not ours
                    raise CheckpointError(f"{path}: unexpected array {key!r} (expected "
                                          f"params/, optim/, arrays/ or __meta__)")
    except (CheckpointError, FileNotFoundError):
        raise
    except _READ_ERRORS as e:    # the zip directory itself: truncated, bit-flipped
        raise CheckpointError(f"{path} is damaged or truncated: not a readable .npz ({e})") from e
    optimizer_state = None
    if "optimizer" in record:
        optimizer_state = dict(record["optimizer"], state=optim)
    return {"params": params, "optimizer_state": optimizer_state, "arrays": arrays,
            "meta": record["meta"]}
