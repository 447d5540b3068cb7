"""ExcessMTL: task weights from excess risks (He, Zhou, Zhao and Zhang, "Robust Multi-Task
Learning with Excess Risks", ICML 2024).

Each task's excess risk (its loss above its optimum) is estimated by a second-order Taylor
expansion with a diagonal AdaGrad Hessian (Eqs. 6-7), and the weights take an exponentiated
gradient step on it (Eq. 9), each task's estimate divided by its first one so that the
tasks' scales do not matter (Sec. 3.2):

.. math::  S_k \\leftarrow S_k + g_k^{\\odot 2},\\qquad
           e_k = \\sum_j \\frac{g_{kj}^2}{\\sqrt{S_{kj} + 10^{-7}}},\\qquad
           w \\leftarrow K\\,\\operatorname{softmax}\\big(\\log w + \\eta\\, e / e^{(0)}\\big),
           \\qquad g = \\sum_k w_k\\, g_k

with ``w`` starting at ones (summing to K) and ``eta = robust_step_size``. As in the official
code (yifei-he/ExcessMTL; LibMTL's ``ExcessMTL``), the first step records the baseline
``e^(0)`` and keeps the weights; ``n_warmup_steps=n`` averages the baseline over the first
``n`` steps (the paper's App. C.1 recommends three epochs), weights unchanged meanwhile.
The official ``w * exp(eta r)``, renormalised, is computed in log space (the same update,
without overflow). A task whose baseline is 0 (no gradient yet: absent from the first
batches) records it at its first non-zero excess, its weight unchanged until then (the
official code divides by 0). ``robust_step_size`` defaults to 1, the authors' published
command (yifei-he/ExcessMTL ``README.md``: ``--robust_step_size 1``); their argparse default
(``LibMTL/LibMTL/config.py``) is 1e-2, at which the weights barely move from 1.

Level: either. At the representation level the statistics use the batch-summed gradients
``sum_i dL_k/dz_i`` (LibMTL's ``rep_grad`` convention: the features persist from batch to
batch, the samples do not); the update ``g`` keeps the per-sample shape.

Heads: the official ``sum_k w_k L_k`` backward gives head ``k`` the gradient ``w_k dL_k`` of
the weights just updated. Here :meth:`loss_weights` gives the heads the weights as they
stand before the step (the heads' gradients are computed before the method sees the task
gradients), one step behind, a factor ``exp(eta r_k)`` up to renormalisation from the
official (``r_k`` the excess ratio, about 1: a factor of order ``e^{+-1}`` between tasks at
the default ``eta = 1``). The task gradients the method receives are those of the weighted losses;
it divides the weights out before its statistics (a weight that underflowed to exactly 0,
which the official update never revives either, keeps its statistics frozen).
"""
from __future__ import annotations

import torch
from torch import Tensor

from ..numerics.gram import compute_dtype
from .base import ElementWise, check_option
from .registry import register


@register("excess_mtl")
class ExcessMTL(ElementWise):
    """Exponentiated-gradient task weights driven by estimated excess risks."""

    state_names = ("step", "squares", "baseline", "weights")
    legacy_empty_is_none = ("squares",)  # 0.1.0 saved None as an empty tensor
    subset_refusal = ("each task's excess risk is accumulated at every step (AdaGrad squares) and divided by its "
                      "first estimate, so a step without a task has no term for it")

    has_weights = True

    def __init__(self, robust_step_size: float = 1.0, n_warmup_steps: int = 1):
        self.robust_step_size = check_option("robust_step_size", robust_step_size, float, "(0, inf)")
        self.n_warmup_steps = check_option("n_warmup_steps", n_warmup_steps, int, "[1, inf)",
                                           "the steps averaged into the baseline; 1 is the official code")

    def bind(self, num_tasks: int, *, device: torch.device, dtype: torch.dtype,
             generator: torch.Generator) -> None:
        super().bind(num_tasks, device=device, dtype=dtype, generator=generator)
        cdt = compute_dtype(dtype)
        self.step = 0
        self.squares: Tensor | None = None
        self.baseline = torch.zeros(num_tasks, dtype=cdt, device=device)
        self.weights = torch.ones(num_tasks, dtype=cdt, device=device)

    def loss_weights(self, losses: Tensor) -> Tensor:
        """The current weights (before this step's update): what the heads receive."""
        return self.weights.to(losses.dtype)

    def combine(self, grads: Tensor, losses: Tensor, rep: Tensor | None) -> Tensor:
        k = grads.shape[0]
        signal = grads.reshape(k, -1) if rep is None or rep.dim() == 0 else grads.reshape(k, grads.shape[1], -1).sum(1)
        previous = self.weights
        alive = previous > 0
        ratio = signal.to(self.weights.dtype) / torch.where(alive, previous, 1)[:, None]
        signal = torch.where(alive[:, None], ratio, 0)
        if self.squares is not None and self.squares.shape != signal.shape:
            raise ValueError(f"excess_mtl accumulates squared gradients over {self.squares.shape[1]} features "
                             f"(or parameters), got {signal.shape[1]} features; the representation's per-sample "
                             "shape (or the shared parameters) must stay the same during training")
        square = signal.square()
        squares = square if self.squares is None else self.squares + square
        excess = (square / (squares + 1e-7).sqrt()).sum(1)
        self.squares = squares
        if self.step < self.n_warmup_steps:
            self.baseline = self.baseline + excess / self.n_warmup_steps
        else:
            known = self.baseline > 0
            ratio = torch.where(known, excess / torch.where(known, self.baseline, 1), 0)
            self.baseline = torch.where(known, self.baseline, excess)
            self.weights = k * torch.softmax(self.weights.log() + self.robust_step_size * ratio, 0)
        self.step += 1
        scale = torch.where(alive, self.use_weights(self.weights) / torch.where(alive, previous, 1), 0)
        return torch.tensordot(scale.to(grads.dtype), grads, dims=1)
