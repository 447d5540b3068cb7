"""MoDo: multi-objective gradient with double sampling (Chen, Fernando, Ying and Chen,
"Three-Way Trade-Off in Multi-Objective Learning: Optimization, Generalization and
Conflict-Avoidance", NeurIPS 2023 / JMLR 2024).

MoDo keeps task weights ``lambda`` on the simplex and moves them by one projected
gradient step on ``1/2 ||G^T lambda||^2 + rho/2 ||lambda||^2`` per step, with the Gram
estimated without bias from two **independent** samples ``G_1, G_2``:

.. math::  \\lambda \\leftarrow \\Pi_\\Delta\\big(\\lambda - \\gamma\\,(G_1 G_2^\\top \\lambda
           + \\rho\\,\\lambda)\\big),\\qquad \\lambda_0 = \\tfrac1K \\mathbf 1,\\qquad
           g = \\lambda^\\top G

``samples=2`` (the authors' Trade-Off-MOL code): ``G`` is the whole batch, i.e. the mean of
the two samples' gradients. ``samples=3`` (LibMTL's MoDo): a third sample ``G_3`` alone
makes the update, ``g = lambda^T G_3``. ``gamma`` defaults to 1e-3, the authors' runs
(Trade-Off-MOL ``LibMTL/examples/office/run_office.sh``, ``nyu/run_nyu.sh``; also LibMTL's);
their argparse default is 0.1.

**Independent samples from one batch** (see ``docs/two_batches.md``). The user's loop does
not change: the batch is split along its first dimension into ``samples`` contiguous parts
(``torch.tensor_split``), independent when the loader draws samples independently
(``shuffle=True``). Part ``j``'s task gradient is the gradient of its mean loss w.r.t. a bias
added to ``z``, ``G_j = (1/|B_j|) sum_{i in B_j} dl_i/dz_i`` (``K x features``); the cross
Gram ``G_1 G_2^T`` is ``K x K``. (The per-sample flattened vectors of two parts never share a
coordinate, so their inner products would all be 0.) Level: the representation only;
``level="params"`` (where the batch is already summed) raises, as does a batch smaller than
``samples``.
"""
from __future__ import annotations

import torch
from torch import Tensor

from .base import ElementWise, check_option
from .registry import register


def project_simplex(v: Tensor) -> Tensor:
    """Euclidean projection of ``v`` onto the probability simplex (sort, cumulative sum,
    threshold ``theta``: ``max(v - theta, 0)`` sums to 1), without host reads. ``v`` is first
    shifted so that its largest entry is 0 (the projection does not change): with entries of
    1e18 the cumulative sums would otherwise lose the ``1`` of the constraint."""
    v = v - v.max()
    u = torch.sort(v, descending=True).values
    excess = u.cumsum(0) - 1
    rank = torch.arange(1, v.shape[0] + 1, dtype=v.dtype, device=v.device)
    count = (u - excess / rank > 0).sum().clamp_min(1)
    theta = excess.gather(0, (count - 1).view(1)) / count.to(v.dtype)
    return (v - theta).clamp_min(0)


def batch_parts(grads: Tensor, rep: Tensor | None, parts: int, method: str) -> tuple[Tensor, ...]:
    """Splits the ``K x batch x ...`` representation gradients into ``parts`` contiguous
    parts of the batch (``torch.tensor_split`` along the batch), after checking that the
    batch can be split; raises a ``ValueError`` naming the fix otherwise."""
    if rep is None:
        raise ValueError(f"{method} needs independent samples, and at level='params' the batch is already "
                         "summed into one gradient; use level='rep' (the default), where the batch is split")
    if rep.dim() == 0:
        raise ValueError(f"{method} splits the batch along the representation's first dimension, but the "
                         "representation is a scalar; return z with a leading batch dimension")
    if grads.shape[1] < parts:
        raise ValueError(f"{method} splits every batch into {parts} independent parts and needs at least {parts} "
                         f"samples, got a batch of {grads.shape[1]}; use a larger batch, or drop the last "
                         "incomplete batch (DataLoader(..., drop_last=True))")
    return torch.tensor_split(grads, parts, dim=1)


def part_gradient(part: Tensor, batch: int) -> Tensor:
    """``K x features``, in float64: the gradient of the part's mean loss w.r.t. a bias added
    to ``z``, ``(B / |B_j|) sum_{i in B_j} dL_k/dz_i`` for ``L_k`` the whole batch's mean loss."""
    flat = part.reshape(part.shape[0], part.shape[1], -1).to(torch.float64)
    return flat.sum(1) * (batch / part.shape[1])


@register("modo")
class MoDo(ElementWise):
    """Projected-gradient task weights from a doubly sampled Gram."""

    state_names = ("lambd",)
    legacy_state_names = {"lambda": "lambd"}  # 0.1.0's keys
    subset_refusal = ("its weights lambda live on the simplex of all K tasks and take one step per batch")

    has_weights = True

    levels = ("rep",)

    def __init__(self, gamma: float = 1e-3, rho: float = 0.1, samples: int = 2):
        self.gamma = check_option("gamma", gamma, float, "(0, inf)", "the step size of lambda")
        self.rho = check_option("rho", rho, float, "[0, inf)", "the l2 regularisation of lambda")
        self.samples = check_option("samples", samples, int, "[2, 3]", "2: the authors' code, update with the "
                                    "whole batch; 3: LibMTL, update with a third part")

    def bind(self, num_tasks: int, *, device: torch.device, dtype: torch.dtype,
             generator: torch.Generator) -> None:
        super().bind(num_tasks, device=device, dtype=dtype, generator=generator)
        self.lambd = torch.full((num_tasks,), 1.0 / num_tasks, dtype=torch.float64, device=device)

    def combine(self, grads: Tensor, losses: Tensor, rep: Tensor | None) -> Tensor:
        parts = batch_parts(grads, rep, self.samples, "modo")
        g1, g2 = (part_gradient(p, grads.shape[1]) for p in parts[:2])
        lambd = self.lambd
        cross = g1 @ (g2.T @ lambd)
        self.lambd = lambd = project_simplex(lambd - self.gamma * (cross + self.rho * lambd))
        c = self.use_weights(lambd).to(grads.dtype)
        if self.samples == 2:
            return torch.tensordot(c, grads, dims=1)
        g = torch.zeros_like(grads[0])
        third = parts[2]
        g[grads.shape[1] - third.shape[1]:] = torch.tensordot(c, third, dims=1) * (grads.shape[1] / third.shape[1])
        return g
