"""Mixed precision: a ``torch.amp.GradScaler``'s loss scale inside the pipeline.

With ``opt.backward(losses, scaler=scaler)`` the task backward runs on ``S * objective``
(``S`` the scaler's current scale), so the task gradients ``S G``, the heads' gradients
and, through ``c^T (S G)``, the backbone's gradients are all scaled, as after
``scaler.scale(loss).backward()``. The methods decide from the unscaled Gram
``M = (S G)(S G)^T / S^2`` in float32 or wider: with the power-of-two scales GradScaler
uses, the division is exact, so the scale never changes a decision. Gradients the method
writes to its own parameters (GradNorm's weights, rotations) are multiplied by ``S`` so
that ``scaler.unscale_`` / ``scaler.step`` treat them like every other gradient.
"""
from __future__ import annotations

from contextlib import contextmanager
from typing import ContextManager, Iterator, overload

import torch
from torch import Tensor


class Scaling:
    """The loss scale of one ``backward`` under a ``GradScaler`` (``scale``: a 0-d tensor),
    or none (``scale=None``: every method is the identity, so the pipeline has no
    ``is None`` branches)."""

    def __init__(self, scale: Tensor | None):
        self.scale = scale

    @classmethod
    def of(cls, scaler: torch.amp.GradScaler | None, device: torch.device) -> "Scaling":
        return cls(loss_scale(scaler, device))

    @property
    def active(self) -> bool:
        return self.scale is not None

    @overload
    def scaled(self, t: Tensor) -> Tensor: ...
    @overload
    def scaled(self, t: None) -> None: ...
    def scaled(self, t: Tensor | None) -> Tensor | None:
        """``t`` times the loss scale (the losses the backward passes run on)."""
        return t if self.scale is None or t is None else t * self.scale

    def unscale(self, t: Tensor) -> Tensor:
        return t if self.scale is None else t / self.scale.to(t.dtype)

    def unscale_gram(self, gram: Tensor | None) -> Tensor | None:
        return gram if self.scale is None or gram is None else unscale_gram(gram, self.scale)

    def method_grads(self, params: list[Tensor]) -> ContextManager[None]:
        """See :func:`method_grads_scaled`."""
        return method_grads_scaled(params, self.scale)


def loss_scale(scaler: torch.amp.GradScaler | None, device: torch.device) -> Tensor | None:
    """The scaler's current scale as a 0-d float32 tensor on ``device`` (no host read), or
    ``None`` without a scaler or with a disabled one."""
    if scaler is None:
        return None
    if not isinstance(scaler, torch.amp.GradScaler):
        raise TypeError(f"scaler must be a torch.amp.GradScaler, got {type(scaler).__name__}")
    if not scaler.is_enabled():
        return None
    return scaler.scale(torch.ones((), dtype=torch.float32, device=device))


def unscale_gram(gram: Tensor, scale: Tensor) -> Tensor:
    """``M / S^2``: the Gram of the unscaled gradients, from the Gram of the scaled ones."""
    inv = scale.reciprocal().to(gram.dtype)
    return gram * (inv * inv)


@contextmanager
def method_grads_scaled(params: list[Tensor], scale: Tensor | None) -> Iterator[None]:
    """Inside the block, gradients written to ``params`` are the unscaled ones; on exit
    they are multiplied by ``scale`` and added to what the parameters held before (so
    gradient accumulation works). On an exception the old gradients are restored."""
    if scale is None or not params:
        yield
        return
    saved = [p.grad for p in params]
    for p in params:
        p.grad = None
    try:
        yield
    except BaseException:
        for p, old in zip(params, saved):
            p.grad = old
        raise
    for p, old in zip(params, saved):
        new = p.grad
        if new is not None:
            new = new * scale.to(new.device)
        p.grad = old if new is None else new if old is None else old + new


def mark_overflow(params: list[Tensor]) -> None:
    """Sets the gradients of ``params`` to NaN, so that ``GradScaler`` sees the overflow in
    them too and skips the step."""
    for p in params:
        p.grad = torch.full_like(p, float("nan"))
