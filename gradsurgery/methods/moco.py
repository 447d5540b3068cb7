"""MoCo: multi-objective gradient correction (Fernando, Shen, Liu, Chaudhury, Murugesan and
Chen, "Mitigating Gradient Bias in Multi-objective Learning: A Provably Convergent
Approach", ICLR 2023).

Stochastic MGDA is biased; MoCo tracks each task's gradient with a moving average ``Y``
(``K x P``) and updates the weights ``lambda`` from the tracked Gram:

.. math::  Y \\leftarrow Y - \\beta_t\\,(Y - \\hat G),\\qquad
           \\lambda \\leftarrow \\operatorname{softmax}\\big(\\lambda - \\gamma_t\\,
           (Y Y^\\top + \\rho I)\\,\\lambda\\big),\\qquad g = s\\,Y^\\top \\lambda

with ``beta_t = beta / t^beta_sigma``, ``gamma_t = gamma / t^gamma_sigma``, ``Y_0 = 0``,
``lambda_0 = 1/K``. By default this is the authors' published Cityscapes run
(heshandevaka/MoCo ``CAGrad/utils.py``, ``tracking`` in ``multi_task_rg_trainer``, run by
``CAGrad/run_moco.sh``): ``hat G = G`` (no normalisation), ``beta = 0.05``, ``t`` the epoch
index from 1 (``decay="epoch"``: call ``opt.end_epoch()`` after each epoch) and ``s = K``
(``scale_by_tasks``). LibMTL's ``MoCo`` is ``normalize=True`` (``hat g_k = g_k / (||g_k|| +
1e-8) L_k``), ``scale_by_tasks=False``, ``decay="step"`` (``t`` counts steps) and ``beta=0.5``.

Level: the shared **parameters** only (``level="params"``): ``Y`` averages gradients over
steps, and representation gradients of different batches belong to different samples (they
share no coordinate), so ``level="rep"`` raises. ``Y`` costs one ``K x P`` tensor of state.
"""
from __future__ import annotations

import torch
from torch import Tensor

from ..numerics.gram import compute_dtype, gram
from .base import ElementWise, check_option
from .registry import register

DECAYS = ("epoch", "step")


@register("moco")
class MoCo(ElementWise):
    """Tracked task gradients, weights by a softmax-mirror step on their Gram."""

    state_names = ("step", "epoch", "lambd", "y")
    legacy_state_names = {"lambda": "lambd"}  # 0.1.0's keys
    legacy_missing = {"epoch": 0}  # 0.1.0 counted steps only
    legacy_empty_is_none = ("y",)  # 0.1.0 saved None as an empty tensor
    subset_refusal = ("it tracks every task's gradient (Y, K x P) and moves its weights over all tasks from the "
                      "tracked Gram")

    has_weights = True

    levels = ("params",)

    def __init__(self, beta: float = 0.05, beta_sigma: float = 0.5, gamma: float = 0.1,
                 gamma_sigma: float = 0.5, rho: float = 0.0, normalize: bool = False,
                 scale_by_tasks: bool = True, decay: str = "epoch"):
        self.beta = check_option("beta", beta, float, "(0, 1]", "the tracking rate of Y")
        self.beta_sigma = check_option("beta_sigma", beta_sigma, float, "[0, inf)")
        self.gamma = check_option("gamma", gamma, float, "[0, inf)")
        self.gamma_sigma = check_option("gamma_sigma", gamma_sigma, float, "[0, inf)")
        self.rho = check_option("rho", rho, float, "[0, inf)")
        self.normalize = check_option("normalize", normalize, bool)
        self.scale_by_tasks = check_option("scale_by_tasks", scale_by_tasks, bool)
        if decay not in DECAYS:
            raise ValueError(f"decay must be 'epoch' (the authors' run: steps decay with the epoch index, "
                             f"call opt.end_epoch()) or 'step' (LibMTL), got {decay!r}")
        self.decay = decay

    def bind(self, num_tasks: int, *, device: torch.device, dtype: torch.dtype,
             generator: torch.Generator) -> None:
        super().bind(num_tasks, device=device, dtype=dtype, generator=generator)
        self.step = 0
        self.epoch = 0
        self.y: Tensor | None = None
        self.lambd = torch.full((num_tasks,), 1.0 / num_tasks, dtype=compute_dtype(dtype), device=device)

    def end_epoch(self) -> None:
        """Counts epochs: with ``decay="epoch"`` the step sizes use ``t = epochs + 1``."""
        self.epoch += 1

    def combine(self, grads: Tensor, losses: Tensor, rep: Tensor | None) -> Tensor:
        if rep is not None:
            raise ValueError("moco tracks each task's gradient across steps, and representation gradients of "
                             "different batches share no coordinate; use level='params' (with shared_params=...)")
        flat = grads.reshape(grads.shape[0], -1).to(self.lambd.dtype)
        if self.y is not None and self.y.shape != flat.shape:
            raise ValueError(f"moco tracks {self.y.shape[1]} shared parameters' gradients, got {flat.shape[1]}; "
                             "the shared parameters must stay the same during training")
        t = (self.epoch if self.decay == "epoch" else self.step) + 1
        if self.normalize:
            flat = flat / (torch.linalg.vector_norm(flat, dim=1, keepdim=True) + 1e-8) * losses.to(flat.dtype)[:, None]
        y = torch.zeros_like(flat) if self.y is None else self.y
        y = y - (self.beta / t**self.beta_sigma) * (y - flat)
        lambd = self.lambd
        lambd = torch.softmax(lambd - (self.gamma / t**self.gamma_sigma) * (gram(y) @ lambd + self.rho * lambd), 0)
        self.step, self.y, self.lambd = self.step + 1, y, lambd
        weights = lambd * len(lambd) if self.scale_by_tasks else lambd
        return (self.use_weights(weights) @ y).to(grads.dtype).view(grads.shape[1:])
