"""The paths from the forked views to the shared backward: one protocol, :class:`Path`,
and one small class per way of forming the task gradients (the functions they are made of
are in :mod:`.stages`):

* :class:`SummedPath` -- loss weighting: the task gradients are added up as plain
  ``sum(L).backward()`` adds them; no ``K x N`` matrix, no Gram.
* :class:`StackedPath` -- the task gradients ``G`` as ``K x ...`` tensors, one per shared
  tensor, from one autograd call over an expanded detached alias.
* :class:`RotatedPath` -- a :class:`StackedPath` whose first shared tensor is rotated per
  task (RotoGrad): the heads read ``R_k z``, ``G`` is brought back to ``z``'s space.
* :class:`ParamsPath` -- the parameter level: ``J = G dz/dtheta``, the method decides from
  ``J``'s Gram and ``c^T J`` goes straight into the shared parameters' ``.grad``.

:func:`new_path` picks one; it is built by ``fork`` and lives until the ``backward`` that
consumes it. Several shared tensors (``fork((a, b))``) are one task gradient over all of
them: the Gram is the sum of the per-tensor Grams and the combination applies to each tensor.
"""
from __future__ import annotations

from typing import TYPE_CHECKING, Any, Callable, Sequence

import torch
from torch import Tensor

from ..methods.base import ElementWise, LossWeighting, Method
from ..numerics.gram import compute_dtype
from ..numerics.gram import gram as gram_of
from . import graph, params_level, stages
from . import rotation as rot

if TYPE_CHECKING:
    from ..scale.amp import Scaling
    from ..scale.distributed import NoSync, Sync


def _per_task(by_tensor: list[list[Tensor]], single: bool) -> list:
    """Per task: its view (one shared tensor) or the tuple of its views (several)."""
    if single:
        return list(by_tensor[0])
    return [tuple(views[k] for views in by_tensor) for k in range(len(by_tensor[0]))]


class Path:
    """What every path does, in the order ``backward`` calls it: :meth:`task_gradients`,
    :meth:`gram`, :meth:`combine` (or :meth:`combine_elements`), :meth:`align` (a no-op
    but for rotations), :meth:`shared_backward`. ``views`` are what ``fork`` returns."""

    shared: tuple[Tensor, ...]
    num_tasks: int
    single: bool
    views: list[Any]

    def reader(self, node: Any, nr: int) -> tuple[int, int] | None:
        """``(task, tensor index)`` when the autograd edge ``(node, nr)`` is a view of this
        fork (the heads' graphs are checked against it), else ``None``."""
        raise NotImplementedError

    def task_gradients(self, objective: Tensor, params: list[Tensor]) -> list[Tensor | None]:
        """Forms the task gradients of ``objective`` and returns its gradients w.r.t.
        ``params`` (the heads'), in one autograd call; nothing is written to ``.grad``."""
        raise NotImplementedError

    def gram(self, needed: bool, retain_graph: bool) -> Tensor | None:
        """The ``K x K`` Gram of the task gradients (float32 or wider), ``None`` when this
        path forms none. ``needed``: the method decides from it (a rotated path forms it
        anyway, for the rotations); ``retain_graph``: the backbone's graph is needed afterwards."""
        return None

    def flat_task_gradients(self) -> Tensor:
        """The ``K x N`` task gradients, flat over every shared tensor (copies; for error
        messages only)."""
        raise NotImplementedError

    def nonfinite_indicator(self, gram: Tensor | None) -> Tensor:
        """A small tensor that is non-finite exactly when a task gradient is."""
        raise NotImplementedError

    def combine(self, coefficients: Tensor) -> list[Tensor] | None:
        """``g = c^T G`` for each shared tensor (``None``: written to ``.grad`` already)."""
        raise NotImplementedError

    def combine_elements(self, method: ElementWise, losses: Tensor, present: Tensor | None,
                         scaling: Scaling) -> list[Tensor] | None:
        """An element-wise method's ``g``, decided on the unscaled gradients of the
        ``present`` tasks (``scaling``: the loss scale of a GradScaler step, if any)."""
        raise TypeError(f"{type(self).__name__} does not hold the task gradients' elements")

    def align(self, gram: Tensor | None, loss_scale: Tensor | None, sync: Sync | NoSync) -> Tensor | None:
        """Trains what the path learns (rotations); returns its losses. Nothing by default."""
        return None

    def shared_backward(self, combined: list[Tensor] | None, backbone_loss: Tensor | None) -> None:
        """One backward pass through the backbone: ``z.backward(g)`` and ``backbone_loss``."""
        if combined is not None:
            stages.shared_backward(self.shared, combined, backbone_loss)
        elif backbone_loss is not None:
            torch.autograd.backward(backbone_loss)

    def nan_backward(self, backbone_loss: Tensor | None) -> None:
        """NaN through the backbone (an overflow under a GradScaler: the step is skipped)."""
        stages.shared_backward(self.shared, [torch.full_like(t, float("nan")) for t in self.shared], backbone_loss)


