"""SDMGrad: stochastic direction-oriented multi-objective gradient descent (Xiao, Ban and
Ji, "Direction-oriented Multi-objective Learning: Simple and Provable Stochastic
Algorithms", NeurIPS 2023, Algorithm 1).

The update stays close to a preferred direction ``g_0 = w~^T G`` (``w~ = pref_vector``,
default the mean ``1/K``) while it improves every task: the weights ``w`` (kept across
steps, ``w_0 = 1/K``) take ``n_iter`` steps of projected SGD with momentum on
``1/2 ||G^T (w + lambda w~)||^2``, whose gradient is estimated from two **independent**
samples, and a third one makes the update:

.. math::  M = \\xi_1 \\xi_2^\\top,\\quad A = M / s^2,\\quad
           s = \\operatorname{mean}_k \\sqrt{\\max(M_{kk}, 0) + 10^{-4}},\\qquad
           v \\leftarrow \\mu v + A (w + \\lambda \\tilde w),\\quad
           w \\leftarrow \\Pi_\\Delta(w - \\eta v)

.. math::  g = K\\,\\frac{(w + \\lambda \\tilde w)^\\top \\zeta}{1 + \\lambda},
           \\qquad g \\leftarrow g \\min\\Big(1, \\frac{\\text{max\\_norm}}{\\|g\\| + 10^{-6}}\\Big)

as the official code (OptMN-Lab/sdmgrad, ``methods/weight_methods.py``, ``SDMGrad``) does:
``lr`` (``eta``) 10, ``momentum`` (``mu``) 0.5 with a fresh buffer every step, ``n_iter`` 20,
``lambda_`` 0.3 (its NYU-v2 runs), ``K x`` (the sum loss's scale, ``reduction="sum"``;
``"mean"`` is LibMTL's and torchjd's), the gradient clipped to ``max_norm=1`` (``None``: off;
``||g||`` is the norm of the batch-summed update, the gradient of a bias on ``z``, as the
official code clips the shared parameters' gradient). The diagonal is clamped at 0 before the
square root (LibMTL's guard; the official ``sqrt(M_kk + 1e-4)`` is nan when two samples
disagree, ``M_kk < -1e-4``).

**Three independent samples from one batch**: the batch is split into three contiguous
parts ``zeta, xi_1, xi_2`` (:func:`gradsurgery.methods.modo.batch_parts`, see
``docs/two_batches.md``); only ``zeta``'s samples receive the update (scaled to ``zeta``'s
mean loss), the heads their whole batch's loss gradient. Level: the representation only.
"""
from __future__ import annotations

from typing import Sequence

import torch
from torch import Tensor

from .base import ElementWise, check_option
from .modo import batch_parts, part_gradient, project_simplex
from .registry import register


@register("sdmgrad")
class SDMGrad(ElementWise):
    """Direction-oriented weights by projected SGD on a triply sampled batch."""

    state_names = ("w",)
    subset_refusal = ("its weights w are kept across steps on the simplex of all K tasks")

    has_weights = True

    levels = ("rep",)

    def __init__(self, lambda_: float = 0.3, n_iter: int = 20, lr: float = 10.0, momentum: float = 0.5,
                 pref_vector: Sequence[float] | Tensor | None = None, max_norm: float | None = 1.0,
                 reduction: str = "sum"):
        self.lambda_ = check_option("lambda_", lambda_, float, "[0, inf)")
        self.n_iter = check_option("n_iter", n_iter, int, "[1, inf)")
        self.lr = check_option("lr", lr, float, "(0, inf)", "the inner SGD's step")
        self.momentum = check_option("momentum", momentum, float, "[0, 1)")
        self.max_norm = None if max_norm is None else check_option("max_norm", max_norm, float, "(0, inf)",
                                                                   "None: no clipping")
        if reduction not in ("sum", "mean"):
            raise ValueError(f"reduction must be 'sum' (the official x K) or 'mean', got {reduction!r}")
        if pref_vector is not None:
            pref_vector = torch.as_tensor(pref_vector, dtype=torch.float64).clone()
            if pref_vector.dim() != 1 or not torch.isfinite(pref_vector).all():
                raise ValueError(f"pref_vector must be a finite vector of K weights, got {pref_vector.tolist()!r}")
        self.pref_vector = pref_vector
        self.reduction = reduction

    def bind(self, num_tasks: int, *, device: torch.device, dtype: torch.dtype,
             generator: torch.Generator) -> None:
        if self.pref_vector is not None and self.pref_vector.shape[0] != num_tasks:
            raise ValueError(f"pref_vector has {self.pref_vector.shape[0]} entries for {num_tasks} tasks; "
                             "give one weight per task")
        super().bind(num_tasks, device=device, dtype=dtype, generator=generator)
        self.pref = (torch.full((num_tasks,), 1.0 / num_tasks, dtype=torch.float64) if self.pref_vector is None
                     else self.pref_vector).to(device)
        self.w = torch.full((num_tasks,), 1.0 / num_tasks, dtype=torch.float64, device=device)

    def combine(self, grads: Tensor, losses: Tensor, rep: Tensor | None) -> Tensor:
        zeta, xi1, xi2 = batch_parts(grads, rep, 3, "sdmgrad")
        a = part_gradient(xi1, grads.shape[1]) @ part_gradient(xi2, grads.shape[1]).T
        scale = (a.diagonal().clamp_min(0) + 1e-4).sqrt().mean()
        a = a / scale**2
        w, target = self.w, self.lambda_ * self.pref
        velocity = None
        for _ in range(self.n_iter):
            step = a @ (w + target)
            velocity = step if velocity is None else self.momentum * velocity + step
            w = project_simplex(w - self.lr * velocity)
        self.w = w
        c = self.use_weights((w + target) / (1 + self.lambda_))
        if self.reduction == "sum":
            c = c * self.num_tasks
        update = torch.tensordot(c.to(grads.dtype), zeta, dims=1) * (grads.shape[1] / zeta.shape[1])
        if self.max_norm is not None:
            norm = torch.linalg.vector_norm(update.reshape(update.shape[0], -1).sum(0).to(torch.float64))
            update = update * (self.max_norm / (norm + 1e-6)).clamp(max=1.0).to(update.dtype)
        g = torch.zeros_like(grads[0])
        g[:zeta.shape[1]] = update
        return g
