"""The backward pipeline, one function per step, in the order they run::

    fork  ->  task_gradients  ->  gram  ->  coefficients  ->  combine  ->  shared_backward

``fork`` gives each task a detached alias of the shared representation ``z``; one autograd
call over the (weighted) task losses fills every task's gradient ``G[k] = dL_k/dz_k`` (the
heads are disjoint, so nothing mixes) without touching the backbone; the method turns the
``K x K`` Gram ``G G^T`` into coefficients ``c``; ``g = c^T G`` goes back through the
backbone in a single ``z.backward(g)``. Methods that only weight the losses skip the
middle: ``task_gradients`` returns ``sum_k G[k]`` directly, added up as plain backward
adds it. :class:`gradsurgery.MultiTaskOptimizer` drives it and owns the state; these
functions own none.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import Tensor

from ..numerics.gram import gram  # noqa: F401  (the pipeline's Gram step, re-exported)


@dataclass
class Fork:
    """What ``fork`` recorded for the coming ``backward``."""

    z: Tensor  #: the backbone's output, still in the graph
    #: ``K x z.shape``: a detached alias of ``z`` per task, requires grad (``None`` when ``summed``)
    leaf: Tensor | None
    views: list[Tensor] = field(default_factory=list)  #: what the heads read
    #: the views are ``K`` separate detached leaves and ``task_gradients`` returns ``sum_k G[k]``
    summed: bool = False
    #: with ``summed``: each task's gradient (``None``: its head ignored its view), kept by
    #: ``task_gradients`` until the finite check, to name a non-finite task
    task_grads: list[Tensor | None] = field(default_factory=list)


def fork(z: Tensor, num_tasks: int, summed: bool = False) -> Fork:
    """One view of ``z`` per task, cut from the backbone's graph.

    The views are ``leaf.unbind(0)`` of an expanded (never copied) detached alias, so a
    single autograd call returns all task gradients stacked as one ``K x ...`` tensor.

    ``summed`` (for methods whose ``g`` is the plain sum of the loss-weighted task
    gradients): the views are ``K`` detached aliases of ``z``, each its own leaf, and
    :func:`task_gradients` adds their gradients up as plain ``sum(L).backward()`` does;
    the ``K x ...`` matrix ``G`` is never formed.
    """
    if summed:
        return Fork(z=z, leaf=None, views=[z.detach().requires_grad_() for _ in range(num_tasks)], summed=True)
    leaf = z.detach().unsqueeze(0).expand(num_tasks, *z.shape).requires_grad_()
    return Fork(z=z, leaf=leaf, views=list(leaf.unbind(0)))


def task_gradients(objective: Tensor, fork: Fork, params: list[Tensor]
                   ) -> tuple[Tensor, list[Tensor | None]]:
    """Gradients of ``objective`` (the weighted sum of the task losses) w.r.t. the forked
    alias and the heads' parameters, in one autograd call; nothing is written to
    ``.grad`` yet (so a rejected step leaves no trace).

    For a ``summed`` fork the first result is ``sum_k G[k]``, added in the order autograd
    adds the heads' gradients of a shared input in plain backward (the last task's first:
    the engine runs later-built nodes first), so that ``sum`` equals plain backward bit
    for bit; the ``K`` gradients stay in ``fork.task_grads`` for the finite check.
    """
    inputs = fork.views if fork.summed else [fork.leaf]
    grads = torch.autograd.grad(objective, [*inputs, *params], allow_unused=True)
    params_grads = list(grads[len(inputs):])
    if not fork.summed:
        return (grads[0] if grads[0] is not None else torch.zeros_like(fork.leaf)), params_grads
    fork.task_grads = list(grads[:len(inputs)])
    total, owned = None, False  # in place once the sum is a tensor of our own, as autograd does
    for g in reversed(fork.task_grads):
        if g is None:
            continue
        if total is None:
            total = g
        elif owned:
            total.add_(g)
        else:
            total, owned = total + g, True
    return (total if total is not None else torch.zeros_like(fork.views[0])), params_grads


def task_rows(fork: Fork, grads: Tensor) -> Tensor:
    """The ``K x ...`` task gradients: ``grads`` itself, or for a ``summed`` fork the kept
    ones stacked (zeros for a task whose head ignored its view). For error messages only:
    it copies."""
    if not fork.summed:
        return grads
    return torch.stack([torch.zeros_like(grads) if g is None else g for g in fork.task_grads])


def combine(coefficients: Tensor, grads: Tensor) -> Tensor:
    """``g = c^T G``: one matmul of the ``K`` coefficients with the ``K x N`` gradients,
    in the coefficients' (float32 or wider) precision, returned in ``G``'s dtype."""
    flat = grads.reshape(grads.shape[0], -1)
    g = coefficients @ flat.to(coefficients.dtype)
    return g.view(grads.shape[1:]).to(grads.dtype)


def shared_backward(z: Tensor, grad: Tensor, backbone_loss: Tensor | None = None) -> None:
    """One backward pass through the backbone: ``z.backward(grad)``, plus the gradient of
    ``backbone_loss`` (a regulariser of the shared parameters) in the same pass."""
    if backbone_loss is None:
        torch.autograd.backward(z, grad)
    else:
        torch.autograd.backward([z, backbone_loss], [grad, None])


def accumulate(params: list[Tensor], grads: list[Tensor | None]) -> None:
    """Adds ``grads`` to ``params``' ``.grad`` as ``loss.backward()`` would."""
    for p, g in zip(params, grads):
        if g is None:
            continue
        if p.grad is None:
            p.grad = g
        else:
            p.grad.add_(g)
