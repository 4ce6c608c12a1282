"""Figures for the examples and benchmarks, drawn only when matplotlib (an optional extra) is
installed: ``pip install "rnnkern[plot]"``.

Figures are made with matplotlib's object API (``matplotlib.figure.Figure``), not pyplot, so
drawing one never changes the caller's pyplot backend or opens a window.
"""
from __future__ import annotations

import importlib.util

INSTALL_HINT = 'pip install "rnnkern[plot]" (or pip install matplotlib)'


def have_matplotlib():
    """Whether matplotlib can be imported here (without importing it)."""
    return importlib.util.find_spec("matplotlib") is not None


def new_figure(figsize=(8, 4)):
    """A fresh ``matplotlib.figure.Figure``; ImportError naming the extra without matplotlib."""
    try:
        from matplotlib.figure import Figure
    except ImportError as exc:
        raise ImportError(f"drawing a plot needs matplotlib, which is not installed: "
                          f"{INSTALL_HINT}") from exc
    return Figure(figsize=figsize)
