"""The functions the paths of :mod:`.paths` share: ``combine`` (``g = c^T G``),
``shared_backward`` (one ``z.backward(g)`` through the backbone) and ``accumulate`` (the
heads' gradients into ``.grad``).

The pipeline's stages, in the order ``MultiTaskOptimizer.backward`` runs them::

    fork -> task gradients -> Gram -> decide -> combine -> shared backward

``fork`` gives each task a detached alias of the shared representation ``z``
(:func:`.paths.new_path`); one autograd call over the (weighted) task losses fills every
task's gradient ``G[k] = dL_k/dz_k`` (``Path.task_gradients``; the heads are disjoint, so
nothing mixes) without touching the backbone; the method decides coefficients ``c`` from
the ``K x K`` Gram ``G G^T`` (``Path.gram``, then ``Method.decide``); ``g = c^T G``
(:func:`combine`) goes back through the backbone in a single ``z.backward(g)``
(:func:`shared_backward`). :class:`gradsurgery.MultiTaskOptimizer` drives them and owns
the state.
"""
from __future__ import annotations

from typing import Sequence

import torch
from torch import Tensor

from ..numerics.grads import accumulate_grad


def combine(coefficients: Tensor, grads: Tensor) -> Tensor:
    """``g = c^T G``: one matmul of the ``K`` coefficients with the ``K x N`` gradients,
    in the coefficients' (float32 or wider) precision, returned in ``G``'s dtype."""
    flat = grads.reshape(grads.shape[0], -1)
    g = coefficients @ flat.to(coefficients.dtype)
    return g.view(grads.shape[1:]).to(grads.dtype)


def shared_backward(shared: Sequence[Tensor], grads: Sequence[Tensor], backbone_loss: Tensor | None = None) -> None:
    """One backward pass through the backbone: ``z.backward(g)`` for every shared tensor at
    once, plus the gradient of ``backbone_loss`` (a regulariser of the shared parameters)
    in the same pass."""
    tensors: list[Tensor] = list(shared)
    seeds: list[Tensor | None] = list(grads)
    if backbone_loss is not None:
        tensors.append(backbone_loss)
        seeds.append(None)
    torch.autograd.backward(tensors, seeds)


def accumulate(params: list[Tensor], grads: list[Tensor | None], scales: list[Tensor | None] | None = None) -> None:
    """Adds ``grads`` (each times its ``scales`` entry, when given) to ``params``' ``.grad``
    as ``loss.backward()`` would."""
    for i, (p, g) in enumerate(zip(params, grads)):
        if g is None:
            continue
        scale = None if scales is None else scales[i]
        if scale is not None:
            g = g * scale.to(g.dtype)
        accumulate_grad(p, g)
