"""The matrix exponential of skew-symmetric stacks (the rotations' parametrisation): Taylor
scaling and squaring with a tight 2-norm bound, differentiated exactly by autograd."""
from __future__ import annotations

import functools
import math

import torch
from torch import Tensor


def skew(a: Tensor) -> Tensor:
    """``tril(a, -1) - tril(a, -1)^T``: geotorch's skew-symmetric frame of ``a`` (over the
    last two dims)."""
    lower = a.tril(-1)
    return lower - lower.transpose(-2, -1)


#: Squarings :func:`expm` runs without a host read (off the CPU): enough for
#: ``||X||_2 <= 2^10 theta_16`` (about 2700 in float32, 840 in float64; a rotation
#: generator that large means training diverged), NaN beyond.
MAX_SQUARINGS = 10


def expm(x: Tensor, *, sync_free: bool | None = None) -> Tensor:
    """``exp(x)`` of a ``K x m x m`` stack of skew-symmetric matrices, differentiable.

    Scaling and squaring of a truncated Taylor series, ``exp(X) ~ T_d(X / 2^s)^(2^s)``,
    with ``d`` and ``s`` chosen so that the truncation error is below the unit roundoff
    (see :func:`_taylor_theta`). The terms are bounded with the 2-norm, which for a
    skew-symmetric (normal) ``X`` is its spectral radius, estimated from above as
    ``rho = min(||X||_1, ||X^2||_1^(1/2), ||X^4||_1^(1/4))`` (``||X^j||_2 <= ||X^j||_1``
    for the symmetric even powers): on trained rotations 2-5x tighter than the 1-norm that
    ``torch.linalg.matrix_exp`` uses, so a lower degree and fewer squarings.
    ``T_d`` is evaluated by Paterson-Stockmeyer in ``X^4`` (degrees 4, 8, 12, 16: 3, 4, 5,
    6 matrix products, ``X^2`` and ``X^4`` among them), the powers computed once and
    rescaled by ``2^-sj``. Autograd through these products is the exact derivative of the
    approximant (about twice the forward's products), which equals the exponential's
    Fréchet derivative to the same accuracy: far cheaper than ``matrix_exp``'s backward,
    which exponentiates a ``2m x 2m`` block matrix.

    Args:
        sync_free: choose the plan without reading ``rho`` on the host: degree 16 and
            :data:`MAX_SQUARINGS` squarings, each applied only where ``i < s``
            (``torch.where``), ``s`` a device tensor. Otherwise one host read picks the
            cheapest degree and only the squarings needed. Both plans are accurate to
            the unit roundoff. Default: ``not reads_on_host(x)`` (sync-free on an
            accelerator up to :data:`SYNC_FREE_MAX_SIZE`).
    """
    sync_free = not reads_on_host(x) if sync_free is None else sync_free
    x2 = x @ x
    x4 = x2 @ x2
    with torch.no_grad():
        rho = torch.stack([x.abs().sum(-2).amax(), x2.abs().sum(-2).amax().sqrt(),
                           x4.abs().sum(-2).amax().sqrt().sqrt()]).amin()
    thetas = _taylor_theta(x.dtype)
    if sync_free:
        degree, theta = thetas[-1]
        squarings = (rho / theta).log2().ceil().clamp(0, MAX_SQUARINGS)
        scale = 2 ** -squarings
    else:
        bound = float(rho)  # the one host read
        degree, theta = next(((d, t) for d, t in thetas if not bound > t), thetas[-1])
        squarings = max(0, math.ceil(math.log2(bound / theta))) if bound > theta and math.isfinite(bound) else 0
        scale = 2.0 ** -squarings
    if sync_free or squarings:
        x, x2, x4 = x * scale, x2 * scale ** 2, x4 * scale ** 4
    out = _taylor(x, x2, x4, degree)
    if not sync_free:
        for _ in range(squarings):
            out = out @ out
        return out
    for i in range(MAX_SQUARINGS):
        out = torch.where(i < squarings, out @ out, out)
    return torch.where(rho <= theta * 2 ** MAX_SQUARINGS, out, torch.nan)


#: Widest rotation whose exponential runs the sync-free plan on an accelerator by default.
#: The fixed plan costs about 3x the products of the host-chosen one (16 + 10 masked
#: squarings forward): negligible at this size, more than a synchronisation above it.
SYNC_FREE_MAX_SIZE = 512


def reads_on_host(x: Tensor) -> bool:
    """Whether :func:`expm` picks its plan with a host read by default: on the CPU, where
    reading a number costs nothing, and for rotations wider than
    :data:`SYNC_FREE_MAX_SIZE`, where the sync-free plan's extra products would cost more
    than the synchronisation the read causes."""
    return x.device.type == "cpu" or x.shape[-1] > SYNC_FREE_MAX_SIZE


def _taylor(x: Tensor, x2: Tensor, x4: Tensor, degree: int) -> Tensor:
    """``T_d(X) = sum_{j <= d} X^j / j!`` from the powers ``X, X^2, X^4``; for ``d > 4``
    by Paterson-Stockmeyer in ``X^4``: ``T = B_0 + X^4 (B_1 + X^4 (B_2 + ...))`` with
    blocks ``B_j`` of degree < 4."""
    c = [1 / math.factorial(j) for j in range(degree + 1)]
    eye = torch.eye(x.shape[-1], dtype=x.dtype, device=x.device)
    x3 = x2 @ x
    if degree == 4:
        return eye + x + x2 * c[2] + x3 * c[3] + x4 * c[4]
    powers = (eye, x, x2, x3)
    blocks = [sum(p * c[4 * j + i] for i, p in enumerate(powers)) for j in range(degree // 4)]
    out = blocks[-1] + x4 * c[degree]
    for block in reversed(blocks[:-1]):
        out = block + x4 @ out
    return out


@functools.cache
def _taylor_theta(dtype: torch.dtype) -> tuple[tuple[int, float], ...]:
    """``(d, theta_d)`` for the Taylor degrees :func:`expm` uses: ``theta_d`` is the largest
    ``||X||_2`` for which the truncation error ``sum_{j > d} ||X||^j / j!`` (a bound on
    ``||exp(X) - T_d(X)||_2``, relative since ``||exp(X)||_2 = 1`` for skew ``X``) stays
    below the unit roundoff of ``dtype``; found by bisection."""
    unit = torch.finfo(dtype).eps / 2

    def tail(degree: int, t: float) -> float:
        return sum(t ** j / math.factorial(j) for j in range(degree + 1, degree + 40))

    out = []
    for degree in (4, 8, 12, 16):
        lo, hi = 0.0, 8.0
        for _ in range(60):
            mid = (lo + hi) / 2
            lo, hi = (mid, hi) if tail(degree, mid) <= unit else (lo, mid)
        out.append((degree, lo))
    return tuple(out)
