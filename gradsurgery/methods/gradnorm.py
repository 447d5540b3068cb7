"""GradNorm: adaptive loss balancing through gradient normalisation (Chen et al.,
ICML 2018).

Learnable task weights ``w`` (start at 1) scale the task gradients, ``g = sum_k w_k g_k``.
The weights follow the GradNorm loss, with the target treated as a constant:

.. math::
    \\mathcal L_{grad} = \\sum_k \\big| w_k \\|g_k\\| - \\overline{w\\|g\\|}\\, r_k^{\\alpha} \\big|,
    \\qquad r_k = \\frac{\\tilde L_k}{\\operatorname{mean}_j \\tilde L_j},\\quad
    \\tilde L_k = \\frac{L_k(t)}{L_k(0)}

so ``d L_grad / d w_k = sign(w_k ||g_k|| - target_k) ||g_k||``, written to the weights'
``.grad``; the wrapped optimizer steps them (param group with ``method_lr``), and after
every step they are clamped positive and renormalised to sum to ``K``. ``L_k(0)`` is taken
at the first step. ``alpha`` (default 1.5) sets how strongly slow tasks are pushed.
Losses are expected positive, as in the paper; a task whose initial loss is 0 counts as
training at the average rate (``r_k = 1``), so no NaN can appear.

Level: the paper measures the norms at the last shared layer's weights ``W``; that is
``MultiTaskOptimizer(..., level="params", shared_params=[W])`` (the Gram, hence the norms,
of the task gradients w.r.t. ``W``). By default the norms are those of the gradients
w.r.t. the shared representation ``z`` (no layer to choose, no Jacobian). Heads get their
own, unweighted loss gradients (gradsurgery's contract for gradient methods); the paper's
``sum_k w_k L_k`` also weights them: ``weight_heads=True``. There is no authors' code; LibMTL's
re-implementation parametrises ``w = K softmax(v)`` and skips the first epoch (weights 1,
``L(0)`` the epoch-0 mean): LibMTL's choices, not the paper's, so not the defaults here.
"""
from __future__ import annotations

import torch
from torch import Tensor, nn

from ..numerics.grads import accumulate_grad
from ..numerics.gram import norms
from .base import GramWeighting, check_option
from .registry import register

#: Smallest weight kept after a step (weights must stay positive).
MIN_WEIGHT = 1e-6


@register("gradnorm")
class GradNorm(GramWeighting):
    """Learnable task weights balancing the task gradients' norms (see module docstring)."""

    state_names = ("task_weights", "initial_losses")
    subset_refusal = ("its weights are trained towards the mean weighted gradient norm over all tasks and "
                      "renormalised to sum to K")

    def __init__(self, alpha: float = 1.5, weight_heads: bool = False):
        self.alpha = check_option("alpha", alpha, float, "[0, inf)")
        self.weight_heads = check_option("weight_heads", weight_heads, bool,
                                         what="True: heads get w_k dL_k, the paper's sum_k w_k L_k")
        self.initial_losses: Tensor | None = None

    def bind(self, num_tasks: int, *, device: torch.device, dtype: torch.dtype,
             generator: torch.Generator) -> None:
        super().bind(num_tasks, device=device, dtype=dtype, generator=generator)
        self.task_weights = nn.Parameter(torch.ones(num_tasks, device=device, dtype=dtype))

    def parameters(self) -> list[nn.Parameter]:
        return [self.task_weights]

    def weights(self, gram: Tensor, losses: Tensor) -> Tensor:
        if self.initial_losses is None:
            self.initial_losses = losses.clone()
        w = self.task_weights.detach().to(gram.dtype)
        n = norms(gram)
        initial = self.initial_losses
        ratio = torch.where(initial != 0, losses / torch.where(initial != 0, initial, 1), 1)
        mean = ratio.mean()
        relative = torch.where(mean > 0, ratio / torch.where(mean > 0, mean, 1), 1).clamp_min(0)
        target = (w * n).mean() * relative.pow(self.alpha)
        grad = torch.sign(w * n - target) * n
        grad = grad.to(self.task_weights.dtype)
        accumulate_grad(self.task_weights, grad)
        return w

    def after_step(self) -> None:
        with torch.no_grad():
            w = self.task_weights.clamp_(min=MIN_WEIGHT)
            w.mul_(self.num_tasks / w.sum())
