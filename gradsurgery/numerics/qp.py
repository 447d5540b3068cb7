"""Small quadratic programs over ``K x K`` Grams: the min-norm point of the convex hull
(MGDA), the projection onto the dual cone (UPGrad, DualProj), and the batched small
systems they solve. Tensor programs: no host reads, no Python branching on tensor
values, fixed iteration budgets."""
from __future__ import annotations

import functools

import torch
from torch import Tensor

from .eigh import symmetric_eigh, symmetric_eigvalsh
from .gram import normalized64, small_matmul

#: Largest K for which :func:`min_norm_simplex` enumerates all ``2^K - 1`` supports;
#: above it, Wolfe's active-set algorithm is cheaper.
MIN_NORM_ENUMERATION_MAX_TASKS = 8

def _affine_minimizers(m: Tensor, masks: Tensor) -> Tensor:
    """For each support ``S`` (row of ``masks``), the minimiser of ``l^T M l`` over the
    affine hull ``{l : sum(l) = 1, l_i = 0 for i not in S}``: ``l = y / sum(y)`` with
    ``M_SS y_S = 1``, ``y = 0`` off ``S`` (stationarity ``M_SS l_S = nu 1``).

    Solved on the unit-diagonal ``C = S^{-1} M S^{-1}``, ``S = diag(sqrt(M_kk))`` (1 for a
    zero row): ``C_SS z_S = S^{-1} 1``, ``y = S^{-1} z`` is the same ``y`` exactly, but the
    system's conditioning no longer includes the spread of the gradients' norms, and
    :func:`masked_solve`'s ridge is relative to every task's own norm (on ``M`` it swamped
    the faces of gradients 1e-4 times smaller than the largest). Singular faces
    (duplicated, opposite or zero gradients) are solved through that ridge;
    ``sum(y) = 1^T (M_SS + eps S^2)^{-1} 1 > 0``."""
    fm = masks.to(m.dtype)
    scale = m.diagonal().clamp_min(0).sqrt()
    scale = torch.where(scale > 0, scale, torch.ones_like(scale))
    c = m / (scale[:, None] * scale[None, :])
    y = masked_solve(c, masks, (fm / scale)[..., None])[..., 0] / scale
    return y / y.sum(-1, keepdim=True)


def min_norm_simplex(gram: Tensor, iterations: int | None = None) -> Tensor:
    """Exact minimiser ``l`` of ``l^T M l`` over the probability simplex.

    ``sum_k l_k g_k`` is then the minimum-norm point ``d`` of the convex hull of the task
    gradients (MGDA, Sener & Koltun 2018), characterised by the KKT conditions
    ``<g_k, d> >= ||d||^2`` for every ``k``, with equality where ``l_k > 0``. Solved in
    float64 on ``M`` normalised to unit mean diagonal (the minimiser is scale-invariant).

    For ``K <= MIN_NORM_ENUMERATION_MAX_TASKS`` every support's affine minimiser is
    computed in one batched solve and the feasible one of least objective is returned.
    For larger ``K``, Wolfe's active-set algorithm (:func:`_wolfe_active_set`) runs a fixed
    ``iterations`` budget (default ``3 K + 10``; it needs about one iteration per support
    change, at most ``2 K + 10`` in the tests up to ``K = 64``) and stops changing once the
    KKT conditions hold, so its answer is exact too. No host reads in either path.
    """
    k = gram.shape[0]
    m = normalized64(gram)
    if k <= MIN_NORM_ENUMERATION_MAX_TASKS:
        cands = _affine_minimizers(m, supports(k, m.device))
        objective = torch.einsum("bi,ij,bj->b", cands, m, cands)
        feasible = (cands >= -1e-12).all(-1)
        best = torch.where(feasible, objective, torch.inf).argmin()
        lam = cands.index_select(0, best.reshape(1))[0]  # no host read (unlike cands[best])
    else:
        lam = _wolfe_active_set(m, 3 * k + 10 if iterations is None else iterations)
    lam = lam.clamp_min(0)
    return (lam / lam.sum()).to(gram.dtype)


