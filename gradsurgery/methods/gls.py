"""GLS: geometric loss strategy (Chennupati et al., "MultiNet++: Multi-Stream Feature
Aggregation and Geometric Loss Strategy for Multi-Task Learning", CVPR Workshops 2019).

The objective is the geometric mean of the losses, ``L = (prod_k L_k)^(1/K)``, as in
LibMTL's ``GLS.backward``; its gradient weights task ``k`` by

.. math::  w_k = \\frac{\\partial L}{\\partial L_k} = \\frac{(\\prod_j L_j)^{1/K}}{K\\,L_k}
           = \\frac{1}{K}\\exp\\Big(\\frac1K\\sum_j \\log L_j - \\log L_k\\Big)

(computed in log space, so a product of many small or large losses neither underflows nor
overflows). The losses are weighted -- heads and backbone alike -- and no Gram is computed.
The losses must be positive: the geometric mean of a zero loss has an infinite gradient
and that of a negative one is undefined. For such a loss the weights are NaN (all of them
for a negative loss; the zero loss's for a zero one) and the step's finiteness check (its
one host read) rejects the step with a ``ValueError`` that names :attr:`loss_domain`,
before anything changed.
No options. Level: loss weighting, the same at either level.
"""
from __future__ import annotations

import torch
from torch import Tensor

from .base import LossWeighting
from .registry import register


@register("gls")
class GLS(LossWeighting):
    """Weights of the geometric mean of the losses, ``(prod L)^(1/K) / (K L_k)``."""

    subset_safe = True

    loss_domain = ("positive losses (the geometric mean of a zero or negative loss has no finite gradient); "
                   "shift or rescale the losses")

    def loss_weights(self, losses: Tensor) -> Tensor:
        """NaN where a loss is 0 (its gradient is infinite), everywhere if one is negative."""
        log = losses.log()
        return torch.exp(log.mean() - log) / losses.numel()
