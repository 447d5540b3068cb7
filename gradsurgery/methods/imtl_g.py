"""IMTL-G: the gradient half of impartial multi-task learning (Liu et al., "Towards
Impartial Multi-task Learning", ICLR 2021).

The update ``g = sum_k a_k g_k`` (``sum_k a_k = 1``) has equal projections on every task's
unit gradient ``u_k = g_k / ||g_k||``: ``<g, u_k> = lambda``. With the Gram ``M = G G^T`` and
``n_k = ||g_k|| = sqrt(M_kk)`` this reads ``M a = lambda n``. The authors' closed form
(LibMTL ``IMTL.py``; the paper's Eq.) eliminates ``a_1 = 1 - sum_{k>1} a_k``:
``a_{2..K} = g_1 U^T (D U^T)^{-1}``, ``D = g_1 - g_{2..K}``, ``U = u_1 - u_{2..K}``. Here

.. math::  a = \\frac{M^+ n}{\\mathbf 1^\\top M^+ n}\\quad\\text{if } M M^+ n = n,
           \\qquad\\text{else } g = 0

which is the same point wherever the closed form exists, and extends it to linearly
dependent gradients (duplicate rows: torchjd 0.18's pseudo-inverse form). When ``n`` is not
in the range of ``M`` (e.g. two exactly opposed gradients) only ``lambda = 0`` solves the
condition, hence ``g = 0``: the authors' closed form gives that too, where torchjd returns
rounding noise blown up (coefficients 0 here). A zero task gradient (the authors' code: NaN)
leaves the others' equal-projection point. When ``1^T M^+ n`` vanishes (relative to ``M^+ n``)
there is no such combination either and the coefficients are 0. Computed in float64 on the
Gram normalised to unit mean diagonal, so the weights do not depend on the scale; ``M^+`` is
:func:`gradsurgery.numerics.eigh.pinv_symmetric` (``torch.linalg.pinv(hermitian=True)``'s
cut-off, no host-device sync on any device). Permutation-equivariant. No options.

Level: the paper applies it to the shared parameters' gradients; here by default to the
representation's, ``level="params"`` for the paper's setting. The full method (with the
learned loss scales, IMTL-L) is ``imtl``.
"""
from __future__ import annotations

import torch
from torch import Tensor

from ..numerics.eigh import pinv_symmetric
from ..numerics.gram import normalized64, norms
from ..numerics.qp import clean_psd
from .base import GramWeighting
from .registry import register

#: Relative residual ``||M M^+ n - n|| / ||n||`` above which ``n`` is out of ``M``'s range
#: (measured: below 1e-9 for in-range cases, norms six orders apart included; 0.36-1 when out).
RANGE_TOL = 1e-6


def equal_projection_weights(gram: Tensor) -> Tensor:
    """The IMTL-G coefficients for the Gram ``gram`` (see the module docstring), decided on
    the Gram whose eigenvalues that ``gram``'s precision cannot tell from 0 are 0
    (:func:`~gradsurgery.numerics.qp.clean_psd` on the unit-diagonal copy): a float32 Gram of
    rank-deficient gradients otherwise keeps rounding-sized eigenvalues that the float64
    pseudo-inverse inverts, and the decision moves with the gradients' scale."""
    m = normalized64(gram)
    d = m.diagonal().clamp_min(0).sqrt()
    outer = torch.outer(torch.where(d > 0, d, 1), torch.where(d > 0, d, 1))
    m = clean_psd(m / outer, gram.dtype) * outer
    n = norms(m)
    v = pinv_symmetric(m) @ n
    total = v.sum()
    in_range = (m @ v - n).norm() <= RANGE_TOL * n.norm()
    ok = in_range & (total.abs() > 1e-12 * v.abs().sum().clamp_min(1e-300))
    return torch.where(ok, v / torch.where(ok, total, 1), 0).to(gram.dtype)


@register("imtl_g")
class IMTLG(GramWeighting):
    """Equal projections of the update on every task's unit gradient."""

    subset_safe = True

    def weights(self, gram: Tensor, losses: Tensor) -> Tensor:
        return equal_projection_weights(gram)