def _wolfe_active_set(m: Tensor, iterations: int) -> Tensor:
    """Wolfe's minimum-norm-point algorithm (1976) on ``min l^T M l`` over the simplex,
    as a fixed number of branch-free iterations.

    Starts at the vertex of least norm with support ``S = {it}``. Each iteration takes the
    affine minimiser ``mu`` on ``S``. If ``mu >= 0`` it becomes ``l`` and the vertex ``j``
    with the most negative ``(M l)_j - l^T M l`` (a KKT violation) joins ``S``; otherwise
    ``l`` moves towards ``mu`` until a coordinate hits 0, and that vertex leaves ``S``.
    Once no vertex violates the KKT conditions, the iteration is a fixed point.
    """
    k = m.shape[0]
    index = torch.arange(k, device=m.device)
    lam = (index == m.diagonal().argmin()).to(m.dtype)
    support = lam > 0
    for _ in range(iterations):
        mu = _affine_minimizers(m, support[None])[0]
        feasible = (mu >= 0).all()
        # feasible: l = mu; the worst KKT violator joins the support
        grad = m @ mu
        gap = torch.where(support, torch.inf, grad - mu @ grad)
        worst = gap.argmin()
        grown = support | ((index == worst) & (gap.min() < -1e-12))
        # infeasible: the largest step towards mu that keeps l >= 0; blocking vertices leave
        shrinking = support & (mu < 0)
        ratio = torch.where(shrinking, lam / torch.where(shrinking, lam - mu, 1), torch.inf)
        t = ratio.min().clamp(0, 1)
        moved = torch.where(shrinking & (ratio <= t), 0, lam + t * (mu - lam)).clamp_min(0)
        lam = torch.where(feasible, mu, moved)
        support = torch.where(feasible, grown, support & (moved > 0))
    return lam


def masked_solve(m: Tensor, masks: Tensor, rhs: Tensor) -> Tensor:
    """For each support ``S`` (row of the ``B x K`` boolean ``masks``), solves
    ``M_SS x_S = rhs_S`` with ``x = rhs`` outside ``S`` (``rhs`` is ``B x K x R``).

    A relative ridge (1e-13 in float64) keeps singular faces solvable; it converges to the
    least-norm solution, which is what a consistent singular system of a Gram matrix
    (``M_SS = G_S G_S^T``, right-hand sides in its range) needs."""
    k = m.shape[0]
    fm = masks.to(m.dtype)
    eye = torch.eye(k, dtype=m.dtype, device=m.device)
    ridge = 1e-13 if m.dtype == torch.float64 else 1e-7
    a = m * (fm[:, :, None] * fm[:, None, :]) + eye * (1 - fm)[:, None, :] + ridge * eye * fm[:, None, :]
    return solve_spd(a, rhs)


def solve_spd(a: Tensor, rhs: Tensor) -> Tensor:
    """Solves the batched symmetric positive-definite systems ``a x = rhs`` (``... x K x K``,
    ``... x K x R``) with one ``torch.linalg.solve_ex(..., check_errors=False)`` call (LU with
    partial pivoting): no error check, so no host read or device sync (its documented
    contract; the call dispatches the single ``aten._linalg_solve_ex`` op), and no
    per-batch Python loop; faster than the alternatives measured (docs/design-notes.md)."""
    return torch.linalg.solve_ex(a, rhs, check_errors=False)[0]


