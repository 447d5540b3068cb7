"""GradVac: gradient vaccine (Wang et al., "Gradient Vaccine: Investigating and Improving
Multi-task Optimization in Massively Multilingual Models", ICLR 2021).

PCGrad generalised to a per-pair target similarity. For each task ``i``, start from
``g_i' = g_i`` and visit the other tasks ``j`` in a random order: with
``phi = cos(g_i', g_j)`` and the target ``phi_hat_ij``, when ``phi < phi_hat_ij``

.. math::  g_i' \\leftarrow g_i' + \\frac{\\|g_i'\\|\\,\\big(\\hat\\phi_{ij}\\sqrt{1-\\phi^2}
           - \\phi\\sqrt{1-\\hat\\phi_{ij}^2}\\big)}{\\|g_j\\|\\sqrt{1-\\hat\\phi_{ij}^2}}\\; g_j

and, at every visit, ``phi_hat_ij <- (1 - beta) phi_hat_ij + beta phi`` (an EMA, starting at
0, kept in ``state_dict``). The update is ``sum_i g_i'`` (PCGrad's and torchjd's scale).
Every ``g_i'`` is a combination of the task gradients, so it runs on the Gram, all ``K``
tasks at once per position of their (independent) random orders, drawn from the method's
generator. ``beta`` defaults to 0.5 (LibMTL's and torchjd's default; the paper tunes it,
e.g. 1e-2). A pair where either gradient is zero is skipped (no cosine, no EMA update), and
so is a ``g_i'`` that cancelled to rounding (its norm, from ``c^T M c``, below
``4 sqrt(K eps)`` times ``sum_j |c_ij| ||g_j||``: its direction is noise); LibMTL's and
torchjd's ``eps = 1e-8`` in the denominators would decay the target instead.
``1 - phi_hat^2`` is floored at 1e-12. The visiting orders are PCGrad's draw
(:func:`~gradsurgery.methods.pcgrad.visiting_keys`), one per optimizer step.

Level: the paper applies it to parameter gradients (whole model or per layer); by default
here to the representation's, ``level="params"`` for the whole-model parameter setting.
"""
from __future__ import annotations

import torch
from torch import Tensor

from ..numerics.gram import small_matmul
from .base import GramWeighting, check_option
from .pcgrad import orders_from_keys, visiting_keys
from .registry import register


@register("gradvac")
class GradVac(GramWeighting):
    """Gradient vaccine: raise each pair's cosine towards its running target."""

    state_names = ("targets",)
    subset_refusal = ("its target similarities are moving averages of every pair's cosine, updated from all pairs at "
                      "once")

    def __init__(self, beta: float = 0.5):
        self.beta = check_option("beta", beta, float, "[0, 1]")
        self.targets: Tensor | None = None

    def bind(self, num_tasks: int, *, device: torch.device, dtype: torch.dtype,
             generator: torch.Generator) -> None:
        super().bind(num_tasks, device=device, dtype=dtype, generator=generator)
        self.targets = torch.zeros(num_tasks, num_tasks, dtype=torch.float64, device=device)

    _keys: Tensor | None = None

    def prepare(self) -> None:
        """Draws this optimizer step's visiting orders (PCGrad's draw, shared by the
        micro-batches of one step) ahead of :meth:`weights`."""
        self._keys = visiting_keys(self.num_tasks, self.generator)

    def weights(self, gram: Tensor, losses: Tensor) -> Tensor:
        k = gram.shape[0]
        if self._keys is None:  # called outside the optimizer, without prepare()
            self._keys = visiting_keys(k, self.generator)
        order = orders_from_keys(self._keys, gram.device)
        m = gram.to(torch.float64)
        # ||g_i'|| from c^T M c keeps ~sqrt(eps) of its terms' size: below that, g_i' cancelled
        floor = 4 * (k * torch.finfo(gram.dtype).eps) ** 0.5
        assert self.targets is not None, "bind() creates the targets"
        targets = self.targets.to(m.device)
        coefs = torch.eye(k, dtype=m.dtype, device=m.device)
        rows = torch.arange(k, device=m.device)
        norm_j_all = m.diagonal().clamp_min(0).sqrt()
        for step in range(k - 1):
            j = order[:, step]
            dots = (coefs * m[:, j].T).sum(1)  # <g_i', g_j>
            norm_i = (small_matmul(coefs, m) * coefs).sum(1).clamp_min(0).sqrt()
            norm_j = norm_j_all[j]
            defined = (norm_i > floor * (coefs.abs() @ norm_j_all)) & (norm_j > 0)
            phi = torch.where(defined, dots / torch.where(defined, norm_i * norm_j, 1), 0).clamp(-1, 1)
            target = targets[rows, j]
            root_target = (1 - target.square()).clamp_min(1e-12).sqrt()
            shift = norm_i * (target * (1 - phi.square()).clamp_min(0).sqrt() - phi * root_target) \
                / torch.where(defined, norm_j, 1) / root_target
            coefs[rows, j] += torch.where(defined & (phi < target), shift, 0)
            targets[rows, j] = torch.where(defined, (1 - self.beta) * target + self.beta * phi, target)
        self.targets = targets
        return coefs.sum(0).to(gram.dtype)

    def after_step(self) -> None:
        self._keys = None  # one draw per optimizer step
