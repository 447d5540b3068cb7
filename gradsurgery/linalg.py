"""Small ``K x K`` linear algebra shared by the methods: Gram matrices, cosines, the
min-norm point of a convex hull. Everything is a tensor program: no host reads, no
Python branching on tensor values, fixed iteration budgets."""
from __future__ import annotations

import functools
from typing import Any, Callable

import torch
from torch import Tensor

#: Largest K for which the solvers below may enumerate every support (2^K - 1 small
#: linear systems, solved in one batched call).
ENUMERATION_MAX_TASKS = 12

#: Largest K for which :func:`min_norm_simplex` enumerates all ``2^K - 1`` supports;
#: above it, Wolfe's active-set algorithm is cheaper.
MIN_NORM_ENUMERATION_MAX_TASKS = 8


def compute_dtype(dtype: torch.dtype) -> torch.dtype:
    """The dtype decisions are made in: float32, or float64 for float64 inputs."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def gram(grads: Tensor) -> Tensor:
    """``G G^T`` of the ``K x ...`` task gradients, in float32 or wider."""
    flat = grads.reshape(grads.shape[0], -1)
    flat = flat.to(compute_dtype(flat.dtype))
    return flat @ flat.T


def norms(gram: Tensor) -> Tensor:
    """Per-task gradient norms ``||g_k|| = sqrt(M_kk)``."""
    return gram.diagonal().clamp_min(0).sqrt()


def cosines(gram: Tensor) -> Tensor:
    """Pairwise cosines ``M_ij / (||g_i|| ||g_j||)``; 0 where a gradient is zero."""
    n = norms(gram)
    denom = n[:, None] * n[None, :]
    return torch.where(denom > 0, gram / torch.where(denom > 0, denom, 1), 0)


def scale_gram(gram: Tensor, scales: Tensor) -> Tensor:
    """The Gram of ``g_k * scales_k``: ``M_ij s_i s_j``."""
    return gram * scales[:, None] * scales[None, :]


def _affine_minimizers(m: Tensor, masks: Tensor) -> Tensor:
    """For each support ``S`` (row of ``masks``), the minimiser of ``l^T M l`` over the
    affine hull ``{l : sum(l) = 1, l_i = 0 for i not in S}``: ``l = y / sum(y)`` with
    ``M_SS y_S = 1``, ``y = 0`` off ``S`` (stationarity ``M_SS l_S = nu 1``). Singular faces
    (duplicated, opposite or zero gradients) are solved through :func:`masked_solve`'s
    relative ridge; ``sum(y) = 1^T (M_SS + eps I)^{-1} 1 > 0``."""
    fm = masks.to(m.dtype)
    y = masked_solve(m, masks, fm[..., None])[..., 0]
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


def normalized64(gram: Tensor) -> Tensor:
    """``M`` in float64, divided by its mean diagonal (left as is when that is 0). Every
    solver below works on this copy: their solutions are invariant to the scale of ``M``,
    so gradients from 1e-10 to 1e10 give the same decision."""
    m = gram.to(torch.float64)
    scale = m.diagonal().mean()
    return m / torch.where(scale > 0, scale, 1)


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
    per-batch Python loop. Measured against Gauss-Jordan elimination written with
    element-wise ops (one Python iteration per row), 1 and 2 CPU threads, float64, same
    solutions to 6e-16 relative: 255 systems of 8 x 8 (MGDA's enumeration at K = 8) 1.1 vs
    3.5 ms, 4095 of 12 x 12 20 vs 236 ms, one 32 x 32 (each iteration of Wolfe's
    algorithm at K = 32, which runs 3K + 10 of them) 0.03-0.05 vs 5-7 ms. (``cholesky_ex``
    is avoided: its ``tril`` took ~8 ms for a 16 x 16 matrix on a loaded 2-thread CPU.)"""
    return torch.linalg.solve_ex(a, rhs, check_errors=False)[0]


def small_matmul(a: Tensor, b: Tensor) -> Tensor:
    """``a @ b`` for the ``K x K`` solvers' operands: a broadcast multiply-sum (one
    element-wise kernel) while the product has at most ``SMALL_PRODUCT`` multiply-adds per
    batch entry, where a BLAS call's start-up dominates; a BLAS matmul above."""
    if a.shape[-2] * a.shape[-1] * b.shape[-1] > SMALL_PRODUCT:
        return a @ b
    return (a.unsqueeze(-1) * b.unsqueeze(-3)).sum(-2)


#: Multiply-adds up to which :func:`small_matmul` broadcasts instead of calling BLAS.
SMALL_PRODUCT = 4096


