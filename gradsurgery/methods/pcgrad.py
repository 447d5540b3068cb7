"""PCGrad: projecting conflicting gradients (Yu et al., "Gradient Surgery for Multi-Task
Learning", NeurIPS 2020).

For each task ``i``, start from ``g_i^PC = g_i`` and visit the other tasks ``j != i`` in a
random order; whenever ``<g_i^PC, g_j> < 0`` project it off ``g_j``:

.. math::  g_i^{PC} \\leftarrow g_i^{PC} - \\frac{\\langle g_i^{PC}, g_j\\rangle}{\\|g_j\\|^2} g_j

The update is ``sum_i g_i^PC`` (torchjd's scale). Every ``g_i^PC`` is a combination
``C_i^T G`` of the task gradients, so the whole algorithm runs on the Gram: the inner
product is ``C_i^T M e_j``. All ``K`` tasks are projected at once, one vectorised update
per position in their permutations. The permutations are drawn from the method's
generator (``K`` independent ones per step).

Level: the paper projects gradients w.r.t. the shared parameters; here, by default, the
gradients w.r.t. the shared representation (``level="params"`` gives the paper's setting).
A zero ``g_j`` is skipped (nothing to project off).
"""
from __future__ import annotations

import torch
from torch import Tensor

from .base import Method
from .registry import register


@register("pcgrad")
class PCGrad(Method):
    """Projecting conflicting gradients; see the module docstring for the math."""

    def weights(self, gram: Tensor, losses: Tensor) -> Tensor:
        k = gram.shape[0]
        keys = torch.rand(k, k, generator=self.generator).to(gram.device)
        keys.diagonal().fill_(2.0)  # task i visits itself last, where it is skipped
        order = keys.argsort(dim=1)
        coefs = torch.eye(k, dtype=gram.dtype, device=gram.device)
        rows = torch.arange(k, device=gram.device)
        sq_norms = gram.diagonal()
        for step in range(k - 1):
            j = order[:, step]
            dots = (coefs * gram[:, j].T).sum(1)  # <g_i^PC, g_j> for every i
            denom = sq_norms[j]
            shift = torch.where(denom > 0, dots.clamp(max=0) / torch.where(denom > 0, denom, 1), 0)
            coefs[rows, j] -= shift
        return coefs.sum(0)
