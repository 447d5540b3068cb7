"""CAGrad: conflict-averse gradient descent (Liu et al., "Conflict-Averse Gradient Descent
for Multi-task Learning", NeurIPS 2021, Algorithm 1).

The update maximises the worst task's improvement within a ball around the mean gradient
``g_0 = (1/K) sum_k g_k``: ``max_d min_k <g_k, d>`` s.t. ``||d - g_0|| <= c ||g_0||``.
Through its dual,

.. math::  w^* = \\arg\\min_{w \\in \\Delta^K}\\; g_w^\\top g_0 + c\\,\\|g_0\\|\\,\\|g_w\\|,
           \\qquad g_w = G^\\top w,\\qquad
           g = g_0 + \\frac{c\\,\\|g_0\\|}{\\|g_w^*\\|}\\, g_w^*

so the coefficients are ``1/K + c ||g_0|| / ||g_w|| * w``, then scaled as the authors' code
(Cranial-XIX/CAGrad, ``nyuv2/utils.py``: ``cagrad`` and ``overwrite_grad``) scales them:

.. math::  g_{\\text{authors}} = \\frac{K}{\\rho}\\,\\Big(g_0 + \\frac{c\\,\\|g_0\\|}{\\|g_w^*\\|}\\, g_w^*\\Big),
           \\qquad \\rho = 1,\\ 1 + c^2,\\ 1 + c \\quad(\\texttt{rescale} = 0, 1, 2)

Options (the authors' defaults): ``c=0.4`` (their published runs, ``run.sh --alpha 0.4``; their
argparse says 0.5); ``rescale=1`` (``g / (1 + c^2)``); ``reduction="sum"`` (the factor ``K``,
"to match the sum loss"; ``"mean"`` drops it, as the copies in nash-mtl and LibMTL do).
torchjd 0.18's CAGrad is ``rescale=0, reduction="mean"``. ``c = 0`` is the sum (the mean).
When ``g_w^*`` vanishes (0 is in the convex hull of the gradients and the dual optimum, e.g. a
zero task gradient from a batch without that task's labels) the primal optimum is not unique;
the authors' regularisers (``sqrt(w^T A w + 1e-8)``, ``c' / (||g_w|| + 1e-8)``) select
``g_0 + c' u``, ``u`` the unit direction of the other gradients' cone most against ``g_0`` (the
mean where none is against it). Ours solves that regularised problem there (on ``M + 1e-8 11^T``
with ``M`` normalised to unit mean diagonal, :data:`AUTHORS_EPS`), and the exact one elsewhere.

Solved exactly (:func:`gradsurgery.numerics.qp.cagrad_dual`) in float64 on the Gram normalised
to unit mean diagonal (the coefficients do not depend on the gradients' scale): on a support
``S`` the stationarity conditions give ``w_S = (nu p - q) / sqrt(B^2 - A (C - s^2))`` with
``p = M_SS^{-1} 1``, ``q = M_SS^{-1} a_S``, ``a = M 1/K``, ``A = 1^T p``, ``B = 1^T q``,
``C = a_S^T q``, ``s = c ||g_0||`` and
``nu = (B + sqrt(B^2 - A (C - s^2))) / A``. For ``K <= 12`` every support is tried (plus the
min-norm point, where ``g_w = 0``) and the feasible one of least objective is taken; above, a
primal active-set method (Wolfe-style: move towards the face's stationary point, drop the
weights that hit 0, add the task that violates the KKT conditions most) reaches the exact
point in ``iterations`` steps (default ``3 K + 10``). Float32 Grams are cleaned of their
rounding eigenvalues first (:func:`gradsurgery.numerics.qp.clean_psd`).

Level: the paper works on the shared parameters' gradients; by default here on the
representation's, ``level="params"`` for the paper's setting.
"""
from __future__ import annotations

import torch
from torch import Tensor

from ..numerics.gram import normalized64
from ..numerics.qp import cagrad_dual, clean_psd
from .base import GramWeighting, check_option
from .registry import register

#: The authors' regulariser of ``||g_w||^2`` and ``||g_0||^2`` and of ``||g_w||`` in ``lambda``
#: (Cranial-XIX/CAGrad ``cagrad``: ``sqrt(x^T A x + 1e-8)``, ``c / (gw_norm + 1e-8)``), applied
#: to the Gram normalised to unit mean diagonal (so the decision stays scale-invariant).
AUTHORS_EPS = 1e-8
REDUCTIONS = ("sum", "mean")


@register("cagrad")
class CAGrad(GramWeighting):
    """Conflict-averse gradient: the best worst-case direction near the mean gradient."""

    subset_safe = True

    def __init__(self, c: float = 0.4, rescale: int = 1, reduction: str = "sum", iterations: int | None = None):
        self.c = check_option("c", c, float, "[0, inf)")
        self.rescale = check_option("rescale", rescale, int, "[0, 2]",
                                    "0: none, 1: divide by 1 + c^2, the authors', 2: divide by 1 + c")
        if reduction not in REDUCTIONS:
            raise ValueError(f"reduction must be 'sum' (the authors' x K, matching sum(losses)) or 'mean', "
                             f"got {reduction!r}")
        self.reduction = reduction
        self.iterations = None if iterations is None else check_option(
            "iterations", iterations, int, "[1, inf)", "None: 3 K + 10 active-set steps for K > 12")

    def weights(self, gram: Tensor, losses: Tensor) -> Tensor:
        k = gram.shape[0]
        m = clean_psd(normalized64(gram), gram.dtype)
        mean = torch.full((k,), 1.0 / k, dtype=m.dtype, device=m.device)
        a = m @ mean
        s = self.c * (mean @ a).clamp_min(0).sqrt()
        w = cagrad_dual(m, a, s, self.iterations)
        norm_w = (w @ m @ w).clamp_min(0).sqrt()
        # g_w = 0 at the optimum: the authors' regularisers pick the direction (module docstring)
        degenerate = norm_w <= 1e-8  # both solves run: choosing one would be a host read
        m_reg = m + AUTHORS_EPS
        w_reg = cagrad_dual(m_reg, m_reg @ mean, s, self.iterations)
        norm_reg = (w_reg @ m @ w_reg).clamp_min(0).sqrt()
        w = torch.where(degenerate, w_reg, w)
        coefs = mean + torch.where(degenerate, s / (norm_reg + AUTHORS_EPS), s / norm_w.clamp_min(1e-300)) * w
        return (coefs * self._scale(k)).to(gram.dtype)

    def _scale(self, k: int) -> float:
        """The authors' factor: ``K`` (``reduction="sum"``) over ``1``, ``1 + c^2`` or ``1 + c``."""
        rho = (1.0, 1 + self.c**2, 1 + self.c)[self.rescale]
        return (k if self.reduction == "sum" else 1) / rho
