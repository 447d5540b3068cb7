"""Small ``K x K`` linear algebra shared by the methods: Gram matrices, cosines, the
min-norm point of a convex hull. Everything is a tensor program: no host reads, no
Python branching on tensor values, fixed iteration budgets."""
from __future__ import annotations

import itertools

import torch
from torch import Tensor

#: Largest K for which :func:`min_norm_simplex` enumerates every support (2^K - 1 small
#: linear systems, solved in one batched call). Above it, an accelerated projected-gradient
#: warm start is polished on its support.
ENUMERATION_MAX_TASKS = 12


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


def _supports(k: int, device: torch.device) -> Tensor:
    """All non-empty subsets of ``range(k)`` as a ``(2^k - 1) x k`` boolean mask."""
    masks = torch.tensor(list(itertools.product((False, True), repeat=k))[1:], dtype=torch.bool)
    return masks.to(device)


_SUPPORT_CACHE: dict[tuple[int, torch.device], Tensor] = {}


def _affine_minimizers(m: Tensor, masks: Tensor) -> Tensor:
    """For each support ``S`` (row of ``masks``), the minimiser of ``l^T M l`` over the
    affine hull ``{l : sum(l) = 1, l_i = 0 for i not in S}``, via the KKT system
    ``[M_SS 1; 1^T 0][l; -nu] = [0; 1]`` (padded with identity rows outside S)."""
    b, k = masks.shape
    dtype, device = m.dtype, m.device
    fm = masks.to(dtype)
    outer = fm[:, :, None] * fm[:, None, :]
    eye = torch.eye(k, dtype=dtype, device=device)
    # a tiny ridge keeps singular faces (duplicated or zero gradients) solvable; m is
    # normalised to unit mean diagonal, so the ridge is relative.
    ridge = 1e-13 if dtype == torch.float64 else 1e-7
    a = m * outer + eye * (1 - fm)[:, None, :] + ridge * eye * fm[:, None, :]
    kkt = torch.zeros(b, k + 1, k + 1, dtype=dtype, device=device)
    kkt[:, :k, :k] = a
    kkt[:, :k, k] = -fm
    kkt[:, k, :k] = fm
    rhs = torch.zeros(b, k + 1, 1, dtype=dtype, device=device)
    rhs[:, k] = 1
    return torch.linalg.solve(kkt, rhs)[:, :k, 0]


def _project_simplex(v: Tensor) -> Tensor:
    """Euclidean projection of each row of ``v`` onto the probability simplex."""
    k = v.shape[-1]
    u, _ = torch.sort(v, dim=-1, descending=True)
    css = u.cumsum(-1) - 1
    idx = torch.arange(1, k + 1, dtype=v.dtype, device=v.device)
    cond = (u - css / idx) > 0
    rho = cond.to(v.dtype).cumsum(-1).argmax(-1, keepdim=True)  # last True (cond is a prefix)
    theta = css.gather(-1, rho) / (rho + 1).to(v.dtype)
    return (v - theta).clamp_min(0)


def min_norm_simplex(gram: Tensor, iterations: int = 300) -> Tensor:
    """Exact minimiser ``l`` of ``l^T M l`` over the probability simplex.

    ``sum_k l_k g_k`` is then the minimum-norm point of the convex hull of the task
    gradients (MGDA, Sener & Koltun 2018). Solved in float64 on a copy of ``M``
    normalised to unit mean diagonal (the minimiser is scale-invariant).

    For ``K <= ENUMERATION_MAX_TASKS`` every support is tried in one batched solve and
    the feasible affine minimiser of least objective is returned: the exact optimum.
    For larger ``K``, ``iterations`` steps of accelerated projected gradient find the
    support, and the KKT system on that support gives the exact point (kept when it is
    feasible and no worse).
    """
    k = gram.shape[0]
    m = gram.to(torch.float64)
    scale = m.diagonal().mean()
    m = m / torch.where(scale > 0, scale, 1)
    if k <= ENUMERATION_MAX_TASKS:
        key = (k, m.device)
        masks = _SUPPORT_CACHE.get(key)
        if masks is None:
            masks = _SUPPORT_CACHE[key] = _supports(k, m.device)
        cands = _affine_minimizers(m, masks)
        objective = torch.einsum("bi,ij,bj->b", cands, m, cands)
        feasible = (cands >= -1e-12).all(-1)
        best = torch.where(feasible, objective, torch.inf).argmin()
        lam = cands[best]
    else:
        lam = _accelerated_projected_gradient(m, iterations)
        support = lam > 1e-9 * lam.max()
        polished = _affine_minimizers(m, support[None])[0]
        ok = (polished >= -1e-12).all() & (polished @ m @ polished <= lam @ m @ lam + 1e-15)
        lam = torch.where(ok, polished, lam)
    lam = lam.clamp_min(0)
    return (lam / lam.sum()).to(gram.dtype)


def _accelerated_projected_gradient(m: Tensor, iterations: int) -> Tensor:
    """FISTA on ``min l^T M l`` over the simplex, step ``1 / (2 lambda_max(M))``."""
    k = m.shape[0]
    lipschitz = 2 * torch.linalg.eigvalsh(m)[-1].clamp_min(1e-30)
    lam = torch.full((k,), 1.0 / k, dtype=m.dtype, device=m.device)
    y, t = lam, 1.0
    for _ in range(iterations):
        nxt = _project_simplex(y - (2 * (m @ y)) / lipschitz)
        t_next = (1 + (1 + 4 * t * t) ** 0.5) / 2
        y = nxt + ((t - 1) / t_next) * (nxt - lam)
        lam, t = nxt, t_next
    return lam
