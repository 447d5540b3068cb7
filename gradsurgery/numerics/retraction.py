"""Retractions on ``SO(m)`` for rotations held directly (``rotation_param="riemannian"``).

**Lie-algebra coordinates.** A skew-symmetric ``X`` (``m x m``) is stored packed as its
strictly lower triangle, ``m(m-1)/2`` numbers in :func:`torch.tril_indices` order
(:func:`pack`, :func:`unpack`); ``unpack(pack(X)) = X``, and ``unpack`` of a packed
vector ``w`` is ``geotorch``'s ``skew(A)`` of any ``A`` with that lower triangle.

**Retraction.** ``R <- R P(X)``, ``P(X) = I + X + X^2/2 - X^4/8``: three products per
rotation (``X^2``, ``X^4 = (X^2)^2``, ``R P``). It agrees with the exponential to second
order (so it is a retraction: ``P(0) = I``, ``dP(0) = id``), and among ``I + X + a X^2 +
c X^4`` it is the most nearly orthogonal: for skew ``X`` the odd powers cancel in
``P^T P = I + (2a - 1) X^2 + (a^2 + 2c) X^4 + 2ac X^6 + c^2 X^8``, so ``a = 1/2``,
``c = -1/8`` leave ``P^T P - I = -X^6/8 + X^8/64``: one step adds at most
``||X||_2^6 / 8`` (1e-10 at ``||X||_2 = 0.05``, the size of an Adam step at lr 1e-3 for
``m = 256``; the Taylor polynomial ``I + X + X^2/2`` leaves ``X^4/4``, 1.6e-6 there).

**Re-orthogonalisation.** What rounding (and the ``X^6`` term) leaves is removed by one
Newton-Schulz step towards the polar factor, ``R <- R (3 I - R^T R) / 2 = R - R E / 2``,
``E = R^T R - I`` (two products), which maps an error ``E`` to ``-3/4 E^2 - 1/4 E^3``.
It runs every :data:`REORTHOGONALISE_EVERY` retractions (rounding: float32 products of
``m = 256`` add a few 1e-8 each), and on the CPU also as soon as the accumulated bound
``sum ||X||_2^6 / 8`` exceeds :data:`DEFECT_TOLERANCE`, with ``||X||_2 <= ||X^4||_1^{1/4}``
(``X^4`` is at hand; one host read per step, free on the CPU). Off the CPU it runs after
every retraction instead (no host read). Measured in float32 over 2000 steps
(``tests/test_riemannian.py``): ``max |R^T R - I| <= 1e-6`` for steps up to
``||X||_2 = 0.3`` (Adam at lr 1e-2 on ``m = 256``).
"""
from __future__ import annotations

import torch
from torch import Tensor

#: Retractions between two Newton-Schulz re-orthogonalisations (at most).
REORTHOGONALISE_EVERY = 8
#: Accumulated bound on the retractions' orthogonality defect that triggers one sooner.
DEFECT_TOLERANCE = 1e-7


def tril_indices(m: int, device: torch.device | None = None) -> Tensor:
    """``(2, m(m-1)/2)``: the rows and columns of the strict lower triangle (packed order)."""
    return torch.tril_indices(m, m, -1, device=device)


def pack(x: Tensor, indices: Tensor) -> Tensor:
    """``(..., m, m) -> (..., m(m-1)/2)``: the strict lower triangle of ``x``."""
    return x[..., indices[0], indices[1]]


def unpack(w: Tensor, indices: Tensor, m: int) -> Tensor:
    """``(..., m(m-1)/2) -> (..., m, m)``: the skew-symmetric matrix whose strict lower
    triangle is ``w``."""
    lower = w.new_zeros(*w.shape[:-1], m, m)
    lower[..., indices[0], indices[1]] = w
    return lower - lower.transpose(-2, -1)


def retract_(r: Tensor, x: Tensor) -> Tensor:
    """``r <- r (I + x + x^2/2 - x^4/8)`` in place (``r``: ``(K, m, m)`` rotations, ``x``:
    skew-symmetric, same shape). Returns a bound on the orthogonality defect the step
    adds, ``max_k ||x_k^4||_1^{3/2} / 8 >= ||x_k||_2^6 / 8`` (a 0-dim tensor)."""
    x2 = x @ x
    x4 = x2 @ x2
    bound = x4.abs().sum(dim=-2).amax().pow(1.5) / 8
    r.add_(r @ x4.mul_(-0.125).add_(x2, alpha=0.5).add_(x))  # the increment: rounding relative to it
    return bound


def reorthogonalise_(r: Tensor) -> None:
    """One Newton-Schulz step towards the nearest orthogonal matrix, in place:
    ``r <- r - r (r^T r - I) / 2``."""
    e = r.transpose(-2, -1) @ r
    e.diagonal(dim1=-2, dim2=-1).sub_(1.0)
    r.sub_(r @ e, alpha=0.5)


def orthogonality_error(r: Tensor) -> Tensor:
    """``max |r^T r - I|`` over the stack (a 0-dim tensor)."""
    e = r.transpose(-2, -1) @ r
    e.diagonal(dim1=-2, dim2=-1).sub_(1.0)
    return e.abs().amax()
