"""RLW: random loss weighting (Lin et al., "Reasonable Effectiveness of Random Weighting:
A Litmus Test for Multi-Task Learning", TMLR 2022; arXiv 2111.10603, 2021).

Every optimizer step draws ``w = softmax(xi)``, ``xi ~ N(0, I_K)`` (the paper's default
distribution; weights sum to 1) and weights the losses with it — heads and backbone alike;
no Gram is computed. The draw comes from the method's generator: it is previewed from a
copy of the generator's state by the pure :meth:`loss_weights` and committed by
:meth:`update` once a ``backward`` is accepted, so a rejected step draws nothing. The
micro-batches of one optimizer step (gradient accumulation) share the draw: it is kept
until :meth:`after_step`.
Level: loss weighting.
"""
from __future__ import annotations

import torch
from torch import Tensor

from .base import LossWeighting
from .registry import register


@register("rlw")
class RLW(LossWeighting):
    """Random softmax-normal loss weights, redrawn every optimizer step."""

    state_names = ("current",)
    subset_safe = True  # absent tasks: the softmax over the present tasks' normals

    current: Tensor | None = None  #: this optimizer step's committed draw

    def _draw(self, generator: torch.Generator | None, like: Tensor) -> Tensor:
        xi = torch.randn(self.num_tasks, generator=generator, dtype=torch.float64)
        return torch.softmax(xi, 0).to(like, non_blocking=True)

    def loss_weights(self, losses: Tensor) -> Tensor:
        if self.current is not None:
            return self._present(self.current.to(losses))
        assert self.generator is not None, "RLW draws from the generator bind() gives it"
        preview = torch.Generator()
        preview.set_state(self.generator.get_state())
        return self._present(self._draw(preview, losses))

    def _present(self, weights: Tensor) -> Tensor:
        """The present tasks' weights renormalised: ``softmax`` of their normals."""
        index = self.present_index(weights)
        if index is None:
            return weights
        kept = weights[index]
        return kept / kept.sum()

    def update(self, losses: Tensor) -> None:
        if self.current is None:
            self.current = self._draw(self.generator, losses)  # commit the previewed draw

    def after_step(self) -> None:
        self.current = None
