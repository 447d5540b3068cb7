"""Parameter-level surgery: the methods decide from the task gradients w.r.t. the shared
*parameters* (the papers' setting) instead of the shared representation.

The representation-level pipeline already has ``G`` (``K x z.shape``), every task's
gradient w.r.t. ``z``. By the chain rule the task gradients w.r.t. the shared parameters
``theta`` are the rows of

.. math::  J = G\\, \\frac{\\partial z}{\\partial \\theta}\\qquad (K \\times P)

so ``J`` comes from **one** batched vector-Jacobian product through the backbone
(``torch.autograd.grad(z, theta, G, is_grads_batched=True)``, vmap over the ``K`` rows);
no task ever backpropagates through the heads again. Then ``M = J J^T`` (summed
parameter by parameter, never concatenating ``J``), the method's coefficients ``c`` from
``M`` exactly as at the representation level, and ``c^T J`` written to the parameters'
``.grad``. ``J`` lives from the batched product to that combination only.

The batched product costs about ``K`` plain backward passes, less than ``K`` separate
``retain_graph`` passes; a layer-wise Gramian (never forming ``J``) costs more at usual
batch sizes and only applies to known layer types (docs/design-notes.md).

Element-wise methods (GradDrop) get the flat ``K x P`` Jacobian through their ``combine``
hook. Methods that only weight losses need no Jacobian at all: their parameter-level step is
the representation-level one (``z.backward(c^T G)``), which is the same gradient.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import torch
from torch import Tensor

from ..numerics.grads import accumulate_grad
from ..numerics.gram import compute_dtype


@dataclass
class Jacobian:
    """The ``K x P`` Jacobian of the tasks w.r.t. the shared parameters, one ``K x p_i``
    block per parameter (not concatenated)."""

    params: list[Tensor]
    blocks: list[Tensor]

    def gram(self) -> Tensor:
        """``J J^T`` in float32 or wider, accumulated block by block."""
        k = self.blocks[0].shape[0]
        dtype = compute_dtype(self.blocks[0].dtype)
        total = torch.zeros(k, k, dtype=dtype, device=self.blocks[0].device)
        for block in self.blocks:
            flat = block.reshape(k, -1).to(dtype)
            total.addmm_(flat, flat.T)
        return total

    def flat(self) -> Tensor:
        """The ``K x P`` matrix (a copy), for element-wise methods."""
        return torch.cat([b.reshape(b.shape[0], -1) for b in self.blocks], 1)

    def accumulate(self, coefficients: Tensor | None = None, combined: Tensor | None = None) -> None:
        """Adds ``c^T J`` (or an already ``combined`` flat ``P`` vector) to the parameters'
        ``.grad``, then drops ``J``."""
        offset = 0
        for p, block in zip(self.params, self.blocks):
            if combined is None:
                g = torch.tensordot(coefficients.to(compute_dtype(block.dtype)), block.to(compute_dtype(block.dtype)), 1)
            else:
                g = combined[offset:offset + p.numel()].view(p.shape)
                offset += p.numel()
            accumulate_grad(p, g.to(p.dtype))
        self.blocks = []


def jacobian(shared: Sequence[Tensor], params: list[Tensor], grads: Sequence[Tensor], *,
             retain_graph: bool) -> Jacobian:
    """``J = G dz/dtheta`` by one batched vector-Jacobian product through the backbone
    (``grads``: the ``K x t.shape`` representation gradients of each shared tensor ``t``).
    Parameters the shared tensors do not reach through a differentiable path get zero
    blocks."""
    blocks = torch.autograd.grad(list(shared), params, [g.to(t.dtype) for g, t in zip(grads, shared)],
                                 is_grads_batched=True, retain_graph=retain_graph, allow_unused=True)
    k = grads[0].shape[0]
    blocks = [b if b is not None else torch.zeros(k, *p.shape, dtype=p.dtype, device=p.device)
              for b, p in zip(blocks, params)]
    return Jacobian(params=list(params), blocks=list(blocks))
