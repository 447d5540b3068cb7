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
one). The Pareto set is the valley floor between the two minima ``(7, -8)`` and
``(-7, -8)``. Each training seed starts from one of :data:`STARTS` (seed modulo 5); the
"held-out metric" of a task is its loss at the final point (lower is better).
"""
from __future__ import annotations

from pathlib import Path
from typing import Any, Iterator, Sequence

import torch
from torch import Tensor, nn

from .base import Batch, Benchmark, Predict

#: Starting points (those of the Nash-MTL paper's figure).
STARTS = ((-8.5, 7.5), (-8.5, -5.0), (9.0, 9.0), (-7.5, -0.5), (9.0, -1.0))
#: The plotted square.
BOX = (-10.0, 10.0)


def objectives(x: Tensor) -> Tensor:
    """``(..., 2)`` points -> ``(..., 2)`` losses ``(L_1, L_2)`` (module docstring)."""
    x1, x2 = x[..., 0], x[..., 1]
    upper = torch.tanh(x2 / 2).clamp_min(0)
    lower = torch.tanh(-x2 / 2).clamp_min(0)
    valley1 = torch.log((0.5 * (-x1 - 7) - torch.tanh(-x2)).abs().clamp_min(1e-6)) + 6
    valley2 = torch.log((0.5 * (-x1 + 3) + torch.tanh(-x2) + 2).abs().clamp_min(1e-6)) + 6
    bowl1 = ((x1 - 7) ** 2 + 0.1 * (x2 + 8) ** 2) / 10 - 20
    bowl2 = ((x1 + 7) ** 2 + 0.1 * (x2 + 8) ** 2) / 10 - 20
    f1 = upper * valley1 + lower * bowl1
    f2 = upper * valley2 + lower * bowl2
    return torch.stack([0.1 * (f1 + 20), f2 + 20], dim=-1)


def pareto_set(resolution: int = 300) -> tuple[Tensor, Tensor]:
    """Non-dominated points of a ``resolution x resolution`` grid over :data:`BOX`:
    ``(points (n, 2), losses (n, 2))``. A point is kept when no grid point is at least as
    good on both losses (sort by ``L_1``, keep the points that lower the running minimum
    of ``L_2``)."""
    axis = torch.linspace(*BOX, resolution, dtype=torch.float64)
    grid = torch.cartesian_prod(axis, axis)
    losses = objectives(grid)
    order = torch.argsort(losses[:, 0])
    l2 = losses[order, 1]
    best_before = torch.cat([l2.new_full((1,), float("inf")), torch.cummin(l2, 0).values[:-1]])
    keep = order[l2 < best_before]
    return grid[keep], losses[keep]


class Point(nn.Module):
    """The "backbone": a learnable point, returned for every (dummy) input row."""

    def __init__(self, start: Sequence[float]):
        super().__init__()
        self.x = nn.Parameter(torch.tensor(start, dtype=torch.float32))

    def forward(self, batch: Tensor) -> Tensor:
        return self.x.expand(len(batch), 2)


class Objective(nn.Module):
    """The "head" of task ``k``: ``L_k`` of the point it reads."""

    def __init__(self, k: int):
        super().__init__()
        self.k = k

    def forward(self, z: Tensor) -> Tensor:
        return objectives(z)[..., self.k]


class Toy(Benchmark):
    """Two conflicting, differently scaled objectives in 2-D (the CAGrad paper's toy)."""

    name = "toy"
    tasks = ("L1", "L2")
    metrics = ("loss", "loss")
    higher_is_better = (False, False)
    rep_size = 2
    epochs = 12
    seeds = tuple(range(len(STARTS)))
    lr = 0.05
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

    def extra_plots(self, results: Any, out_dir: Path) -> list[Path]:
        from ..compare.plotting import plot_toy_trajectories
        return [plot_toy_trajectories(results, out_dir / "toy_trajectories.png")]
