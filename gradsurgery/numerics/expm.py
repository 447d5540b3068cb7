"""The matrix exponential of skew-symmetric stacks (the rotations' parametrisation): Taylor
scaling and squaring with a tight 2-norm bound and a hand-written exact backward.

**Forward.** ``exp(X) ~ T_d(X / 2^s)^(2^s)``, ``T_d(X) = sum_{j <= d} X^j / j!``. ``T_d`` is
evaluated from the powers ``X, .., X^q`` by Horner's rule in ``X^q`` over ``r = d / q``
blocks of degree ``< q`` (Paterson-Stockmeyer)::

    V_{r-1} = B_{r-1} + X^d / d!,   V_j = B_j + X^q V_{j+1},   T_d = V_0,
    B_j = sum_{i < q} X^i / (qj + i)!

with ``(d, q)`` in (1, 1), (2, 2), (4, 2), (6, 3), (9, 3), (12, 3), (16, 4): ``q - 1 + r - 1``
matrix products (0, 1, 2, 3, 4, 5, 6). The plan ``(d, s)`` is the cheapest (forward and,
when a gradient is wanted, backward products) for which the truncation error is below the
unit roundoff ``u`` for the value and ``64 u`` for the derivative (:func:`_taylor_theta`),
given ``rho >= ||X||_2``: for skew-symmetric ``X``, ``||X^j||_2 = ||X||_2^j`` and the even
powers are symmetric, so ``rho = min(||X||_1, ||X^2||_1^(1/2), ||X^4||_1^(1/4))`` (the
powers the plan computes anyway).

**Backward** (:class:`_SkewExp`): the exact adjoint of the evaluated approximant, reusing
the forward's powers and Horner values: ``G <- G E^T + E^T G`` through each squaring (2
products), ``dV_{j+1} = (X^q)^T dV_j``, ``dX^q += dV_j V_{j+1}^T`` through Horner (2 per
block), then the powers. The domain is the skew-symmetric matrices, so only the skew part
of ``dX`` is returned (which is all that ``skew(A)`` passes on to ``A``); by parity, only
``sym(dX^2)``, ``skew(dX^3)`` and ``sym(dX^4)`` reach it, which halves the powers' adjoints:
``X^2 = X X`` costs one product (``skew(-(S X + X S)) = -(S X - (S X)^T)``, ``S`` symmetric),
``X^4 = X^2 X^2`` one, ``X^3 = X^2 X`` two. Backward products per degree: 0, 1, 3, 5, 7, 9,
10 (autograd through the same evaluation: twice the forward's, and every intermediate
kept). Both agree with ``torch.linalg.matrix_exp`` and its derivative to ~1e-13 relative in
float64 (``tests/test_rotation_numerics.py``), and ``gradcheck`` holds exactly.
"""
from __future__ import annotations

import functools
import math
from typing import Any, Sequence

import torch
from torch import Tensor


def skew(a: Tensor) -> Tensor:
    """``tril(a, -1) - tril(a, -1)^T``: geotorch's skew-symmetric frame of ``a`` (over the
    last two dims)."""
    lower = a.tril(-1)
    return lower - lower.transpose(-2, -1)


#: Squarings :func:`expm` runs without a host read (off the CPU): enough for
#: ``||X||_2 <= 2^10 theta_16`` (about 2600 in float32, 840 in float64; a rotation
#: generator that large means training diverged), NaN beyond.
MAX_SQUARINGS = 10

#: Widest rotation whose exponential runs the sync-free plan on an accelerator by default.
#: The fixed plan costs about 3x the products of the host-chosen one (16 + 10 masked
#: squarings forward): negligible at this size, more than a synchronisation above it.
SYNC_FREE_MAX_SIZE = 512

#: ``d -> q``: degree ``d`` of ``T_d`` evaluated by Horner's rule in ``X^q`` (``d = q r``).
_SCHEMES = {1: 1, 2: 2, 4: 2, 6: 3, 9: 3, 12: 3, 16: 4}
#: Products of the powers' adjoints, by the highest power ``q``: ``X^2`` 1, ``X^3`` 2, ``X^4`` 1.
_POWER_ADJOINTS = {1: 0, 2: 1, 3: 3, 4: 4}