def new_path(method: Method, shared: list[Tensor], num_tasks: int, single: bool, *, rotations: rot.Rotations | None,
             level: str, shared_params: list[Tensor] | None, candidates: Callable[[], list[Tensor]],
             rescaled_rows: bool = False) -> Path:
    """The path this step takes: rotated with rotations; summed for loss weighting
    (``g = sum_k w_k g_k`` added up as plain backward, exact in float32/64; stacked in lower
    precision, or when the rows of ``G`` may be rescaled after the task backward:
    ``rescaled_rows``, absent tasks under ``torch.distributed``); at ``level="params"`` the
    parameter level over a stacked path (its parameters: ``shared_params``, or the
    ``candidates`` the shared tensors depend on)."""
    if rotations is not None:
        return RotatedPath(rotations, shared, num_tasks, single)
    if isinstance(method, LossWeighting):
        if not rescaled_rows and all(t.dtype == compute_dtype(t.dtype) for t in shared):
            return SummedPath(shared, num_tasks, single)
        return StackedPath(shared, num_tasks, single)
    inner = StackedPath(shared, num_tasks, single)
    if level != "params":
        return inner
    return ParamsPath(inner, *_params_of(method, shared, shared_params, candidates()))


def _params_of(method: Method, shared: list[Tensor], given: list[Tensor] | None,
               candidates: list[Tensor]) -> tuple[list[Tensor], bool]:
    """The shared parameters of ``level="params"`` (``given``, or the ``candidates`` the
    shared tensors depend on) and whether they are all of those (see :class:`ParamsPath`)."""
    found = graph.shared_parameters(shared, candidates)
    if given is None and not found:
        raise ValueError("level='params' found no shared parameter: z depends on none of the wrapped "
                         "optimizer's parameters. Put the backbone's parameters in the optimizer, or "
                         "pass shared_params=backbone.parameters()")
    if given is None:
        return found, True
    complete = {id(p) for p in found} <= {id(p) for p in given}
    if not complete and isinstance(method, ElementWise):
        raise ValueError(f"{method!r} combines the Jacobian of shared_params element by element, so the "
                         f"other {len(found) - len(given)} parameter(s) of the backbone would get "
                         "no gradient; pass every backbone parameter as shared_params (or leave it None)")
    return given, complete


class StackedPath(Path):
    """``G`` as one ``K x t.shape`` tensor per shared tensor ``t``.

    The views are ``leaf.unbind(0)`` of an expanded (never copied) detached alias, so one
    autograd call returns every task's gradient stacked.
    """

    def __init__(self, shared: Sequence[Tensor], num_tasks: int, single: bool):
        self.shared, self.num_tasks, self.single = tuple(shared), num_tasks, single
        self.leaves = self._leaves()
        by_tensor = [list(leaf.unbind(0)) for leaf in self.leaves]
        self._unbinds = {id(views[0].grad_fn): i for i, views in enumerate(by_tensor)}
        self.views = _per_task(by_tensor, single)
        self.grads: list[Tensor] = []

    def _leaves(self) -> list[Tensor]:
        return [t.detach().unsqueeze(0).expand(self.num_tasks, *t.shape).requires_grad_() for t in self.shared]

    def reader(self, node: Any, nr: int) -> tuple[int, int] | None:
        i = self._unbinds.get(id(node))
        return None if i is None else (nr, i)

    def task_gradients(self, objective: Tensor, params: list[Tensor]) -> list[Tensor | None]:
        """Fills :attr:`grads`; see :meth:`Path.task_gradients`."""
        out = torch.autograd.grad(objective, [*self.leaves, *params], allow_unused=True)
        n = len(self.leaves)
        self.grads = [g if g is not None else torch.zeros_like(leaf) for g, leaf in zip(out[:n], self.leaves)]
        return list(out[n:])

    def gram(self, needed: bool = True, retain_graph: bool = False) -> Tensor | None:
        """``G G^T`` over all shared tensors (float32 or wider), when ``needed``."""
        if not needed:
            return None
        return self._gram()

    def _gram(self) -> Tensor:
        total = gram_of(self.grads[0])
        for g in self.grads[1:]:
            total = total + gram_of(g)
        return total

    def flat_task_gradients(self) -> Tensor:
        return torch.cat([g.reshape(self.num_tasks, -1) for g in self.grads], 1)

    def nonfinite_indicator(self, gram: Tensor | None) -> Tensor:
        if gram is not None:
            return gram.diagonal()
        return torch.stack([g.reshape(self.num_tasks, -1).sum(1) for g in self.grads]).sum(0)

    def combine(self, coefficients: Tensor) -> list[Tensor]:
        """``g = c^T G`` for each shared tensor."""
        return [stages.combine(coefficients, g) for g in self.grads]

    def combine_elements(self, method: ElementWise, losses: Tensor, present: Tensor | None,
                         scaling: Scaling) -> list[Tensor]:
        """See :meth:`Path.combine_elements` (one shared tensor only)."""
        if not self.single:
            raise ValueError(f"{method!r} combines the task gradients element by element, which is defined on "
                             "one shared tensor; fork a single tensor (concatenate the features) or use a "
                             "Gram-based method")
        grads = self.grads[0] if present is None else self.grads[0][present]
        g = scaling.scaled(method.combine(scaling.unscale(grads), losses, self.shared[0].detach()))
        return [g.reshape(self.shared[0].shape).to(self.grads[0].dtype)]


