"""Uncertainty weighting (Kendall, Gal & Cipolla, "Multi-Task Learning Using Uncertainty
to Weigh Losses for Scene Geometry and Semantics", CVPR 2018).

Each task has a learnable log-variance ``s_k = log sigma_k^2`` (a method parameter, trained
by the wrapped optimizer in its own group with ``method_lr``; start ``init``, default -0.5,
LibMTL's ``UW.init_param`` and MTAN's ``logsigma``: weights ``e^{0.5} / 2 = 0.82`` at the start):

.. math::  \\mathcal L = \\sum_k \\tfrac12 e^{-s_k} L_k + \\tfrac12 s_k

(the regression form, also LibMTL's). The task losses are weighted by
``w_k = exp(-s_k) / 2`` — heads and backbone alike, since the method only weights losses
(no Gram is computed) — and ``s`` receives the exact gradient
``dL/ds_k = (1 - exp(-s_k) L_k) / 2`` in its ``.grad`` during :meth:`update`, which runs
after the step was validated. Level: loss weighting, the same at either level.
"""
from __future__ import annotations

import torch
from torch import Tensor, nn

from ..numerics.grads import accumulate_grad
from .base import LossWeighting, check_option
from .registry import register


@register("uw")
class UncertaintyWeighting(LossWeighting):
    """Learnable homoscedastic-uncertainty loss weights ``exp(-s_k) / 2``."""

    state_names = ("log_vars",)
    subset_safe = True  # absent tasks: their terms drop out; their log-variances get a zero gradient

    def __init__(self, init: float = -0.5):
        self.init = check_option("init", init, float, what="the initial log-variance")

    def bind(self, num_tasks, *, device, dtype, generator):
        super().bind(num_tasks, device=device, dtype=dtype, generator=generator)
        self.log_vars = nn.Parameter(torch.full((num_tasks,), self.init, device=device, dtype=dtype))

    def parameters(self) -> list[nn.Parameter]:
        return [self.log_vars]

    def loss_weights(self, losses: Tensor) -> Tensor:
        s = self.log_vars.detach().to(losses.dtype)
        index = self.present_index(s)
        return 0.5 * torch.exp(-(s if index is None else s[index]))

    def update(self, losses: Tensor) -> None:
        s = self.log_vars.detach().to(losses.dtype)
        index = self.present_index(s)
        if index is None:
            grad = (0.5 * (1 - torch.exp(-s) * losses)).to(self.log_vars.dtype)
        else:  # an absent task's term is not in the objective: zero gradient for its s_k
            grad = torch.zeros_like(self.log_vars).index_copy(
                0, index, (0.5 * (1 - torch.exp(-s[index]) * losses)).to(self.log_vars.dtype))
        accumulate_grad(self.log_vars, grad)
