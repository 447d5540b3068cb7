"""Aligned-MTL: independent component alignment (Senushkin et al., "Independent Component
Alignment for Multi-Task Learning", CVPR 2023, Algorithm 1).

The task gradients are replaced by an orthogonal system with equal norms: with the
eigen-decomposition ``M = G G^T = V diag(lambda) V^T`` restricted to its rank ``r``
(eigenvalues above ``lambda_max * K * eps``, ``eps`` float32's whatever the Gram's dtype, as
the authors' ``torch.finfo()``),

.. math::  B = \\sqrt{\\lambda_{s}}\\; V_r \\operatorname{diag}(\\lambda_r)^{-1/2} V_r^\\top,
           \\qquad g = G^\\top B\\, w,\\quad w = \\mathbf 1

where ``lambda_s`` is the smallest kept eigenvalue (``scale_mode="min"``, the authors'
default), their median (``"median"``) or mean (``"rmse"``). As in the authors' code
(SamsungLabs/MTL ``code/optim/aligned/solver.py`` ``ProcrustesSolver`` and
``aligned/balancer.py``; LibMTL ``Aligned_MTL.py``) the aligned gradients are **summed**
(``w = 1``). ``pref_vector`` (torchjd's name) weights them instead: ``w = pref_vector``;
torchjd 0.18's ``AlignedMTL`` averages (``pref_vector = 1/K``). A zero Gram gives ``B = I``.
The eigen-decomposition is :func:`gradsurgery.numerics.eigh.symmetric_eigh` (LAPACK on the
CPU, Jacobi sweeps elsewhere: no host-device sync). Permutation-equivariant (without
``pref_vector``); the update is linear in the gradients' scale.

Level: the paper aligns the gradients of the shared parameters (or, in its "-UB" variant,
of the representation, as here by default); ``level="params"`` gives the former.
"""
from __future__ import annotations

from typing import Sequence

import torch
from torch import Tensor

from ..numerics.eigh import symmetric_eigh
from .base import GramWeighting
from .registry import register

SCALE_MODES = ("min", "median", "rmse")


@register("aligned_mtl")
class AlignedMTL(GramWeighting):
    """Gradients made orthogonal and of equal norm, then summed."""

    subset_safe = True

    def __init__(self, scale_mode: str = "min", pref_vector: Tensor | Sequence[float] | None = None):
        if scale_mode not in SCALE_MODES:
            raise ValueError(f"scale_mode must be one of {SCALE_MODES}, got {scale_mode!r}")
        if pref_vector is not None:
            pref_vector = torch.as_tensor(pref_vector, dtype=torch.float64)
            if pref_vector.dim() != 1 or not torch.isfinite(pref_vector).all():
                raise ValueError(f"pref_vector must be a 1-D vector of K finite weights (None: sum, the authors'), "
                                 f"got shape {tuple(pref_vector.shape)}")
            self.subset_safe = False  # one weight per task: no subsets
            self.subset_refusal = "pref_vector gives one weight per task, so all K tasks must be there"
        self.scale_mode = scale_mode
        self.pref_vector = pref_vector

    def bind(self, num_tasks: int, *, device: torch.device, dtype: torch.dtype,
             generator: torch.Generator) -> None:
        if self.pref_vector is not None and len(self.pref_vector) != num_tasks:
            raise ValueError(f"pref_vector has {len(self.pref_vector)} weights for {num_tasks} tasks; "
                             "pass one per task")
        super().bind(num_tasks, device=device, dtype=dtype, generator=generator)

    def weights(self, gram: Tensor, losses: Tensor) -> Tensor:
        k = gram.shape[0]
        eps = torch.finfo(torch.float32).eps  # the authors' torch.finfo() (default dtype)
        lam, vec = symmetric_eigh(gram.to(torch.float64))
        kept = lam > lam.max() * k * eps
        inv_sqrt = torch.where(kept, lam.clamp_min(1e-300).rsqrt(), 0)
        if self.scale_mode == "min":
            scale = torch.where(kept, lam, torch.inf).min()
        elif self.scale_mode == "median":
            scale = torch.where(kept, lam, torch.nan).nanmedian()
        else:
            scale = torch.where(kept, lam, 0).sum() / kept.sum().clamp_min(1)
        balance = scale.clamp_min(0).sqrt() * (vec * inv_sqrt) @ vec.T
        w = (torch.ones(k, dtype=torch.float64, device=gram.device) if self.pref_vector is None
             else self.pref_vector.to(gram.device))
        alpha = torch.where(kept.any(), balance @ w, w)
        return alpha.to(gram.dtype)