def expm(x: Tensor, *, sync_free: bool | None = None) -> Tensor:
    """``exp(x)`` of a stack of skew-symmetric matrices (``(..., m, m)``), differentiable
    (the gradient is the skew-symmetric one; see the module docstring).

    Computed in ``x``'s dtype, or float32 for half-precision ``x`` (the result is cast back),
    with autocast off in the forward and the backward whatever autocast is active around
    the call or its ``backward`` (a half-precision product would not keep ``exp(x)``
    orthogonal, and would mix dtypes in the backward's in-place products).

    Args:
        sync_free: choose the plan without reading ``rho`` on the host: degree 16 and
            :data:`MAX_SQUARINGS` squarings, each applied only where ``i < s``
            (``torch.where``), ``s`` a device tensor. Otherwise host reads (free on the
            CPU) pick the cheapest degree and only the squarings needed. Both plans are
            accurate to the unit roundoff. Default: ``not reads_on_host(x)`` (sync-free on
            an accelerator up to :data:`SYNC_FREE_MAX_SIZE`). Always sync-free while
            TorchDynamo traces the call (``torch.compile``): a host read would become a
            guard on the norm's value, hence a recompilation whenever the plan changes.
    """
    if torch.compiler.is_compiling():
        sync_free = True
    elif sync_free is None:
        sync_free = not reads_on_host(x)
    m = x.shape[-1]
    wide = x.to(torch.promote_types(x.dtype, torch.float32))
    with torch.autocast(x.device.type, enabled=False):
        return _SkewExp.apply(wide.reshape(-1, m, m), sync_free).view(x.shape).to(x.dtype)


def reads_on_host(x: Tensor) -> bool:
    """Whether :func:`expm` picks its plan with host reads by default: on the CPU, where
    reading a number costs nothing, and for rotations wider than
    :data:`SYNC_FREE_MAX_SIZE`, where the sync-free plan's extra products would cost more
    than the synchronisation the read causes."""
    return x.device.type == "cpu" or x.shape[-1] > SYNC_FREE_MAX_SIZE


