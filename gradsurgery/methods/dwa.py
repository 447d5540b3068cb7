"""DWA: dynamic weight average (Liu, Johns & Davison, "End-to-End Multi-Task Learning with
Attention", CVPR 2019, Eq. 7), as the authors' code (lorenmt/mtan,
``im2im_pred/utils.py``, ``multi_task_trainer``) computes it.

.. math::  w_k(e) = \\frac{K \\exp(r_k / T)}{\\sum_j \\exp(r_j / T)},\\qquad
           r_k = \\frac{\\bar L_k(e-1)}{\\bar L_k(e-2)}

where ``e`` counts epochs and ``\\bar L_k(e)`` is the mean of task ``k``'s training losses
over the accepted ``backward`` calls of epoch ``e``; ``w = 1`` in epochs 0 and 1;
temperature ``T`` (default 2, the authors'). The user marks each epoch's end with
:meth:`gradsurgery.MultiTaskOptimizer.end_epoch`; the weights change only there, so they
are constant within an epoch (without ``end_epoch`` calls they stay 1). ``per_step=True``
replaces epochs by steps: the ratio of the losses of the previous two accepted ``backward``
calls. The losses are weighted — heads and backbone alike; no Gram is computed.
Level: loss weighting.
"""
from __future__ import annotations

import torch
from torch import Tensor

from .base import LossWeighting, check_option
from .registry import register


@register("dwa")
class DWA(LossWeighting):
    """Weights from the ratio of the last two epochs' mean losses, softmax with temperature."""

    state_names = ("history", "total", "count")
    subset_refusal = ("its weights come from the epoch means of the losses, which count the batches once for all "
                      "tasks")

    def __init__(self, temperature: float = 2.0, per_step: bool = False):
        self.temperature = check_option("temperature", temperature, float, "(0, inf)")
        self.per_step = check_option("per_step", per_step, bool)
        self.history: list[Tensor] = []  # the last two completed periods' mean losses
        self.total: Tensor | None = None  # sum of this epoch's losses
        self.count = 0  # accepted backward calls in this epoch

    def loss_weights(self, losses: Tensor) -> Tensor:
        if len(self.history) < 2:
            return torch.ones_like(losses)
        ratio = self.history[-1].to(losses) / self.history[-2].to(losses)
        return self.num_tasks * torch.softmax(ratio / self.temperature, 0)

    def update(self, losses: Tensor) -> None:
        if self.per_step:
            self.history = [*self.history[-1:], losses.clone()]
            return
        self.total = losses.clone() if self.total is None else self.total + losses
        self.count += 1

    def end_epoch(self) -> None:
        """Closes the epoch: its mean losses become the newest entry of the ratio."""
        if self.per_step or self.total is None:  # no accepted batch this epoch (count == 0)
            return
        self.history = [*self.history[-1:], self.total / self.count]
        self.total, self.count = None, 0
