"""LR schedulers: the method's own parameters (rotations, task weights) sit in a param
group named ``"method"``, so a scheduler that sets every group's rate (``OneCycleLR``,
``CyclicLR``) can be given a per-group rate that keeps ``method_lr`` apart
(docs/schedulers.md)."""
from __future__ import annotations

import pytest
import torch
from torch import nn

import gradsurgery as gs

LR, METHOD_LR = 1e-2, 1e-3


def build(method: str = "rotograd"):
    torch.manual_seed(0)
    backbone, heads = nn.Linear(3, 4), nn.ModuleList([nn.Linear(4, 1), nn.Linear(4, 1)])
    base = torch.optim.SGD([*backbone.parameters(), *heads.parameters()], lr=LR, momentum=0.9)
    opt = gs.MultiTaskOptimizer(base, method, num_tasks=2, rep_size=4, method_lr=METHOD_LR)
    return opt, backbone, heads


def train_step(opt, backbone, heads):
    opt.zero_grad()
    views = opt.fork(backbone(torch.randn(8, 3)))
    opt.backward([h(v).pow(2).mean() for h, v in zip(heads, views)])
    opt.step()


@pytest.mark.parametrize("method", ["rotograd", "gradnorm"])
def test_method_group_is_named(method):
    opt, *_ = build(method)
    names = [g.get("name") for g in opt.param_groups]
    assert names.count("method") == 1 and names[-1] == "method"
    group = opt.param_groups[-1]
    assert group["lr"] == METHOD_LR
    assert {id(p) for p in group["params"]} == {id(p) for p in opt._own_params()}
    # the name survives a checkpoint
    again, *_ = build(method)
    again.load_state_dict(opt.state_dict())
    assert [g.get("name") for g in again.param_groups] == names


def test_no_method_group_without_method_parameters():
    opt, *_ = build("mgda")
    assert [g.get("name") for g in opt.param_groups] == [None]


def test_one_cycle_keeps_method_lr_with_per_group_max_lr():
    """The recipe of docs/schedulers.md: ``max_lr`` per group, the method's 10x smaller."""
    opt, backbone, heads = build()
    max_lr = [METHOD_LR if g.get("name") == "method" else LR for g in opt.param_groups]
    assert max_lr == [LR, METHOD_LR]
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=max_lr, total_steps=20)
    seen = []
    for _ in range(19):
        train_step(opt, backbone, heads)
        sched.step()
        model_lr, method_lr = (g["lr"] for g in opt.param_groups)
        seen.append(model_lr)
        assert method_lr == pytest.approx(model_lr * METHOD_LR / LR, rel=1e-12)
    assert max(seen) == pytest.approx(LR, rel=1e-6) and seen[-1] < LR / 100  # a whole cycle ran


def test_scalar_max_lr_overwrites_method_lr():
    """Why the recipe is needed: one ``max_lr`` gives the method the model's rate."""
    opt, *_ = build()
    torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=LR, total_steps=20)
    model_lr, method_lr = (g["lr"] for g in opt.param_groups)
    assert method_lr == model_lr
