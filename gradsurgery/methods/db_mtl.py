"""DB-MTL: dual-balancing multi-task learning (Lin et al., "Dual-Balancing for Multi-Task
Learning", arXiv 2308.12029, 2023), as the authors' code computes it
(median-research-group/LibMTL, ``LibMTL/weighting/DB_MTL.py``, ``DB_MTL.backward``).

Loss-scale balancing: every task is trained on ``log(L_k + eps)`` — its loss weighted by
``1 / (L_k + eps)`` (``eps`` 1e-8), heads and backbone alike. Gradient-magnitude balancing
on an exponential moving average of the (log-loss) task gradients ``g_k``: at step
``t = 1, 2, ...``, from ``b = 0`` (no bias correction, as the authors),

.. math::  b \\leftarrow g + \\frac{\\beta}{t^{\\sigma}} (b - g),\\qquad
           g_{shared} = \\sum_k \\frac{\\max_j \\|b_j\\|}{\\|b_k\\| + 10^{-8}}\\, b_k

with ``beta`` (default 0.9) and ``beta_sigma`` = ``sigma`` (default 0): LibMTL's
``config.py`` defaults. The first step is thus ``1 - beta`` times the ``beta = 0`` step.

Level: ``level="params"`` is the authors' setting (their code refuses representation
gradients): ``b`` is the ``K x P`` average of the parameter gradients. At the
representation level the coordinates of ``dL_k/dz`` belong to the batch's samples and do
not persist from one batch to the next, so the average is taken of what persists, each
task's gradient norm: ``m <- ||g|| + beta / t^sigma (m - ||g||)`` from ``m = 0``, and
``g_shared = sum_k max_j m_j / (m_k + 1e-8) g_k`` with the current batch's gradients.
``beta=0`` gives the balancing of the current gradients at either level.
"""
from __future__ import annotations

import torch
from torch import Tensor

from ..numerics.gram import compute_dtype
from .base import ElementWise, check_option
from .registry import register

#: The authors' floor of the norms in the scale ratios.
NORM_EPS = 1e-8


@register("db_mtl")
class DBMTL(ElementWise):
    """Log-loss weighting plus moving-averaged gradients equalised to the largest norm."""

    state_names = ("step", "average")
    subset_refusal = ("it scales every task's moving-average gradient to the largest of all K, with one step count "
                      "for their bias")

    def __init__(self, beta: float = 0.9, beta_sigma: float = 0.0, eps: float = 1e-8):
        self.beta = check_option("beta", beta, float, "[0, 1)", "the moving average's decay")
        self.beta_sigma = check_option("beta_sigma", beta_sigma, float, "[0, inf)",
                                       "the decay's schedule beta / t**beta_sigma")
        self.eps = check_option("eps", eps, float, "[0, inf)")
        self.step = 0
        self.average: Tensor | None = None  # K x P gradients (params level) or K norms (rep level)

    def loss_weights(self, losses: Tensor) -> Tensor:
        return 1 / (losses + self.eps)

    def combine(self, grads: Tensor, losses: Tensor, rep: Tensor | None) -> Tensor:
        dtype = compute_dtype(grads.dtype)
        flat = grads.reshape(grads.shape[0], -1).to(dtype)
        current = flat if rep is None else flat.norm(dim=1)
        if self.average is not None and self.average.shape != current.shape:
            raise ValueError(f"db_mtl's moving average has shape {tuple(self.average.shape)} but this step's "
                             f"is {tuple(current.shape)}: the level or the shared parameters changed; "
                             "build a new optimizer (or load a matching state)")
        self.step += 1
        decay = self.beta / self.step ** self.beta_sigma
        average = torch.zeros_like(current) if self.average is None else self.average.to(current)
        self.average = current + decay * (average - current)
        if rep is None:
            scale = self.average.norm(dim=1)
            combined = (scale.max() / (scale + NORM_EPS)) @ self.average
        else:
            combined = (self.average.max() / (self.average + NORM_EPS)) @ flat
        return combined.view(grads.shape[1:]).to(grads.dtype)
