"""The small data sets the examples train on, shipped inside the package (sources: SOURCES.md).

    >>> import rnnkern as rk
    >>> prices = rk.datasets.stock_daily()        # [732, 5] float64, newest day first
    >>> text = rk.datasets.tiny_shakespeare()     # str, 1,115,394 characters

Each loader takes an optional ``path`` to read another copy of the same format instead (the
examples' ``--csv`` / ``--text``). Nothing is downloaded: the packaged files are read through
:mod:`importlib.resources`, so they are found wherever the package is installed.
"""
from __future__ import annotations

import gzip
import io
import os
import warnings
from importlib import resources

import numpy as np

STOCK_DAILY_FILE = "data-02-stock_daily.csv"
TINY_SHAKESPEARE_FILE = "tinyshakespeare.txt.gz"
STOCK_COLUMNS = ("Open", "High", "Low", "Volume", "Close")

__all__ = ["stock_daily", "tiny_shakespeare", "packaged_file", "STOCK_COLUMNS"]


def packaged_file(name):
    """The bytes of data file ``name`` shipped in this package."""
    entry = resources.files(__name__) / name
    if not entry.is_file():
        raise FileNotFoundError(f"rnnkern.datasets has no file {name!r}: the installed package "
                                "is incomplete (reinstall rnnkern)")
    return entry.read_bytes()


def _read(path, packaged_name):
    """(bytes, where) from ``path`` when given, else from the packaged file."""
    if path is None:
        return packaged_file(packaged_name), f"rnnkern.datasets/{packaged_name}"
    path = os.fspath(path)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"data file not found: {path}")
    with open(path, "rb") as f:
        return f.read(), path


def stock_daily(path=None):
    """The TensorFlow lab 12-5 data: GOOG daily prices, ``[N, 5]`` float64, newest day first.

    Columns (:data:`STOCK_COLUMNS`): Open, High, Low, Volume, Close; the packaged file has
    N = 732 trading days. ``path``: a CSV of the same layout (``#`` lines are comments).
    Reverse the rows (``[::-1]``) for chronological order, as the lab does.
    """
    raw, where = _read(path, STOCK_DAILY_FILE)
    try:
        with warnings.catch_warnings():   # a file of comments only: the shape check says so
            warnings.simplefilter("ignore", UserWarning)
            xy = np.loadtxt(io.StringIO(raw.decode("utf-8")), delimiter=",", ndmin=2)
    except (UnicodeDecodeError, ValueError) as exc:
        raise ValueError(f"{where}: not a CSV of numbers ({exc})") from None
    if xy.shape[1:] != (len(STOCK_COLUMNS),) or len(xy) == 0:
        raise ValueError(f"{where}: expected rows of {len(STOCK_COLUMNS)} comma-separated "
                         f"columns ({', '.join(STOCK_COLUMNS)}), got shape {xy.shape}")
    return xy


def tiny_shakespeare(path=None):
    """Karpathy's tiny-shakespeare corpus as one ``str`` (1,115,394 characters, 65 distinct).

    ``path``: another UTF-8 text file to read instead (gzip-compressed when it ends in ``.gz``).
    """
    raw, where = _read(path, TINY_SHAKESPEARE_FILE)
    if path is None or os.fspath(path).endswith(".gz"):
        try:
            raw = gzip.decompress(raw)
        except (OSError, EOFError) as exc:
            raise ValueError(f"{where}: not a readable gzip file ({exc})") from None
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise ValueError(f"{where}: not UTF-8 text ({exc})") from None
