"""PCGrad: projecting conflicting gradients (Yu et al., "Gradient Surgery for Multi-Task
Learning", NeurIPS 2020).

For each task ``i``, start from ``g_i^PC = g_i`` and visit the other tasks ``j != i`` in a
random order; whenever ``<g_i^PC, g_j> < 0`` project it off ``g_j``:

.. math::  g_i^{PC} \\leftarrow g_i^{PC} - \\frac{\\langle g_i^{PC}, g_j\\rangle}{\\|g_j\\|^2} g_j

The update is ``sum_i g_i^PC`` (torchjd's scale). Every ``g_i^PC`` is a combination
``C_i^T G`` of the task gradients, so the whole algorithm runs on the Gram: the inner
product is ``C_i^T M e_j``. All ``K`` tasks are projected at once, one vectorised update
per position in their permutations. The permutations are drawn from the method's
generator (``K`` independent ones per step, :func:`visiting_orders`), so a seed fixes
them and ``state_dict`` resumes them.

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
        return project_conflicting(gram, visiting_orders(gram.shape[0], self.generator, gram.device))


def visiting_orders(k: int, generator: torch.Generator | None, device: torch.device) -> Tensor:
    """``K x (K - 1)``: row ``i`` is a uniformly random permutation of the tasks ``j != i``,
    the order in which task ``i`` visits the others. One ``K x K`` draw of uniform keys
    from ``generator`` (on the CPU, so a seed gives the same orders on every device)."""
    keys = torch.rand(k, k, generator=generator).to(device, non_blocking=True)  # no stream sync
    keys.diagonal().fill_(2.0)  # task i sorts itself last, and is dropped
    return keys.argsort(dim=1)[:, : k - 1]


def project_conflicting(gram: Tensor, order: Tensor) -> Tensor:
    """The coefficients ``c`` of ``sum_i g_i^PC = c^T G`` for the visiting ``order``
    (``K x (K - 1)``, see :func:`visiting_orders`), from the Gram ``M`` alone.

    Row ``i`` of ``C`` holds ``g_i^PC = C_i^T G``; at position ``s`` every task ``i``
    projects off ``g_j``, ``j = order[i, s]``, at once:
    ``C_ij -= min(C_i^T M e_j, 0) / M_jj`` (skipped where ``M_jj = 0``).
    """
    k = gram.shape[0]
    coefs = torch.eye(k, dtype=gram.dtype, device=gram.device)
    rows = torch.arange(k, device=gram.device)
    sq_norms = gram.diagonal()
    for step in range(k - 1):
        j = order[:, step]
        dots = (coefs * gram[j]).sum(1)  # <g_i^PC, g_j> for every i (M symmetric)
        denom = sq_norms[j]
        shift = torch.where(denom > 0, dots.clamp(max=0) / torch.where(denom > 0, denom, 1), 0)
        coefs[rows, j] -= shift
    return coefs.sum(0)
