"""DB-MTL: dual-balancing multi-task learning (Lin et al., "Dual-Balancing for Multi-Task
Learning", arXiv 2308.12029, 2023).

Loss-scale balancing: every task is trained on ``log L_k`` — its loss weighted by
``1 / (L_k + eps)`` (``eps`` 1e-8), heads and backbone alike. Gradient-magnitude balancing:
the shared update rescales every (log-loss) task gradient to the largest norm,

.. math::  g = \\sum_k \\frac{\\max_j \\|g_j\\|}{\\|g_k\\|}\\, g_k,\\qquad g_k = \\nabla \\log L_k

(a zero ``g_k`` gets weight 0); the norms come from the Gram's diagonal. The paper applies
the balancing to an exponential moving average of the task gradients; this implementation
uses the current gradients (the paper's ``beta = 0``): at the representation level
gradients of different batches do not share coordinates, and a momentum optimizer already
averages over steps. Level: either.
"""
from __future__ import annotations

import torch
from torch import Tensor

from ..numerics.gram import norms
from .base import Method
from .registry import register


@register("db_mtl")
class DBMTL(Method):
    """Log-loss weighting plus gradient norms equalised to the largest."""

    def __init__(self, eps: float = 1e-8):
        if not eps >= 0:
            raise ValueError(f"eps must be >= 0, got {eps!r}")
        self.eps = float(eps)

    def loss_weights(self, losses: Tensor) -> Tensor:
        return 1 / (losses + self.eps)

    def weights(self, gram: Tensor, losses: Tensor) -> Tensor:
        n = norms(gram)
        return torch.where(n > 0, n.max() / torch.where(n > 0, n, 1), 0)

    def extra_repr(self) -> str:
        return f"eps={self.eps}"
