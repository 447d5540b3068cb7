"""Parameter-level surgery: the methods decide from the task gradients w.r.t. the shared
*parameters* (the papers' setting) instead of the shared representation.

The representation-level pipeline already has ``G`` (``K x z.shape``), every task's
gradient w.r.t. ``z``. By the chain rule the task gradients w.r.t. the shared parameters
``theta`` are the rows of

.. math::  J = G\\, \\frac{\\partial z}{\\partial \\theta}\\qquad (K \\times P)

and everything comes from **one** batched vector-Jacobian product of ``G`` through the
backbone (``torch.autograd.grad(z, ..., G, is_grads_batched=True)``, vmap over the ``K``
rows); no task ever backpropagates through the heads again. The method decides from the
Gram ``M = J J^T`` and ``c^T J`` is written to the parameters' ``.grad``.

**Linear layers, layer-wise** (:class:`LinearLayer`). A linear map ``y = a W^T + b`` of
``R`` rows (``a``: ``R x d_in``, every batch and sequence position a row) gives task ``k``
the weight gradient ``g_k^T a`` and bias gradient ``1^T g_k``, where ``g_k`` (``R x
d_out``) is task ``k``'s gradient w.r.t. ``y``. Its Gram entries are therefore

.. math::  M_{ij} \\mathrel{+}= \\langle g_i^T a, g_j^T a\\rangle + \\langle 1^T g_i, 1^T g_j\\rangle
          = \\langle g_i, (a a^T + \\mathbf{1}\\mathbf{1}^T)\\, g_j \\rangle

and the combined gradient is ``(sum_k c_k g_k)^T a`` (bias: its column sums). The batched
product is asked for ``g`` (the gradient edge of the layer's ``addmm``/``mm`` node, found
by walking the graph; ``a`` is the input that node saved) instead of the weight's ``K``
gradients, so the ``K x d_out x d_in`` block is never formed. Per layer, in multiply-adds:

* Jacobian block: ``K R d_out d_in`` (batched weight gradients) ``+ K^2 d_out d_in``
  (Gram) ``+ K d_out d_in`` (combination);
* layer-wise: ``R^2 d_in`` (``a a^T``) ``+ K R^2 d_out`` (``A g_k``) ``+ K^2 R d_out``
  (Gram) ``+ K R d_out + R d_out d_in`` (combination);

the cheaper one is taken (:func:`layerwise_cheaper`): layer-wise when the rows are fewer
than about ``d_in`` (e.g. batch 256 into a 1024-wide layer: 2.5x fewer at ``K = 8``),
the block when the layer is narrow or the rows many. Both need the backward's input
gradient, ``K R d_out d_in``, to reach earlier layers. A weight read by more than one
operation (tied or reused layers), a node's factors saved in a form not recognised, and
every other layer type (convolutions, norms, embeddings) get the Jacobian block.

Element-wise methods (GradDrop) get the flat ``K x P`` Jacobian through their ``combine``
hook (a linear layer's blocks are then formed from ``g`` and ``a``). Methods that only
weight losses need no Jacobian at all: their parameter-level step is the
representation-level one (``z.backward(c^T G)``), which is the same gradient.
"""
from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, NamedTuple

import torch
from torch import Tensor
from torch.autograd.graph import GradientEdge, get_gradient_edge

from ..numerics.grads import accumulate_grad
from ..numerics.gram import compute_dtype

#: ``False`` forms every Jacobian block (no layer-wise Gram): only for
#: ``benchmarks/params_level.py``, which measures both.
LAYERWISE = True


def layerwise_cheaper(k: int, rows: int, d_in: int, d_out: int, bias: bool) -> bool:
    """Whether a linear layer's layer-wise Gram and combination cost fewer multiply-adds
    than its Jacobian block (the counts in the module docstring)."""
    width = d_in + bias
    block = d_out * width * (k * rows + k * k + k)
    layerwise = rows * rows * d_in + k * rows * rows * d_out + k * k * rows * d_out + k * rows * d_out \
        + rows * d_out * d_in
    return layerwise < block


class LinearUse(NamedTuple):
    """A linear map found in the graph: its ``addmm``/``mm`` node (whose output gradient
    is ``g``), parameters and saved inputs ``a`` (``R x d_in``)."""

    node: Any
    weight: Tensor
    bias: Tensor | None
    inputs: Tensor


