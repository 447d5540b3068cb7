"""PNG figures of a :class:`~gradsurgery.compare.Results` (matplotlib, imported only when
drawing; the figure helpers are :mod:`gradsurgery.data.report`'s)."""
from __future__ import annotations

import math
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, Sequence

from ..data.report import figure, grid, require_matplotlib, save

if TYPE_CHECKING:
    from .results import Results


def plot_all(results: "Results", out_dir: Path) -> list[Path]:
    """Every figure for ``results`` into ``out_dir``; returns the written paths."""
    require_matplotlib()
    out_dir.mkdir(parents=True, exist_ok=True)
    paths = [plot_metric_curves(results, out_dir / "metrics.png"),
             plot_delta_m(results, out_dir / "delta_m.png")]
    for path in (plot_cosines(results, out_dir / "grad_cosine.png"),
                 plot_task_weights(results, out_dir / "task_weights.png")):
        if path is not None:
            paths.append(path)
    extra = getattr(results.source, "extra_plots", None)
    if extra is not None:
        paths += extra(results, out_dir)
    return paths


# -- helpers ------------------------------------------------------------------------------
def _styles(methods: Sequence[str]) -> dict[str, dict[str, Any]]:
    """One colour (and, past 10 methods, a second line style) per method, stable across figures."""
    from matplotlib import colormaps
    cmap = colormaps["tab10"]
    dashes = ["-", "--", ":", "-."]
    return {m: {"color": cmap(i % 10), "linestyle": dashes[(i // 10) % len(dashes)]} for i, m in enumerate(methods)}


def _mean_over_seeds(series: Sequence[Sequence[Any]]) -> Any:
    """Element-wise mean of the per-seed series, truncated to the shortest."""
    import numpy as np
    n = min(len(s) for s in series)
    return np.mean([np.asarray(s[:n], dtype=float) for s in series], axis=0)


def _smooth(y: Any, window: int) -> Any:
    """Moving average along the first axis (``window`` steps; shorter at the start)."""
    import numpy as np
    if window <= 1 or len(y) < 2:
        return y
    c = np.cumsum(np.concatenate([np.zeros((1, *y.shape[1:])), y]), axis=0)
    idx = np.arange(1, len(y) + 1)
    lo = np.maximum(idx - window, 0)
    return (c[idx] - c[lo]) / (idx - lo).reshape(-1, *[1] * (y.ndim - 1))


def _per_step(results: "Results", field: Callable[[Any], list]) -> dict[str, Any]:
    """``method -> mean over finished seeds`` of a per-step series, for methods that have it."""
    out = {}
    for m in results.methods:
        series = [field(r) for r in results.runs_of(m) if r.ok and field(r)]
        if series:
            out[m] = _mean_over_seeds(series)
    return out


#: Past this many methods, line plots colour only the baseline and the best by Δm%.
MAX_COLOURED = 8


def _line_styles(results: "Results") -> dict[str, dict[str, Any]]:
    """Line styles for plots with one line per method: every method coloured when there
    are few; otherwise the baseline and the best ``MAX_COLOURED - 1`` by Δm% coloured, the
    rest thin grey lines under one legend entry ("other methods")."""
    styles = _styles(results.methods)
    if len(results.methods) <= MAX_COLOURED:
        return styles
    ranked = [row["method"] for row in results.summary() if row["method"] != results.baseline]
    shown = {results.baseline, *ranked[:MAX_COLOURED - 1]}
    first_other = True
    for m in results.methods:
        if m not in shown:
            styles[m] = {"color": "0.7", "linewidth": 0.8, "zorder": 1,
                         "label": "other methods" if first_other else "_nolegend_"}
            first_other = False
        else:
            styles[m] = {**styles[m], "linewidth": 1.8, "zorder": 2}
    return styles


def _legend_right(fig: Any, ax: Any) -> None:
    handles, labels = ax.get_legend_handles_labels()
    fig.legend(handles, labels, loc="outside right center", fontsize="small", title="method")


# -- figures ------------------------------------------------------------------------------
def plot_metric_curves(results: "Results", path: Path) -> Path:
    """Held-out metric of every task after each epoch, one line per method (mean over
    finished seeds)."""
    import numpy as np
    styles = _line_styles(results)
    rows, cols = grid(len(results.tasks))
    fig, axes = figure(rows, cols, size=(4.2, 3.2))
    for k, (task, metric, up) in enumerate(zip(results.tasks, results.metrics, results.higher_is_better)):
        ax = axes.flat[k]
        for m in sorted(results.methods, key=lambda m: "label" not in styles[m]):  # grey lines first
            curves = [r.curves for r in results.runs_of(m) if r.ok]
            if curves:
                y = _mean_over_seeds(curves)[:, k]
                ax.plot(np.arange(1, len(y) + 1), y, **{"label": m, **styles[m]})
        ax.set_title(f"{task}: {metric} ({'higher' if up else 'lower'} is better)", fontsize="medium")
        ax.set_xlabel("epoch")
        ax.set_ylabel(f"held-out {metric}")
        ax.grid(alpha=0.3)
    for ax in axes.flat[len(results.tasks):]:
        ax.set_visible(False)
    _legend_right(fig, axes.flat[0])
    fig.suptitle(f"{results.benchmark}: held-out metrics during training (mean over seeds)")
    return save(fig, path)


def plot_delta_m(results: "Results", path: Path) -> Path:
    """Δm% per method (bars: mean over seeds; whiskers: std; dots: the seeds)."""
    rows = results.summary()[::-1]  # best on top
    styles = _styles(results.methods)
    fig, axes = figure(size=(7.0, 0.45 * len(rows) + 1.6))
    ax = axes[0, 0]
    for i, row in enumerate(rows):
        m = row["method"]
        if not math.isfinite(row["delta_m"]):
            ax.text(0, i, "  no finished seed", va="center", fontsize="small", color="gray")
            continue
        ax.barh(i, row["delta_m"], xerr=row["delta_m_std"], color=styles[m]["color"], alpha=0.8,
                error_kw={"capsize": 3, "elinewidth": 1})
        seeds = [results.delta_m(r) for r in results.runs_of(m) if r.ok]
        ax.plot(seeds, [i] * len(seeds), "o", color="black", markersize=3, zorder=3)
    labels = [row["method"] + ("" if row["finished"] == len(results.seeds)
                               else f" ({row['finished']}/{len(results.seeds)} seeds)") for row in rows]
    ax.set_yticks(range(len(rows)), labels)
    ax.axvline(0, color="black", linewidth=0.8)
    ax.set_xlabel(f"Δm% against {results.baseline!r} (positive is better)")
    ax.set_title(f"{results.benchmark}: Δm% (bars: mean, whiskers: std, dots: seeds)")
    ax.grid(axis="x", alpha=0.3)
    return save(fig, path)


def plot_cosines(results: "Results", path: Path) -> Path | None:
    """Mean pairwise cosine of the task gradients at every step (from ``opt.stats``), one
    line per method that records it; ``None`` when no method did."""
    import numpy as np
    series = _per_step(results, lambda r: r.cosine)
    if not series:
        return None
    styles = _line_styles(results)
    fig, axes = figure(size=(7.5, 4.0))
    ax = axes[0, 0]
    for m in sorted(series, key=lambda m: "label" not in styles[m]):  # grey lines first
        y = series[m]
        ax.plot(np.arange(1, len(y) + 1), _smooth(y, max(1, len(y) // 25)), **{"label": m, **styles[m]})
    ax.axhline(0, color="black", linewidth=0.8)
    ax.set_xlabel("training step")
    ax.set_ylabel("mean pairwise cosine")
    missing = [m for m in results.methods if m not in series]
    note = f"\n(not recorded by: {', '.join(missing)})" if missing else ""
    ax.set_title(f"{results.benchmark}: cosine between task gradients dL_k/dz (smoothed){note}", fontsize="medium")
    ax.grid(alpha=0.3)
    _legend_right(fig, ax)
    return save(fig, path)


def plot_task_weights(results: "Results", path: Path) -> Path | None:
    """The coefficients ``c_k`` each method chose at every step (``opt.stats["weights"]``),
    one panel per method; ``None`` when no method recorded them."""
    import numpy as np
    series = _per_step(results, lambda r: r.weights)
    if not series:
        return None
    rows, cols = grid(len(series))
    fig, axes = figure(rows, cols, size=(3.6, 2.6), sharex=True)
    for ax, (m, y) in zip(axes.flat, series.items()):
        y = _smooth(y, max(1, len(y) // 25))
        for k, task in enumerate(results.tasks):
            ax.plot(np.arange(1, len(y) + 1), y[:, k], label=task)
        ax.set_title(m, fontsize="medium")
        ax.grid(alpha=0.3)
    for ax in axes.flat[len(series):]:
        ax.set_visible(False)
    for ax in axes[-1]:
        ax.set_xlabel("training step")
    for ax in axes[:, 0]:
        ax.set_ylabel("weight c_k")
    handles, labels = axes.flat[0].get_legend_handles_labels()
    fig.legend(handles, labels, loc="outside right center", fontsize="small", title="task")
    fig.suptitle(f"{results.benchmark}: task weights chosen by each method (smoothed, mean over seeds)")
    return save(fig, path)
