"""``toy``: a two-objective problem in 2-D with conflicting, differently scaled gradients.

The point ``x = (x_1, x_2)`` is the shared "representation" (the backbone is the point
itself, the heads are the two objectives). The objectives are the two-valley function of
the CAGrad paper (Liu et al., 2021), also used by Nash-MTL and FAMO. With
``a = max(tanh(x_2/2), 0)`` and ``b = max(tanh(-x_2/2), 0)`` (upper and lower half-plane),

.. math::
    f_1 &= a\\,[\\log\\max(|\\tfrac12(-x_1-7) - \\tanh(-x_2)|, 10^{-6}) + 6]
          + b\\,[((x_1-7)^2 + 0.1 (x_2+8)^2)/10 - 20] \\\\
    f_2 &= a\\,[\\log\\max(|\\tfrac12(-x_1+3) + \\tanh(-x_2) + 2|, 10^{-6}) + 6]
          + b\\,[((x_1+7)^2 + 0.1 (x_2+8)^2)/10 - 20]

and the task losses are ``L_1 = 0.1 (f_1 + 20)`` and ``L_2 = f_2 + 20`` (shifted to stay
positive, the first scaled down 10x as in the FAMO paper, so its gradient is the small
one). The Pareto set is the valley floor between the two minima ``(7, -8.43)`` and
``(-7, -8.43)`` (the factor ``b`` pulls the floor from ``x_2 = -8`` down to -8.36 at
``x_1 = 0``). Each training seed starts from one of :data:`STARTS` (seed modulo 5); the
"held-out metric" of a task is its loss at the final point (lower is better).

Each run's ``outcome`` (:meth:`Toy.outcome`) holds its start, end point, the end point's
distance to the Pareto set and whether it **reached** it (:func:`reached`: within
:data:`PARETO_TOL` of :func:`pareto_curve`); the compare tool's table lists them and its
trajectory plot marks reached end points. The toy's shared parameter is the point itself,
so ``level="params"`` (the papers' setting) and ``level="rep"`` see the same gradients.
"""
from __future__ import annotations

import functools
from pathlib import Path
from typing import Any, Iterator, Sequence

import torch
from torch import Tensor, nn

from .base import Batch, Benchmark, Predict
from .report import figure, format_table, grid, save

#: Starting points (those of the Nash-MTL paper's figure).
STARTS = ((-8.5, 7.5), (-8.5, -5.0), (9.0, 9.0), (-7.5, -0.5), (9.0, -1.0))
#: The plotted square.
BOX = (-10.0, 10.0)
#: An end point "reached" the Pareto set when it lies within this distance of
#: :func:`pareto_curve`: one Adam step at the toy's learning rate (Adam moves each
#: coordinate by at most about ``lr`` per step, so closer than that is "on it" at the
#: optimiser's resolution).
PARETO_TOL = 0.2


def task_loss(x: Tensor, k: int) -> Tensor:
    """``(..., 2)`` points -> ``(...)`` losses ``L_k`` of task ``k`` (0 or 1; module
    docstring). Each head computes only its own task (half the work of :func:`objectives`)."""
    if k not in (0, 1):
        raise ValueError(f"the toy has tasks 0 and 1, got k={k!r}")
    x1, x2 = x[..., 0], x[..., 1]
    half = torch.tanh(x2 / 2)
    upper, lower = half.clamp_min(0), (-half).clamp_min(0)  # tanh is odd
    if k == 0:
        valley = torch.log((0.5 * (-x1 - 7) + torch.tanh(x2)).abs().clamp_min(1e-6)) + 6
        centre, scale = 7.0, 0.1
    else:
        valley = torch.log((0.5 * (-x1 + 3) - torch.tanh(x2) + 2).abs().clamp_min(1e-6)) + 6
        centre, scale = -7.0, 1.0
    bowl = ((x1 - centre) ** 2 + 0.1 * (x2 + 8) ** 2) / 10 - 20
    return scale * (upper * valley + lower * bowl + 20)


def objectives(x: Tensor) -> Tensor:
    """``(..., 2)`` points -> ``(..., 2)`` losses ``(L_1, L_2)`` (module docstring)."""
    return torch.stack([task_loss(x, 0), task_loss(x, 1)], dim=-1)


