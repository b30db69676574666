"""Figures drawn without pyplot: a caller's backend (a notebook's inline one) stays as it is, and no
figure is left open in pyplot's registry; PNGs written atomically."""

from __future__ import annotations

import os
from pathlib import Path

from ..io import atomic_path


def figure_grid(rows: int, columns: int, inches: tuple[float, float], layout: str | None = None):
    """A figure and its axes as a (rows, columns) array."""
    from matplotlib.figure import Figure

    fig = Figure(figsize=inches, layout=layout)
    return fig, fig.subplots(rows, columns, squeeze=False)


def save_png(fig, out: str | Path, dpi: int) -> None:
    with atomic_path(out) as tmp:
        fig.savefig(tmp, dpi=dpi, format="png")


def drawable(name: str) -> str:
    """A name as a figure can draw it: bytes of a file name that are no UTF-8 (an old zip's
    `patient_\xe9`, held as surrogates) shown as replacement characters, which fonts have."""
    return os.fsencode(name).decode("utf-8", "replace")
