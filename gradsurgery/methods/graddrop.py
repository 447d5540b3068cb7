"""GradDrop: gradient sign dropout (Chen et al., "Just Pick a Sign: Optimizing Deep
Multitask Models with Gradient Sign Dropout", NeurIPS 2020, Algorithm 1).

Element-wise, so it uses the :meth:`~gradsurgery.methods.Method.combine` hook instead of
the Gram. With the task gradients ``g_k`` (summed over the batch dimension first when
they have one, as the paper prescribes for batch-separated gradients):

.. math::  P = \\tfrac12\\Big(1 + \\frac{\\sum_k g_k}{\\sum_k |g_k|}\\Big),\\qquad
           U \\sim \\mathcal U(0, 1),\\qquad
           \\mathcal M_k = \\mathbb 1[P > U]\\,\\mathbb 1[g_k > 0] + \\mathbb 1[P < U]\\,\\mathbb 1[g_k < 0]

and the update is ``sum_k (leak + (1 - leak) M_k) * g_k`` with the masks broadcast over
the batch (``P = 1/2`` where every ``g_k`` is 0). ``leak`` (default 0) is the paper's
leak parameter, one value for all tasks. ``U`` comes from the method's generator.

Gradients of shape ``K x B x ...`` (the representation level: ``B`` the batch) are summed
over ``B`` for ``P`` and the signs; a ``K x P`` matrix (the parameter level, or a 1-D
representation) is used element by element. The update's scale is the sum's.
"""
from __future__ import annotations

import torch
from torch import Tensor

from .base import Method
from .registry import register


@register("graddrop")
class GradDrop(Method):
    """Keeps, element by element, the gradients of one randomly chosen sign."""

    def __init__(self, leak: float = 0.0):
        if not 0 <= leak <= 1:
            raise ValueError(f"leak must be in [0, 1], got {leak!r}")
        self.leak = float(leak)

    def combine(self, grads: Tensor, losses: Tensor) -> Tensor:
        signal = grads.sum(1) if grads.dim() > 2 else grads
        signal = signal.to(torch.float64 if grads.dtype == torch.float64 else torch.float32)
        total, magnitude = signal.sum(0), signal.abs().sum(0)
        purity = 0.5 * (1 + torch.where(magnitude > 0, total / torch.where(magnitude > 0, magnitude, 1), 0))
        u = torch.rand(purity.shape, generator=self.generator, dtype=purity.dtype).to(purity.device, non_blocking=True)
        keep = ((purity > u) & (signal > 0)) | ((purity < u) & (signal < 0))
        mask = self.leak + (1 - self.leak) * keep.to(purity.dtype)
        if grads.dim() > 2:
            mask = mask.unsqueeze(1)
        return (mask * grads.to(mask.dtype)).sum(0).to(grads.dtype)

    def extra_repr(self) -> str:
        return f"leak={self.leak}"
