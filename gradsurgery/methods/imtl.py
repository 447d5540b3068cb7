"""IMTL: impartial multi-task learning (Liu et al., "Towards Impartial Multi-task Learning",
ICLR 2021), the hybrid of its loss half (IMTL-L) and gradient half (IMTL-G), as the authors'
group's LibMTL ``LibMTL/weighting/IMTL.py`` (``IMTL.backward``) runs it.

IMTL-L: each task has a learnable loss scale ``s_k`` (a method parameter, trained by the
wrapped optimizer in its own group with ``method_lr``; start ``init``, default 0 as LibMTL's
``init_param``) and the scaled loss

.. math::  \\tilde L_k = e^{s_k} L_k - s_k,\\qquad
           \\frac{\\partial \\tilde L_k}{\\partial s_k} = e^{s_k} L_k - 1

(so ``s_k`` settles where ``e^{s_k} L_k = 1``: every scaled loss at the same level). The heads
receive ``e^{s_k} dL_k`` (the loss weights) and the task gradients reach the Gram scaled,
``g~_k = e^{s_k} g_k``. IMTL-G then combines them with equal projections on every unit
gradient (:func:`gradsurgery.methods.imtl_g.equal_projection_weights`, coefficients summing
to 1): ``g = sum_k a_k g~_k``. ``s`` receives the exact gradient above in its ``.grad`` when the
step is accepted.

Level: the paper applies IMTL-G to the shared parameters' gradients; here by default to the
representation's, ``level="params"`` for the paper's setting (IMTL-L is the same at both).
"""
from __future__ import annotations

import torch
from torch import Tensor, nn

from ..numerics.grads import accumulate_grad
from .base import GramWeighting, check_option
from .imtl_g import equal_projection_weights
from .registry import register


@register("imtl")
class IMTL(GramWeighting):
    """Learned loss scales ``e^{s_k}`` (IMTL-L) and equal-projection coefficients (IMTL-G)."""

    state_names = ("loss_scale",)
    subset_refusal = ("its gradient half (IMTL-G) weights are tied to the learnable loss scales of all tasks, trained "
                      "together")

    def __init__(self, init: float = 0.0):
        self.init = check_option("init", init, float, what="the initial log loss scale s")

    def bind(self, num_tasks: int, *, device: torch.device, dtype: torch.dtype,
             generator: torch.Generator) -> None:
        super().bind(num_tasks, device=device, dtype=dtype, generator=generator)
        self.loss_scale = nn.Parameter(torch.full((num_tasks,), self.init, device=device, dtype=dtype))

    def parameters(self) -> list[nn.Parameter]:
        return [self.loss_scale]

    def loss_weights(self, losses: Tensor) -> Tensor:
        return torch.exp(self.loss_scale.detach().to(losses.dtype))

    def weights(self, gram: Tensor, losses: Tensor) -> Tensor:
        scale = torch.exp(self.loss_scale.detach().to(losses.dtype))
        grad = (scale * losses - 1).to(self.loss_scale.dtype)
        accumulate_grad(self.loss_scale, grad)
        return equal_projection_weights(gram)