class _SkewExp(torch.autograd.Function):
    """``exp(X)`` of a ``K x m x m`` skew-symmetric stack with the exact adjoint of the
    evaluated approximant as its backward (skew-symmetric part)."""

    @staticmethod
    def forward(ctx: Any, x: Tensor, sync_free: bool) -> Tensor:  # ctx: autograd's, with our attributes
        grad = ctx.needs_input_grad[0]
        thetas = _THETAS[x.dtype] if x.dtype in _THETAS else _taylor_theta(x.dtype)
        n1 = _norm1(x)
        powers: list = [None, x]  # X^0 (the identity) is never formed
        scale: Tensor | float  # a device tensor when sync-free
        if sync_free:
            x2 = x @ x
            x4 = x2 @ x2
            powers += [x2, x2 @ x, x4]
            rho = torch.stack([n1, _norm1(x2).sqrt(), _norm1(x4).sqrt().sqrt()]).amin()
            degree, theta = 16, thetas[16]
            squarings = (rho / theta).log2().ceil().clamp(0, MAX_SQUARINGS)
            scale = 2 ** -squarings
            powers = [None] + [p * scale ** j for j, p in enumerate(powers[1:], 1)]
        else:  # the host reads: rho and the number of squarings are Python numbers
            host_rho = float(n1)
            if host_rho <= thetas[1] or not math.isfinite(host_rho):
                degree, host_squarings = 1, 0
            else:
                powers.append(x @ x)
                host_rho = min(host_rho, float(_norm1(powers[2])) ** 0.5)
                degree, host_squarings = _plan(host_rho, thetas, grad)
                if degree == 16 or host_squarings:  # X^4 bounds rho tighter, and degree 16 needs it
                    powers += [powers[2] @ x, powers[2] @ powers[2]]
                    host_rho = min(host_rho, float(_norm1(powers[4])) ** 0.25)
                    degree, host_squarings = _plan(host_rho, thetas, grad)
                elif _SCHEMES[degree] == 3:
                    powers.append(powers[2] @ x)
            scale = 2.0 ** -host_squarings
            if host_squarings:
                powers = [None] + [p * scale ** j for j, p in enumerate(powers[1:], 1)]
        q = _SCHEMES[degree]
        horner, out = _horner(powers, q, degree)
        squares = []
        if sync_free:
            for i in range(MAX_SQUARINGS):
                squares.append(out)
                out = torch.where(i < squarings, out @ out, out)
            ok = rho <= theta * 2 ** MAX_SQUARINGS
            out = torch.where(ok, out, torch.nan)
        else:
            for _ in range(host_squarings):
                squares.append(out)
                out = out @ out
        if grad:
            ctx.degree, ctx.sync_free, ctx.scale = degree, sync_free, None if sync_free else scale
            ctx.counts = (q, len(horner), len(squares))
            ctx.save_for_backward(*powers[1:q + 1], *horner, *squares, *([ok, scale] if sync_free else []))
        return out

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx: Any, g: Tensor) -> tuple[Tensor, None]:
        with torch.autocast(g.device.type, enabled=False):  # the backward may run under the caller's autocast
            return _SkewExp._backward(ctx, g.to(ctx.saved_tensors[0].dtype))

    @staticmethod
    def _backward(ctx: Any, g: Tensor) -> tuple[Tensor, None]:
        q, n_horner, n_squares = ctx.counts
        saved = ctx.saved_tensors
        powers = [None, *saved[:q]]
        horner = saved[q:q + n_horner]
        squares = saved[q + n_horner:q + n_horner + n_squares]
        if ctx.sync_free:
            ok, scale = saved[q + n_horner + n_squares:]
            squarings = -scale.log2()
            g = torch.where(ok, g, 0)
            for i in reversed(range(n_squares)):
                e = squares[i].mT
                g = torch.where(i < squarings, torch.baddbmm(g @ e, e, g), g)
        else:
            scale = ctx.scale
            for e in reversed(squares):
                e = e.mT
                g = (g @ e).baddbmm_(e, g)
        d = _horner_adjoint(g, powers, horner, q, ctx.degree)
        # the powers' adjoints: only skew(dX^odd) and sym(dX^even) reach skew(dX)
        if q >= 4:  # X^4 = X^2 X^2: sym(dX^2) += S X^2 + X^2 S, S = sym(dX^4)
            d.baddbmm(2, d[4] + d[4].mT, powers[2], 1.0)
        if q >= 3:  # X^3 = X^2 X: sym(dX^2) += sym(-K X), skew(dX) += skew(X^2 K), K = skew(dX^3)
            k3 = d[3] - d[3].mT
            d.baddbmm(2, k3, powers[1], -0.5)
            d.baddbmm(1, powers[2], k3, 0.5)
        if q >= 2:  # X^2 = X X: skew(dX) += -(S X - (S X)^T), S = sym(dX^2)
            d.baddbmm(1, d[2] + d[2].mT, powers[1], -1.0)
        return (d[1] - d[1].mT).mul_(0.5 * scale), None


def _norm1(x: Tensor) -> Tensor:
    """``max_k ||x_k||_1``, the largest column sum of absolute values over the stack."""
    return x.abs().sum(-2).amax()


def _add_eye(x: Tensor, value: float) -> Tensor:
    x.diagonal(dim1=-2, dim2=-1).add_(value)
    return x


def _horner(powers: list, q: int, degree: int) -> tuple[list[Tensor], Tensor]:
    """``(saved, T_d)``: ``T_d`` by Horner's rule in ``X^q`` from ``powers[i] = X^i``;
    ``saved`` holds ``V_{r-1} / c_{q(r-1)+1}`` (the coefficient of ``X`` in the last block
    is folded into the next product's scale) and ``V_{r-2}, .., V_1`` for the backward."""
    c = _COEFFICIENTS[degree]
    x, xq, r = powers[1], powers[q], degree // q
    if q == 1:
        return [], _add_eye(x.clone(), 1.0)
    top = q * (r - 1)
    sigma = c[top + 1]
    v = x
    for i in range(2, q + 1):
        v = torch.add(v, powers[i], alpha=c[top + i] / sigma)
    saved = [_add_eye(v, c[top] / sigma)]  # a new tensor: q >= 2 added once at least
    for j in reversed(range(r - 1)):
        block = x
        for i in range(2, q):
            block = torch.add(block, powers[i], alpha=c[q * j + i] / c[q * j + 1])
        saved.append(_add_eye(torch.baddbmm(block, xq, saved[-1], beta=c[q * j + 1], alpha=sigma), c[q * j]))
        sigma = 1.0
    out = saved.pop()
    return saved, out


