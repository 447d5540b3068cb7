"""The RotoGrad family (Javaloy & Valera, "RotoGrad: Gradient Homogenization in Multitask
Learning", ICLR 2022), step for step as the ``rotograd`` package 0.1.6.

All three learn one rotation ``R_k`` per task (``rotation = True``; the rotations, their
alignment loss and cooperative mode live in :mod:`gradsurgery.pipeline.rotation`, so any method can
use them with ``rotation=True``, and these can drop them with ``rotation=False``). They
differ in the magnitudes of the combined gradient ``g = sum_k c_k g_k`` (``g_k`` the
original-space task gradients):

- ``rotate_only``: ``c_k = 1`` (the plain sum).
- ``rotograd``: every task gradient rescaled to the same norm, the weighted sum of norms
  with weights given by the relative convergence ``||g_k(t)|| / ||g_k(t0)||``::

      a_k = (||g_k|| / ||g_k(t0)||) / sum_j (||g_j|| / ||g_j(t0)||),
      c_k = (sum_j a_j ||g_j||) / ||g_k||

- ``rotogradnorm``: GradNorm magnitudes, ``c_k = w_k`` with learnable weights
  ``w = K (e^v + 1e-15) / sum_j (e^{v_j} + 1e-15)`` (positive, summing to ``K``; ``v``
  starts at 1), trained on ``sum_k | w_k ||g_k|| - T_k |`` with the constant targets
  ``T_k = ||sum_j w_j g_j|| / K * (r_k / mean_j r_j)^alpha``, ``r_k = L_k(t) / L_k(t0)``.
  Note the reference's target norm: ``||sum_j w_j g_j|| / K``, the norm of the weighted
  *mean*; the gradient also flows through the renormalisation of ``w``.

Shared options:

- ``burn_in_period`` (default 20): the initial losses ``L_k(t0)`` (and RotoGrad's initial
  norms) are taken at the first step and taken again at step ``burn_in_period``.
- ``normalize_losses`` (default False): the losses are divided by ``L_k(t0)`` before
  anything (heads, task gradients, ``backbone_loss``, divided by its own initial value);
  otherwise the raw losses are used, and ``L_k / L_k(t0)`` only feeds RotoGradNorm's
  targets.

Heads get their own (normalised, when asked) loss gradients.
"""
from __future__ import annotations

from typing import ClassVar

import torch
from torch import Tensor, nn

from ..numerics.grads import accumulate_grad
from ..numerics.gram import norms
from .base import GramWeighting, LossWeighting, Method, check_option
from .registry import register

#: Floor of gradient norms and of the sum of convergence ratios (rotograd 0.1.6).
EPS = 1e-15


class _LossNormalization(Method):
    """What the three share: RotoGrad's optional loss normalisation by the initial losses
    ``L(t0)`` (retaken at ``burn_in_period``), and the step counter."""

    subset_refusal = ("it normalises each task by its initial loss, recorded for all tasks at the first steps")

    rotation = True
    levels = ("rep",)
    state_names: ClassVar[tuple[str, ...]] = ("steps", "initial_losses", "initial_backbone_loss", "refresh_backbone")

    def __init__(self, normalize_losses: bool = False, burn_in_period: int = 20):
        self.normalize_losses = check_option("normalize_losses", normalize_losses, bool)
        self.burn_in_period = check_option("burn_in_period", burn_in_period, int, "[0, inf)")
        self.steps = 0
        self.initial_losses: Tensor | None = None
        self.initial_backbone_loss: Tensor | None = None
        self.refresh_backbone = True

    def _fresh(self) -> bool:
        """Whether this step (re)takes the initial values."""
        return self.steps == 0 or self.steps == self.burn_in_period

    def loss_weights(self, losses: Tensor) -> Tensor | None:
        if not self.normalize_losses:
            return None
        initial = losses if self._fresh() or self.initial_losses is None else self.initial_losses
        return 1 / initial

    def _advance(self, losses: Tensor) -> Tensor:
        """Commits the step: (re)takes ``L(t0)`` when due, counts it; returns
        ``L(t) / L(t0)``."""
        fresh = self._fresh()
        if fresh or self.initial_losses is None:
            self.initial_losses = losses.clone()
        self.refresh_backbone = fresh
        self.steps += 1
        return losses / self.initial_losses

    def backbone_loss_weight(self, value: Tensor) -> Tensor | None:
        if not self.normalize_losses:
            return None
        if self.refresh_backbone or self.initial_backbone_loss is None:
            self.initial_backbone_loss = value.detach().clone()
        return 1 / self.initial_backbone_loss


