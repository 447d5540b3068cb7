"""The backward pipeline, one function per step, in the order they run::

    fork  ->  task_gradients  ->  gram  ->  coefficients  ->  combine  ->  shared_backward

``fork`` gives each task a detached alias of the shared representation ``z``; one autograd
call over the (weighted) task losses fills every task's gradient ``G[k] = dL_k/dz_k`` (the
heads are disjoint, so nothing mixes) without touching the backbone; the method turns the
``K x K`` Gram ``G G^T`` into coefficients ``c``; ``g = c^T G`` goes back through the
backbone in a single ``z.backward(g)``. :class:`gradsurgery.MultiTaskOptimizer` drives it
and owns the state; these functions own none.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import Tensor

from .linalg import gram  # noqa: F401  (the pipeline's Gram step, re-exported)


@dataclass
class Fork:
    """What ``fork`` recorded for the coming ``backward``."""

    z: Tensor  #: the backbone's output, still in the graph
    leaf: Tensor  #: ``K x z.shape``: a detached alias of ``z`` per task, requires grad
    views: list[Tensor] = field(default_factory=list)  #: what the heads read


def fork(z: Tensor, num_tasks: int) -> Fork:
    """One view of ``z`` per task, cut from the backbone's graph.

    The views are ``leaf.unbind(0)`` of an expanded (never copied) detached alias, so a
    single autograd call returns all task gradients stacked as one ``K x ...`` tensor.
    """
    leaf = z.detach().unsqueeze(0).expand(num_tasks, *z.shape).requires_grad_()
    return Fork(z=z, leaf=leaf, views=list(leaf.unbind(0)))


def task_gradients(objective: Tensor, leaf: Tensor, params: list[Tensor]
                   ) -> tuple[Tensor, list[Tensor | None]]:
    """Gradients of ``objective`` (the weighted sum of the task losses) w.r.t. the forked
    alias and the heads' parameters, in one autograd call; nothing is written to
    ``.grad`` yet (so a rejected step leaves no trace)."""
    grads = torch.autograd.grad(objective, [leaf, *params], allow_unused=True)
    task_grads = grads[0] if grads[0] is not None else torch.zeros_like(leaf)
    return task_grads, list(grads[1:])


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
