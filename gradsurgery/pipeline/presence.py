"""Which tasks a step has (a ``None`` loss: a task absent from the batch).

:class:`Presence` refuses what an optimizer cannot take, and under ``torch.distributed``
turns each rank's presence into the step's: ``begin`` (this rank's, into the all-reduce;
zero stand-ins), ``apply_counts`` (the all-reduced counts ``n_k``: refusals on every rank
together, the ``R / n_k`` factors), ``read`` (the one host read, which closes the finiteness
check and also says which present task's gradient is exactly zero: the trap of a masked
loss over a batch without labels for its task, which should have been ``None``)."""
from __future__ import annotations

import math
import warnings
from typing import Any, Sequence

import torch
from torch import Tensor

from ..methods import Method, available, get
from ..scale.distributed import NoSync, Sync, check_heads_outside_ddp
from . import graph


def read_checks(flag: Tensor, gram: Tensor | None, task_losses: Tensor,
                present: list[bool] | None) -> tuple[bool, list[int]]:
    """One host read: whether ``flag`` (see the optimizer's finiteness check) is finite,
    and the present tasks whose gradient is exactly zero: a zero diagonal of the Gram
    ``||g_k||^2`` when there is one, else (loss weighting: no task gradients are formed)
    an exactly zero loss (``task_losses``: the present tasks' losses)."""
    tasks = list(range(len(task_losses))) if present is None else [k for k, p in enumerate(present) if p]
    if gram is not None:
        diagonal = gram.diagonal()
        zero = diagonal == 0 if present is None else diagonal[torch.tensor(tasks, device=gram.device)] == 0
    else:
        zero = task_losses == 0
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