@dataclass
class LinearLayer:
    """A linear layer's factors: inputs ``a`` (``R x d_in``) and the task gradients ``g``
    of its output (``K x R x d_out``)."""

    weight: Tensor
    bias: Tensor | None
    inputs: Tensor
    grads: Tensor

    def gram(self, dtype: torch.dtype) -> Tensor:
        """``M_ij = <g_i, (a a^T + 1) g_j>`` (``+ 1`` with a bias)."""
        a, g = self.inputs.to(dtype), self.grads.to(dtype)
        kernel = a @ a.T
        if self.bias is not None:
            kernel += 1
        k = g.shape[0]
        return g.reshape(k, -1) @ torch.matmul(kernel, g).reshape(k, -1).T

    def combined(self, coefficients: Tensor) -> list[tuple[Tensor, Tensor]]:
        """``(parameter, gradient)`` pairs of ``c^T J`` on this layer."""
        dtype = compute_dtype(self.grads.dtype)
        g = torch.tensordot(coefficients.to(dtype), self.grads.to(dtype), 1)  # R x d_out
        out = [(self.weight, g.T @ self.inputs.to(dtype))]
        return out + ([] if self.bias is None else [(self.bias, g.sum(0))])

    def blocks(self) -> list[tuple[Tensor, Tensor]]:
        """``(parameter, K x parameter.shape block)`` pairs: the Jacobian rows, formed."""
        dtype = compute_dtype(self.grads.dtype)
        g = self.grads.to(dtype)
        out = [(self.weight, g.transpose(1, 2) @ self.inputs.to(dtype))]
        return out + ([] if self.bias is None else [(self.bias, g.sum(1))])


@dataclass
class Jacobian:
    """The ``K x P`` Jacobian of the tasks w.r.t. the shared parameters, never
    concatenated: one ``K x p_i`` block per parameter, or, for a linear layer's
    parameters, its :class:`LinearLayer` factors (``blocks[i]`` is then ``None``)."""

    params: list[Tensor]
    blocks: list[Tensor | None]
    layers: list[LinearLayer]

    def gram(self) -> Tensor:
        """``J J^T`` in float32 or wider, accumulated block by block and layer by layer."""
        first = next((b for b in self.blocks if b is not None), None)
        like = first if first is not None else self.layers[0].grads
        k, dtype = like.shape[0], compute_dtype(like.dtype)
        total = torch.zeros(k, k, dtype=dtype, device=like.device)
        for block in self.blocks:
            if block is not None:
                flat = block.reshape(k, -1).to(dtype)
                total.addmm_(flat, flat.T)
        for layer in self.layers:
            total += layer.gram(dtype)
        return total if not self.layers else (total + total.T) / 2  # exactly symmetric

    def flat(self) -> Tensor:
        """The ``K x P`` matrix (a copy), for element-wise methods."""
        formed = {id(p): b for layer in self.layers for p, b in layer.blocks()}
        full = [b if b is not None else formed[id(p)] for p, b in zip(self.params, self.blocks)]
        return torch.cat([b.reshape(b.shape[0], -1) for b in full], 1)

    def accumulate(self, coefficients: Tensor | None = None, combined: Tensor | None = None) -> None:
        """Adds ``c^T J`` (or an already ``combined`` flat ``P`` vector) to the parameters'
        ``.grad``, then drops ``J``."""
        if combined is not None:
            offset = 0
            for p in self.params:
                accumulate_grad(p, combined[offset:offset + p.numel()].view(p.shape).to(p.dtype))
                offset += p.numel()
        else:
            assert coefficients is not None, "pass coefficients or combined"
            for p, block in zip(self.params, self.blocks):
                if block is not None:
                    dtype = compute_dtype(block.dtype)
                    accumulate_grad(p, torch.tensordot(coefficients.to(dtype), block.to(dtype), 1).to(p.dtype))
            for layer in self.layers:
                for p, g in layer.combined(coefficients):
                    accumulate_grad(p, g.to(p.dtype))
        self.blocks, self.layers = [], []


