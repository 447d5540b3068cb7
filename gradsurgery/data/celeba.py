"""``celeba-like``: many binary attributes (``K = 8`` by default) of one latent face,
synthesised from a seed, to show what happens when ``K`` grows.

A latent ``h ~ N(0, I_r)`` is observed through a random linear map with noise,
``x = A h + 0.5 \\epsilon``. The attributes come in groups that share a direction of
``h`` (correlated attributes), and every other group's direction is the negation of the
previous one (anti-correlated attributes, whose gradients conflict); half of the
attributes are linear thresholds ``1[w_k^T h > b_k]``, the other half bands
``1[|w_k^T h| > b_k]`` that the backbone must learn to fold. Thresholds ``b_k`` set
positive rates from about 10% to 50% (class imbalance), and 5% of labels are flipped.
Loss: binary cross-entropy with logits; metric: held-out accuracy (higher is better).
"""
from __future__ import annotations

from typing import Sequence

import torch
from torch import Tensor, nn

from .base import TensorBenchmark, mlp, split


class CelebaLike(TensorBenchmark):
    """K = 8 synthetic binary attributes, correlated and anti-correlated."""

    name = "celeba-like"
    epochs = 8
    lr = 3e-3
    method_lr = 1e-3
    threads = 1
    batch_size = 128

    def __init__(self, num_tasks: int = 8, *, n_train: int = 2048, n_test: int = 1024,
                 latent: int = 6, in_features: int = 32, group_size: int = 2, flip: float = 0.05,
                 rep_size: int = 32, seed: int = 0):
        if num_tasks < 2:
            raise ValueError(f"num_tasks must be >= 2, got {num_tasks}")
        self.tasks = tuple(f"attr{k + 1}" for k in range(num_tasks))
        self.metrics = ("acc",) * num_tasks
        self.higher_is_better = (True,) * num_tasks
        self.rep_size = rep_size
        self.in_features = in_features

        g = torch.Generator().manual_seed(seed)
        n = n_train + n_test
        h = torch.randn(n, latent, generator=g)
        x = h @ torch.randn(latent, in_features, generator=g) + 0.5 * torch.randn(n, in_features, generator=g)
        labels = []
        direction: Tensor | None = None
        for k in range(num_tasks):
            group, member = divmod(k, group_size)
            if member == 0:  # a new group: a fresh direction, or the previous one negated
                direction = -direction if group % 2 and direction is not None else torch.randn(latent, generator=g)
            assert direction is not None  # set at k = 0 (member 0)
            w = direction + 0.3 * torch.randn(latent, generator=g)
            score = h @ w / w.norm()
            rate = 0.1 + 0.4 * k / (num_tasks - 1)
            score = score.abs() if k % 2 else score
            y = score > score.quantile(1 - rate)
            flipped = torch.rand(n, generator=g) < flip
            labels.append((y ^ flipped).float()[:, None])
        train, test = split(n, n_test, g)
        self.x_train, self.x_test = x[train], x[test]
        self.y_train = [y[train] for y in labels]
        self.y_test = [y[test] for y in labels]

    def build(self, seed: int) -> tuple[nn.Module, list[nn.Module]]:
        backbone = mlp([self.in_features, 64, self.rep_size])
        return backbone, [nn.Linear(self.rep_size, 1) for _ in self.tasks]

    def losses(self, outputs: Sequence[Tensor], targets: Sequence[Tensor]) -> list[Tensor]:
        return [nn.functional.binary_cross_entropy_with_logits(o, t) for o, t in zip(outputs, targets)]

    def metric_values(self, outputs: Sequence[Tensor], targets: Sequence[Tensor]) -> list[float]:
        return torch.stack([((o > 0).float() == t).float().mean() for o, t in zip(outputs, targets)]).tolist()
