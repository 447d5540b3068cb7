"""Shared helpers of the tests of the optimizer and of the methods (test_optimizer,
test_registry, test_errors, test_state_dict, tests/methods/...): a small random
multi-task model, one training step through the wrapper or through plain autograd, the
per-task representation gradients computed independently, and state snapshots."""
from __future__ import annotations

import copy
import io
import math

import torch
from torch import nn

import gradsurgery as gs


class Model(nn.Module):
    """``z = backbone(x)`` of shape ``(batch, *rep_shape)``; head ``k`` flattens ``z``,
    applies ``Linear -> tanh -> Linear`` and returns one value per sample."""

    def __init__(self, num_tasks: int, in_dim: int = 5, rep_shape: tuple[int, ...] = (6,),
                 hidden: int = 7):
        super().__init__()
        size = math.prod(rep_shape)
        self.rep_shape = rep_shape
        self.backbone = nn.Sequential(nn.Linear(in_dim, hidden), nn.Tanh(), nn.Linear(hidden, size))
        self.heads = nn.ModuleList(nn.Sequential(nn.Flatten(), nn.Linear(size, hidden), nn.Tanh(),
                                                 nn.Linear(hidden, 1)) for _ in range(num_tasks))

    def rep(self, x: torch.Tensor) -> torch.Tensor:
        return self.backbone(x).view(x.shape[0], *self.rep_shape)

    def losses(self, views, ys) -> list[torch.Tensor]:
        return [nn.functional.mse_loss(head(v).squeeze(-1), y) for head, v, y in zip(self.heads, views, ys)]


def make(num_tasks: int, seed: int = 0, dtype=torch.float64, batch: int = 4, **kwargs):
    """A model and a batch ``(x, ys)`` (ys: ``K x batch``), deterministic in ``seed``."""
    gen = torch.Generator().manual_seed(seed)
    torch.manual_seed(seed)
    model = Model(num_tasks, **kwargs).to(dtype)
    x = torch.randn(batch, model.backbone[0].in_features, generator=gen).to(dtype)
    ys = (3 * torch.randn(num_tasks, batch, generator=gen)).to(dtype)
    return model, x, ys


def wrapped_step(model: Model, opt: gs.MultiTaskOptimizer, x, ys, step: bool = True, **backward_kwargs):
    """One ordinary step through the wrapper; returns the losses."""
    opt.zero_grad()
    views = opt.fork(model.rep(x))
    losses = model.losses(views, ys)
    opt.backward(losses, **backward_kwargs)
    if step:
        opt.step()
    return losses


def task_grads(model: Model, x, ys) -> torch.Tensor:
    """``K x N``: each task's gradient w.r.t. the (flattened) representation, computed
    with plain autograd, one task at a time, independently of gradsurgery."""
    z = model.rep(x).detach()
    rows = []
    for head, y in zip(model.heads, ys):
        zk = z.clone().requires_grad_()
        loss = nn.functional.mse_loss(head(zk).squeeze(-1), y)
        rows.append(torch.autograd.grad(loss, zk)[0].flatten())
    return torch.stack(rows)


def backbone_grads_for(model: Model, x, direction: torch.Tensor) -> list[torch.Tensor]:
    """Gradients of the backbone's parameters when ``direction`` (flat) is pushed back
    through ``z = backbone(x)``."""
    z = model.rep(x)
    return list(torch.autograd.grad(z, list(model.backbone.parameters()), direction.view_as(z)))


def head_grads_plain(model: Model, x, ys, weights=None) -> list[torch.Tensor]:
    """Heads' gradients of ``sum_k weights_k L_k`` by plain autograd."""
    z = model.rep(x).detach()
    losses = model.losses([z] * len(model.heads), ys)
    w = [1.0] * len(losses) if weights is None else weights
    total = sum(wk * lk for wk, lk in zip(w, losses))
    return list(torch.autograd.grad(total, list(model.heads.parameters())))


def snapshot(model: nn.Module, opt: gs.MultiTaskOptimizer) -> dict:
    """Everything a rejected call must leave alone: parameters, their ``.grad``, the
    optimizer's (and method's) state dict, the generator state, the pending fork."""
    params = [p.detach().clone() for g in opt.param_groups for p in g["params"]]
    params += [p.detach().clone() for p in model.parameters()]
    grads = [None if p.grad is None else p.grad.clone() for g in opt.param_groups for p in g["params"]]
    buf = io.BytesIO()
    torch.save(opt.state_dict(), buf)
    return {"params": params, "grads": grads, "state": buf.getvalue(),
            "method": copy.deepcopy(opt.method.state_dict()), "fork": opt._path}


def assert_same(a: dict, b: dict) -> None:
    assert len(a["params"]) == len(b["params"])
    for p, q in zip(a["params"], b["params"]):
        assert torch.equal(p, q)
    assert len(a["grads"]) == len(b["grads"])
    for p, q in zip(a["grads"], b["grads"]):
        assert (p is None) == (q is None)
        if p is not None:
            assert torch.equal(p, q)
    assert a["state"] == b["state"]
    assert_tree_equal(a["method"], b["method"])
    assert a["fork"] is b["fork"]


def assert_tree_equal(a, b) -> None:
    """Bit-exact equality of nested dicts/lists of tensors and plain values."""
    assert type(a) is type(b), (type(a), type(b))
    if isinstance(a, dict):
        assert a.keys() == b.keys()
        for key in a:
            assert_tree_equal(a[key], b[key])
    elif isinstance(a, (list, tuple)):
        assert len(a) == len(b)
        for x, y in zip(a, b):
            assert_tree_equal(x, y)
    elif isinstance(a, torch.Tensor):
        assert a.dtype == b.dtype and a.shape == b.shape
        assert torch.equal(a, b) or (torch.isnan(a) == torch.isnan(b)).all() and torch.equal(
            a.nan_to_num(), b.nan_to_num())
    else:
        assert a == b or (a != a and b != b)


def representative_methods() -> list[str]:
    """One registered method of each kind (Gram weighting, loss weighting, element-wise),
    the first with parameters of its own and the first rotation method: the methods the
    tests that exercise the optimizer's surface (not each method's math) run with. Drawn
    from the registry, so the set follows the methods that exist."""
    chosen: list[str] = []

    def first(predicate):
        name = next((n for n in gs.methods.available() if predicate(gs.methods.get(n))), None)
        if name is not None and name not in chosen:
            chosen.append(name)

    def has_parameters(cls) -> bool:
        method = cls()
        method.bind(2, device=torch.device("cpu"), dtype=torch.float64, generator=torch.Generator())
        return bool(method.parameters())

    for kind in (gs.methods.LossWeighting, gs.methods.GramWeighting, gs.methods.ElementWise):
        first(lambda cls, kind=kind: issubclass(cls, kind) and "rep" in cls.levels and not cls.rotation)
    first(lambda cls: "rep" in cls.levels and not cls.rotation and has_parameters(cls))
    first(lambda cls: cls.rotation)
    return chosen
