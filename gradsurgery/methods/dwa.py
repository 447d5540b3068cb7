"""DWA: dynamic weight average (Liu, Johns & Davison, "End-to-End Multi-Task Learning with
Attention", CVPR 2019, Eq. 7).

.. math::  w_k(t) = \\frac{K \\exp(r_k(t-1) / T)}{\\sum_j \\exp(r_j(t-1) / T)},\\qquad
           r_k(t-1) = \\frac{L_k(t-1)}{L_k(t-2)}

with temperature ``T`` (default 2, the paper's) and ``w = 1`` until two steps were seen.
The paper averages the losses over an epoch; here ``t`` counts optimizer steps (the losses
of the previous two accepted ``backward`` calls, kept in ``state_dict``). The losses are
weighted — heads and backbone alike; no Gram is computed. Level: loss weighting.
"""
from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

from .base import Method
from .registry import register


@register("dwa")
class DWA(Method):
    """Weights from the ratio of the last two losses, softmax with temperature."""

    needs_gram = False
    loss_only = True

    def __init__(self, temperature: float = 2.0):
        if not temperature > 0:
            raise ValueError(f"temperature must be > 0, got {temperature!r}")
        self.temperature = float(temperature)
        self.history: list[Tensor] = []

    def loss_weights(self, losses: Tensor) -> Tensor:
        if len(self.history) < 2:
            return torch.ones_like(losses)
        ratio = self.history[-1].to(losses) / self.history[-2].to(losses)
        return self.num_tasks * torch.softmax(ratio / self.temperature, 0)

    def weights(self, gram: Tensor | None, losses: Tensor) -> Tensor:
        self.history = [*self.history[-1:], losses.clone()]
        return torch.ones_like(losses)

    def state_dict(self) -> dict[str, Any]:
        return {"history": [h.clone() for h in self.history]}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.history = [h.clone() for h in state["history"]]

    def extra_repr(self) -> str:
        return f"temperature={self.temperature}"
