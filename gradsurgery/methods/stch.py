"""STCH: smooth Tchebycheff scalarisation (Lin et al., "Smooth Tchebycheff Scalarization
for Multi-Objective Optimization", ICML 2024; official code Xi-L/STCH,
``STCH_MTL/LibMTL/weighting/STCH.py``, the same as LibMTL's ``STCH.py``).

After a warm-up, the objective is the smooth maximum of the log losses relative to a nadir
point ``z`` (the mean losses of the last warm-up epoch):

.. math::  \\mathcal L = K \\mu \\log \\sum_k \\exp(l_k / \\mu),\\qquad
           l_k = \\log(L_k / z_k + 10^{-20})

so the losses are weighted by ``w_k = dL/dL_k = K softmax(l / mu)_k / (L_k + 10^{-20} z_k)``.
During the warm-up (epochs ``0 .. warmup_epoch``, counted by
:meth:`gradsurgery.MultiTaskOptimizer.end_epoch`) the objective is ``sum_k log(L_k + 1e-20)``,
``w_k = 1 / (L_k + 1e-20)``; during epoch ``warmup_epoch`` the losses of every step are
averaged into ``z``, fixed when that epoch ends. Defaults are the authors' (``mu = 1.0``,
``warmup_epoch = 4``, their config and runs). The losses are weighted -- heads and backbone
alike, as the official code backpropagates the whole objective -- and no Gram is computed.

Call ``opt.end_epoch()`` once per epoch, after its steps: without it STCH stays in its
warm-up. The losses must be positive (their logarithms are taken): a non-positive loss's
weight is NaN, and the step's finiteness check (its one host read) rejects the step with a
``ValueError`` naming :attr:`loss_domain`, before anything changed. State (``state_dict``): the epoch, the running sum
and count of the nadir epoch's losses, the nadir point. Level: loss weighting, the same at
either level.
"""
from __future__ import annotations

import torch
from torch import Tensor

from .base import LossWeighting, check_option
from .registry import register

#: The official code's guard inside the logarithms.
TINY = 1e-20


@register("stch")
class STCH(LossWeighting):
    """Smooth Tchebycheff weights of the log losses relative to a warm-up nadir point."""

    state_names = ("epoch", "loss_sum", "count", "nadir")
    legacy_empty_is_none = ("nadir",)  # 0.1.0 saved None as an empty tensor
    subset_refusal = ("its nadir point is the per-task epoch means of the warm-up, which count the batches once for "
                      "all tasks")

    def __init__(self, mu: float = 1.0, warmup_epoch: int = 4):
        self.mu = check_option("mu", mu, float, "(0, inf)", "the smoothing")
        self.warmup_epoch = check_option("warmup_epoch", warmup_epoch, int, "[0, inf)",
                                         "the epoch whose mean losses are the nadir point")

    def bind(self, num_tasks: int, *, device: torch.device, dtype: torch.dtype,
             generator: torch.Generator) -> None:
        super().bind(num_tasks, device=device, dtype=dtype, generator=generator)
        self.epoch = 0
        self.loss_sum = torch.zeros(num_tasks, dtype=torch.float64, device=device)
        self.count = 0
        self.nadir: Tensor | None = None

    loss_domain = "positive losses (it takes their logarithms); shift or rescale the losses"

    def loss_weights(self, losses: Tensor) -> Tensor:
        """NaN for a loss that is not positive (the step is then rejected)."""
        positive = losses > 0
        if self.nadir is None:
            w = 1 / (losses + TINY)
        else:
            z = self.nadir.to(losses.dtype)
            l = torch.log(losses / z + TINY)
            w = self.num_tasks * torch.softmax(l / self.mu, 0) / (losses + TINY * z)
        return torch.where(positive, w, torch.nan)  # rejected by the step's finite check

    def update(self, losses: Tensor) -> None:
        if self.epoch == self.warmup_epoch:
            self.loss_sum = self.loss_sum + losses.to(self.loss_sum.dtype)
            self.count += 1

    def end_epoch(self) -> None:
        if self.epoch == self.warmup_epoch:
            if self.count == 0:
                raise RuntimeError(f"STCH saw no step during epoch {self.warmup_epoch}, whose mean losses set "
                                   "its nadir point; call opt.end_epoch() once per epoch, after its steps")
            self.nadir = self.loss_sum / self.count
        self.epoch += 1
