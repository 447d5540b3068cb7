"""Trimmed mean (Yin et al., "Byzantine-Robust Distributed Learning: Towards Optimal
Statistical Rates", ICML 2018; torchjd's ``TrimmedMean``).

Coordinate-wise: for each element of the gradient, the ``K`` task values are sorted, the
``trim_number`` smallest and the ``trim_number`` largest are dropped, and the remaining
``K - 2 t`` are averaged:

.. math::  g_i = \\frac{1}{K - 2t} \\sum_{r=t+1}^{K-t} G_{(r), i}

(``G_{(r), i}`` the ``r``-th smallest of ``G_{1,i}, ..., G_{K,i}``). Needs
``K >= 2 t + 1`` (checked when the method is bound). ``trim_number`` defaults to 1 (torchjd
has no default; 0 is the mean). Scale: the mean's. Element-wise, so it runs on the raw
``K x ...`` task gradients (each element of the representation's batch gradient at the
representation level, each shared parameter at ``level="params"``).
"""
from __future__ import annotations

import torch
from torch import Tensor

from ..numerics.gram import compute_dtype
from .base import ElementWise, check_option
from .registry import register


@register("trimmed_mean")
class TrimmedMean(ElementWise):
    """Coordinate-wise mean of the task gradients without the ``trim_number`` extremes."""

    subset_safe = True

    def __init__(self, trim_number: int = 1):
        self.trim_number = check_option("trim_number", trim_number, int, "[0, inf)")

    def bind(self, num_tasks: int, *, device: torch.device, dtype: torch.dtype,
             generator: torch.Generator) -> None:
        self._check(num_tasks)
        super().bind(num_tasks, device=device, dtype=dtype, generator=generator)

    def _check(self, num_tasks: int) -> None:
        if num_tasks < 2 * self.trim_number + 1:
            raise ValueError(f"trim_number={self.trim_number} drops {2 * self.trim_number} of every "
                             f"{num_tasks} task values; it needs at least {2 * self.trim_number + 1} tasks "
                             f"(use trim_number <= {(num_tasks - 1) // 2})")

    def combine(self, grads: Tensor, losses: Tensor, rep: Tensor | None) -> Tensor:
        self._check(grads.shape[0])  # a step with absent tasks sees fewer
        values = grads.to(compute_dtype(grads.dtype)).sort(0).values
        kept = values.narrow(0, self.trim_number, grads.shape[0] - 2 * self.trim_number)
        return kept.mean(0).to(grads.dtype)
