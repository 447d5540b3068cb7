"""``weight_ema``: a method's weights smoothed over steps (CR-MOGM, Zhou et al. 2022),

.. math::  \\lambda_t = a\\, \\lambda_{t-1} + (1 - a)\\, \\hat\\lambda_t, \\qquad \\lambda_1 = \\hat\\lambda_1,

for a Gram-weighting method's coefficients, a loss-weighting method's loss weights and an
element-wise method's weights (those with ``has_weights``).
"""
from __future__ import annotations

from typing import TYPE_CHECKING

from torch import Tensor

from .base import Decision, ElementWise, Method, TaskGradients

if TYPE_CHECKING:
    from ..scale.amp import Scaling


class Smoothed:
    """Decides as ``method`` does, with its weights smoothed; :attr:`running` holds
    ``lambda_{t-1}`` (``None`` before the first step)."""

    def __init__(self, method: Method, alpha: float):
        if isinstance(alpha, bool) or not isinstance(alpha, (int, float)) or not 0 <= alpha < 1:
            raise ValueError(f"weight_ema must be a number in [0, 1) (the weight of the previous weights), "
                             f"got {alpha!r}")
        if isinstance(method, ElementWise) and not method.has_weights:
            raise ValueError(f"weight_ema smooths a method's weights, but {method!r} combines the task "
                             "gradients element by element and has none; drop weight_ema")
        self.method, self.alpha = method, float(alpha)
        self.running: Tensor | None = None

    def smooth(self, weights: Tensor) -> Tensor:
        """``a lambda_{t-1} + (1 - a) weights`` (``weights`` at the first step). Pure."""
        if self.running is None:
            return weights
        return self.alpha * self.running.to(weights) + (1 - self.alpha) * weights

    def commit(self, weights: Tensor) -> Tensor:
        """Keeps ``weights`` as the running weights; returns them."""
        self.running = weights.detach().clone()
        return weights

    def step_loss_weights(self, losses: Tensor) -> Tensor | None:
        return self.method.step_loss_weights(losses, self)

    def decide(self, grads: TaskGradients, gram: Tensor | None, losses: Tensor, present: Tensor | None,
               loss_weights: Tensor | None, scaling: Scaling) -> Decision:
        return self.method.decide(grads, gram, losses, present, loss_weights, scaling, self)

    def __repr__(self) -> str:
        return f"Smoothed({self.method!r}, alpha={self.alpha})"
