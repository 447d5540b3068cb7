"""``regression``: synthetic multi-task regression with a shared subspace, controllable
conflict and loss-scale imbalance.

Inputs ``x ~ N(0, I_d)``; every task reads the same ``r``-dimensional subspace
``h = U^T x`` (``U`` orthonormal). Task ``k`` is a random two-layer teacher on ``h``,

.. math::  y_k = s_k \\big( v_k^\\top \\tanh(W_k h) + \\epsilon \\big),\\qquad
           W_k = \\sqrt{1-c}\\, W_0 + \\sqrt{c}\\, W_k',\\quad
           v_k = \\sqrt{1-c}\\, v_0 + \\sqrt{c}\\, v_k'

with a common teacher ``(W_0, v_0)`` and task-specific ones ``(W_k', v_k')``. ``conflict``
``c`` in ``[0, 1]`` moves the tasks from one shared function (``c = 0``) to independent
functions that compete for the representation's capacity (``c = 1``); ``scales`` ``s_k``
make the losses differ by ``s_k^2`` (default: the last task's targets 100x larger).
Metric: normalised MSE on the held-out split, ``MSE_k / Var(y_k)`` (lower is better).
"""
from __future__ import annotations

from typing import Sequence

import torch
from torch import Tensor, nn

from .base import TensorBenchmark, mlp, split


class Regression(TensorBenchmark):
    """K regression tasks sharing a subspace; the last task's targets are 100x larger."""

    name = "regression"
    epochs = 20
    lr = 3e-3
    method_lr = 1e-3
    threads = 1
    batch_size = 100

    def __init__(self, num_tasks: int = 4, *, conflict: float = 0.5,
                 scales: Sequence[float] | None = None, n_train: int = 1000, n_test: int = 1000,
                 in_features: int = 16, subspace: int = 4, hidden: int = 8, noise: float = 0.1,
                 rep_size: int = 16, seed: int = 0):
        if num_tasks < 1:
            raise ValueError(f"num_tasks must be >= 1, got {num_tasks}")
        if not 0 <= conflict <= 1:
            raise ValueError(f"conflict must be in [0, 1], got {conflict}")
        if scales is None:
            scales = [1.0] * (num_tasks - 1) + [100.0]
        if len(scales) != num_tasks:
            raise ValueError(f"scales has {len(scales)} entries, expected num_tasks={num_tasks}")
        self.tasks = tuple(f"y{k + 1}" for k in range(num_tasks))
        self.metrics = ("nmse",) * num_tasks
        self.higher_is_better = (False,) * num_tasks
        self.rep_size = rep_size
        self.in_features = in_features

        g = torch.Generator().manual_seed(seed)
        u = torch.linalg.qr(torch.randn(in_features, subspace, generator=g))[0]
        w0 = torch.randn(hidden, subspace, generator=g)
        v0 = torch.randn(hidden, generator=g)
        x = torch.randn(n_train + n_test, in_features, generator=g)
        h = x @ u
        targets = []
        for s in scales:
            w = (1 - conflict) ** 0.5 * w0 + conflict ** 0.5 * torch.randn(hidden, subspace, generator=g)
            v = (1 - conflict) ** 0.5 * v0 + conflict ** 0.5 * torch.randn(hidden, generator=g)
            clean = torch.tanh(h @ w.T) @ v
            y = clean + noise * clean.std() * torch.randn(len(x), generator=g)
            targets.append(float(s) * y[:, None])
        train, test = split(len(x), n_test, g)
        self.x_train, self.x_test = x[train], x[test]
        self.y_train = [y[train] for y in targets]
        self.y_test = [y[test] for y in targets]

    def build(self, seed: int) -> tuple[nn.Module, list[nn.Module]]:
        backbone = mlp([self.in_features, 64, self.rep_size])
        return backbone, [nn.Linear(self.rep_size, 1) for _ in self.tasks]

    def losses(self, outputs: Sequence[Tensor], targets: Sequence[Tensor]) -> list[Tensor]:
        return [nn.functional.mse_loss(o, t) for o, t in zip(outputs, targets)]

    def metric_values(self, outputs: Sequence[Tensor], targets: Sequence[Tensor]) -> list[float]:
        return torch.stack([nn.functional.mse_loss(o, t) / t.var() for o, t in zip(outputs, targets)]).tolist()
