"""Constant: static loss weights (torchjd's ``Constant``; the linear scalarisation
``sum_k w_k L_k`` of OptMN-Lab/fairgrad's ``LinearScalarization``).

.. math::  g = \\sum_k w_k g_k,\\qquad w = \\texttt{task\\_weights}

``task_weights`` (a sequence or 1-D tensor of ``K`` finite numbers; default ``None``: all
ones, the sum) is checked against the number of tasks when the method is bound. The losses
are weighted -- heads and backbone alike -- and no Gram is computed. Level: loss weighting,
the same at either level.
"""
from __future__ import annotations

from typing import Sequence

import torch
from torch import Tensor

from .base import LossWeighting
from .registry import register


@register("constant")
class Constant(LossWeighting):
    """Fixed per-task loss weights ``task_weights``."""

    subset_safe = True  # absent tasks: the present tasks' weights

    def __init__(self, task_weights: Sequence[float] | Tensor | None = None):
        if task_weights is not None:
            try:
                values = torch.as_tensor(task_weights, dtype=torch.float64).detach().cpu().clone()
            except (TypeError, ValueError, RuntimeError):
                raise ValueError("task_weights must be a sequence or 1-D tensor of numbers, "
                                 f"got {task_weights!r}") from None
            if values.dim() != 1 or values.numel() == 0:
                raise ValueError(f"task_weights must be 1-D with one weight per task, got shape {tuple(values.shape)}")
            if not bool(values.isfinite().all()):
                raise ValueError(f"task_weights must be finite, got {values.tolist()}")
            task_weights = values
        self.task_weights = task_weights

    def bind(self, num_tasks: int, *, device: torch.device, dtype: torch.dtype,
             generator: torch.Generator) -> None:
        if self.task_weights is not None and self.task_weights.numel() != num_tasks:
            raise ValueError(f"task_weights has {self.task_weights.numel()} weights but there are {num_tasks} "
                             "tasks; give one weight per task")
        super().bind(num_tasks, device=device, dtype=dtype, generator=generator)
        values = torch.ones(num_tasks, dtype=torch.float64) if self.task_weights is None else self.task_weights
        self._weights = values.to(device)

    def loss_weights(self, losses: Tensor) -> Tensor:
        index = self.present_index(self._weights)
        return (self._weights if index is None else self._weights[index]).to(losses.dtype)