@functools.lru_cache(maxsize=4)
def pareto_curve(n: int = 1401) -> Tensor:
    """``(n, 2)`` points of the Pareto set (float64), ``x_1`` evenly spaced over [-7, 7].

    Between the two minima the ``x_1`` components of the task gradients have opposite
    signs, so a point is Pareto-stationary exactly where the gradients are anti-parallel,
    i.e. their 2-D cross product ``g_1 x g_2`` vanishes. For each ``x_1``, 40 bisection
    steps on ``x_2`` in [-9.5, -7.6] (where the cross product changes sign) find that
    point; at ``x_1 = +-7`` it is the minimum of ``L_1`` (``L_2``). (A grid search for
    non-dominated points scatters over ``x_2``, where the losses are nearly flat; this
    curve does not.) Cached (do not modify the returned tensor).
    """
    x1 = torch.linspace(-7.0, 7.0, n, dtype=torch.float64)

    def cross(x2: Tensor) -> Tensor:
        x = torch.stack([x1, x2], -1).requires_grad_(True)
        g1, = torch.autograd.grad(task_loss(x, 0).sum(), x)
        g2, = torch.autograd.grad(task_loss(x, 1).sum(), x)
        return g1[:, 0] * g2[:, 1] - g1[:, 1] * g2[:, 0]

    lo, hi = torch.full_like(x1, -9.5), torch.full_like(x1, -7.6)
    sign_lo = cross(lo).sign()
    for _ in range(40):  # the bracket, 1.9 wide, shrinks to 2e-12
        mid = (lo + hi) / 2
        left = cross(mid).sign() == sign_lo
        lo, hi = torch.where(left, mid, lo), torch.where(left, hi, mid)
    return torch.stack([x1, (lo + hi) / 2], -1)


def pareto_distance(points: Tensor) -> Tensor:
    """``(..., 2)`` points -> ``(...)`` Euclidean distance to the Pareto set (the nearest
    of :func:`pareto_curve`'s points, 0.01 apart), in float64."""
    flat = points.detach().to(torch.float64).reshape(-1, 2)
    return torch.cdist(flat, pareto_curve()).min(1).values.reshape(points.shape[:-1])


def reached(points: Tensor, tol: float = PARETO_TOL) -> Tensor:
    """Whether each ``(..., 2)`` point reached the Pareto set: ``pareto_distance <= tol``.

    Why distance and not Pareto stationarity (the min-norm point of the hull of the two
    gradients being ~0): the losses are almost flat in ``x_2`` near the valley floor, so a
    point 2 units above it is stationary to within 1.5% of the larger gradient, and at the
    two minima ``(+-7, -8.43)`` one gradient vanishes, so a relative test is undefined
    there. Stationarity also holds on local, non-global Pareto points. The distance to the
    (global) Pareto set of :func:`pareto_curve` has none of these problems.
    """
    return pareto_distance(points) <= tol


class Point(nn.Module):
    """The "backbone": a learnable point, returned for every (dummy) input row."""

    def __init__(self, start: Sequence[float]):
        super().__init__()
        self.start = tuple(start)
        self.x = nn.Parameter(torch.tensor(start, dtype=torch.float32))

    def forward(self, batch: Tensor) -> Tensor:
        return self.x.expand(len(batch), 2)


class Objective(nn.Module):
    """The "head" of task ``k``: ``L_k`` of the point it reads."""

    def __init__(self, k: int):
        super().__init__()
        self.k = k

    def forward(self, z: Tensor) -> Tensor:
        return task_loss(z, self.k)


class Toy(Benchmark):
    """Two conflicting, differently scaled objectives in 2-D (the CAGrad paper's toy).

    Training: Adam as in the papers, but 500 steps (10 epochs of 50) at lr 0.2 instead of
    CAGrad's 100,000 steps at lr 0.001, so that all methods from all five starts run in
    about three minutes on two CPU cores. Adam moves each coordinate by at most about
    ``lr`` per step, so the path-length budget ``lr x steps = 100`` is the paper's.
    """

    name = "toy"
    tasks = ("L1", "L2")
    metrics = ("loss", "loss")
    higher_is_better = (False, False)
    rep_size = 2
    epochs = 10
    seeds = tuple(range(len(STARTS)))
    lr = 0.2
    method_lr = 0.01
    threads = 1

    def __init__(self, steps_per_epoch: int = 50):
        self.steps_per_epoch = steps_per_epoch
        self._dummy = torch.zeros(1, 1)

    def build(self, seed: int) -> tuple[nn.Module, list[nn.Module]]:
        return Point(STARTS[seed % len(STARTS)]), [Objective(0), Objective(1)]

    def train_batches(self, generator: torch.Generator) -> Iterator[Batch]:
        for _ in range(self.steps_per_epoch):
            yield self._dummy, [self._dummy, self._dummy]

    def losses(self, outputs: Sequence[Tensor], targets: Sequence[Tensor]) -> list[Tensor]:
        return [o.mean() for o in outputs]

    def evaluate(self, predict: Predict) -> list[float]:
        return torch.stack([o.mean() for o in predict(self._dummy)]).tolist()

    def track(self, backbone: Point) -> Tensor:
        """The current point, recorded after every step (the trajectories' picture)."""
        return backbone.x.detach().clone()

    def outcome(self, backbone: Point, heads: Sequence[nn.Module]) -> dict[str, Any]:
        """After training: the start (``STARTS[seed]``), the end point, its distance to the
        Pareto set and whether it :func:`reached` it."""
        end = backbone.x.detach().double()
        return {"start": [float(v) for v in backbone.start], "end": end.tolist(),
                "pareto_distance": float(pareto_distance(end)), "reached": bool(reached(end))}

    def extra_table(self, results: Any, fmt: str = "markdown") -> str:
        """End point of every method (rows) from every start (columns), with ✓ where it
        reached the Pareto set (within :data:`PARETO_TOL`) and ✗ where not."""
        seeds = list(results.seeds)
        header = ["method", *[f"from ({STARTS[s % len(STARTS)][0]:g}, {STARTS[s % len(STARTS)][1]:g})"
                              for s in seeds], "reached"]
        body = []
        for m in results.methods:
            runs = {r.seed: r for r in results.runs_of(m)}
            cells = [_endpoint_cell(runs.get(s)) for s in seeds]
            body.append([m, *cells, f"{results.outcome_count(m, 'reached')}/{len(seeds)}"])
        caption = (f"End points after {results.epochs} epochs: ✓ within {PARETO_TOL} of the Pareto set "
                   "(counted in `reached`), ✗ not; a run that diverged or failed ends where it stopped "
                   "and says after how many steps.")
        return caption + ("\n\n" if fmt == "markdown" else "\n") + format_table(header, body, fmt) + "\n"

    def extra_plots(self, results: Any, out_dir: Path) -> list[Path]:
        return [plot_trajectories(results, out_dir / "toy_trajectories.png")]