@functools.lru_cache(maxsize=None)
def supports(k: int, device: torch.device) -> Tensor:
    """All non-empty subsets of ``range(k)`` as a ``(2^k - 1) x k`` boolean mask, cached per
    ``(k, device)``, in the order of ``itertools.product((False, True), repeat=k)`` (row
    ``r`` is ``r`` in binary, task 0 the most significant bit). Built on ``device``: no
    host-to-device copy (which is a sync from pageable memory)."""
    rows = torch.arange(1, 2**k, device=device)
    shifts = torch.arange(k - 1, -1, -1, device=device)
    return ((rows[:, None] >> shifts[None, :]) & 1).bool()


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
    ``M``, in float64 on the normalised Gram: for ``K <= DUAL_CONE_ENUMERATION_MAX_TASKS``
    every free set ``F`` gets ``v_F = -M_FF^+ M_FA u_A``, ``v_A = u_A``; the candidate meeting
    the KKT conditions (primal and dual feasibility, to 1e-10 relative) with the least
    objective is returned. For larger ``K``, ``iterations`` steps of accelerated projected
    gradient guess the active set, ``2K`` primal active-set rounds correct it, and the same
    system on it gives the point (kept when it meets the KKT conditions).
    """
    k = gram.shape[0]
    m = normalized64(gram)
    u64 = u.to(torch.float64)
    if k <= DUAL_CONE_ENUMERATION_MAX_TASKS:
        free = torch.cat([torch.zeros(1, k, dtype=torch.bool, device=m.device), supports(k, m.device)])
        v = _box_candidates(m, u64[:, None, :].expand(-1, free.shape[0], -1), free[None].expand(u64.shape[0], -1, -1))
        mv = small_matmul(v, m)
        objective = (v * mv).sum(-1)
        tol = 1e-10 * (1 + u64.abs().amax(-1, keepdim=True))
        primal = (v >= u64[:, None, :] - tol[..., None]).all(-1)
        dual = (mv >= -tol[..., None]).all(-1)
        kkt = primal & dual
        score = torch.where(kkt, objective, torch.where(primal, objective + 1e300, torch.inf))
        best = score.argmin(-1)
        v = v.gather(1, best[:, None, None].expand(-1, 1, k))[:, 0]
    else:
        v = _accelerated_box(m, u64, iterations)
        free = _refine_free_set(m, u64, v > u64 + 1e-9 * (1 + u64.abs()), 2 * k)
        polished = _box_candidates(m, u64[:, None, :], free[:, None, :])[:, 0]
        mv = small_matmul(polished, m)
        tol = 1e-10 * (1 + u64.abs().amax(-1, keepdim=True))
        ok = ((polished >= u64 - tol) & (mv >= -tol)).all(-1, keepdim=True)
        v = torch.where(ok, polished, v)
    return torch.maximum(v, u64).to(gram.dtype)


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


#: Solvers of :func:`symmetric_eigh`: ``"torch"`` is ``torch.linalg.eigh`` (LAPACK on the CPU,
#: cuSOLVER on CUDA, which reads its error code on the host: a device sync), ``"jacobi"`` is
#: :func:`jacobi_eigh` (tensor ops only), ``"auto"`` the former on the CPU, the latter elsewhere.
EIGH_SOLVERS = ("auto", "torch", "jacobi")


def symmetric_eigh(a: Tensor, solver: str = "auto") -> tuple[Tensor, Tensor]:
    """Eigenvalues (ascending) and orthonormal eigenvectors (columns) of the symmetric
    ``... x K x K`` matrices ``a``, as ``torch.linalg.eigh`` returns them, without a host
    read on any device with ``solver="auto"``.

    ``"auto"`` calls ``torch.linalg.eigh`` on the CPU (LAPACK: no sync there, and much
    faster) and :func:`jacobi_eigh` on every other device, where ``torch.linalg.eigh``
    checks its solver's error code on the host. Measured, Aligned-MTL's ``weights`` per call:
    CPU (1 thread) K = 8 / 32: LAPACK 0.2 / 0.35 ms, Jacobi 10 / 62 ms; H200 (torch 2.11,
    the sweeps replayed as one CUDA graph, each call timed to a synchronize) K = 3 / 8 / 32:
    Jacobi 0.76 / 1.9 / 8.9 ms, cuSOLVER with its sync 0.75 / 0.60 / 0.55 ms (the sync's
    real cost, a CPU stalled until the GPU drains the step's queue, is not in these)."""
    return torch.linalg.eigh(a) if _uses_torch(a, solver) else jacobi_eigh(a)


def _uses_torch(a: Tensor, solver: str) -> bool:
    """Whether ``solver`` means ``torch.linalg.eigh`` for ``a`` (validates the name)."""
    if solver not in EIGH_SOLVERS:
        raise ValueError(f"solver must be one of {EIGH_SOLVERS}, got {solver!r}")
    return solver == "torch" or (solver == "auto" and a.device.type == "cpu")


def symmetric_eigvalsh(a: Tensor, solver: str = "auto") -> Tensor:
    """The ascending eigenvalues of :func:`symmetric_eigh` alone (``torch.linalg.eigvalsh``
    on the CPU with ``"auto"``; the Jacobi sweeps then skip the eigenvectors)."""
    if _uses_torch(a, solver):
        return torch.linalg.eigvalsh(a)
    return _jacobi(a, vectors=False)[0].sort(-1).values


def pinv_symmetric(a: Tensor, solver: str = "auto") -> Tensor:
    """Moore-Penrose pseudo-inverse ``V diag(1/lambda) V^T`` of the symmetric ``K x K``
    matrices ``a`` from :func:`symmetric_eigh`, with ``torch.linalg.pinv(a, hermitian=True)``'s
    cut-off: eigenvalues with ``|lambda| <= K eps max|lambda|`` (``eps`` of ``a``'s dtype)
    count as 0 (that very function where ``solver`` means ``torch.linalg.eigh``)."""
    if _uses_torch(a, solver):
        return torch.linalg.pinv(a, hermitian=True)
    lam, vec = jacobi_eigh(a)
    size = lam.abs()
    cutoff = a.shape[-1] * torch.finfo(a.dtype).eps * size.amax(-1, keepdim=True)
    inverse = torch.where(size > cutoff, 1 / torch.where(size > cutoff, lam, 1), 0)
    return (vec * inverse.unsqueeze(-2)) @ vec.mT


def jacobi_eigh(a: Tensor, sweeps: int | None = None) -> tuple[Tensor, Tensor]:
    """:func:`symmetric_eigh` by Jacobi's method, on any device (``solver="jacobi"``);
    ``sweeps`` overrides :func:`jacobi_sweeps` (for tests)."""
    lam, vec = _jacobi(a, vectors=True, sweeps=sweeps)
    order = lam.argsort(-1)
    return lam.gather(-1, order), vec.gather(-1, order.unsqueeze(-2).expand_as(vec))


def jacobi_sweeps(k: int) -> int:
    """The fixed number of sweeps :func:`_jacobi` runs for ``K x K`` matrices:
    ``ceil(log2 K) + 5``, and 2 for ``K = 2`` (one rotation diagonalises a 2 x 2 matrix).
    Measured (float64; random, rank-deficient, graded 1e-5..1e5, near-duplicate,
    clustered, opposite-pair and zero-row Grams, 4-5 draws each): the residual
    ``||A V - V diag(lambda)|| / ||A||`` and the eigenvalue error reach 1e-14 after at most
    1, 4, 5, 5, 6, 7, 8 sweeps for K = 2, 3, 5, 8, 10, 16, 32 (quadratic convergence), so
    the budget leaves at least two sweeps of margin."""
    return 2 if k <= 2 else (k - 1).bit_length() + 5


@functools.lru_cache(maxsize=None)
def _round_robin(k: int, device: torch.device) -> tuple[Tensor, Tensor]:
    """The parallel ordering of the cyclic Jacobi method: ``K - 1`` rounds (``K`` for odd
    ``K``) of ``floor(K / 2)`` disjoint pairs ``(p, q)``, every pair once per sweep (the
    round-robin tournament's circle method; for odd ``K`` a dummy player marks who rests).
    Returns, per round, the flat indices of ``a_pp, a_qq, a_pq`` (``rounds x 3h``) and of the
    rotation's entries ``(p,p), (q,q), (p,q), (q,p)`` (``rounds x 4h``); built once per
    ``(K, device)``."""
    players = k + k % 2
    reads, writes = [], []
    for r in range(players - 1):
        circle = [0] + [1 + (j + r) % (players - 1) for j in range(players - 1)]
        pairs = [sorted((circle[i], circle[players - 1 - i])) for i in range(players // 2)]
        p, q = zip(*[(a, b) for a, b in pairs if b < k])
        p, q = torch.tensor(p), torch.tensor(q)
        reads.append(torch.cat([p * k + p, q * k + q, p * k + q]))
        writes.append(torch.cat([p * k + p, q * k + q, p * k + q, q * k + p]))
    return torch.stack(reads).to(device), torch.stack(writes).to(device)


def _jacobi(a: Tensor, *, vectors: bool, sweeps: int | None = None) -> tuple[Tensor, Tensor]:
    """:func:`_jacobi_sweeps`, through :func:`replay` (one CUDA-graph launch on CUDA)."""
    if sweeps is not None or a.shape[-1] == 1:
        return _jacobi_sweeps(a, vectors=vectors, sweeps=sweeps)
    return replay(_jacobi_sweeps, a, vectors=vectors)


def replay(fn: Callable[..., tuple[Tensor, ...]], *tensors: Tensor, **options: Any) -> tuple[Tensor, ...]:
    """``fn(*tensors, **options)`` for a branch-free tensor program ``fn`` (a fixed number of
    small ops, no host read) returning a tuple of tensors. On CUDA it runs from a CUDA graph
    captured once per ``(fn, options, shapes, dtypes, device)`` and replayed: one launch
    instead of hundreds (an H200 spent ~20 µs per launch of the Jacobi sweeps: K = 8 took
    20 ms eagerly). Elsewhere, inside another capture, or under ``torch.compile``, ``fn``
    simply runs. The outputs are copies (the graph's buffers are reused)."""
    first = tensors[0]
    if (first.device.type != "cuda" or torch.cuda.is_current_stream_capturing()
            or torch.compiler.is_compiling()):
        return fn(*tensors, **options)
    key = tuple((t.shape, t.dtype) for t in tensors)
    graph, static, out = _captured(fn, tuple(sorted(options.items())), key, first.device)
    for buffer, t in zip(static, tensors):
        buffer.copy_(t)
    graph.replay()
    return tuple(o.clone() for o in out)


@functools.lru_cache(maxsize=64)
def _captured(fn: Callable[..., tuple[Tensor, ...]], options: tuple, layout: tuple,
              device: torch.device) -> tuple[Any, list[Tensor], tuple[Tensor, ...]]:
    """The CUDA graph of ``fn`` for inputs of this layout, its static inputs and outputs.
    Capturing synchronises once (``torch.cuda.graph`` does), like the other first-call
    caches; a warm-up run on a side stream first builds ``fn``'s own caches."""
    static = [torch.zeros(shape, dtype=dtype, device=device) for shape, dtype in layout]
    kwargs = dict(options)
    side = torch.cuda.Stream(device)
    side.wait_stream(torch.cuda.current_stream(device))
    with torch.no_grad():
        with torch.cuda.stream(side):
            fn(*static, **kwargs)
        torch.cuda.current_stream(device).wait_stream(side)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph, capture_error_mode="thread_local"):
            out = fn(*static, **kwargs)
    return graph, static, out


def _jacobi_sweeps(a: Tensor, *, vectors: bool, sweeps: int | None = None) -> tuple[Tensor, Tensor]:
    """Cyclic Jacobi eigenvalue algorithm with the round-robin parallel ordering
    (Brent & Luk 1985), a fixed number of sweeps, tensor ops only (no host read), batched
    over the leading dims of ``a``.

    Each round rotates ``floor(K / 2)`` disjoint planes ``(p, q)`` at once:
    ``A <- J^T A J``, ``V <- V J`` with ``J`` the product of the Givens rotations
    ``[[c, s], [-s, c]]`` on ``(p, q)``, ``theta = atan(2 a_pq / (a_qq - a_pp)) / 2``
    (``|theta| <= pi / 4``, ``pi / 4`` when ``a_pp = a_qq``; it zeroes ``a_pq``). A plane with
    ``|a_pq| <= eps ||A||_F`` is not rotated (threshold Jacobi): without it the rotations
    inside a cluster of round-off-sized eigenvalues (a rank-deficient Gram's null space)
    keep mixing it and convergence drops to linear. Returns the unsorted diagonal and
    ``V`` (the identity when ``vectors`` is False). ``J`` is built dense (``K x K``) so a
    round is three small matmuls: for ``K <= 32`` the launches, not the flops, cost."""
    k = a.shape[-1]
    batch = a.shape[:-2]
    eye = torch.eye(k, dtype=a.dtype, device=a.device)
    vec = eye.expand(*batch, k, k)
    if k == 1:
        return a[..., 0], vec
    reads, writes = _round_robin(k, a.device)
    h = reads.shape[1] // 3
    flat_eye = eye.reshape(k * k).expand(*batch, k * k)
    threshold = torch.finfo(a.dtype).eps * torch.linalg.matrix_norm(a).unsqueeze(-1)
    for _ in range(jacobi_sweeps(k) if sweeps is None else sweeps):
        for r in range(reads.shape[0]):
            entries = a.reshape(*batch, k * k).index_select(-1, reads[r])
            app, aqq, apq = entries[..., :h], entries[..., h:2 * h], entries[..., 2 * h:]
            theta = torch.where(apq.abs() > threshold, 0.5 * torch.atan(2 * apq / (aqq - app)), 0)
            c, s = theta.cos(), theta.sin()
            j = flat_eye.scatter(-1, writes[r].expand(*batch, 4 * h),
                                 torch.cat([c, c, s, -s], -1)).reshape(*batch, k, k)
            a = j.mT @ a @ j
            if vectors:
                vec = vec @ j
    return a.diagonal(dim1=-2, dim2=-1), vec
