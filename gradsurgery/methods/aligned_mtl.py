"""Aligned-MTL: independent component alignment (Senushkin et al., "Independent Component
Alignment for Multi-Task Learning", CVPR 2023, Algorithm 1).

The task gradients are replaced by an orthogonal system with equal norms: with the
eigen-decomposition ``M = G G^T = V diag(lambda) V^T`` restricted to its rank ``r``
(eigenvalues above ``lambda_max * K * eps`` of the Gram's dtype),

.. math::  B = \\sqrt{\\lambda_{s}}\\; V_r \\operatorname{diag}(\\lambda_r)^{-1/2} V_r^\\top,
           \\qquad g = G^\\top B\\, w,\\quad w = \\mathbf 1 / K

where ``lambda_s`` is the smallest kept eigenvalue (``scale_mode="min"``, the paper's
choice and the default), their median (``"median"``) or mean (``"rmse"``, the original
code's). A zero Gram gives ``B = I``. The eigen-decomposition is
:func:`gradsurgery.numerics.eigh.symmetric_eigh` (LAPACK on the CPU, Jacobi sweeps elsewhere:
no host-device sync). Same scale and options as torchjd 0.18's
``AlignedMTL``. Permutation-equivariant; the update is linear in the gradients' scale.

Level: the paper aligns the gradients of the shared parameters (or, in its "-UB" variant,
of the representation, as here by default); ``level="params"`` gives the former.
"""
from __future__ import annotations

import torch
from torch import Tensor

from ..numerics.eigh import symmetric_eigh
from .base import Method
from .registry import register

SCALE_MODES = ("min", "median", "rmse")


@register("aligned_mtl")
class AlignedMTL(Method):
    """Gradients made orthogonal and of equal norm, then averaged."""

    def __init__(self, scale_mode: str = "min"):
        if scale_mode not in SCALE_MODES:
            raise ValueError(f"scale_mode must be one of {SCALE_MODES}, got {scale_mode!r}")
        self.scale_mode = scale_mode

    def weights(self, gram: Tensor, losses: Tensor) -> Tensor:
        k = gram.shape[0]
        eps = torch.finfo(gram.dtype).eps
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
        w = torch.full((k,), 1.0 / k, dtype=torch.float64, device=gram.device)
        alpha = torch.where(kept.any(), balance @ w, w)
        return alpha.to(gram.dtype)

    def extra_repr(self) -> str:
        return f"scale_mode={self.scale_mode!r}"