def jacobian(shared: Sequence[Tensor], params: list[Tensor], grads: Sequence[Tensor], *,
             retain_graph: bool) -> Jacobian:
    """``J = G dz/dtheta`` by one batched vector-Jacobian product through the backbone
    (``grads``: the ``K x t.shape`` representation gradients of each shared tensor ``t``),
    asked for each layer-wise linear layer's output gradient and every other parameter's
    gradient. Parameters the shared tensors do not reach through a differentiable path get
    zero blocks."""
    k = grads[0].shape[0]
    uses = linear_uses(shared, params, k) if LAYERWISE else []
    covered = {id(p) for use in uses for p in (use.weight, use.bias) if p is not None}
    rest = [p for p in params if id(p) not in covered]
    edges = [GradientEdge(use.node, 0) for use in uses] + [get_gradient_edge(p) for p in rest]
    out = torch.autograd.grad(list(shared), edges, [g.to(t.dtype) for g, t in zip(grads, shared)],
                              is_grads_batched=True, retain_graph=retain_graph, allow_unused=True)
    layers = [LinearLayer(use.weight, use.bias, use.inputs, g) for use, g in zip(uses, out)]
    computed = {id(p): b if b is not None else torch.zeros(k, *p.shape, dtype=p.dtype, device=p.device)
                for p, b in zip(rest, out[len(uses):])}
    return Jacobian(params=list(params), blocks=[computed.get(id(p)) for p in params], layers=layers)


def linear_uses(shared: Sequence[Tensor], params: list[Tensor], k: int) -> list[LinearUse]:
    """The linear maps in the shared tensors' graph whose layer-wise Gram is cheaper (see
    :func:`layerwise_cheaper`): an ``addmm(b, a, W^T)`` or ``mm(a, W^T)`` node (what
    ``nn.Linear`` records, under autocast too) whose weight ``W`` is one of ``params``
    and read by that node only, and whose bias, if any, is too; a bias that is not gets
    its own Jacobian block and the layer is taken without it."""
    wanted = {id(p) for p in params}
    readers: dict[int, int] = {}  # id(node) -> number of graph edges into it
    nodes: list[Any] = []
    seen: set[int] = set()
    stack: list[Any] = [t.grad_fn for t in shared if t.grad_fn is not None]
    while stack:
        node = stack.pop()
        if id(node) in seen:
            continue
        seen.add(id(node))
        nodes.append(node)
        for child, _ in node.next_functions:
            if child is not None:
                readers[id(child)] = readers.get(id(child), 0) + 1
                stack.append(child)
    uses = []
    for node in nodes:
        name = type(node).__name__
        if name not in ("AddmmBackward0", "MmBackward0"):
            continue
        if name == "AddmmBackward0" and (node._saved_alpha != 1 or node._saved_beta != 1):
            continue
        edges = node.next_functions
        weight = _leaf(edges[-1][0], readers, ("TBackward0",))
        if weight is None or id(weight) not in wanted or weight.dim() != 2:
            continue
        bias = _leaf(edges[0][0], readers, ()) if name == "AddmmBackward0" else None
        if bias is not None and (id(bias) not in wanted or bias.shape != weight.shape[:1]):
            bias = None
        try:
            inputs = node._saved_mat1 if name == "AddmmBackward0" else node._saved_self
        except RuntimeError:  # freed, or behind a saved-tensor hook that cannot unpack here
            continue
        if inputs is None or inputs.dim() != 2 or inputs.shape[1] != weight.shape[1]:
            continue
        if layerwise_cheaper(k, inputs.shape[0], weight.shape[1], weight.shape[0], bias is not None):
            uses.append(LinearUse(node, weight, bias, inputs.detach()))
    return uses


def _leaf(node: Any, readers: dict[int, int], through: tuple[str, ...]) -> Tensor | None:
    """The parameter behind ``node`` when the chain from it is ``through`` (in order), then
    any autocast casts (``ToCopyBackward0``), then its gradient accumulator, with every
    node on the way read by one edge only; else ``None``."""
    for expected in through:
        if node is None or type(node).__name__ != expected or readers.get(id(node)) != 1:
            return None
        node = node.next_functions[0][0]
    while node is not None and type(node).__name__ == "ToCopyBackward0" and readers.get(id(node)) == 1:
        node = node.next_functions[0][0]
    if node is None or readers.get(id(node)) != 1:
        return None
    return getattr(node, "variable", None)
