"""UPGrad: unconflicting projection of gradients (Quinton & Rey, "Jacobian Descent for
Multi-Objective Optimization", 2024, arXiv 2406.16232; the authors' code is torchjd,
``aggregation/_upgrad.py``, ``UPGradWeighting``).

Each task gradient, weighted by the preference ``u_i`` (``pref_vector``, default ``1/K``),
is projected onto the dual cone of all task gradients,
``C = {y : <g_k, y> >= 0 for all k}``, and the projections are added:

.. math::  g = \\sum_i \\pi_C(u_i g_i) = G^\\top w,\\qquad
           w = \\sum_i v_i,\\quad v_i = \\arg\\min_{v \\ge u_i e_i} v^\\top M v

(torchjd's scale: with ``u = 1/K``, the *mean* of the projections). By default the
projection is exact (:func:`gradsurgery.numerics.qp.project_dual_cone`, no regularisation of
``M``), so ``<g_k, g> >= 0`` for every task to rounding. torchjd's default projector solves
the same problem on ``M / tr(M) + reg_eps I`` (``M`` replaced by 0 when ``tr(M) < norm_eps``,
both 1e-4 there): ``norm_eps=1e-4, reg_eps=1e-4`` reproduce it (the regulariser keeps its
QP solver's matrix positive definite; ours needs none). Permutation-equivariant and
positively homogeneous when ``norm_eps = reg_eps = 0``.

Level: defined on any matrix of gradients; representation level by default,
``level="params"`` for the paper's Jacobian descent on the shared parameters.
"""
from __future__ import annotations

from typing import Sequence

import torch
from torch import Tensor

from ..numerics.qp import project_dual_cone
from .base import GramWeighting, check_option
from .registry import register


@register("upgrad")
class UPGrad(GramWeighting):
    """Sum of the preference-weighted task gradients' projections onto their dual cone."""

    subset_safe = True

    def __init__(self, pref_vector: Sequence[float] | Tensor | None = None, norm_eps: float = 0.0,
                 reg_eps: float = 0.0):
        self.norm_eps = check_option("norm_eps", norm_eps, float, "[0, inf)", "torchjd's default is 1e-4")
        self.reg_eps = check_option("reg_eps", reg_eps, float, "[0, inf)", "torchjd's default is 1e-4")
        self.pref_vector = None
        if pref_vector is not None:
            pref = torch.as_tensor(pref_vector, dtype=torch.float64).detach().clone()
            if pref.dim() != 1 or not bool(torch.isfinite(pref).all()) or bool((pref < 0).any()):
                raise ValueError("pref_vector must be one finite weight >= 0 per task, "
                                 f"got {pref_vector!r}")
            self.pref_vector = pref
            self.subset_safe = False  # one preference per task: the tasks must all be there
            self.subset_refusal = "pref_vector gives one preference per task, so all K tasks must be there"

    def bind(self, num_tasks: int, *, device: torch.device, dtype: torch.dtype,
             generator: torch.Generator) -> None:
        super().bind(num_tasks, device=device, dtype=dtype, generator=generator)
        if self.pref_vector is not None and self.pref_vector.numel() != num_tasks:
            raise ValueError(f"pref_vector has {self.pref_vector.numel()} entries but num_tasks={num_tasks}")

    def preferences(self, gram: Tensor) -> Tensor:
        """``u``: ``pref_vector``, or ``1/K`` for the ``K`` tasks of ``gram``."""
        k = gram.shape[0]
        if self.pref_vector is None:
            return torch.full((k,), 1.0 / k, dtype=gram.dtype, device=gram.device)
        return self.pref_vector.to(gram.device, gram.dtype)

    def regularized(self, gram: Tensor) -> Tensor:
        """torchjd's ``M / tr(M) + reg_eps I`` (0 for ``tr(M) < norm_eps``); ``M`` itself
        when both are 0."""
        if self.norm_eps == 0 and self.reg_eps == 0:
            return gram
        trace = gram.diagonal().sum()
        m = torch.where(trace < self.norm_eps, 0, gram / torch.where(trace > 0, trace, 1))
        return m + self.reg_eps * torch.eye(gram.shape[0], dtype=gram.dtype, device=gram.device)

    def project(self, gram: Tensor, u: Tensor) -> Tensor:
        """``v = argmin_{v >= u} v^T M v`` for each row of ``u``, on the (regularised) Gram
        (:func:`~gradsurgery.numerics.qp.project_dual_cone`, exact and scale-robust)."""
        return project_dual_cone(self.regularized(gram), u)

    def weights(self, gram: Tensor, losses: Tensor) -> Tensor:
        return self.project(gram, torch.diag(self.preferences(gram))).sum(0)