@register("rotate_only")
class RotateOnly(_LossNormalization, LossWeighting):
    """Rotations alone: ``g = sum_k g_k``; see the module docstring."""

    def update(self, losses: Tensor) -> None:
        self._advance(losses)


@register("rotograd")
class RotoGrad(_LossNormalization, GramWeighting):
    """Rotations + magnitudes homogenised by relative convergence; see the module docstring."""

    state_names = (*_LossNormalization.state_names, "initial_norms")

    def __init__(self, normalize_losses: bool = False, burn_in_period: int = 20):
        super().__init__(normalize_losses, burn_in_period)
        self.initial_norms: Tensor | None = None

    def weights(self, gram: Tensor, losses: Tensor) -> Tensor:
        fresh = self._fresh()
        self._advance(losses)
        n = norms(gram).clamp_min(EPS)
        if fresh or self.initial_norms is None:
            self.initial_norms = n.clone()
        ratios = n / self.initial_norms
        alphas = ratios / ratios.sum().clamp_min(EPS)
        return (alphas * n).sum() / n


@register("rotogradnorm")
class RotoGradNorm(_LossNormalization, GramWeighting):
    """Rotations + GradNorm's learnable magnitudes; see the module docstring."""

    state_names = (*_LossNormalization.state_names, "weight_logits")

    def __init__(self, alpha: float = 1.5, normalize_losses: bool = False, burn_in_period: int = 20):
        self.alpha = check_option("alpha", alpha, float, "[0, inf)", "GradNorm's asymmetry")
        super().__init__(normalize_losses, burn_in_period)

    def bind(self, num_tasks: int, *, device: torch.device, dtype: torch.dtype,
             generator: torch.Generator) -> None:
        super().bind(num_tasks, device=device, dtype=dtype, generator=generator)
        self.weight_logits = nn.Parameter(torch.ones(num_tasks, device=device, dtype=dtype))

    def parameters(self) -> list[nn.Parameter]:
        return [self.weight_logits]

    def task_weights(self) -> Tensor:
        """``w = K (e^v + 1e-15) / sum(e^v + 1e-15)``, differentiable w.r.t. ``v``."""
        e = self.weight_logits.exp() + EPS
        return e * (self.num_tasks / e.sum())

    def weights(self, gram: Tensor, losses: Tensor) -> Tensor:
        ratios = self._advance(losses)
        n = norms(gram)
        v = self.weight_logits.detach()
        w = self.task_weights().detach()  # no autograd graph: the gradient is written out below
        fixed = w.to(gram.dtype)
        mean_norm = (fixed @ gram @ fixed).clamp_min(0).sqrt() / self.num_tasks
        target = mean_norm * (ratios / ratios.mean()).pow(self.alpha)
        # d/dv of sum_k |n_k w_k - T_k| (T constant), written out so that weights has no
        # autograd call (a graph break under torch.compile): with u_k = n_k sgn(n_k w_k - T_k)
        # and w_k = K e_k / S, e = exp(v) + eps, S = sum(e): dw_k/dv_j = exp(v_j) (K delta_kj - w_k) / S
        u = n.to(w.dtype) * (n.to(w.dtype) * w - target.to(w.dtype)).sign()
        e = v.exp()
        grad = e / (e + EPS).sum() * (self.num_tasks * u - u @ w)
        accumulate_grad(self.weight_logits, grad)
        return fixed
