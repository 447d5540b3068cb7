"""IMTL-G: the gradient half of impartial multi-task learning (Liu et al., "Towards
Impartial Multi-task Learning", ICLR 2021).

The update ``g = sum_k a_k g_k`` (``sum_k a_k = 1``) has equal projections on every task's
unit gradient ``u_k = g_k / ||g_k||``: ``<g, u_k> = const``. With the Gram
``M = G G^T`` and ``n_k = ||g_k|| = sqrt(M_kk)`` this reads ``M a = lambda n``, so

.. math::  a = \\frac{M^+ n}{\\mathbf 1^\\top M^+ n}

(the pseudo-inverse form, as in torchjd 0.18, extends the paper's closed form to linearly
dependent gradients). Weights sum to 1; when ``1^T M^+ n`` vanishes (relative to the
gradients' scale) there is no such combination and the weights are 0. Computed in float64
on the Gram normalised to unit mean diagonal, so the weights do not depend on the scale;
``M^+`` is :func:`gradsurgery.numerics.eigh.pinv_symmetric` (``torch.linalg.pinv(hermitian=True)``'s
cut-off, no host-device sync on any device).
Permutation-equivariant. No options.

Level: the paper applies it to the shared parameters' gradients; here by default to the
representation's, ``level="params"`` for the paper's setting.
"""
from __future__ import annotations

import torch
from torch import Tensor

from ..numerics.eigh import pinv_symmetric
from ..numerics.gram import norms, normalized64
from .base import Method
from .registry import register


@register("imtl_g")
class IMTLG(Method):
    """Equal projections of the update on every task's unit gradient."""

    def weights(self, gram: Tensor, losses: Tensor) -> Tensor:
        m = normalized64(gram)
        v = pinv_symmetric(m) @ norms(m)
        total = v.sum()
        ok = total.abs() > 1e-12 * v.abs().sum().clamp_min(1e-300)
        return torch.where(ok, v / torch.where(ok, total, 1), 0).to(gram.dtype)
