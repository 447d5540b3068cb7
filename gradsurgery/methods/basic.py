"""Plain combinations: ``sum`` and ``mean`` of the task losses.

They only weight the losses, so no Gram is computed: the step equals
``sum(losses).backward()`` (resp. ``(sum(losses) / K).backward()``) on every parameter.
"""
from __future__ import annotations

import torch
from torch import Tensor

from .base import LossWeighting
from .registry import register


@register("sum")
class Sum(LossWeighting):
    """``g = sum_k g_k``; heads get their own loss gradients. Equals ``sum(L).backward()``."""

    subset_safe = True


@register("mean")
class Mean(Sum):
    """``g = (1/K) sum_k g_k``; heads get ``1/K`` of their loss gradients, so the step
    equals ``(sum(L) / K).backward()``."""

    def loss_weights(self, losses: Tensor) -> Tensor:
        return torch.full_like(losses, 1.0 / losses.numel())  # the present tasks
