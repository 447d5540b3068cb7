"""The finite check of one ``backward``: one flag, read once on the host, before any state
changes; then either a clear error or, under a ``GradScaler``, the overflow's NaN step."""
from __future__ import annotations

from typing import NoReturn

import torch
from torch import Tensor

from ..methods.base import Method
from ..scale import amp
from ..scale.distributed import NoSync, Sync
from . import stages
from .paths import Path


def finite_flag(losses: Tensor, path: Path, gram: Tensor | None, head_grads: list[Tensor | None],
                backbone_loss: Tensor | None) -> Tensor:
    """A 0-d tensor: 0 when the losses, the task gradients, the heads' gradients and
    ``backbone_loss`` are all finite, NaN otherwise (no host read; under
    ``torch.distributed`` it is summed across ranks with the Gram)."""
    parts = [losses, path.nonfinite_indicator(gram).to(losses.dtype)]
    present = [g for g in head_grads if g is not None]
    if present:
        parts.append(torch.stack(torch._foreach_norm(present)).to(losses.dtype))
    if backbone_loss is not None:
        parts.append(backbone_loss.detach().reshape(1).to(losses.dtype))
    return (torch.cat(parts) * 0).sum()


def reduce(sync: Sync | NoSync, path: Path, gram: Tensor | None, task_losses: Tensor,
           head_grads: list[Tensor | None], backbone_loss: Tensor | None, *, check: bool,
           reduce_losses: bool) -> tuple[Tensor, Tensor | None, Tensor, list[Tensor | None]]:
    """The step's one all-reduce (the Gram and, when ``reduce_losses``, the losses, under
    exact surgery; the finite flag, :func:`finite_flag` when ``check``; the heads'
    gradients; the identity when single-process). Returns the reduced flag (NaN when
    anything was not finite on any rank; read once on the host by
    :func:`gradsurgery.pipeline.presence.read_checks`), Gram, losses and heads' gradients."""
    flag = finite_flag(task_losses, path, gram, head_grads, backbone_loss) if check else task_losses.new_zeros(())
    total, reduced, flag, head_grads = sync.reduce(gram if sync.exact else None,
                                                   task_losses if sync.exact and reduce_losses else None,
                                                   flag, head_grads)
    gram, task_losses = gram if total is None else total, task_losses if reduced is None else reduced
    return flag, gram, task_losses, head_grads


def raise_nonfinite(losses: Tensor, loss_weights: Tensor | None, path: Path, backbone_loss: Tensor | None,
                    method: Method, world_size: int) -> NoReturn:
    """Names what was not finite (a second look, after the one read said so)."""
    bad_loss = (~torch.isfinite(losses)).nonzero().flatten().tolist()
    if bad_loss:
        raise ValueError(f"non-finite loss for task(s) {bad_loss} (values {losses.tolist()}); "
                         "nothing was changed: skip this batch or lower the learning rate")
    if loss_weights is not None and not bool(torch.isfinite(loss_weights).all()):
        raise ValueError(f"the loss weights of {method!r} are not finite for the losses {losses.tolist()}; "
                         f"it needs {method.loss_domain or 'other losses'}. Nothing was changed")
    if backbone_loss is not None and not torch.isfinite(backbone_loss).all():
        raise ValueError("backbone_loss is not finite; nothing was changed")
    bad_task = (~torch.isfinite(path.flat_task_gradients()).all(1)).nonzero().flatten().tolist()
    where = f"task(s) {bad_task}" if bad_task else "the heads' parameters"
    if world_size > 1 and not bad_task:
        where = "the heads' parameters or on another rank"
    raise FloatingPointError(f"non-finite gradient in {where} although the losses are finite; "
                             "nothing was changed (use a GradScaler for mixed precision)")


def overflow_backward(path: Path, head_params: list[Tensor], head_grads: list[Tensor | None],
                      backbone_loss: Tensor | None, own_params: list[Tensor]) -> None:
    """Overflow under a GradScaler: the method is not consulted, so its state (RNG,
    counters, initial losses, parameters) stays as it was; NaN goes through the backbone
    (under DDP its all-reduce runs on every rank as usual) and into the method's
    parameters' gradients, so ``scaler.step`` skips the step."""
    path.nan_backward(backbone_loss)
    stages.accumulate(head_params, head_grads)
    amp.mark_overflow(own_params)
