"""Tables and figures for benchmark reports: the helpers :mod:`gradsurgery.compare` draws
its table and PNGs with, and that a benchmark's own ``extra_table``/``extra_plots`` (see
:mod:`gradsurgery.data.base`) use, so a benchmark's presentation never imports the compare
tool (dependencies point compare -> data -> core).

Figures are :class:`matplotlib.figure.Figure` objects saved directly (imported here only
when drawing), so the caller's pyplot state and backend are never touched.
"""
from __future__ import annotations

import math
from pathlib import Path
from typing import Any, Sequence

PLOT_INSTALL = "pip install 'gradsurgery[plot]'  (or: pip install matplotlib)"


def format_table(header: Sequence[str], body: Sequence[Sequence[str]], fmt: str) -> str:
    """``header`` and rows of cells as a markdown table (first column left, the others
    centred) or as text (first column left-aligned, the others right-aligned, between
    rules); no trailing newline."""
    if fmt == "markdown":
        lines = ["| " + " | ".join(header) + " |", "|" + "|".join(["---"] + [":-:"] * (len(header) - 1)) + "|"]
        return "\n".join(lines + ["| " + " | ".join(cells) + " |" for cells in body])
    widths = [max(len(r[i]) for r in [header, *body]) for i in range(len(header))]
    fmt_row = lambda cells: "  ".join(c.ljust(w) if i == 0 else c.rjust(w)  # noqa: E731
                                      for i, (c, w) in enumerate(zip(cells, widths)))
    rule = "-" * len(fmt_row(header))
    return "\n".join([rule, fmt_row(header), rule, *map(fmt_row, body), rule])


def require_matplotlib() -> None:
    """Raises an ``ImportError`` naming the install command when matplotlib is missing."""
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        raise ImportError(f"plots need matplotlib: {PLOT_INSTALL}") from None


def figure(rows: int = 1, cols: int = 1, size: tuple[float, float] = (6.0, 4.0), **kwargs: Any) -> Any:
    """A new ``Figure`` with a ``rows x cols`` array of axes (``size`` per panel)."""
    from matplotlib.figure import Figure
    fig = Figure(figsize=(size[0] * cols, size[1] * rows), layout="constrained")
    axes = fig.subplots(rows, cols, squeeze=False, **kwargs)
    return fig, axes


def save(fig: Any, path: Path) -> Path:
    """Writes ``fig`` as a PNG to ``path`` and returns it."""
    fig.savefig(path, dpi=110, bbox_inches="tight")
    return path


def grid(n: int, max_cols: int = 4) -> tuple[int, int]:
    """Rows and columns of a grid of ``n`` panels, at most ``max_cols`` wide."""
    cols = min(n, max_cols)
    return math.ceil(n / cols), cols
