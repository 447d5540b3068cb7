"""PCD: priority-constrained descent ("Not All Objectives Are Born Equal:
Priority-Constrained Descent for Hierarchical Multi-Objective Optimization", TMLR 2026,
arXiv 2606.29521; torchjd 0.18's ``PCD``, the reference here).

Task 0 is the primary objective, tasks ``1..K-1`` secondary ones. With each gradient
normalised by a running estimate of its norm, ``~g_i = s_i g_i``,

.. math::  \\tilde d = \\arg\\min_d \\tfrac12\\|d - \\tilde g_0\\|^2 \\quad\\text{s.t.}\\quad
           \\langle \\tilde g_j, d\\rangle \\ge \\tau_j \\|\\tilde g_j\\|^2,\\ j \\ge 1

and the update is ``~d`` rescaled to the norm of ``g_0``. ``s_i = 1 / sqrt(v_i + eps)``
where ``v_i`` is the bias-corrected exponential moving average (decay ``beta``) of
``||g_i||^2`` over the steps (0 where ``v_i + eps = 0``). By the KKT conditions
``~d = ~g_0 + sum_j mu_j ~g_j`` with ``mu >= 0`` solving the dual

.. math::  \\min_{\\mu \\ge 0} \\tfrac12 \\mu^\\top \\tilde M_{SS} \\mu - b^\\top\\mu,\\qquad
           b_j = \\tau_j \\tilde M_{jj} - \\tilde M_{j0}

(``~M = M * s s^T``, ``S`` the secondaries), solved exactly in float64 by trying every
active set for ``K <= 13`` (``2^(K-1)`` small systems in one batched solve, no host read);
above, by Goldfarb & Idnani's dual active-set method (as torchjd; it adds one violated
constraint at a time and reads each step's choices on the host). Both find the minimiser. The
coefficients are ``c = (1, mu) * s * ||g_0|| / ||~d||``. Special cases, as torchjd:
``g_0 = 0`` gives ``c = 0``; infeasible constraints (e.g. two opposed secondaries) are
dropped (``mu = 0``: the update is ``g_0``); ``~d = 0`` up to rounding gives ``c = 0``.

Options (torchjd's names and defaults): ``tau`` (0.02; one value in [0, 1] or one per
secondary task), ``beta`` (0.999, in [0, 1)), ``eps`` (1e-8, >= 0). The moving average and
the step count are the method's state (``state_dict``). Not symmetric in the tasks; scaling
a secondary gradient by the same factor at every step leaves the update unchanged (up to
``eps``). Level: torchjd works on the shared parameters' Jacobian; by default here on the
representation's gradients, ``level="params"`` for that setting.
"""
from __future__ import annotations

from typing import Sequence

import torch
from torch import Tensor

from ..numerics.gram import scale_gram, small_matmul
from ..numerics.qp import masked_solve, supports
from .base import GramWeighting, check_option
from .registry import register

#: Largest number of secondary tasks whose active sets are enumerated (above: the dual
#: active-set method).
MAX_SECONDARY = 12