class SummedPath(Path):
    """Loss weighting: ``K`` separate detached leaves per shared tensor, and
    :meth:`task_gradients` adds their gradients up in the order autograd adds the heads'
    gradients of a shared input in plain backward (the last task's first), so that
    ``sum`` equals plain backward bit for bit. :attr:`grads` holds the sums; the per-task
    gradients stay in :attr:`task_grads` until the finite check (to name a bad task)."""

    def __init__(self, shared: Sequence[Tensor], num_tasks: int, single: bool):
        self.by_tensor = [[t.detach().requires_grad_() for _ in range(num_tasks)] for t in shared]
        self.task_grads: list[list[Tensor | None]] = []
        self.shared, self.num_tasks, self.single = tuple(shared), num_tasks, single
        self.views = _per_task(self.by_tensor, single)
        self._leaf_ids = {id(v): (k, i) for i, views in enumerate(self.by_tensor) for k, v in enumerate(views)}
        self.grads: list[Tensor] = []

    def reader(self, node: Any, nr: int) -> tuple[int, int] | None:
        variable = getattr(node, "variable", None)
        return None if variable is None else self._leaf_ids.get(id(variable))

    def task_gradients(self, objective: Tensor, params: list[Tensor]) -> list[Tensor | None]:
        flat = [v for views in self.by_tensor for v in views]
        out = torch.autograd.grad(objective, [*flat, *params], allow_unused=True)
        k = self.num_tasks
        self.task_grads = [list(out[i * k:(i + 1) * k]) for i in range(len(self.by_tensor))]
        self.grads = [_sum_as_autograd(grads, t) for grads, t in zip(self.task_grads, self.shared)]
        return list(out[len(flat):])

    def flat_task_gradients(self) -> Tensor:
        return torch.cat([torch.stack([torch.zeros_like(t) if g is None else g for g in grads])
                          .reshape(self.num_tasks, -1) for grads, t in zip(self.task_grads, self.shared)], 1)

    def nonfinite_indicator(self, gram: Tensor | None) -> Tensor:
        return torch.stack([g.sum() for g in self.grads])

    def combine(self, coefficients: Tensor) -> list[Tensor]:
        """The sums (the coefficients are ones); drops the per-task gradients, kept only
        to name a non-finite task, before the backbone's backward."""
        self.task_grads = []
        return self.grads


def _sum_as_autograd(grads: list[Tensor | None], like: Tensor) -> Tensor:
    """``sum_k grads[k]``, last task first, in place once the sum is a tensor of our own
    (as autograd accumulates)."""
    total, owned = None, False
    for g in reversed(grads):
        if g is None:
            continue
        if total is None:
            total = g
        elif owned:
            total.add_(g)
        else:
            total, owned = total + g, True
    return total if total is not None else torch.zeros_like(like)


