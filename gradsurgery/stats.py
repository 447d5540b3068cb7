"""``opt.stats``: what each ``backward`` saw and decided (:class:`StepRecord`), the
optimizer step's stats computed from those records (:func:`step_stats`), and
:func:`stats_to_scalars`, the stats as plain scalars for TensorBoard, Weights & Biases or
any logger::

    writer = torch.utils.tensorboard.SummaryWriter()
    ...
    opt.backward(losses); opt.step()
    for name, value in gs.stats_to_scalars(opt.stats).items():
        writer.add_scalar(name, value, step)

Names: a 0-d entry keeps its key (``"overflow"``), a per-task vector gets the task index
(``"weights/0"``, ``"grad_norms/1"``), the pairwise cosines the pair ``i < j``
(``"cosines/0_1"``; the diagonal is 1 and the matrix symmetric), any other matrix every
entry (``"name/i_j"``).
"""
from __future__ import annotations

import functools
from collections.abc import Mapping, Sequence
from typing import NamedTuple

import torch
from torch import Tensor

from .numerics.gram import cosines, norms


class StepRecord(NamedTuple):
    """What one accepted ``backward`` saw and decided (detached tensors)."""

    losses: Tensor  # the present tasks' losses
    gram: Tensor | None  # their K x K Gram (None: not formed)
    coefficients: Tensor | None  # each unweighted task gradient's coefficient (K)
    present: list[bool] | None  # which tasks had a loss (None: all)
    alignment: Tensor | None  # the rotations' alignment losses


def step_stats(records: Sequence[StepRecord], num_tasks: int) -> dict[str, Tensor]:
    """The stats of one optimizer step: each entry the mean over its ``backward`` calls
    (a flag: any of them), and ``micro_batches`` their count."""
    per_call = [record_stats(record, num_tasks) for record in records]
    stats = {key: functools.reduce(torch.logical_or, [r[key] for r in per_call])
             if per_call[0][key].dtype == torch.bool else torch.stack([r[key] for r in per_call]).sum(0) / len(per_call)
             for key in per_call[0]}
    stats["micro_batches"] = torch.tensor(len(per_call))
    return stats


def record_stats(record: StepRecord, num_tasks: int) -> dict[str, Tensor]:
    """The stats of one ``backward``, the same keys for every method (NaN for what was not
    measured or absent)."""
    losses, gram, coefficients, present, alignment = record
    k = num_tasks
    nan = losses.new_full((k,), float("nan"))
    mask = None if present is None else torch.tensor(present, device=losses.device)
    stats = {"losses": losses if mask is None else nan.masked_scatter(mask, losses),
             "weights": nan if coefficients is None else coefficients.to(losses.dtype).clone(),
             "grad_norms": nan if gram is None else norms(gram).to(losses.dtype),
             "cosines": nan[:, None].expand(k, k).clone() if gram is None else cosines(gram).to(losses.dtype),
             "present": torch.ones(k, dtype=torch.bool, device=losses.device) if mask is None else mask}
    if mask is not None:
        absent = ~mask
        stats["grad_norms"] = stats["grad_norms"].masked_fill(absent, float("nan"))
        stats["cosines"] = stats["cosines"].masked_fill(absent[:, None] | absent[None, :], float("nan"))
    if alignment is not None:
        stats["rotation_losses"] = alignment
    return stats


#: Symmetric ``K x K`` statistics logged once per pair ``i < j``.
PAIRWISE = frozenset({"cosines"})


def stats_to_scalars(stats: Mapping[str, Tensor], prefix: str = "") -> dict[str, float]:
    """``{name: float}`` for every entry of ``stats`` (``opt.stats``), names as in the
    module docstring, each preceded by ``prefix`` (e.g. ``"mtl/"``). Non-finite values
    (e.g. a task absent from the step) are kept as they are. One device-to-host copy for
    all the values."""
    if not isinstance(stats, Mapping):
        raise TypeError(f"stats_to_scalars takes opt.stats (a dict of tensors), got {type(stats).__name__}")
    names: list[str] = []
    values: list[Tensor] = []
    for key, value in stats.items():
        if not isinstance(value, Tensor):
            raise TypeError(f"stats[{key!r}] is a {type(value).__name__}, not a tensor; pass opt.stats "
                            "itself (or a dict of tensors)")
        value = value.detach()
        if value.dim() == 0:
            names.append(f"{prefix}{key}")
            values.append(value.reshape(1))
        elif value.dim() == 2 and key in PAIRWISE and value.shape[0] == value.shape[1]:
            i, j = torch.triu_indices(value.shape[0], value.shape[1], offset=1)
            names += [f"{prefix}{key}/{a}_{b}" for a, b in zip(i.tolist(), j.tolist())]
            values.append(value[i, j])
        else:
            index = torch.cartesian_prod(*(torch.arange(n) for n in value.shape)).reshape(value.numel(), -1)
            names += [f"{prefix}{key}/" + "_".join(map(str, row)) for row in index.tolist()]
            values.append(value.reshape(-1))
    if not values:
        return {}
    device = values[0].device
    flat = torch.cat([v.to(device=device, dtype=torch.float64) for v in values]).tolist()
    return dict(zip(names, flat))
