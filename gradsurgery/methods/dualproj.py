"""DualProj: the mean gradient projected onto the dual cone of the task gradients
(Quinton & Rey, "Jacobian Descent for Multi-Objective Optimization", 2024; the projection
is Eq. 11 of Lopez-Paz & Ranzato, "Gradient Episodic Memory", NeurIPS 2017).

.. math::  g = \\pi_C\\Big(\\frac1K\\sum_k g_k\\Big) = G^\\top v,\\qquad
           v = \\arg\\min_{v \\ge \\mathbf 1/K} v^\\top M v

where ``C = {y : <g_k, y> >= 0 for all k}`` (torchjd's scale: the projection of the
mean). Exact projection (:func:`gradsurgery.numerics.qp.project_dual_cone`, no regularisation),
so no task conflicts with ``g`` beyond rounding. Permutation-equivariant, weights invariant
to the gradients' scale. No options.

Level: representation level by default, ``level="params"`` for the shared parameters.
"""
from __future__ import annotations

import torch
from torch import Tensor

from ..numerics.qp import project_dual_cone
from .base import Method
from .registry import register


@register("dualproj")
class DualProj(Method):
    """Projection of the mean gradient onto the dual cone of the task gradients."""

    def weights(self, gram: Tensor, losses: Tensor) -> Tensor:
        k = gram.shape[0]
        mean = torch.full((1, k), 1.0 / k, dtype=gram.dtype, device=gram.device)
        return project_dual_cone(gram, mean)[0]
