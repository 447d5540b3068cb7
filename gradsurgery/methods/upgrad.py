"""UPGrad: unconflicting projection of gradients (Quinton & Rey, "Jacobian Descent for
Multi-Objective Optimization", 2024, arXiv 2406.16232).

Each task gradient is projected onto the dual cone of all task gradients,
``C = {y : <g_k, y> >= 0 for all k}``, and the projections are averaged:

.. math::  g = \\frac1K \\sum_i \\pi_C(g_i) = G^\\top w,\\qquad
           w = \\frac1K \\sum_i v_i,\\quad v_i = \\arg\\min_{v \\ge e_i} v^\\top M v

(torchjd's scale: the *mean* of the projections). The projection is exact
(:func:`gradsurgery.numerics.qp.project_dual_cone`, no regularisation of ``M``), so
``<g_k, g> >= 0`` for every task to rounding: no task conflicts with the update.
Permutation-equivariant and positively homogeneous (``w`` does not change with the scale
of the gradients). No options.

Level: defined on any matrix of gradients; representation level by default,
``level="params"`` for the paper's Jacobian descent on the shared parameters.
"""
from __future__ import annotations

import torch
from torch import Tensor

from ..numerics.qp import project_dual_cone
from .base import Method
from .registry import register


@register("upgrad")
class UPGrad(Method):
    """Mean of the task gradients' projections onto their dual cone."""

    def weights(self, gram: Tensor, losses: Tensor) -> Tensor:
        k = gram.shape[0]
        eye = torch.eye(k, dtype=gram.dtype, device=gram.device)
        return project_dual_cone(gram, eye).mean(0)
