"""MoCo: multi-objective gradient correction (Fernando, Shen, Liu, Chaudhury, Murugesan and
Chen, "Mitigating Gradient Bias in Multi-objective Learning: A Provably Convergent
Approach", ICLR 2023).

Stochastic MGDA is biased; MoCo tracks each task's gradient with a moving average ``Y``
(``K x P``) and updates the weights ``lambda`` from the tracked Gram. LibMTL's ``MoCo``
(written from the authors' shared code), which this follows step for step, first scales
every task gradient to its loss value:

.. math::  \\hat g_k = \\frac{g_k}{\\|g_k\\| + 10^{-8}}\\,L_k,\\qquad
           Y \\leftarrow Y - \\beta_t\\,(Y - \\hat G),\\qquad
           \\lambda \\leftarrow \\operatorname{softmax}\\big(\\lambda - \\gamma_t\\,
           (Y Y^\\top + \\rho I)\\,\\lambda\\big),\\qquad g = Y^\\top \\lambda

with ``beta_t = beta / t^beta_sigma``, ``gamma_t = gamma / t^gamma_sigma`` (``t`` counts
steps from 1), ``Y_0 = 0``, ``lambda_0 = 1/K``. Defaults: LibMTL's (``beta`` 0.5,
``beta_sigma`` 0.5, ``gamma`` 0.1, ``gamma_sigma`` 0.5, ``rho`` 0).

Level: the shared **parameters** only (``level="params"``), as in LibMTL: ``Y`` averages
gradients over steps, and representation gradients of different batches belong to
different samples (they share no coordinate), so ``level="rep"`` raises. ``Y`` costs one
``K x P`` tensor of state.
"""
from __future__ import annotations

import torch
from torch import Tensor

from ..numerics.gram import compute_dtype, gram
from .base import ElementWise, check_option
from .registry import register


@register("moco")
class MoCo(ElementWise):
    """Tracked task gradients, weights by a softmax-mirror step on their Gram."""

    state_names = ("step", "lambd", "y")
    legacy_state_names = {"lambda": "lambd"}  # 0.1.0's keys
    legacy_empty_is_none = ("y",)  # 0.1.0 saved None as an empty tensor

    has_weights = True

    levels = ("params",)

    def __init__(self, beta: float = 0.5, beta_sigma: float = 0.5, gamma: float = 0.1,
                 gamma_sigma: float = 0.5, rho: float = 0.0):
        self.beta = check_option("beta", beta, float, "(0, 1]", "the tracking rate of Y")
        self.beta_sigma = check_option("beta_sigma", beta_sigma, float, "[0, inf)")
        self.gamma = check_option("gamma", gamma, float, "[0, inf)")
        self.gamma_sigma = check_option("gamma_sigma", gamma_sigma, float, "[0, inf)")
        self.rho = check_option("rho", rho, float, "[0, inf)")

    def bind(self, num_tasks: int, *, device: torch.device, dtype: torch.dtype,
             generator: torch.Generator) -> None:
        super().bind(num_tasks, device=device, dtype=dtype, generator=generator)
        self.step = 0
        self.y: Tensor | None = None
        self.lambd = torch.full((num_tasks,), 1.0 / num_tasks, dtype=compute_dtype(dtype), device=device)

    def combine(self, grads: Tensor, losses: Tensor, rep: Tensor | None) -> Tensor:
        if rep is not None:
            raise ValueError("moco tracks each task's gradient across steps, and representation gradients of "
                             "different batches share no coordinate; use level='params' (with shared_params=...)")
        flat = grads.reshape(grads.shape[0], -1).to(self.lambd.dtype)
        if self.y is not None and self.y.shape != flat.shape:
            raise ValueError(f"moco tracks {self.y.shape[1]} shared parameters' gradients, got {flat.shape[1]}; "
                             "the shared parameters must stay the same during training")
        t = self.step + 1
        scaled = flat / (torch.linalg.vector_norm(flat, dim=1, keepdim=True) + 1e-8) * losses.to(flat.dtype)[:, None]
        y = torch.zeros_like(scaled) if self.y is None else self.y
        y = y - (self.beta / t**self.beta_sigma) * (y - scaled)
        lambd = self.lambd
        lambd = torch.softmax(lambd - (self.gamma / t**self.gamma_sigma) * (gram(y) @ lambd + self.rho * lambd), 0)
        self.step, self.y, self.lambd = t, y, lambd
        return (self.use_weights(lambd) @ y).to(grads.dtype).view(grads.shape[1:])
