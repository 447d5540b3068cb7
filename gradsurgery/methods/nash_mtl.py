"""Nash-MTL: multi-task learning as a bargaining game (Navon et al., ICML 2022).

The update ``g = G^T alpha`` is the Nash bargaining solution among the tasks; with the
Gram ``M = G G^T`` its weights solve the bargaining condition

.. math::  M \\alpha = 1 / \\alpha \\quad(\\text{element-wise}),\\qquad \\alpha > 0,

i.e. ``<g_k, g> = 1 / alpha_k`` for every task, hence ``||g||^2 = sum_k alpha_k <g_k, g> = K``
whatever the gradients' scale. As in the paper's code (and torchjd 0.18) the system is solved
on ``M / ||M||_F`` and the solution rescaled by ``||M||_F^{-1/2}``.

The condition is the stationarity condition of the strictly convex
``f(alpha) = alpha^T M alpha / 2 - sum_k log alpha_k``; it is solved in pure torch
(float64) by a fixed budget of ``max_iter`` damped Newton steps (default 10; a vectorised
backtracking line search over 31 step lengths keeps ``alpha > 0``), as tensor ops. The start
is the previous solution (the first time, ``alpha_k = 1 / ||g_k||``), rescaled so that
``alpha^T M alpha = K`` as at the solution: exact for orthogonal and for collinear
gradients, and it brings every Gram measured (random, conflicting, nearly collinear,
norms 1e-3..1e3, K = 2..32) to the tolerance within 6 steps, warm or cold (one of 400
extreme draws, K = 10 gradients in 8 dimensions with condition 1e9, needed 12: raise
``max_iter`` for such). Then **one** host
read per solve checks the relative residual ``max_k |alpha_k (M alpha)_k - 1| <= tol``
(default 1e-6: float64 Newton stalls near ``cond(M) * 1e-16``, which reaches 1e-8 on
ill-conditioned Grams); above it a ``FloatingPointError`` is raised — that happens when no
solution exists, e.g. a zero task gradient or gradients with 0 in their convex hull — and no
old weights are reused silently. (The design requires that error, and raising needs the
read: Nash-MTL is the one built-in method with a host read per solve; steps that reuse the
weights read nothing.)

``on_failure="warn"`` (opt-in) turns that error into a ``RuntimeWarning`` and keeps the
last solution (the start point, ``alpha_k = 1 / ||g_k||``, if none converged yet): for
training that reaches a Pareto-stationary point, where the task gradients become exactly
opposed and the bargaining problem stops having a solution (the 2-D toy shows it).

The authors' other options (AvivNavon/nash-mtl, ``methods/weight_methods.py``, ``NashMTL``),
with their defaults: ``update_weights_every=1`` solves only every that many steps and reuses
the weights in between; ``max_norm=1.0`` scales ``alpha`` down so that ``||g|| <= max_norm``
(their ``clip_grad_norm_`` of the shared parameters' gradient after ``sum_k alpha_k L_k`` was
backpropagated; ``None`` turns it off: ``||g|| = sqrt(K)``, torchjd's ``max_norm=0``).
``weight_heads=True`` is their backward too: each head receives ``alpha_k dL_k`` (here the
clipped coefficient; theirs clips the shared parameters only); by default each head gets its
own unweighted loss gradient.

Level: the paper uses the shared parameters' gradients (and reports a representation-level
variant as faster but worse on QM9); by default here the representation's,
``level="params"`` for the paper's setting.
"""
from __future__ import annotations

import warnings
from typing import Any

import torch
from torch import Tensor

from ..numerics.cuda_graphs import replay
from ..numerics.gram import small_matmul
from .base import GramWeighting
from .registry import register

#: Number of candidate Newton step lengths ``1, 1/2, ..., 2^-30`` the line search tries at once.
LINE_SEARCH_STEPS = 31


@register("nash_mtl")
class NashMTL(GramWeighting):
    """Nash bargaining weights ``M alpha = 1 / alpha``."""

    subset_refusal = ("its bargaining solution alpha (one per task) continues from the last step's, over all tasks")

    def __init__(self, update_weights_every: int = 1, max_norm: float | None = 1.0,
                 tol: float = 1e-6, max_iter: int = 10, on_failure: str = "raise", weight_heads: bool = False):
        for name, value in (("update_weights_every", update_weights_every), ("max_iter", max_iter)):
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"{name} must be an integer >= 1, got {value!r}")
        if max_norm is not None and not max_norm > 0:
            raise ValueError(f"max_norm must be > 0 or None (no clipping), got {max_norm!r}")
        if not tol > 0:
            raise ValueError(f"tol must be > 0, got {tol!r}")
        if not isinstance(weight_heads, bool):
            raise ValueError(f"weight_heads must be True (heads get alpha_k dL_k, the authors' code) or False, "
                             f"got {weight_heads!r}")
        if on_failure not in ("raise", "warn"):
            raise ValueError(f"on_failure must be 'raise' or 'warn' (keep the last solution), got {on_failure!r}")
        self.on_failure = on_failure
        self.weights_heads = weight_heads
        self.update_weights_every = update_weights_every
        self.max_norm = None if max_norm is None else float(max_norm)
        self.tol = float(tol)
        self.max_iter = max_iter
        self.step = 0
        self.alpha: Tensor | None = None

    def weights(self, gram: Tensor, losses: Tensor) -> Tensor:
        if self.alpha is None or self.step % self.update_weights_every == 0:
            self.alpha = self._solve(gram)
        self.step += 1
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

    def state_dict(self) -> dict[str, Any]:
        return {"step": self.step, "alpha": None if self.alpha is None else self.alpha.clone()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.step = int(state["step"])
        self.alpha = None if state["alpha"] is None else state["alpha"].clone()

    def extra_repr(self) -> str:
        return (f"update_weights_every={self.update_weights_every}, max_norm={self.max_norm}, "
                f"tol={self.tol:g}, max_iter={self.max_iter}, on_failure={self.on_failure!r}, "
                f"weight_heads={self.weights_heads}")


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
