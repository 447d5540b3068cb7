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
them and ``state_dict`` resumes them. They are drawn in :meth:`PCGrad.prepare`, which the
optimizer calls just before :meth:`PCGrad.weights` (a direct call of ``weights`` draws them
itself): Dynamo cannot trace a ``torch.Generator``, so ``weights`` stays free of graph breaks.

Level: the paper projects gradients w.r.t. the shared parameters; here, by default, the
gradients w.r.t. the shared representation (``level="params"`` gives the paper's setting).
A zero ``g_j`` is skipped (nothing to project off).
"""
from __future__ import annotations

import torch
from torch import Tensor

from .base import GramWeighting
from .registry import register


@register("pcgrad")
class PCGrad(GramWeighting):
    """Projecting conflicting gradients; see the module docstring for the math."""

    subset_safe = True  # absent tasks: the present tasks visit each other in the orders of their own keys

    _keys: Tensor | None = None

    def prepare(self) -> None:
        """Draws this optimizer step's sort keys (see :func:`visiting_keys`) ahead of
        :meth:`weights`, which then traces into one graph under ``torch.compile``; the
        micro-batches of one step (gradient accumulation) share them."""
        self._keys = visiting_keys(self.num_tasks, self.generator)

    def weights(self, gram: Tensor, losses: Tensor) -> Tensor:
        if self._keys is None:  # called outside the optimizer, without prepare()
            self._keys = visiting_keys(gram.shape[0], self.generator)
        keys = self._keys
        if keys.shape[0] != gram.shape[0]:  # absent tasks: the present ones' keys, a uniform draw among them
            index = self.present_index(keys)
            keys = keys[:gram.shape[0], :gram.shape[0]] if index is None else keys[index][:, index]
        return project_conflicting(gram, orders_from_keys(keys, gram.device))

    def after_step(self) -> None:
        self._keys = None  # one draw per optimizer step


def visiting_keys(k: int, generator: torch.Generator | None) -> Tensor:
    """One ``K x K`` draw of uniform sort keys from ``generator``, on the CPU (so a seed
    gives the same orders on every device)."""
    return torch.rand(k, k, generator=generator)


def orders_from_keys(keys: Tensor, device: torch.device) -> Tensor:
    """``K x (K - 1)``: row ``i`` sorts the tasks ``j != i`` by ``keys[i, j]``, a uniformly
    random permutation for uniform keys: the order in which task ``i`` visits the others."""
    k = keys.shape[0]
    keys = keys.to(device, non_blocking=True)  # no stream sync
    keys = torch.where(torch.eye(k, dtype=torch.bool, device=device), 2.0, keys)  # i sorts itself last, dropped
    return keys.argsort(dim=1)[:, : k - 1]


def visiting_orders(k: int, generator: torch.Generator | None, device: torch.device) -> Tensor:
    """The visiting orders of one step: :func:`orders_from_keys` of :func:`visiting_keys`."""
    return orders_from_keys(visiting_keys(k, generator), device)


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
