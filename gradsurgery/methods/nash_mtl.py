"""Nash-MTL: multi-task learning as a bargaining game (Navon et al., ICML 2022; card:
docs/methods/nash_mtl.md).

With the Gram ``M = G G^T`` the weights solve the bargaining condition

.. math::  M \\alpha = 1 / \\alpha \\quad(\\text{element-wise}),\\qquad \\alpha > 0,

so ``<g_k, g> = 1 / alpha_k`` and ``||g||^2 = K`` for ``g = G^T alpha``; then ``alpha`` is
scaled down so that ``||g|| <= max_norm`` (the authors' clip). The condition is the
stationarity of the strictly convex ``alpha^T M alpha / 2 - sum_k log alpha_k``, solved on
``M / ||M||_F`` by ``max_iter`` damped Newton steps from the previous solution; one host read
per solve checks the residual against ``tol`` and raises (``on_failure="warn"``: warns and
keeps the last solution) when no solution exists. ``update_weights_every`` reuses the weights
in between; ``weight_heads=True`` gives each head ``alpha_k dL_k``, as the authors' backward.
"""
from __future__ import annotations

import warnings

import torch
from torch import Tensor

from ..numerics.cuda_graphs import replay
from ..numerics.gram import small_matmul
from .base import GramWeighting, check_option
from .registry import register

#: Number of candidate Newton step lengths ``1, 1/2, ..., 2^-30`` the line search tries at once.
LINE_SEARCH_STEPS = 31


@register("nash_mtl")
class NashMTL(GramWeighting):
    """Nash bargaining weights ``M alpha = 1 / alpha``."""

    state_names = ("decisions", "alpha")
    legacy_state_names = {"step": "decisions"}  # 0.1.0's keys
    subset_refusal = ("its bargaining solution alpha (one per task) continues from the last step's, over all tasks")

    def __init__(self, update_weights_every: int = 1, max_norm: float | None = 1.0,
                 tol: float = 1e-6, max_iter: int = 10, on_failure: str = "raise", weight_heads: bool = False):
        if on_failure not in ("raise", "warn"):
            raise ValueError(f"on_failure must be 'raise' or 'warn' (keep the last solution), got {on_failure!r}")
        self.update_weights_every = check_option("update_weights_every", update_weights_every, int, "[1, inf)")
        self.max_norm = None if max_norm is None else check_option("max_norm", max_norm, float, "(0, inf)",
                                                                   "None: no clipping")
        self.tol = check_option("tol", tol, float, "(0, inf)")
        self.max_iter = check_option("max_iter", max_iter, int, "[1, inf)")
        self.on_failure = on_failure
        self.weight_heads = check_option("weight_heads", weight_heads, bool,
                                         what="True: heads get alpha_k dL_k, the authors' code")
        self.decisions = 0  # weights() calls so far: a new solve every update_weights_every
        self.alpha: Tensor | None = None

    def weights(self, gram: Tensor, losses: Tensor) -> Tensor:
        if self.alpha is None or self.decisions % self.update_weights_every == 0:
            self.alpha = self._solve(gram)
        self.decisions += 1
        alpha = self.alpha.to(gram.dtype)
        self._heads = alpha  # the heads get the unclipped alpha (the authors' backward of sum_k alpha_k L_k)
        if self.max_norm is not None:
            norm = (alpha @ gram @ alpha).clamp_min(0).sqrt()
            alpha = alpha * torch.clamp(self.max_norm / norm.clamp_min(1e-300), max=1.0)
        return alpha

    def head_weights(self, coefficients: Tensor) -> Tensor:
        return self._heads

    def _solve(self, gram: Tensor) -> Tensor:
        m = gram.to(torch.float64)
        root = torch.linalg.matrix_norm(m).clamp_min(1e-300).sqrt()
        m = m / root.square()
        start = self.alpha.to(m) * root if self.alpha is not None else m.diagonal().clamp_min(1e-300).rsqrt()
        start = start * (len(start) / (start @ m @ start).clamp_min(1e-300)).sqrt()
        alpha, = replay(_newton, m, start, iterations=self.max_iter)
        residual = float((alpha * (m @ alpha) - 1).abs().max())  # the one host read of a solve
        if residual <= self.tol:
            return alpha / root
        message = (f"Nash-MTL's bargaining solver did not converge in {self.max_iter} Newton steps (relative "
                   f"residual {residual:.2e} > tol={self.tol:g}): the bargaining problem has no solution "
                   "for these gradients (a zero task gradient, or gradients with 0 in their convex hull)")
        if self.on_failure == "raise":
            raise FloatingPointError(f"{message}. Nothing was reused; raise max_iter/tol, drop the degenerate "
                                     "task, or pass on_failure='warn' to keep the last solution")
        warnings.warn(f"{message}; keeping the last solution (on_failure='warn')", RuntimeWarning, stacklevel=2)
        return self.alpha if self.alpha is not None else m.diagonal().clamp_min(1e-300).rsqrt() / root

def _newton(m: Tensor, alpha: Tensor, *, iterations: int) -> tuple[Tensor]:
    """``iterations`` damped Newton steps on ``f(alpha) = alpha^T M alpha / 2 - sum log alpha``
    from ``alpha > 0``: a branch-free tensor program (one CUDA graph through
    :func:`gradsurgery.numerics.cuda_graphs.replay`). The backtracking line search tries every step length
    ``2^-s`` at once and takes the longest that keeps ``alpha > 0`` and meets Armijo's
    condition (none: ``alpha`` stays)."""
    index = torch.arange(LINE_SEARCH_STEPS, device=m.device)
    steps = 0.5 ** index.to(m.dtype)  # built on the device: no host-to-device copy
    for _ in range(iterations):
        ma = m @ alpha
        grad = ma - 1 / alpha
        hess = m + torch.diag(alpha.pow(-2))
        delta = -torch.linalg.solve_ex(hess, grad)[0]
        trial = alpha + steps[:, None] * delta
        positive = (trial > 0).all(-1)
        f0 = 0.5 * alpha @ ma - alpha.log().sum()
        ft = 0.5 * (small_matmul(trial, m) * trial).sum(-1) - trial.clamp_min(1e-300).log().sum(-1)
        armijo = positive & (ft <= f0 + 1e-4 * steps * (grad @ delta))
        first = torch.where(armijo, index, LINE_SEARCH_STEPS).min()
        chosen = trial.index_select(0, first.clamp(max=LINE_SEARCH_STEPS - 1).reshape(1))[0]  # no host read
        alpha = torch.where(first < LINE_SEARCH_STEPS, chosen, alpha)
    return (alpha,)
