"""MGDA: the multiple-gradient descent algorithm as min-norm point (Sener & Koltun,
"Multi-Task Learning as Multi-Objective Optimization", NeurIPS 2018).

.. math::  \\lambda^* = \\arg\\min_{\\lambda \\in \\Delta^K} \\Big\\|\\sum_k \\lambda_k \\hat g_k\\Big\\|^2,
           \\qquad g = \\sum_k \\lambda^*_k g_k

where ``\\hat g_k = g_k / n_k`` is the task gradient under the paper code's
``normalization``: ``"none"`` (``n_k = 1``, default), ``"l2"`` (``n_k = ||g_k||``),
``"loss"`` (``n_k = L_k``) or ``"loss+"`` (``n_k = L_k ||g_k||``). As in the paper's code,
the weights found on the normalised gradients combine the raw ones.

The small QP is solved exactly (:func:`gradsurgery.numerics.qp.min_norm_simplex`): every
support is enumerated for ``K <= 8``, Wolfe's active-set algorithm runs above, so the
result meets the KKT conditions ``<g_k, d> >= ||d||^2`` (equality on the support) to
rounding (residuals below 1e-12 relative to ``max ||g_k||^2`` in the tests, K up to 32).
No host reads. Representation level by default, as in MGDA-UB.

``weight_heads=True`` is the authors' backward (``train_multi_task.py`` backpropagates
``sum_t lambda_t L_t``): each head then receives ``lambda_k dL_k``; by default each head gets
its own unweighted loss gradient (the project's rule for gradient methods).
"""
from __future__ import annotations

import torch
from torch import Tensor

from ..numerics.gram import norms, scale_gram
from ..numerics.qp import min_norm_simplex
from .base import GramWeighting, check_option
from .registry import register

NORMALIZATIONS = ("none", "l2", "loss", "loss+")


@register("mgda")
class MGDA(GramWeighting):
    """Min-norm point of the convex hull of the task gradients."""

    subset_safe = True

    def __init__(self, normalization: str = "none", weight_heads: bool = False):
        if normalization not in NORMALIZATIONS:
            raise ValueError(f"normalization must be one of {NORMALIZATIONS}, got {normalization!r}")
        self.normalization = normalization
        self.weight_heads = check_option("weight_heads", weight_heads, bool,
                                         what="True: heads get lambda_k dL_k, the authors' code")

    def weights(self, gram: Tensor, losses: Tensor) -> Tensor:
        if self.normalization == "none":
            return min_norm_simplex(gram)
        scale = torch.ones_like(losses)
        if self.normalization in ("l2", "loss+"):
            scale = scale * norms(gram)
        if self.normalization in ("loss", "loss+"):
            scale = scale * losses.abs()
        inv = torch.where(scale > 0, 1 / torch.where(scale > 0, scale, 1), 0)
        return min_norm_simplex(scale_gram(gram, inv))
