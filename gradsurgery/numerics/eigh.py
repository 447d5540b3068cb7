"""Symmetric eigendecompositions of small ``K x K`` matrices without host reads: LAPACK on
the CPU, a batched Jacobi solver (replayed as one CUDA graph) elsewhere."""
from __future__ import annotations

import functools

import torch
from torch import Tensor

from .cuda_graphs import replay

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
    checks its solver's error code on the host (docs/design-notes.md: the timings)."""
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
        firsts, seconds = zip(*[(a, b) for a, b in pairs if b < k])
        p, q = torch.tensor(firsts), torch.tensor(seconds)
        reads.append(torch.cat([p * k + p, q * k + q, p * k + q]))
        writes.append(torch.cat([p * k + p, q * k + q, p * k + q, q * k + p]))
    return torch.stack(reads).to(device), torch.stack(writes).to(device)


def _jacobi(a: Tensor, *, vectors: bool, sweeps: int | None = None) -> tuple[Tensor, Tensor]:
    """:func:`_jacobi_sweeps`, through :func:`replay` (one CUDA-graph launch on CUDA)."""
    if sweeps is not None or a.shape[-1] == 1:
        return _jacobi_sweeps(a, vectors=vectors, sweeps=sweeps)
    values, vecs = replay(_jacobi_sweeps, a, vectors=vectors)
    return values, vecs


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
