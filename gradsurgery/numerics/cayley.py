"""The Cayley map of skew-symmetric stacks, geotorch's other trivialisation of ``SO(m)``
(``triv="cayley"``)::

    C(X) = (I - X/2)^{-1} (I + X/2) = 2 P - I,      P = (I - X/2)^{-1}

``I - X/2`` and ``I + X/2`` commute, ``C`` is orthogonal with determinant +1 for every
skew-symmetric ``X`` (it reaches every rotation without the eigenvalue -1), and ``P`` is
always well conditioned: the eigenvalues of ``I - X/2`` are ``1 - i lambda/2`` with
``|.| >= 1``, so ``||P||_2 <= 1`` and no pivoting can fail. One inverse per matrix,
whatever ``||X||`` (the exponential needs more products as the generator grows).

**Derivative.** ``dC = 2 dP = P dX P``, so the adjoint is ``dX = P^T G P^T``: two products,
from the saved ``P``; only its skew-symmetric part is returned (the domain). Exact for
the computed ``P``.

**Batching.** The inverses are taken one matrix at a time: on this torch 2.13 CPU build,
batched LAPACK LU (``torch.linalg.solve``, ``inv``, ``lu_factor`` on a batch) prints MKL
``SLASWP`` errors and returns garbage pivots or hangs. ``inv_ex`` does not check the
factorisation's status, so nothing reads on the host (``I - X/2`` is never singular).
"""
from __future__ import annotations

from typing import Any

import torch
from torch import Tensor


def cayley(x: Tensor) -> Tensor:
    """``(I - x/2)^{-1} (I + x/2)`` of a stack of skew-symmetric matrices (``(..., m, m)``),
    differentiable (the gradient is the skew-symmetric one)."""
    m = x.shape[-1]
    return _Cayley.apply(x.reshape(-1, m, m)).view(x.shape)


class _Cayley(torch.autograd.Function):

    @staticmethod
    def forward(ctx: Any, x: Tensor) -> Tensor:
        a = -0.5 * x
        a.diagonal(dim1=-2, dim2=-1).add_(1.0)
        p = torch.stack([torch.linalg.inv_ex(a[k])[0] for k in range(a.shape[0])])  # see Batching
        ctx.save_for_backward(p)
        out = 2.0 * p
        out.diagonal(dim1=-2, dim2=-1).sub_(1.0)
        return out

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx: Any, g: Tensor) -> Tensor:
        p, = ctx.saved_tensors
        pt = p.mT
        h = pt @ g @ pt
        return (h - h.mT) * 0.5
