"""Checkpoints: one ``.npz`` file with named arrays and a JSON metadata record.

Written atomically: the data goes to a temporary file in the same directory, is flushed and
fsync'ed, then ``os.replace``'d over the target, so a crash mid-save leaves the previous
checkpoint intact, never a truncated one. Loading uses ``allow_pickle=False``: a checkpoint
cannot run code.

Layout (keys inside the npz)::

    params/<name>                 model parameters
    optim/<name>/<slot>           optimizer state arrays (Adam's m, v, ...)
    arrays/<name>                 anything else (e.g. a carried recurrent state)
    __meta__                      UTF-8 JSON: optimizer scalars, RNG states, epoch, step, user data
"""
from __future__ import annotations

import json
import os
import tempfile

import numpy as np

FORMAT = "rnnkern-checkpoint-1"


def save_checkpoint(path, *, params, optimizer_state=None, arrays=None, meta=None):
    """Write a checkpoint atomically.

    Args:
        path:            destination file (conventionally ``*.npz``)
        params:          ``{name: array}`` model parameters
        optimizer_state: an ``Optimizer.state_dict()`` or None
        arrays:          extra ``{name: array}`` to store
        meta:            JSON-serialisable dict (RNG states, epoch, step, vocabulary, ...)
    """
    path = os.fspath(path)
    blobs = {f"params/{k}": np.asarray(v) for k, v in params.items()}
    record = {"format": FORMAT, "meta": meta or {}}
    if optimizer_state is not None:
        scalars = {k: v for k, v in optimizer_state.items() if k != "state"}
        record["optimizer"] = scalars
        for name, slots in optimizer_state["state"].items():
            for slot, a in slots.items():
                blobs[f"optim/{name}/{slot}"] = np.asarray(a)
    for k, v in (arrays or {}).items():
        blobs[f"arrays/{k}"] = np.asarray(v)
    blobs["__meta__"] = np.frombuffer(json.dumps(record).encode("utf-8"), dtype=np.uint8)
    directory = os.path.dirname(os.path.abspath(path))
    fd, tmp = tempfile.mkstemp(prefix=".tmp-", suffix=".npz", dir=directory)
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


def load_checkpoint(path):
    """Read a checkpoint: ``{"params", "optimizer_state" (or None), "arrays", "meta"}``."""
    with np.load(os.fspath(path), allow_pickle=False) as z:
        if "__meta__" not in z.files:
            raise ValueError(f"{path} is not an rnnkern checkpoint (no __meta__ record)")
        record = json.loads(bytes(z["__meta__"]).decode("utf-8"))
        if record.get("format") != FORMAT:
            raise ValueError(f"{path}: unknown checkpoint format {record.get('format')!r}")
        params, arrays, optim = {}, {}, {}
        for key in z.files:
            if key.startswith("params/"):
                params[key[len("params/"):]] = z[key]
            elif key.startswith("arrays/"):
                arrays[key[len("arrays/"):]] = z[key]
            elif key.startswith("optim/"):
                name, slot = key[len("optim/"):].rsplit("/", 1)
                optim.setdefault(name, {})[slot] = z[key]
    optimizer_state = None
    if "optimizer" in record:
        optimizer_state = dict(record["optimizer"], state=optim)
    return {"params": params, "optimizer_state": optimizer_state, "arrays": arrays,
            "meta": record["meta"]}
