"""The ``K x K`` Gram of the task gradients and what is read off it: norms, cosines,
rescaled and normalised copies; the dtype decisions are made in."""
from __future__ import annotations

import torch
from torch import Tensor


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


def normalized64(gram: Tensor) -> Tensor:
    """``M`` in float64, divided by its mean diagonal (left as is when that is 0). Every
    solver below works on this copy: their solutions are invariant to the scale of ``M``,
    so gradients from 1e-10 to 1e10 give the same decision."""
    m = gram.to(torch.float64)
    scale = m.diagonal().mean()
    return m / torch.where(scale > 0, scale, 1)


def small_matmul(a: Tensor, b: Tensor) -> Tensor:
    """``a @ b`` for the ``K x K`` solvers' operands: a broadcast multiply-sum (one
    element-wise kernel) while the product has at most ``SMALL_PRODUCT`` multiply-adds per
    batch entry, where a BLAS call's start-up dominates; a BLAS matmul above."""
    if a.shape[-2] * a.shape[-1] * b.shape[-1] > SMALL_PRODUCT:
        return a @ b
    return (a.unsqueeze(-1) * b.unsqueeze(-3)).sum(-2)


#: Multiply-adds up to which :func:`small_matmul` broadcasts instead of calling BLAS.
SMALL_PRODUCT = 4096
