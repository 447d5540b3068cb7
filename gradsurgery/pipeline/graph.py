"""Walks of autograd graphs (no backward pass runs): which parameters the shared tensors
depend on, and which views each task's loss reads (a misuse check)."""
from __future__ import annotations

from typing import TYPE_CHECKING, Any, Callable, Iterator, Sequence

from torch import Tensor

if TYPE_CHECKING:
    from .paths import Path


def _walk(roots: Sequence, stop: Callable[[object, int], bool] = lambda node, nr: False
          ) -> Iterator[tuple[object, int]]:
    """Every edge ``(node, nr)`` reachable from the ``roots`` (autograd nodes), each node
    expanded once; an edge for which ``stop`` is true is yielded but not followed."""
    seen: set[int] = set()
    stack = [(root, 0) for root in roots if root is not None]
    while stack:
        node, nr = stack.pop()
        yield node, nr
        if stop(node, nr) or id(node) in seen:
            continue
        seen.add(id(node))
        stack.extend((child, i) for child, i in node.next_functions if child is not None)


def shared_parameters(shared: Sequence[Tensor], candidates: list[Tensor]) -> list[Tensor]:
    """The ``candidates`` the ``shared`` tensors depend on (their gradient accumulators
    are reached by walking the graph), in ``candidates``' order."""
    wanted = {id(p) for p in candidates}
    found = {id(v) for node, _ in _walk([t.grad_fn for t in shared])
             if (v := getattr(node, "variable", None)) is not None and id(v) in wanted}
    return [p for p in candidates if id(p) in found]


def check_readers(losses: Sequence[Tensor | None], path: Path, shared: Sequence[Tensor]) -> dict[int, set[int]]:
    """Raises when a task's loss does not read its own view (e.g. every loss computed from
    ``views[0]``), or reads the backbone other than through the views (``z`` itself, or a
    tensor of the backbone that was not forked, such as a skip connection's features).
    Reading another task's view is not refused: heads fused into one autograd node (a
    compiled or batched head module) legitimately reach every view.

    ``path.reader(node, nr)`` names the ``(task, tensor)`` of a view edge. Run at every
    ``backward``, before anything changes, at the price of a walk of the heads' graphs
    only: autograd numbers its nodes in creation order (per thread), so the backbone's
    operations are those numbered at most ``z``'s; the heads' walk stops at the views and
    at such a node. Only when it meets one (a misuse, or a head reading a tensor made
    before ``fork`` that is not the backbone's) is the backbone walked, to tell them apart
    (:func:`_check_readers_exactly`). Returns ``{id(parameter): tasks}``: the tasks whose
    loss reaches each parameter (its head's; see :func:`owners`)."""
    marks = [t.grad_fn._sequence_nr() for t in shared if t.grad_fn is not None]
    if not marks:  # the shared tensors are leaves: no backbone to reach
        return _check_readers_exactly(losses, path, shared)
    last = max(marks)

    def before_fork(node: Any) -> bool:  # parameters (AccumulateGrad) are numbered 2**64 - 1
        return node._sequence_nr() <= last and not hasattr(node, "variable")

    reached: dict[int, set[int]] = {}
    for task, loss in enumerate(losses):
        if loss is None:
            continue
        read = set()
        for node, nr in _walk([loss.grad_fn], stop=lambda node, nr: path.reader(node, nr) is not None
                              or before_fork(node)):
            hit = path.reader(node, nr)
            if hit is not None:
                read.add(hit[0])
            elif before_fork(node):
                return _check_readers_exactly(losses, path, shared)
            elif (variable := getattr(node, "variable", None)) is not None:
                reached.setdefault(id(variable), set()).add(task)
        if task not in read:
            raise ValueError(f"the loss of task {task} does not read its view from fork(); nothing was changed. "
                             f"Fix: {_FIX}")
    return reached


def owners(reached: dict[int, set[int]]) -> dict[int, int]:
    """``{id(parameter): task}`` from :func:`check_readers`'s answer (``-1``: several tasks')."""
    return {i: next(iter(tasks)) if len(tasks) == 1 else -1 for i, tasks in reached.items()}


_FIX = ("compute task k's loss from the k-th item fork() returned only; a head that also reads "
        "other features of the backbone (skip connections, several scales) needs them forked "
        "too: a, b = ...; views = opt.fork((a, b)), and head k reads views[k] = (a_k, b_k)")


def _check_readers_exactly(losses: Sequence[Tensor | None], path: Path, shared: Sequence[Tensor]
                           ) -> dict[int, set[int]]:
    """:func:`check_readers` by walking the backbone's graph too (its operations, not its
    leaves: a head may share a weight with the backbone)."""
    backbone = {id(node) for node, _ in _walk([t.grad_fn for t in shared])
                if not hasattr(node, "variable")}
    reached: dict[int, set[int]] = {}
    for task, loss in enumerate(losses):
        if loss is None:
            continue
        read, outside = set(), False
        for node, nr in _walk([loss.grad_fn], stop=lambda node, nr: path.reader(node, nr) is not None
                              or id(node) in backbone):
            hit = path.reader(node, nr)
            if hit is not None:
                read.add(hit[0])
            elif id(node) in backbone:
                outside = True
            elif (variable := getattr(node, "variable", None)) is not None:
                reached.setdefault(id(variable), set()).add(task)
        if outside:
            raise ValueError(f"the loss of task {task} reads the backbone's output directly, not only through "
                             f"its view from fork(); nothing was changed. Fix: {_FIX}")
        if task not in read:
            raise ValueError(f"the loss of task {task} does not read its view from fork(); nothing was changed. "
                             f"Fix: {_FIX}")
    return reached