@functools.lru_cache(maxsize=None)
def supports(k: int, device: torch.device) -> Tensor:
    """All non-empty subsets of ``range(k)`` as a ``(2^k - 1) x k`` boolean mask, cached per
    ``(k, device)``, in the order of ``itertools.product((False, True), repeat=k)`` (row
    ``r`` is ``r`` in binary, task 0 the most significant bit). Built on ``device``: no
    host-to-device copy (which is a sync from pageable memory)."""
    rows = torch.arange(1, 2**k, device=device)
    shifts = torch.arange(k - 1, -1, -1, device=device)
    return ((rows[:, None] >> shifts[None, :]) & 1).bool()


def clean_psd(m: Tensor, dtype: torch.dtype) -> Tensor:
    """The float64 Gram ``m`` (rounded in ``dtype``, scaled to a unit diagonal by the
    caller) with the eigenvalues that rounding cannot tell from 0 set to 0:
    ``V diag(lambda') V^T`` with ``lambda' = 0`` where ``lambda <= K eps max|lambda|`` (``eps``
    of ``dtype``; ``torch.linalg.pinv``'s cut-off), ``lambda`` elsewhere. A Gram rounded in
    float32 is indefinite, or has spurious ``~eps_32``-sized eigenvalues, where the exact one
    is singular (0 in the convex hull of the gradients, rank-deficient rows); those became
    ``sqrt(eps_32)``-sized components of the update and defeated the solvers' float64
    tolerances (1e-10). Cleaned, the problem is the exact one of a positive semidefinite Gram
    within the input's rounding, solved as a float64 one is. (On the unit-diagonal copy, so
    that the cut-off does not erase tasks of small norm.)"""
    lam, vec = symmetric_eigh(m)
    cutoff = m.shape[-1] * torch.finfo(dtype).eps * lam.abs().amax(-1, keepdim=True)
    return (vec * torch.where(lam > cutoff, lam, 0).unsqueeze(-2)) @ vec.mT


#: Largest K for which :func:`project_dual_cone` enumerates every active set
#: (``rows x 2^K`` small systems in one batched solve).
DUAL_CONE_ENUMERATION_MAX_TASKS = 5


