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

import math
from typing import Any

import torch
from torch import Tensor

from ..numerics.gram import compute_dtype, gram
from .base import ElementWise
from .registry import register


@register("moco")
class MoCo(ElementWise):
    """Tracked task gradients, weights by a softmax-mirror step on their Gram."""

    subset_refusal = ("it tracks every task's gradient (Y, K x P) and moves its weights over all tasks from the "
                      "tracked Gram")

    has_weights = True

    levels = ("params",)

    def __init__(self, beta: float = 0.5, beta_sigma: float = 0.5, gamma: float = 0.1,
                 gamma_sigma: float = 0.5, rho: float = 0.0):
        for name, value in (("beta_sigma", beta_sigma), ("gamma", gamma), ("gamma_sigma", gamma_sigma), ("rho", rho)):
            if not (isinstance(value, (int, float)) and math.isfinite(value) and value >= 0):
                raise ValueError(f"{name} must be a finite number >= 0, got {value!r}")
        if not 0 < beta <= 1:
            raise ValueError(f"beta (the tracking rate of Y) must be in (0, 1], got {beta!r}")
        self.beta = float(beta)
        self.beta_sigma = float(beta_sigma)
        self.gamma = float(gamma)
        self.gamma_sigma = float(gamma_sigma)
        self.rho = float(rho)

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

    def state_dict(self) -> dict[str, Any]:
        y = torch.empty(0, dtype=self.lambd.dtype) if self.y is None else self.y.clone()
        return {"step": self.step, "lambda": self.lambd.clone(), "y": y}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.step = int(state["step"])
        self.lambd = state["lambda"].to(self.lambd.device, self.lambd.dtype).clone()
        y = state["y"]
        self.y = None if y.numel() == 0 else y.to(self.lambd.device, self.lambd.dtype).clone()

    def extra_repr(self) -> str:
        return (f"beta={self.beta}, beta_sigma={self.beta_sigma}, gamma={self.gamma}, "
                f"gamma_sigma={self.gamma_sigma}, rho={self.rho}")