class RotatedPath(StackedPath):
    """The first shared tensor is rotated per task: the heads read ``R_k z``; after the
    task backward :attr:`grads` holds ``G_k = R_k^T H_k`` and :attr:`rotated` the
    rotated-space ``H``. ``R`` is evaluated once, here, and kept in the graph to the
    rotations' parameters for :meth:`align`."""

    def __init__(self, rotations: rot.Rotations, shared: Sequence[Tensor], num_tasks: int, single: bool):
        self.rotations = rotations
        z = shared[0]
        lead, feat, post, self.scale = rotations.layout(z.shape)
        self.rotation: Tensor | None = rotations.matrices()
        with torch.no_grad():
            rotated = rotations.rotate(z.detach().reshape(lead, feat, post), self.rotation.to(z.dtype))
        self._rotated_leaf = rotated.view(num_tasks, *z.shape).requires_grad_()
        super().__init__(shared, num_tasks, single)
        self.rotated: Tensor | None = None

    def _leaves(self) -> list[Tensor]:
        return [self._rotated_leaf] + super()._leaves()[1:]

    def task_gradients(self, objective: Tensor, params: list[Tensor]) -> list[Tensor | None]:
        out = super().task_gradients(objective, params)
        assert self.rotation is not None  # until align()
        self.rotated = self.grads[0]
        self.grads[0] = rot.unrotate(self.rotations, self.rotation, self.rotated)
        return out

    def gram(self, needed: bool = True, retain_graph: bool = False) -> Tensor:
        return self._gram()  # the rotations align with it

    def rotated_gram(self, gram: Tensor) -> Tensor:
        """The Gram of the rotated tensor's gradients (``gram`` itself for one tensor)."""
        return gram if self.single else gram_of(self.grads[0])

    def align(self, gram: Tensor | None, loss_scale: Tensor | None, sync: Sync | NoSync) -> Tensor:
        """Trains the rotations (see :func:`gradsurgery.pipeline.rotation.align`); frees the
        exponential's graph and the rotated gradients."""
        assert gram is not None and self.rotation is not None and self.rotated is not None  # after gram()
        out = rot.align(self.rotations, self.rotation, self.scale, self.shared[0], self.grads[0], self.rotated,
                        self.rotated_gram(gram), loss_scale, sync)
        self.rotated, self.rotation = None, None
        return out


class ParamsPath(Path):
    """The parameter level over a :class:`StackedPath`: ``J = G dz/dtheta`` (one batched
    vector-Jacobian product), the Gram ``J J^T``, and ``c^T J`` written to ``.grad``.

    ``complete``: the shared parameters are every parameter the shared tensors depend on.
    Otherwise (``shared_params`` a subset, e.g. GradNorm's last shared layer) ``J`` serves
    the decision only and the whole backbone receives ``c^T G`` through one backward
    (``c^T J = (c^T G) dz/dtheta``: the same gradient on the subset)."""

    def __init__(self, inner: StackedPath, shared_params: list[Tensor], complete: bool = True):
        self.inner, self.shared_params, self.complete = inner, shared_params, complete
        self.shared, self.num_tasks, self.single, self.views = inner.shared, inner.num_tasks, inner.single, inner.views
        self.jacobian: params_level.Jacobian | None = None

    def reader(self, node: Any, nr: int) -> tuple[int, int] | None:
        return self.inner.reader(node, nr)

    def task_gradients(self, objective: Tensor, params: list[Tensor]) -> list[Tensor | None]:
        return self.inner.task_gradients(objective, params)

    def build_jacobian(self, retain_graph: bool) -> None:
        self.jacobian = params_level.jacobian(self.inner.shared, self.shared_params, self.inner.grads,
                                              retain_graph=retain_graph or not self.complete)

    def gram(self, needed: bool = True, retain_graph: bool = False) -> Tensor:
        self.build_jacobian(retain_graph)
        return self._built().gram()

    def _built(self) -> params_level.Jacobian:
        if self.jacobian is None:
            raise RuntimeError("the Jacobian is formed by gram() first")
        return self.jacobian

    def flat_task_gradients(self) -> Tensor:
        return self.inner.flat_task_gradients()

    def nonfinite_indicator(self, gram: Tensor | None) -> Tensor:
        return self.inner.nonfinite_indicator(gram)

    def combine(self, coefficients: Tensor) -> list[Tensor] | None:
        if not self.complete:
            self.jacobian = None
            return self.inner.combine(coefficients)
        self._built().accumulate(coefficients=coefficients)
        return None

    def combine_elements(self, method: ElementWise, losses: Tensor, present: Tensor | None,
                         scaling: Scaling) -> None:
        jacobian = self._built()
        flat = jacobian.flat()
        combined = scaling.scaled(method.combine(scaling.unscale(flat if present is None else flat[present]),
                                                 losses, None))
        jacobian.accumulate(combined=combined.reshape(-1))
