"""``multidigits``: MultiMNIST-style two-task classification built from scikit-learn's
bundled 8x8 digits (no download).

Each example overlays two digits on an 8 x 12 canvas: the left digit in columns 0-7,
the right one in columns 4-11, pixel-wise maximum, so the middle columns hold both. Task 1
names the left digit, task 2 the right one (10 classes each). The digit images are split
into train and test halves first, so no test example reuses a training image.
Loss: cross-entropy; metric: held-out accuracy (higher is better).
"""
from __future__ import annotations

from typing import Sequence

import torch
from torch import Tensor, nn

from .base import TensorBenchmark, mlp, split

SHIFT = 4  #: columns between the two digits' left edges


def load_digits() -> tuple[Tensor, Tensor]:
    """scikit-learn's 1797 bundled 8x8 digits as ``(images in [0, 1], labels)``."""
    try:
        from sklearn.datasets import load_digits as sk_load_digits
    except ImportError:
        raise ImportError("the 'multidigits' benchmark needs scikit-learn (its bundled 8x8 digits): "
                          "pip install 'gradsurgery[examples]'  (or: pip install scikit-learn)") from None
    data = sk_load_digits()
    images = torch.as_tensor(data.images, dtype=torch.float32) / 16
    return images, torch.as_tensor(data.target, dtype=torch.long)


def overlay(left: Tensor, right: Tensor) -> Tensor:
    """``(n, 8, 8)`` pairs -> ``(n, 8, 8 + SHIFT)`` canvases, pixel-wise maximum."""
    canvas = left.new_zeros(len(left), 8, 8 + SHIFT)
    canvas[:, :, :8] = left
    canvas[:, :, SHIFT:] = torch.maximum(canvas[:, :, SHIFT:], right)
    return canvas


class MultiDigits(TensorBenchmark):
    """Left and right digit of two overlapping 8x8 digits (scikit-learn's bundled set)."""

    name = "multidigits"
    tasks = ("left", "right")
    metrics = ("acc", "acc")
    higher_is_better = (True, True)
    epochs = 5
    lr = 2e-3
    method_lr = 1e-3
    threads = 1
    batch_size = 128

    def __init__(self, *, n_train: int = 3000, n_test: int = 1000, rep_size: int = 32, seed: int = 0):
        images, labels = load_digits()
        g = torch.Generator().manual_seed(seed)
        train, test = split(len(images), len(images) // 3, g)
        self.rep_size = rep_size
        self.x_train, self.y_train = self._pairs(images[train], labels[train], n_train, g)
        self.x_test, self.y_test = self._pairs(images[test], labels[test], n_test, g)

    @staticmethod
    def _pairs(images: Tensor, labels: Tensor, n: int, g: torch.Generator) -> tuple[Tensor, list[Tensor]]:
        a = torch.randint(len(images), (n,), generator=g)
        b = torch.randint(len(images), (n,), generator=g)
        x = overlay(images[a], images[b]).flatten(1)
        return x, [labels[a], labels[b]]

    def build(self, seed: int) -> tuple[nn.Module, list[nn.Module]]:
        backbone = mlp([8 * (8 + SHIFT), 128, self.rep_size])
        return backbone, [nn.Linear(self.rep_size, 10) for _ in self.tasks]

    def losses(self, outputs: Sequence[Tensor], targets: Sequence[Tensor]) -> list[Tensor]:
        return [nn.functional.cross_entropy(o, t) for o, t in zip(outputs, targets)]

    def metric_values(self, outputs: Sequence[Tensor], targets: Sequence[Tensor]) -> list[float]:
        return torch.stack([(o.argmax(1) == t).float().mean() for o, t in zip(outputs, targets)]).tolist()