def _endpoint_cell(run: Any) -> str:
    if run is None or not run.outcome:
        return "-" if run is None else run.status
    x1, x2 = run.outcome["end"]
    cell = f"{'✓' if run.outcome['reached'] else '✗'} ({x1:.2f}, {x2:.2f})"
    return cell if run.ok else f"{cell} {run.status} at step {run.steps + 1}"


def plot_trajectories(results: Any, path: Path) -> Path:
    """The toy problem: each method's trajectories from every starting point over the
    contours of ``L_1 + L_2``, with the Pareto set (black). End markers: a star where the
    run reached the Pareto set (its ``outcome["reached"]``), a hollow square where it did
    not, an X where it stopped (diverged or failed); the panel title counts the runs that
    reached it (stopped ones included: their last point is where they stopped)."""
    import numpy as np
    from matplotlib import colormaps

    axis = torch.linspace(*BOX, 150, dtype=torch.float64)
    xx, yy = torch.meshgrid(axis, axis, indexing="xy")
    total = objectives(torch.stack([xx, yy], -1)).sum(-1).numpy()
    front = pareto_curve().numpy()
    rows, cols = grid(len(results.methods))
    fig, axes = figure(rows, cols, size=(3.4, 3.2), sharex=True, sharey=True)
    seed_colors = colormaps["tab10"]
    for ax, m in zip(axes.flat, results.methods):
        ax.contourf(xx.numpy(), yy.numpy(), np.log1p(total), levels=20, cmap="Greys", alpha=0.6)
        ax.plot(front[:, 0], front[:, 1], "-", color="black", linewidth=2)
        for i, r in enumerate(results.runs_of(m)):
            if not r.track:
                continue
            t = np.asarray(r.track)
            c = seed_colors(i % 10)
            ax.plot(t[:, 0], t[:, 1], color=c, linewidth=1.2)
            ax.plot(t[0, 0], t[0, 1], "o", color=c, markersize=4)
            if not r.ok:  # the run stopped (diverged or failed) there
                ax.plot(t[-1, 0], t[-1, 1], "X", color=c, markersize=9, markeredgecolor="black", markeredgewidth=0.5)
            elif r.outcome.get("reached"):
                ax.plot(t[-1, 0], t[-1, 1], "*", color=c, markersize=11, markeredgecolor="black", markeredgewidth=0.5)
            else:
                ax.plot(t[-1, 0], t[-1, 1], "s", markerfacecolor="white", markeredgecolor=c, markersize=7,
                        markeredgewidth=2)
        runs = results.runs_of(m)
        hits = results.outcome_count(m, "reached")
        title = f"{m} ({hits}/{len(runs)} reached)" if any("reached" in r.outcome for r in runs) else m
        ax.set_title(title, fontsize="medium")
        ax.set_xlim(*BOX)
        ax.set_ylim(*BOX)
    for ax in axes.flat[len(results.methods):]:
        ax.set_visible(False)
    for ax in axes[-1]:
        ax.set_xlabel("x1")
    for ax in axes[:, 0]:
        ax.set_ylabel("x2")
    fig.suptitle("toy: trajectories over contours of log(1 + L1 + L2); black: Pareto set\n"
                 "o start, * end on the Pareto set, □ end elsewhere, X stopped (diverged or failed)")
    return save(fig, path)
