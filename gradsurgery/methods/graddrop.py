"""GradDrop: gradient sign dropout (Chen et al., "Just Pick a Sign: Optimizing Deep
Multitask Models with Gradient Sign Dropout", NeurIPS 2020, Algorithm 1).

Element-wise (an :class:`~gradsurgery.methods.ElementWise` method): it needs the task
gradients' elements and the values ``A`` of the representation they are taken at. With the
per-task gradients ``g_k`` (``K x B x ...``, ``B`` the batch) and the sign-weighted batch sums

.. math::  S_k = \\sum_{b} \\operatorname{sgn}(A_b)\\, g_{k,b},\\qquad
           P = \\tfrac12\\Big(1 + \\frac{\\sum_k S_k}{\\sum_k |S_k|}\\Big),\\qquad
           U \\sim \\mathcal U(0, 1),

.. math::  \\mathcal M_k = \\mathbb 1[P > U]\\,\\mathbb 1[S_k > 0] + \\mathbb 1[P < U]\\,\\mathbb 1[S_k < 0]

the update is ``sum_k (leak + (1 - leak) M_k) g_k`` with the masks broadcast over the batch
(``P = 1/2`` where every ``S_k`` is 0). As the paper's Algorithm 1 and LibMTL's
``GradDrop.backward`` (the authors' group's code): ``sgn(A)`` weights the signal (so a unit
whose activation is negative counts its gradient's sign reversed; ``sgn(0) = 0``, e.g. after
a ReLU), the masks apply to the raw ``g_k``, the tasks are summed, ``leak`` defaults to 0 (one
value for all tasks). ``U`` (one per element of ``P``, in the computation's dtype) comes from
the method's generator. With ``leak = 0`` every task gradient whose ``S_k`` agrees in sign
with all the others' is kept, whatever ``U``.

A representation without a batch dimension (``K x F`` gradients) is used element by
element. At ``level="params"`` there is no activation (``rep`` is ``None``): every shared
parameter element is its own unit with ``sgn(A) = 1``, i.e. ``S_k = g_k`` element by element
(as Cranial-XIX/CAGrad's parameter-level ``graddrop`` and torchjd's ``GradDrop``); the paper
applies GradDrop to activations, so the representation level is its setting.
"""
from __future__ import annotations

import torch
from torch import Tensor

from ..numerics.gram import compute_dtype
from .base import ElementWise, check_option
from .registry import register


@register("graddrop")
class GradDrop(ElementWise):
    """Keeps, element by element, the gradients of one randomly chosen sign."""

    subset_safe = True

    def __init__(self, leak: float = 0.0):
        self.leak = check_option("leak", leak, float, "[0, 1]")

    def combine(self, grads: Tensor, losses: Tensor, rep: Tensor | None) -> Tensor:
        dtype = compute_dtype(grads.dtype)
        signal = grads.to(dtype) if rep is None else grads.to(dtype) * rep.to(dtype).sign()
        signal = signal.sum(1) if rep is not None and grads.dim() > 2 else signal
        total, magnitude = signal.sum(0), signal.abs().sum(0)
        purity = 0.5 * (1 + torch.where(magnitude > 0, total / torch.where(magnitude > 0, magnitude, 1), 0))
        u = torch.rand(purity.shape, generator=self.generator, dtype=purity.dtype).to(purity.device, non_blocking=True)
        keep = ((purity > u) & (signal > 0)) | ((purity < u) & (signal < 0))
        mask = self.leak + (1 - self.leak) * keep.to(purity.dtype)
        if rep is not None and grads.dim() > 2:
            mask = mask.unsqueeze(1)
        return (mask * grads.to(mask.dtype)).sum(0).to(grads.dtype)
