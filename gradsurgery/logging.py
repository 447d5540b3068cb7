"""``opt.stats`` as plain scalars for TensorBoard, Weights & Biases or any logger::

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

from collections.abc import Mapping

import torch
from torch import Tensor

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
            i, j = torch.triu_indices(*value.shape, offset=1)
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