def project_dual_cone(gram: Tensor, u: Tensor, iterations: int = 100) -> Tensor:
    """Weights of the projection onto the dual cone of the task gradients.

    For ``x = G^T u`` (one row of ``u`` per vector to project, ``R x K``), the Euclidean
    projection of ``x`` onto the dual cone ``{y : G y >= 0}`` is ``G^T v`` with

    .. math::  v = \\arg\\min_{v \\ge u} v^\\top M v

    (the dual of the projection problem, Quinton & Rey 2024, Prop. 1). Returns ``v``
    (``R x K``). KKT: ``M v >= 0`` (so ``<g_k, G^T v> >= 0``: no task conflicts with the
    result) with ``(M v)_k = 0`` where ``v_k > u_k``. Solved exactly, without regularising
    ``M`` beyond setting the eigenvalues its input's rounding cannot tell from 0 to 0
    (:func:`clean_psd`: float32 Grams), in float64 on the same problem rescaled so that the solver's tolerances hold for
    every task's constraint whatever its gradient's norm: the Gram scaled to a unit
    diagonal, ``M' = S^-1 M S^-1`` with ``S = diag(sqrt(M_kk))`` (1 for a zero row), and each
    row of ``S u`` divided by its largest entry (``v`` is positively homogeneous in ``u``);
    ``v = S^-1 v'``. (Without it, norms 1e-3..1e3 apart, or opposed 1e-10-sized gradients,
    left a small task in conflict with the result.) For ``K <= DUAL_CONE_ENUMERATION_MAX_TASKS``
    every free set ``F`` gets ``v_F = -M_FF^+ M_FA u_A``, ``v_A = u_A``; the candidate meeting
    the KKT conditions (primal and dual feasibility, to 1e-10 relative) with the least
    objective is returned (failing any, the primal-feasible one closest to dual feasibility).
    For larger ``K``, ``iterations`` steps of accelerated projected gradient guess the active
    set, ``2K`` primal active-set rounds correct it, and the same system on it gives the
    point (kept when it meets the KKT conditions).
    """
    k = gram.shape[0]
    m = gram.to(torch.float64)
    diag = m.diagonal()
    norms = torch.where(diag > 0, diag.clamp_min(0).sqrt(), 0)
    # a zero row's scale is arbitrary (its weight moves nothing) but must not dwarf the
    # others' in ``u``'s normalisation below, or the tolerances stop being relative: the
    # largest norm (1 when every row is 0)
    largest = norms.amax(-1, keepdim=True)
    scale = torch.where(diag > 0, norms, torch.where(largest > 0, largest, 1))
    m = clean_psd(m / (scale[:, None] * scale[None, :]), gram.dtype)
    u64 = u.to(torch.float64) * scale
    size = u64.abs().amax(-1, keepdim=True)
    size = torch.where(size > 0, size, 1)
    u64 = u64 / size
    tol = 1e-10 * (1 + u64.abs().amax(-1, keepdim=True))
    if k <= DUAL_CONE_ENUMERATION_MAX_TASKS:
        free = torch.cat([torch.zeros(1, k, dtype=torch.bool, device=m.device), supports(k, m.device)])
        v = _box_candidates(m, u64[:, None, :].expand(-1, free.shape[0], -1), free[None].expand(u64.shape[0], -1, -1))
        mv = small_matmul(v, m)
        objective = (v * mv).sum(-1)
        primal = (v >= u64[:, None, :] - tol[..., None]).all(-1)
        violation = (-mv).amax(-1).clamp_min(0)
        kkt = primal & (violation <= tol)
        # the least objective among the KKT points; failing any (rounding), the primal-feasible
        # candidate closest to dual feasibility
        best = torch.where(kkt.any(-1), torch.where(kkt, objective, torch.inf).argmin(-1),
                           torch.where(primal, violation, torch.inf).argmin(-1))
        v = v.gather(1, best[:, None, None].expand(-1, 1, k))[:, 0]
    else:
        v = _accelerated_box(m, u64, iterations)
        free = _refine_free_set(m, u64, v > u64 + 1e-9 * (1 + u64.abs()), 2 * k)
        polished = _box_candidates(m, u64[:, None, :], free[:, None, :])[:, 0]
        mv = small_matmul(polished, m)
        ok = ((polished >= u64 - tol) & (mv >= -tol)).all(-1, keepdim=True)
        v = torch.where(ok, polished, v)
    return (torch.maximum(v, u64) * size / scale).to(gram.dtype)


def _box_candidates(m: Tensor, u: Tensor, free: Tensor) -> Tensor:
    """``v`` with ``v = u`` off the free set and ``v_F`` minimising ``v^T M v`` on it
    (``u``, ``free``: ``R x B x K``)."""
    r, b, k = u.shape
    fixed = u * (~free).to(u.dtype)
    rhs = torch.where(free, -small_matmul(fixed, m), u)  # M symmetric: (M u_A)_F = (u_A M)_F
    x = masked_solve(m, free.reshape(r * b, k), rhs.reshape(r * b, k, 1))
    return x.reshape(r, b, k)


def _refine_free_set(m: Tensor, u: Tensor, free: Tensor, rounds: int) -> Tensor:
    """Primal active-set rounds for ``min v^T M v, v >= u`` (each row independently): solve
    on the free set; free variables that fell below ``u`` become fixed; otherwise the fixed
    variable with the most negative multiplier ``(M v)_i`` is freed. Stops changing a row once
    its KKT conditions hold."""
    tol = 1e-10 * (1 + u.abs().amax(-1, keepdim=True))
    for _ in range(rounds):
        v = _box_candidates(m, u[:, None, :], free[:, None, :])[:, 0]
        below = free & (v < u - tol)
        multipliers = torch.where(free, torch.inf, small_matmul(v, m))
        worst = multipliers.argmin(-1, keepdim=True)
        release = torch.zeros_like(free).scatter(-1, worst, True) & (multipliers.amin(-1, keepdim=True) < -tol)
        free = torch.where(below.any(-1, keepdim=True), free & ~below, free | release)
    return free


