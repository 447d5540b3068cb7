"""Nash-MTL: multi-task learning as a bargaining game (Navon et al., ICML 2022).

The update ``g = G^T alpha`` is the Nash bargaining solution among the tasks; with the
Gram ``M = G G^T`` its weights solve the bargaining condition

.. math::  M \\alpha = 1 / \\alpha \\quad(\\text{element-wise}),\\qquad \\alpha > 0,

i.e. ``<g_k, g> = 1 / alpha_k`` for every task, hence ``||g||^2 = sum_k alpha_k <g_k, g> = K``
whatever the gradients' scale. As in the paper's code (and torchjd 0.18) the system is solved
on ``M / ||M||_F`` and the solution rescaled by ``||M||_F^{-1/2}``.

The condition is the stationarity condition of the strictly convex
``f(alpha) = alpha^T M alpha / 2 - sum_k log alpha_k``; it is solved in pure torch
(float64) by damped Newton steps (a vectorised backtracking line search that keeps
``alpha > 0``), warm-started from the previous solution, until the relative residual
``max_k |alpha_k (M alpha)_k - 1| <= tol`` (default 1e-6: float64 Newton stalls near
``cond(M) * 1e-16``, which reaches 1e-8 on ill-conditioned Grams). Checked every 10 iterations
(one host read each); if ``max_iter`` iterations do not reach ``tol`` a
``FloatingPointError`` is raised — that happens when no solution exists, e.g. a zero task
gradient or gradients with 0 in their convex hull — and no old weights are reused
silently. The paper's other options: ``update_weights_every`` (default 1) solves only
every that many steps and reuses the weights in between (as the paper does, by request);
``max_norm`` (default ``None``: no clipping) scales ``alpha`` down so that
``||g|| <= max_norm``, the paper code's clipping (torchjd's default is 1.0).

Level: the paper uses the shared parameters' gradients (and reports a representation-level
variant as faster but worse on QM9); by default here the representation's,
``level="params"`` for the paper's setting.
"""
from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

from ..linalg import small_matmul
from .base import Method
from .registry import register

#: Candidate Newton step lengths tried at once by the line search.
_STEPS = 0.5 ** torch.arange(31, dtype=torch.float64)


@register("nash_mtl")
class NashMTL(Method):
    """Nash bargaining weights ``M alpha = 1 / alpha``."""

    def __init__(self, update_weights_every: int = 1, max_norm: float | None = None,
                 tol: float = 1e-6, max_iter: int = 100):
        for name, value in (("update_weights_every", update_weights_every), ("max_iter", max_iter)):
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"{name} must be an integer >= 1, got {value!r}")
        if max_norm is not None and not max_norm > 0:
            raise ValueError(f"max_norm must be > 0 or None (no clipping), got {max_norm!r}")
        if not tol > 0:
            raise ValueError(f"tol must be > 0, got {tol!r}")
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
        if self.max_norm is not None:
            norm = (alpha @ gram @ alpha).clamp_min(0).sqrt()
            alpha = alpha * torch.clamp(self.max_norm / norm.clamp_min(1e-300), max=1.0)
        return alpha

    def _solve(self, gram: Tensor) -> Tensor:
        m = gram.to(torch.float64)
        root = torch.linalg.matrix_norm(m).clamp_min(1e-300).sqrt()
        m = m / root.square()
        alpha = self.alpha.to(m) * root if self.alpha is not None else m.diagonal().clamp_min(1e-300).rsqrt()
        steps = _STEPS.to(m.device)
        residual = torch.inf
        for it in range(1, self.max_iter + 1):
            ma = m @ alpha
            grad = ma - 1 / alpha
            hess = m + torch.diag(alpha.pow(-2))
            delta = -torch.linalg.solve_ex(hess, grad)[0]
            trial = alpha + steps[:, None] * delta
            positive = (trial > 0).all(-1)
            f0 = 0.5 * alpha @ ma - alpha.log().sum()
            ft = 0.5 * (small_matmul(trial, m) * trial).sum(-1) - trial.clamp_min(1e-300).log().sum(-1)
            armijo = positive & (ft <= f0 + 1e-4 * steps * (grad @ delta))
            first = torch.where(armijo, torch.arange(len(steps), device=m.device), len(steps)).min()
            chosen = trial.index_select(0, first.clamp(max=len(steps) - 1).reshape(1))[0]  # no host read
            alpha = torch.where(first < len(steps), chosen, alpha)
            if it % 10 == 0 or it == self.max_iter:
                residual = float((alpha * (m @ alpha) - 1).abs().max())
                if residual <= self.tol:
                    return alpha / root
        raise FloatingPointError(
            f"Nash-MTL's bargaining solver did not converge in {self.max_iter} iterations (relative "
            f"residual {residual:.2e} > tol={self.tol:g}): the bargaining problem has no solution "
            "for these gradients (a zero task gradient, or gradients with 0 in their convex hull). "
            "Nothing was reused; raise max_iter/tol or drop the degenerate task.")

    def state_dict(self) -> dict[str, Any]:
        return {"step": self.step, "alpha": None if self.alpha is None else self.alpha.clone()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.step = int(state["step"])
        self.alpha = None if state["alpha"] is None else state["alpha"].clone()

    def extra_repr(self) -> str:
        return (f"update_weights_every={self.update_weights_every}, max_norm={self.max_norm}, "
                f"tol={self.tol:g}")
