"""FairGrad: alpha-fair resource allocation among tasks (Ban & Ji, "Fair Resource
Allocation in Multi-Task Learning", ICML 2024; official code OptMN-Lab/fairgrad,
``methods/weight_methods.py``, ``FairGrad``).

The update ``g = G^T x`` gives each task the "utility" ``u_k = <g_k, g>`` of the
alpha-fair allocation, whose optimality condition is (Eq. 4)

.. math::  M x = x^{-1/\\alpha}\\quad(\\text{element-wise}),\\qquad x > 0

(``alpha = 1``: proportional fairness, Nash-MTL's condition; ``alpha -> infinity``: max-min
fairness). The condition is the stationarity condition of the strictly convex
``f(x) = x^T M x / 2 - sum_k h(x_k)`` with ``h' = x^{-1/alpha}``. It is solved in float64
by ``max_iter`` (default 100) damped Newton steps (a vectorised backtracking line search over
31 step lengths keeps ``x > 0`` and decreases ``f``, or the residual where rounding hides
``f``'s decrease), on the Gram normalised to unit mean diagonal (``M -> s M`` maps
``x -> s^{-alpha/(alpha+1)} x``), from ``x_k = t M_kk^{-alpha/(alpha+1)}`` with the best
scalar ``t`` (exact for orthogonal gradients). Measured on K = 2..6 with zero, duplicate and
conflicting rows and norms 1e-3..1e3: 15 steps reach 1e-9 for ``alpha <= 2``, 32 for
``alpha <= 5``; small ``alpha`` (a stiff ``x^{-1/alpha}``) needs more: ``alpha = 0.1`` on K = 20
rank-5 rows leaning one way took up to 50 (issue #19 item 4), hence the default 100.
On the CPU, where reading a value waits for no device, the loop stops early once the
residual is below ``tol / 1000`` (elsewhere it runs its ``max_iter`` steps, sync-free).
Then one host read checks the relative residual
``max_k |(M x)_k x_k^{1/alpha} - 1| <= tol`` (default 1e-6) and raises a
``FloatingPointError`` when no solution exists (0 in the convex hull of the gradients, e.g.
opposed gradients: a Pareto-stationary point). ``on_failure="warn"`` (opt-in) turns the error
into a ``RuntimeWarning`` and keeps the last solution (kept in ``state_dict``; before the first
one, the last Newton iterate, finite and positive, as the official code keeps
``least_squares``' last iterate), as Nash-MTL's option does. A zero task gradient has nothing to
allocate: it is left out of the system (its coefficient is 0) and the others are solved.

As the official code: the update is multiplied by ``K`` ("to match the sum loss") and
clipped to norm ``max_norm`` (default 1.0, its ``clip_grad_norm_``: ``c`` is scaled by
``min(1, max_norm / (||g|| + 1e-6))``; ``None`` disables it). LibMTL's and torchjd's
``FairGrad`` return ``x`` itself (no ``K``, no clipping): ``c / K`` with ``max_norm=None``.
``alpha`` defaults to 2.0, the official experiments' value (``run.sh`` of CelebA and QM9;
its argparse default is 1.0); ``alpha = 0`` is linear scalarisation (``x = 1/K``, as torchjd).
The heads receive their own unweighted loss gradients, as in the official code.

Level: the paper uses the shared parameters' gradients; by default here the
representation's, ``level="params"`` for the paper's setting.
"""
from __future__ import annotations

import warnings

import torch
from torch import Tensor

from ..numerics.gram import normalized64, small_matmul
from ..numerics.qp import solve_spd
from .base import GramWeighting, check_option
from .registry import register

#: Number of candidate Newton step lengths ``1, 1/2, ..., 2^-30`` the line search tries at once.
LINE_SEARCH_STEPS = 31
#: On the CPU the Newton loop stops once the residual is below this fraction of ``tol``.
EARLY_EXIT = 1e-3