class Presence:
    """The absent tasks of one optimizer: which methods and options may see them, and
    under ``torch.distributed`` how each rank's presence becomes the step's (see
    :mod:`gradsurgery.scale.distributed`). ``loss_vector`` is the present losses stacked,
    still in the graph; ``task_losses`` their detached float32+ values."""

    def __init__(self, method: Method, num_tasks: int, *, rotations: bool, weight_ema: bool, check_finite: bool):
        self.method, self.num_tasks = method, num_tasks
        self.rotations, self.weight_ema, self.check_finite = rotations, weight_ema, check_finite
        self.warned: set[int] = set()  # tasks warned about an exactly zero gradient

    def across_ranks(self, sync: Sync | NoSync) -> bool:
        """Whether presence is all-reduced (and read with the finiteness flag) this step."""
        return isinstance(sync, Sync) and self.check_finite

    def refuse(self, present: list[bool], world_size: int, ranks: str = "") -> None:
        """Absent tasks need a method that can decide over any subset of the tasks
        (``ranks``: how the tasks are absent across ranks, said in the error)."""
        if not any(present):
            raise ValueError(f"backward() got None for every task{ranks}; skip the batch instead (nothing was changed)")
        reasons = []
        if not self.method.subset_safe:
            reasons.append(f"{self.method!r} cannot decide over a subset of the tasks: "
                           f"{self.method.subset_refusal or 'it keeps per-task state'} "
                           f"(methods that can: {', '.join(subset_methods())})")
        if self.rotations:
            reasons.append("rotations align every task's gradient")
        if self.weight_ema:
            reasons.append("weight_ema smooths the weights of every task")
        if world_size > 1 and not self.check_finite:
            reasons.append("under torch.distributed the ranks learn each other's tasks from a host read, which "
                           "check_finite=False rules out: pass check_finite=True (the other ranks, which cannot "
                           "know of this error, now wait in the step's all-reduce; see docs/scale.md)")
        if reasons:
            raise ValueError(f"backward() got None for absent task(s) {[k for k, p in enumerate(present) if not p]}"
                             f"{ranks}, but " + "; ".join(reasons)
                             + ". Nothing was changed; skip such batches, or pick a method that supports them.")

    def check(self, present: list[bool], sync: Sync | NoSync) -> None:
        """Refuses absent tasks here, unless presence goes across ranks (then every rank
        refuses together, in :meth:`apply_counts`)."""
        if not all(present) and not self.across_ranks(sync):
            self.refuse(present, sync.world_size)

    def begin(self, sync: Sync | NoSync, losses: Sequence[Tensor | None], path: Any, reached: dict[int, set[int]],
              params: list[Tensor]) -> tuple[list[Tensor | None], list[bool] | None]:
        """Notes this rank's presence for the step's all-reduce (see :meth:`note`); returns
        the losses, a ``None`` replaced by 0 read from its task's view when all ``K`` go
        on (distributed-exact: a task absent here may be present on other ranks; its row
        of ``G`` is exactly 0), and the presence the method sees until the counts are known
        (``None``: every task; per-rank surgery: this rank's tasks, as one process)."""
        present = [loss is not None for loss in losses]
        if not isinstance(sync, Sync) or not self.across_ranks(sync):
            return list(losses), None if all(present) else present
        self.note(sync, present, reached, params, path.shared)
        if not sync.exact and any(present):
            return list(losses), None if all(present) else present
        return [_zero_loss(path.views[k]) if loss is None else loss for k, loss in enumerate(losses)], None

    def note(self, sync: Sync, present: list[bool], reached: dict[int, set[int]],
             params: list[Tensor], shared: Sequence[Tensor]) -> None:
        """Hands the step's all-reduce this rank's presence and which tasks reached which
        head parameter (the backbone's parameters, found once, are not the heads')."""
        if sync.backbone is None:  # the first step: the backbone's parameters, and the heads outside DDP
            backbone = {id(p) for p in graph.shared_parameters(shared, params)}
            check_heads_outside_ddp(p for p in params if id(p) in reached and id(p) not in backbone)
            sync.backbone = backbone
        reach = torch.zeros(len(params), self.num_tasks, dtype=torch.float64)
        for i, p in enumerate(params):
            for task in reached.get(id(p), ()):
                reach[i, task] = 1.0
        sync.note_presence(present, params, reach, [id(p) not in sync.backbone for p in params])

    def apply_counts(self, sync: Sync | NoSync, path: Any, loss_vector: Tensor, task_losses: Tensor,
                     present: list[bool] | None) -> tuple[Tensor, Tensor, list[bool] | None]:
        """Once the all-reduced counts ``n_k`` are known (``sync.counts``): raises on every
        rank together when the step must be refused, and returns the losses and presence
        the method decides over. Distributed-exact: the tasks present on some rank, with
        ``R / n_k`` folded into the losses (``sync.folded``) or into the rows of ``G``;
        per-rank surgery: this rank's tasks. Identity when single-process or done."""
        if not isinstance(sync, Sync) or sync.counts is None or sync.presence_applied:
            return loss_vector, task_losses, present
        sync.presence_applied = True
        counts, r = [int(c) for c in sync.counts.tolist()], sync.world_size
        missing = [k for k, c in enumerate(counts) if c < r]
        if sync.exact:
            decided = [c > 0 for c in counts]
            if not all(decided):
                self.refuse(decided, r, " on every rank")
        else:
            decided = [True] * self.num_tasks if present is None else present
            if sync.empty:
                raise ValueError(f"backward() got None for every task on {sync.empty} rank(s); per-rank surgery "
                                 "(distributed_exact=False) has nothing to decide there. Nothing was changed; "
                                 "use distributed_exact=True or skip the batch on every rank")
            if missing:
                self.refuse([c == r for c in counts], r, " on some ranks (per-rank surgery)")
        if self.rotations and missing:
            raise ValueError(f"task(s) {missing} are absent on some ranks, but rotations align every task's "
                             "gradient on every rank. Nothing was changed; skip such batches on every rank")
        if sync.inexact:
            raise ValueError(f"a head parameter is read by several tasks, and task(s) {missing} are absent on some "
                             "ranks: its gradient of the global batch cannot be told apart from the ranks' sum. "
                             "Nothing was changed; give each task its own head, or skip such batches on every rank")
        if not sync.exact:  # this rank's tasks, already the only ones in the losses
            return loss_vector, task_losses, present
        if (factors := sync.row_factors()) is not None:
            if sync.folded:
                loss_vector = loss_vector * factors.to(loss_vector.device, loss_vector.dtype)
            else:
                for g in path.grads:
                    g.mul_(factors.to(g.device, g.dtype).view(-1, *[1] * (g.dim() - 1)))
        self.method.present = None if all(decided) else decided
        if all(decided):
            return loss_vector, task_losses, None
        index = torch.tensor(decided).nonzero().flatten()
        return loss_vector[index.to(loss_vector.device)], task_losses[index.to(task_losses.device)], decided

    def read(self, flag: Tensor, gram: Tensor | None, task_losses: Tensor, present: list[bool] | None) -> bool:
        """The step's one host read: whether everything is finite; a present task with an
        exactly zero gradient is warned about (once per task), from the same read."""
        finite, zero = read_checks(flag, gram, task_losses, present)
        if finite and zero:
            warn_zero_gradients(zero, self.warned)
        return finite


def subset_methods() -> list[str]:
    """Names of the registered methods that accept absent tasks."""
    return [name for name in available() if get(name).subset_safe]


def _zero_loss(view: Any) -> Tensor:
    """0 read from a view (a tensor, or a tuple whose first tensor is read)."""
    return (view if isinstance(view, Tensor) else view[0]).reshape(-1)[0] * 0