def _accelerated_box(m: Tensor, u: Tensor, iterations: int) -> Tensor:
    """FISTA on ``min v^T M v`` s.t. ``v >= u`` (rows of ``u`` independently)."""
    lipschitz = 2 * symmetric_eigvalsh(m)[-1].clamp_min(1e-30)
    v = u.clone()
    y, t = v, 1.0
    for _ in range(iterations):
        nxt = torch.maximum(y - (2 * small_matmul(y, m)) / lipschitz, u)
        t_next = (1 + (1 + 4 * t * t) ** 0.5) / 2
        y = nxt + ((t - 1) / t_next) * (nxt - v)
        v, t = nxt, t_next
    return v


#: Largest K for which :func:`cagrad_dual` tries every support; above, an active-set method.
CAGRAD_ENUMERATION_MAX_TASKS = 12


def cagrad_dual(m: Tensor, a: Tensor, s: Tensor, iterations: int | None = None) -> Tensor:
    """CAGrad's dual point: ``argmin_{w in simplex} f(w) = a^T w + s sqrt(w^T M w)`` (``a = M 1/K``,
    ``s = c ||g_0||``) for the ``K x K`` Gram ``m`` (float64). For ``K <= 12`` the stationary
    point of every support is tried (plus the min-norm point, where ``g_w = 0``) and the feasible
    one of least objective kept; above, the primal active-set method :func:`_cagrad_active_set`
    (exact too) runs ``iterations`` steps (default ``3 K + 10``) and is compared with the
    min-norm point the same way. Newton steps then polish the point."""
    k = m.shape[0]
    if k <= CAGRAD_ENUMERATION_MAX_TASKS:
        cands = _support_solutions(m, a, s, supports(k, m.device))
    else:
        cands = _cagrad_active_set(m, a, s, 3 * k + 10 if iterations is None else iterations)[None]
    cands = torch.cat([cands, min_norm_simplex(m)[None]])
    objective = cands @ a + s * (small_matmul(cands, m) * cands).sum(-1).clamp_min(0).sqrt()
    feasible = (cands >= -1e-12).all(-1) & torch.isfinite(cands).all(-1)
    best = torch.where(feasible, objective, torch.inf).argmin().reshape(1)
    w = cands.index_select(0, best)[0].clamp_min(0)  # no host read (unlike cands[best])
    return _polish(m, a, s, w / w.sum())


