"""FAMO: fast adaptive multitask optimization (Liu et al., NeurIPS 2023, Algorithm 1).

Task logits ``xi`` (start 0), ``z = softmax(xi)``. The losses are weighted so that the
update is the gradient of ``sum_k z_k log(L_k - l_k) / c`` with ``c = sum_k z_k / (L_k - l_k)``:

.. math::  w_k = \\frac{z_k}{c\\,(L_k - l_k + \\epsilon)}

(``l_k``: the tasks' minimal losses, ``min_losses``, default 0; ``epsilon`` 1e-8) — heads
and backbone alike; no Gram is computed. After the model's step, the logits learn from how
much each log-loss decreased: with the losses ``L'`` measured after the step,

.. math::  \\delta_k = \\log(L_k - l_k + \\epsilon) - \\log(L'_k - l_k + \\epsilon),\\qquad
           \\nabla_\\xi = J_{\\mathrm{softmax}}(\\xi)^\\top \\delta

and ``xi`` takes one Adam step (``w_lr``, default 0.025, with weight decay ``gamma``,
default 1e-3: the authors' runs on NYUv2, CelebA and QM9, Cranial-XIX/FAMO
``experiments/*/run.sh``; their argparse default 0.01 is the Cityscapes run's). No
clipping: the authors' ``WeightMethod.backward`` (``methods/weight_methods.py``) calls
``clip_grad_norm_(shared_parameters, max_norm)`` before ``loss.backward()``, right after the
trainer's ``optimizer.zero_grad()``, so it clips nothing; LibMTL's ``FAMO`` does not clip.
The new losses are passed by
:meth:`gradsurgery.MultiTaskOptimizer.observe` (``opt.observe(losses)`` after
``opt.step()``, e.g. the losses of the same batch re-evaluated under ``torch.no_grad()``,
as in the paper, or the next batch's losses to save a forward pass). The logits have their
own Adam, as in the paper, because their step follows ``observe``, not ``opt.step()``;
its state is in ``state_dict``. Level: loss weighting.
"""
from __future__ import annotations

from typing import Sequence

import torch
from torch import Tensor

from .base import LossWeighting, check_option
from .registry import register

EPS = 1e-8


@register("famo")
class FAMO(LossWeighting):
    """Loss weights whose logits follow the observed log-loss decreases."""

    subset_refusal = ("its logits learn from every task's loss before and after the step (observe() takes all K "
                      "losses)")

    observes_losses = True
    state_names = ("logits", "optimizer", "previous")
    legacy_state_names = {"adam": "optimizer"}  # 0.1.0's key

    def __init__(self, w_lr: float = 0.025, gamma: float = 1e-3,
                 min_losses: Sequence[float] | None = None):
        self.w_lr = check_option("w_lr", w_lr, float, "(0, inf)")
        self.gamma = check_option("gamma", gamma, float, "[0, inf)")
        self.min_losses = None if min_losses is None else [float(v) for v in min_losses]
        self.previous: Tensor | None = None

    def bind(self, num_tasks: int, *, device: torch.device, dtype: torch.dtype,
             generator: torch.Generator) -> None:
        super().bind(num_tasks, device=device, dtype=dtype, generator=generator)
        if self.min_losses is not None and len(self.min_losses) != num_tasks:
            raise ValueError(f"min_losses has {len(self.min_losses)} entries but num_tasks={num_tasks}")
        self.loss_floor = torch.tensor(self.min_losses or [0.0] * num_tasks, dtype=torch.float64, device=device)
        self.logits = torch.zeros(num_tasks, dtype=torch.float64, device=device, requires_grad=True)
        self.optimizer = torch.optim.Adam([self.logits], lr=self.w_lr, weight_decay=self.gamma)

    def loss_weights(self, losses: Tensor) -> Tensor:
        z = torch.softmax(self.logits.detach(), 0)
        gap = losses.to(z) - self.loss_floor + EPS
        return (z / gap / (z / gap).sum()).to(losses)

    def update(self, losses: Tensor) -> None:
        self.previous = losses.detach().clone()

    def observe(self, losses: Tensor) -> None:
        if self.previous is None:
            raise RuntimeError("FAMO.observe(losses) takes the losses after a step: call "
                               "opt.backward(...), opt.step(), then opt.observe(new_losses)")
        delta = (self.previous.to(self.logits) - self.loss_floor + EPS).log() \
            - (losses.to(self.logits) - self.loss_floor + EPS).log()
        z = torch.softmax(self.logits.detach(), 0)
        self.logits.grad = z * (delta - (z * delta).sum())
        self.optimizer.step()
        self.logits.grad = None
        self.previous = None