class _Gradients(list):
    """``d[i]``, the gradient of ``X^i``, accumulated in place once this object owns it
    (never in a tensor it only aliases: the incoming gradient or ``dV``)."""

    def __init__(self, q: int):
        super().__init__([None] * (q + 1))
        self.owned = [False] * (q + 1)

    def add(self, i: int, value: Tensor, alpha: float) -> None:
        if self[i] is None:
            self[i], self.owned[i] = (value, False) if alpha == 1 else (value * alpha, True)
        elif self.owned[i]:
            self[i].add_(value, alpha=alpha)
        else:
            self[i], self.owned[i] = torch.add(self[i], value, alpha=alpha), True

    def baddbmm(self, i: int, a: Tensor, b: Tensor, alpha: float) -> None:
        """``d[i] += alpha a b``."""
        if self[i] is None:
            self[i], self.owned[i] = torch.bmm(a, b).mul_(alpha), True
        elif self.owned[i]:
            self[i].baddbmm_(a, b, alpha=alpha)
        else:
            self[i], self.owned[i] = torch.baddbmm(self[i], a, b, alpha=alpha), True


def _horner_adjoint(g: Tensor, powers: list, saved: Sequence[Tensor], q: int, degree: int) -> _Gradients:
    """The gradients of ``X, .., X^q`` (index 1..q) from the gradient ``g`` of ``T_d``:
    the exact adjoint of :func:`_horner`."""
    c = _COEFFICIENTS[degree]
    r = degree // q
    xq_t = powers[q].mT
    d = _Gradients(q)
    dv = g  # dV_j
    for j in range(r - 1):
        sigma = c[q * (r - 1) + 1] if j == r - 2 else 1.0
        v_next = saved[r - 2 - j]  # V_{j+1} / sigma
        for i in range(1, q):
            d.add(i, dv, c[q * j + i])
        d.baddbmm(q, dv, v_next.mT, sigma)
        dv = xq_t @ dv
    for i in range(1, q + 1):
        d.add(i, dv, c[q * (r - 1) + i])
    return d


#: ``d -> (1/0!, .., 1/d!)``, the Taylor coefficients of each degree.
_COEFFICIENTS = {d: tuple(1 / math.factorial(j) for j in range(d + 1)) for d in _SCHEMES}


def _products(degree: int, backward: bool) -> int:
    """Matrix products of evaluating ``T_degree`` (and, with ``backward``, its adjoint)."""
    q = _SCHEMES[degree]
    r = degree // q
    return (q - 1) + (r - 1) + (2 * (r - 1) + _POWER_ADJOINTS[q] if backward else 0)


def _plan(rho: float, thetas: dict[int, float], backward: bool) -> tuple[int, int]:
    """The cheapest ``(degree, squarings)`` accurate for ``||X||_2 <= rho`` (a squaring
    costs one product forward and two backward); fewer squarings break ties."""
    best = None
    for degree, theta in thetas.items():
        s = max(0, math.ceil(math.log2(rho / theta))) if rho > theta else 0
        key = (_products(degree, backward) + s * (3 if backward else 1), s)
        if best is None or key < best[0]:
            best = (key, degree, s)
    assert best is not None  # thetas is never empty
    return best[1], best[2]


@functools.cache
def _taylor_theta(dtype: torch.dtype) -> dict[int, float]:
    """``{d: theta_d}``: the largest ``t = ||X||_2`` for which the truncation errors of
    ``T_d`` stay below ``u`` (the unit roundoff of ``dtype``) for the value,
    ``sum_{j > d} t^j / j!`` (relative, since ``||exp(X)||_2 = 1`` for skew ``X``), and
    below ``64 u`` for the Fréchet derivative, ``sum_{j >= d} t^j / j!`` (relative to the
    direction's norm); found by bisection."""
    unit = torch.finfo(dtype).eps / 2

    def tail(start: int, t: float) -> float:
        return sum(t ** j / math.factorial(j) for j in range(start, start + 40))

    out = {}
    for degree in _SCHEMES:
        lo, hi = 0.0, 8.0
        for _ in range(80):
            mid = (lo + hi) / 2
            ok = tail(degree + 1, mid) <= unit and tail(degree, mid) <= 64 * unit
            lo, hi = (mid, hi) if ok else (lo, mid)
        out[degree] = lo
    return out


#: The thresholds of the dtypes the exponential runs in, computed once here rather than
#: while TorchDynamo traces a compiled call (it would trace the bisection, for minutes).
_THETAS = {dtype: _taylor_theta(dtype) for dtype in (torch.float32, torch.float64)}