@register("pcd")
class PCD(GramWeighting):
    """Closest direction to the primary task's with guaranteed progress for the others."""

    state_names = ("sq_norm_ema", "n_steps")
    subset_refusal = ("task 0 is the primary objective that constrains the others, and each gradient is scaled by a "
                      "running estimate of its norm")

    def __init__(self, tau: float | Sequence[float] | Tensor = 0.02, beta: float = 0.999, eps: float = 1e-8):
        if not isinstance(tau, (list, tuple, Tensor)):
            tau = check_option("tau", tau, float, "[0, 1]", "or a sequence of one such value per secondary task")
        try:
            taus = torch.as_tensor(tau, dtype=torch.float64).detach().cpu().clone()
        except (TypeError, ValueError, RuntimeError):
            raise ValueError(f"tau must be a number or a sequence of numbers in [0, 1], got {tau!r}") from None
        if taus.dim() > 1 or not bool(((taus >= 0) & (taus <= 1)).all()):
            raise ValueError(f"tau must be a number in [0, 1] or one such value per secondary task, got {tau!r}")
        self.tau = taus
        self.beta = check_option("beta", beta, float, "[0, 1)")
        self.eps = check_option("eps", eps, float, "[0, inf)")

    def bind(self, num_tasks: int, *, device: torch.device, dtype: torch.dtype,
             generator: torch.Generator) -> None:
        if self.tau.dim() == 1 and self.tau.numel() != num_tasks - 1:
            raise ValueError(f"tau has {self.tau.numel()} values but there are {num_tasks - 1} secondary tasks "
                             "(all but task 0); give one per secondary task or a single number")
        super().bind(num_tasks, device=device, dtype=dtype, generator=generator)
        self._taus = self.tau.expand(num_tasks - 1).to(device)
        self.sq_norm_ema = torch.zeros(num_tasks, dtype=torch.float64, device=device)
        self.n_steps = 0

    def weights(self, gram: Tensor, losses: Tensor) -> Tensor:
        m = gram.to(torch.float64)
        sq = m.diagonal()
        self.n_steps += 1
        self.sq_norm_ema = self.beta * self.sq_norm_ema + (1 - self.beta) * sq
        denominators = (self.sq_norm_ema / (1 - self.beta ** self.n_steps) + self.eps).sqrt()
        scales = torch.where(denominators > 0, 1 / torch.where(denominators > 0, denominators, 1), 0)
        mn = scale_gram(m, scales)
        w = torch.cat([torch.ones(1, dtype=m.dtype, device=m.device), self._dual(mn)])
        sq_dir = w @ mn @ w
        magnitude = (w.abs() @ mn.diagonal().clamp_min(0).sqrt()) ** 2
        precision = 10 * torch.finfo(gram.dtype).eps
        ok = (sq[0] > 0) & (sq_dir > precision * magnitude)
        factor = torch.where(ok, (sq[0] / torch.where(ok, sq_dir, 1)).sqrt(), 0)
        return (w * scales * factor).to(gram.dtype)

    def _dual(self, mn: Tensor) -> Tensor:
        """``mu >= 0`` minimising ``mu^T M_SS mu / 2 - b^T mu`` (0 when that is unbounded: infeasible)."""
        k = mn.shape[0]
        if k == 1:
            return mn.new_zeros(0)
        ms = mn[1:, 1:]
        b = self._taus.to(mn) * ms.diagonal() - mn[1:, 0]
        # torchjd's tolerance on the constraints
        tol = 1e-9 * ms.diagonal().abs().amax().clamp_min(torch.finfo(mn.dtype).tiny)
        if k - 1 > MAX_SECONDARY:
            return dual_active_set(ms, b, float(tol))
        active = torch.cat([torch.zeros(1, k - 1, dtype=torch.bool, device=mn.device), supports(k - 1, mn.device)])
        rhs = torch.where(active, b, 0).unsqueeze(-1)
        mu = masked_solve(ms, active, rhs).squeeze(-1)
        slack = small_matmul(mu, ms) - b
        # an inconsistent singular face (infeasible constraints) gets a huge ridge solution
        # whose active constraints then miss equality by far more than tol
        kkt = ((mu >= -tol) & (slack >= -tol) & (~active | (slack.abs() <= tol))).all(-1)
        objective = 0.5 * (small_matmul(mu, ms) * mu).sum(-1) - mu @ b
        best = torch.where(kkt, objective, torch.inf).argmin()
        return torch.where(kkt.any(), mu.index_select(0, best.reshape(1))[0].clamp_min(0), 0)

def dual_active_set(a: Tensor, b: Tensor, tol: float, dependence: float = 1e-9) -> Tensor:
    """Goldfarb & Idnani's dual method for ``min mu^T A mu / 2 - b^T mu``, ``mu >= 0``, with
    ``A`` the Gram of the constraint gradients ``~g_j``: the primal point
    ``d = ~g_0 + sum_j mu_j ~g_j`` meets the active constraints with equality; each round adds
    the most violated constraint ``p``, moving along ``z``, the part of ``~g_p`` orthogonal to
    the active gradients (``mu_A -= t r``, ``mu_p += t`` with ``A_AA r = A_Ap``); an active
    multiplier reaching 0 first is dropped and ``p`` tried again. No step at all (``~g_p`` a
    combination of the active gradients with no multiplier to decrease) means the constraints
    are infeasible: ``mu = 0`` is returned (torchjd's convention). ``dependence``: ``~g_p``
    counts as dependent when ``||z||^2 <= dependence ||~g_p||^2``. At most ``10 n`` rounds
    (rounding could cycle). Reads its choices on the host (a loop of small solves)."""
    n = b.shape[0]
    mu = torch.zeros_like(b)
    active: list[int] = []
    for _ in range(10 * n):
        slack = a @ mu - b
        slack[active] = 0.0
        p = int(slack.argmin())
        if float(slack[p]) >= -tol:
            break
        violation = float(slack[p])
        while True:
            if active:
                r = torch.linalg.solve(a[active][:, active], a[active, p])
                z_sq = float(a[p, p] - a[p, active] @ r)
                ratios = torch.where(r > 0, mu[active] / torch.where(r > 0, r, 1), torch.inf)
                drop = int(ratios.argmin())
                partial = float(ratios[drop])
            else:
                r, z_sq, drop, partial = a.new_zeros(0), float(a[p, p]), -1, float("inf")
            full = -violation / z_sq if z_sq > dependence * float(a[p, p]) else float("inf")
            step = min(partial, full)
            if step == float("inf"):
                return torch.zeros_like(b)  # infeasible
            if active:
                mu[active] -= step * r
            mu[p] += step
            if full <= partial:
                active.append(p)
                break
            mu[active[drop]] = 0.0
            del active[drop]
            violation = float(a[p] @ mu - b[p])
    return mu.clamp_min(0)