def _cagrad_active_set(m: Tensor, a: Tensor, s: Tensor, iterations: int) -> Tensor:
    """Wolfe-style primal active-set method for ``min a^T w + s ||G^T w||`` over the simplex, as
    a fixed number of branch-free iterations (the objective is convex, so moving from ``w``
    towards the minimiser ``mu`` of a face never increases it).

    Starts at the vertex of least objective, support ``S = {it}``. Each iteration takes the
    stationary point ``mu`` on ``S`` (:func:`_support_solutions`). If it exists and ``mu >= 0``
    it becomes ``w`` and the task ``j`` with the most negative ``grad_j - w^T grad`` (a KKT
    violation, ``grad = a + s M w / ||G^T w||``) joins ``S``; if it exists with a negative
    entry, ``w`` moves towards ``mu`` until a weight hits 0 and that task leaves ``S``. Where it
    does not exist (``g_w`` can vanish on the face), the iteration stops changing; the caller
    compares with the min-norm point. Once no task violates the KKT conditions, the iteration
    is a fixed point (where the loop stops on the CPU; elsewhere it runs every step, sync-free)."""
    k = m.shape[0]
    index = torch.arange(k, device=m.device)
    w = (index == (a + s * m.diagonal().clamp_min(0).sqrt()).argmin()).to(m.dtype)
    support = w > 0
    reads_free = m.device.type == "cpu" and not torch.compiler.is_compiling()  # no graph break when traced
    for _ in range(iterations):
        mu = _support_solutions(m, a, s, support[None])[0]
        valid = torch.isfinite(mu).all()
        mu = torch.where(valid, mu, w)
        feasible = valid & (mu >= 0).all()
        mw = m @ mu
        grad = a + s * mw / (mu @ mw).clamp_min(1e-300).sqrt()
        gap = torch.where(support, torch.inf, grad - mu @ grad)
        grown = support | ((index == gap.argmin()) & (gap.min() < -1e-12 * (1 + grad.abs().max())))
        shrinking = support & (mu < 0)
        ratio = torch.where(shrinking, w / torch.where(shrinking, w - mu, 1), torch.inf)
        t = ratio.min().clamp(0, 1)
        moved = torch.where(shrinking & (ratio <= t), 0, w + t * (mu - w)).clamp_min(0)
        w = torch.where(feasible, mu, torch.where(valid, moved, w))
        new_support = torch.where(feasible, grown, torch.where(valid, support & (moved > 0), support))
        if reads_free and bool(feasible & (new_support == support).all()):
            break  # the fixed point (on the CPU, where reading a value waits for no device)
        support = new_support
    return w


def _support_solutions(m: Tensor, a: Tensor, s: Tensor, masks: Tensor) -> Tensor:
    """The stationary point of ``a^T w + s ||G^T w||`` on ``{sum w = 1, w = 0 off S}`` for
    every support ``S`` (rows of ``masks``); NaN rows where it does not exist."""
    fm = masks.to(m.dtype)
    rhs = torch.stack([fm, fm * a], -1)
    pq = masked_solve(m, masks, rhs) * fm[..., None]
    p, q = pq[..., 0], pq[..., 1]
    big_a, big_b, big_c = p.sum(-1), q.sum(-1), (q * a).sum(-1)
    disc = big_b.square() - big_a * (big_c - s.square())
    root = disc.clamp_min(0).sqrt()
    valid = (disc > 0) & (big_a > 0)
    nu = (big_b + root) / torch.where(valid, big_a, 1)
    w = (nu[:, None] * p - q) / torch.where(valid, root, 1)[:, None]
    return torch.where(valid[:, None], w, torch.nan)


def _polish(m: Tensor, a: Tensor, s: Tensor, w: Tensor, steps: int = 2) -> Tensor:
    """Newton steps on the stationarity conditions ``a + s M w / ||g_w|| = nu 1`` over the
    support of ``w`` (the closed form loses ~``cond(M_SS)^2 eps`` to cancellation; Newton's
    residual is evaluated directly, so it ends near ``cond(M_SS) eps``). A step that leaves
    the simplex or is not finite is not taken; nothing moves where ``g_w = 0``."""
    k = m.shape[0]
    support = w > 0
    both = support[:, None] & support[None, :]
    eye = torch.eye(k, dtype=m.dtype, device=m.device)
    border = torch.where(support, 1.0, 0.0).to(m.dtype)
    for _ in range(steps):
        mw = m @ w
        n = (w @ mw).clamp_min(1e-300).sqrt()
        grad = torch.where(support, a + s * mw / n, 0)
        hess = torch.where(both, s * (m / n - torch.outer(mw, mw) / n**3), eye)
        system = torch.cat([torch.cat([hess, border[:, None]], 1), torch.cat([border, border.new_zeros(1)])[None]])
        rhs = torch.cat([-grad, grad.new_zeros(1)])
        step = torch.linalg.solve_ex(system, rhs)[0][:k]
        trial = w + torch.where(support, step, 0)
        ok = torch.isfinite(trial).all() & (trial >= 0).all() & (n > 1e-8)
        w = torch.where(ok, trial, w)
    return w
