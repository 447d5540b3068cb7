"""Krum and Multi-Krum (Blanchard et al., "Machine Learning with Adversaries: Byzantine
Tolerant Gradient Descent", NeurIPS 2017; torchjd's ``Krum``).

With ``f = n_byzantine`` tasks that may be adversarial, each task ``i`` is scored by its
distances to its ``K - f - 2`` nearest other task gradients,

.. math::  s(i) = \\sum_{i \\to j} \\|g_i - g_j\\|^2,\\qquad
           \\|g_i - g_j\\|^2 = M_{ii} + M_{jj} - 2 M_{ij}

and the update is the mean of the ``n_selected`` task gradients of lowest score (Krum:
``n_selected = 1``; Multi-Krum above): ``c_k = 1 / n_selected`` on those, 0 elsewhere. The
distances are read off the Gram (float64). ``squared=True`` (default) is the paper's
score; ``squared=False`` sums the distances themselves, as torchjd 0.18 does. Tasks whose
scores tie exactly at the cut (e.g. the two closest gradients when ``K - f - 2 = 1``, as
for ``K = 3`` with the defaults: each one's score is their distance) share the remaining
places equally -- the mean over every way of breaking the tie, where the paper picks one --
so the update does not depend on the order of the tasks. Needs ``K >= n_byzantine + 3`` and ``K >= n_selected`` (checked
when the method is bound). Defaults: ``n_byzantine=0`` (torchjd has no default),
``n_selected=1``. Scale-invariant: ``c`` does not change when every gradient is scaled by
the same factor. Level: any matrix of gradients; representation level by default.
"""
from __future__ import annotations

import torch
from torch import Tensor

from .base import GramWeighting, check_option
from .registry import register


@register("krum")
class Krum(GramWeighting):
    """Mean of the ``n_selected`` task gradients closest to their ``K - f - 2`` neighbours."""

    subset_safe = True

    def __init__(self, n_byzantine: int = 0, n_selected: int = 1, squared: bool = True):
        self.n_byzantine = check_option("n_byzantine", n_byzantine, int, "[0, inf)")
        self.n_selected = check_option("n_selected", n_selected, int, "[1, inf)")
        self.squared = check_option("squared", squared, bool,
                                    what="True: the paper's squared distances, False: torchjd's")

    def bind(self, num_tasks: int, *, device: torch.device, dtype: torch.dtype,
             generator: torch.Generator) -> None:
        self._check(num_tasks)
        super().bind(num_tasks, device=device, dtype=dtype, generator=generator)

    def _check(self, num_tasks: int) -> None:
        if num_tasks < self.n_byzantine + 3:
            raise ValueError(f"Krum with n_byzantine={self.n_byzantine} needs at least {self.n_byzantine + 3} "
                             f"tasks (n_byzantine + 3), got {num_tasks}; lower n_byzantine")
        if num_tasks < self.n_selected:
            raise ValueError(f"n_selected={self.n_selected} exceeds the number of tasks ({num_tasks})")

    def weights(self, gram: Tensor, losses: Tensor) -> Tensor:
        k = gram.shape[0]
        self._check(k)  # a step with absent tasks sees fewer
        m = gram.to(torch.float64)
        sq = m.diagonal()
        distances = (sq[:, None] + sq[None, :] - (m + m.T)).clamp_min(0)  # exactly symmetric: ties are exact
        if not self.squared:
            distances = distances.sqrt()
        # column 0 of each sorted row is a zero distance (the task itself, or a duplicate)
        nearest = distances.sort(1).values[:, 1:k - self.n_byzantine - 1]
        scores = nearest.sum(1)
        # the n_selected lowest scores; the tasks tied at the cut share its remaining places
        # (the mean over every way of breaking the tie)
        n = self.n_selected
        cut = scores.sort().values[n - 1]
        below, tied = scores < cut, scores == cut
        share = (n - below.sum()).to(m.dtype) / (tied.sum() * n)
        return torch.where(below, 1.0 / n, torch.where(tied, share, 0.0)).to(gram.dtype)
