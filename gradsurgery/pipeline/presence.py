"""Which tasks a step has: the read that closes the finiteness check also says which
present task's gradient is exactly zero (the trap of a masked loss over a batch without
labels for its task, which should have been ``None``)."""
from __future__ import annotations

import math
import warnings

import torch
from torch import Tensor


def read_checks(flag: Tensor, gram: Tensor | None, values: Tensor,
                present: list[bool] | None) -> tuple[bool, list[int]]:
    """One host read: whether ``flag`` (see the optimizer's finiteness check) is finite,
    and the present tasks whose gradient is exactly zero: a zero diagonal of the Gram
    ``||g_k||^2`` when there is one, else (loss weighting: no task gradients are formed)
    an exactly zero loss (``values``: the present tasks' losses)."""
    tasks = list(range(len(values))) if present is None else [k for k, p in enumerate(present) if p]
    if gram is not None:
        diagonal = gram.diagonal()
        zero = diagonal == 0 if present is None else diagonal[torch.tensor(tasks, device=gram.device)] == 0
    else:
        zero = values == 0
    read = torch.cat([flag.reshape(1).to(torch.float64), zero.to(flag.device, torch.float64)]).tolist()
    return math.isfinite(read[0]), [k for k, z in zip(tasks, read[1:]) if z]


def warn_zero_gradients(tasks: list[int], warned: set[int]) -> None:
    """Warns once per task (``warned``: the tasks already warned about)."""
    new = [k for k in tasks if k not in warned]
    if not new:
        return
    warned.update(new)
    warnings.warn(
        f"the loss of task(s) {new} has an exactly zero gradient w.r.t. its view: a masked loss over a batch "
        "without labels for the task (e.g. cross_entropy(..., ignore_index=...) summed and divided by max(n, 1)) "
        "counts as a task that asks for nothing, so MGDA sends the backbone 0 and FAMO's or RotoGrad's weights "
        "blow up. Pass None for a task absent from the batch (docs/training.md, 'A task absent from a batch'). "
        "Warned once per task.", stacklevel=3)