@register("fairgrad")
class FairGrad(GramWeighting):
    """Alpha-fair weights: ``M x = x^(-1/alpha)``, update ``K x^T G`` clipped to ``max_norm``."""

    state_names = ("last",)

    subset_safe = True

    def __init__(self, alpha: float = 2.0, max_norm: float | None = 1.0, tol: float = 1e-6,
                 max_iter: int = 100, on_failure: str = "raise"):
        self.alpha = check_option("alpha", alpha, float, "[0, inf)")
        self.max_norm = None if max_norm is None else check_option("max_norm", max_norm, float, "(0, inf)",
                                                                   "None: no clipping")
        self.tol = check_option("tol", tol, float, "(0, inf)")
        self.max_iter = check_option("max_iter", max_iter, int, "[1, inf)")
        if on_failure not in ("raise", "warn"):
            raise ValueError(f"on_failure must be 'raise' or 'warn' (keep the last solution), got {on_failure!r}")
        self.on_failure = on_failure
        if on_failure == "warn":
            self.subset_safe = False  # the kept solution is per task: the tasks must all be there
            self.subset_refusal = ("on_failure='warn' keeps the last solution, one weight per task, so all K tasks "
                                   "must be there")

    def bind(self, num_tasks: int, *, device: torch.device, dtype: torch.dtype,
             generator: torch.Generator) -> None:
        super().bind(num_tasks, device=device, dtype=dtype, generator=generator)
        self.last = torch.zeros(0, dtype=torch.float64, device=device)  # the last solution ("warn")

    def weights(self, gram: Tensor, losses: Tensor) -> Tensor:
        k = gram.shape[0]
        m64 = gram.to(torch.float64)
        if self.alpha == 0:
            x = torch.full((k,), 1.0 / k, dtype=torch.float64, device=gram.device)
        else:
            x = self._solve(m64)
        c = k * x
        if self.max_norm is not None:
            norm = (c @ m64 @ c).clamp_min(0).sqrt()
            c = c * (self.max_norm / (norm + 1e-6)).clamp(max=1.0)
        return c.to(gram.dtype)

    def _solve(self, m64: Tensor) -> Tensor:
        """``x > 0`` with ``M x = x^(-1/alpha)`` on the tasks with a non-zero gradient, 0 elsewhere."""
        p = 1.0 / self.alpha
        m = normalized64(m64)
        scale = m64.diagonal().mean()
        active = m.diagonal() > 0
        fa = active.to(m.dtype)
        # zero gradients: the identity row, whose solution x = 1 is then dropped
        m = m * fa[:, None] * fa[None, :] + torch.diag(1 - fa)

        def measures(x: Tensor) -> tuple[Tensor, Tensor]:
            """``f(x)`` and the residual ``max_k |(M x)_k x_k^p - 1|`` of each row of ``x``."""
            mx = small_matmul(x, m)
            h = x.log() if p == 1 else x.pow(1 - p) / (1 - p)
            return 0.5 * (mx * x).sum(-1) - h.sum(-1), (mx * x.pow(p) - 1).abs().amax(-1)

        # start: x_k = t M_kk^(-1/(1+p)) (exact for orthogonal gradients), t the best scalar
        x = torch.where(active, m.diagonal(), 1.0).pow(-1 / (1 + p))
        q = x @ m @ x  # 0 when 0 is in the convex hull along x: no solution, keep t = 1
        x = x * torch.where(q > 0, x.pow(1 - p).sum() / torch.where(q > 0, q, 1), 1).pow(1 / (1 + p))
        # step lengths 1, 1/2, ..., 2^-30 and 0 (stay), built on the device: no copy
        steps = torch.cat([0.5 ** torch.arange(LINE_SEARCH_STEPS, dtype=m.dtype, device=m.device),
                           torch.zeros(1, dtype=m.dtype, device=m.device)])
        order = torch.arange(LINE_SEARCH_STEPS + 1, device=m.device)
        reads_free = m.device.type == "cpu"  # reading a value there waits for no device
        for _ in range(self.max_iter):
            grad = m @ x - x.pow(-p)
            dx = -solve_spd(m + torch.diag(p * x.pow(-p - 1)), grad.unsqueeze(-1)).squeeze(-1)
            candidates = x + steps[:, None] * dx
            inside = (candidates > 0).all(-1)
            candidates = torch.where(inside[:, None], candidates, x)
            f, r = measures(candidates)
            # the longest step that keeps x > 0 and decreases f (Armijo), or, where f's
            # rounding hides the decrease near the solution, the residual (the last row, the
            # step 0, always qualifies)
            accept = inside & ((f <= f[-1] + 1e-4 * steps * (grad @ dx)) | (r < r[-1]))
            chosen = torch.where(accept, order, LINE_SEARCH_STEPS).amin()
            x = candidates[chosen]
            if reads_free and bool(r[chosen] <= EARLY_EXIT * self.tol):
                break
        error = measures(x[None])[1][0]
        converged = bool(error <= self.tol)  # the one host read per solve
        if not converged:
            message = (f"FairGrad found no x > 0 with M x = x^(-1/alpha) in max_iter={self.max_iter} Newton "
                       f"steps (relative residual {float(error):.2e} > tol={self.tol}): either 0 is in the convex "
                       "hull of the task gradients (e.g. opposed gradients, a Pareto-stationary point), where no "
                       "alpha-fair allocation exists, or the solve needs more Newton steps (alpha far from 1, "
                       "e.g. alpha=0.1 or alpha=5, with many tasks or gradient norms orders of magnitude "
                       "apart: raise max_iter)")
            if self.on_failure == "raise":
                raise FloatingPointError(message + "; on_failure='warn' keeps the last solution")
            warnings.warn(message + "; the last solution is kept", RuntimeWarning, stacklevel=3)
            if self.last.numel() == x.numel():
                return self.last.clone()
        x = x * torch.where(scale > 0, scale, 1).pow(-self.alpha / (self.alpha + 1)) * fa
        if converged and self.on_failure == "warn":
            self.last = x.clone()
        return x
