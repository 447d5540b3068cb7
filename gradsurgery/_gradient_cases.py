"""Degenerate task-gradient matrices: the one generator behind :func:`gradsurgery.testing.check_method`,
the project's property suite and its differential tests.

Every matrix is drawn in float64 and then rounded to the requested dtype, so that the same
seed gives the same matrix (up to that rounding) in float32 and float64. The families:

* ``normal``: i.i.d. Gaussian rows;
* ``zero``: every row 0;
* ``zero rows``: about 40% of the rows (at least one) set to 0 -- a batch without those tasks;
* ``duplicated rows``, ``opposed rows``: a row repeated, a row the negative of another;
* ``rank deficient``: ``G = A B`` with ``A`` of ``K x r``, ``r < min(K, N)``;
* ``more tasks than dimensions``: ``N < K``;
* ``0 inside the hull``: ``sum_k w_k g_k = 0`` with every ``w_k > 0`` (0 strictly inside the
  convex hull of the rows; e.g. ``K = 4`` rows of rank 3 in ``N = 3`` as torchjd's
  ``NormalSampler(4, 3, 3)`` draws them): the min-norm point and the dual-cone projection of
  the mean are 0;
* ``leaning one way``: every row has a positive inner product with one direction ``u`` (0
  outside the hull), rank at most ``max(1, N // 2) + 1``: a conflict-free update exists;
* ``norms spread``: row norms ``10^U[-2, 2]`` (further apart the Gram's condition number
  exceeds what float64 resolves).
"""
from __future__ import annotations

import torch
from torch import Tensor

FAMILIES = ("normal", "zero", "zero rows", "duplicated rows", "opposed rows", "rank deficient",
            "more tasks than dimensions", "0 inside the hull", "leaning one way", "norms spread")
D = torch.float64


def zero_row(g: Tensor, row: int) -> Tensor:
    """``g`` with row ``row`` set to 0."""
    g = g.clone()
    g[row] = 0
    return g


def duplicated_row(g: Tensor, row: int, source: int = 0) -> Tensor:
    """``g`` with row ``row`` a copy of row ``source``."""
    g = g.clone()
    g[row] = g[source]
    return g


def opposed_row(g: Tensor, row: int, source: int = 0) -> Tensor:
    """``g`` with row ``row`` the negative of row ``source``."""
    g = g.clone()
    g[row] = -g[source]
    return g


def spread_norms(g: Tensor, low: float, high: float) -> Tensor:
    """Row ``k`` of ``g`` scaled by ``10^(low + (high - low) k / (K - 1))`` (log-spaced)."""
    return g * torch.logspace(low, high, g.shape[0], dtype=g.dtype, device=g.device)[:, None]


def degenerate_matrix(family: str, num_tasks: int, size: int, seed: int, dtype: torch.dtype = D) -> Tensor:
    """A ``K x size`` task-gradient matrix of ``family`` (:data:`FAMILIES`), from ``seed``,
    rounded to ``dtype``. ``more tasks than dimensions`` uses ``N = max(1, K - 1)`` and
    ``0 inside the hull`` ``N = min(size, K - 1)`` (so that the rows span their space)."""
    if family not in FAMILIES:
        raise ValueError(f"unknown family {family!r}; pick one of {FAMILIES}")
    k, n = num_tasks, size
    gen = torch.Generator().manual_seed(seed)
    g = torch.randn(k, n, generator=gen, dtype=D)
    if family == "zero":
        g.zero_()
    elif family == "zero rows":
        mask = torch.rand(k, generator=gen) < 0.4
        mask[int(torch.randint(k, (1,), generator=gen))] = True
        g[mask] = 0
    elif family == "duplicated rows" and k > 1:
        g = duplicated_row(g, int(torch.randint(1, k, (1,), generator=gen)))
    elif family == "opposed rows" and k > 1:
        g = opposed_row(g, 1)
    elif family == "rank deficient" and k > 1 and n > 1:
        r = int(torch.randint(1, min(k, n), (1,), generator=gen))
        g = torch.randn(k, r, generator=gen, dtype=D) @ torch.randn(r, n, generator=gen, dtype=D)
    elif family == "more tasks than dimensions":
        g = torch.randn(k, max(1, k - 1), generator=gen, dtype=D)
    elif family == "0 inside the hull" and k > 1:
        g = torch.randn(k, max(1, min(n, k - 1)), generator=gen, dtype=D)
        w = torch.rand(k, generator=gen, dtype=D) + 0.1
        g[-1] = -(w[:-1] @ g[:-1]) / w[-1]
    elif family == "leaning one way":
        u = torch.randn(n, generator=gen, dtype=D)
        u = u / u.norm()
        r = max(1, n // 2)
        noise = torch.randn(k, r, generator=gen, dtype=D) @ torch.randn(r, n, generator=gen, dtype=D) / r ** 0.5
        noise = noise - (noise @ u)[:, None] * u
        g = (0.2 + torch.rand(k, 1, generator=gen, dtype=D)) * u + noise
    elif family == "norms spread":
        g = g * 10.0 ** (4 * torch.rand(k, 1, generator=gen, dtype=D) - 2)
    return g.to(dtype)
