"""``opt.task_model(k, backbone, head)``: the end-to-end predictor of task ``k`` holds the
rotation ``R_k`` (taken when it is built) as a buffer of its own, so its ``state_dict``
carries it, loading restores it, a predictor rebuilt without it refuses the checkpoint,
and it exports with ``torch.export`` and ``torch.jit.trace``."""
from __future__ import annotations

import pytest
import torch
from torch import nn

import gradsurgery as gs

pytestmark = pytest.mark.usefixtures("single_thread")


class ConvHead(nn.Module):
    def __init__(self, channels: int):
        super().__init__()
        self.conv = nn.Conv2d(channels, 2, 1)

    def forward(self, z):
        return self.conv(z).mean(dim=(2, 3))


def trained(seed: int, *, conv: bool = False, method: str = "rotograd", steps: int = 3):
    """A backbone, heads and optimizer after a few steps (so the rotations have moved
    away from their start)."""
    torch.manual_seed(seed)
    if conv:
        backbone = nn.Sequential(nn.Conv2d(2, 4, 3, padding=1), nn.Tanh())
        heads = nn.ModuleList([ConvHead(4), ConvHead(4)])
        shape = dict(rotation_shape=4, post_shape=(5, 5))
        x = torch.randn(6, 2, 5, 5)
    else:
        backbone = nn.Sequential(nn.Linear(3, 5), nn.Tanh())
        heads = nn.ModuleList([nn.Linear(5, 2), nn.Linear(5, 1)])
        shape = dict(rep_size=5)
        x = torch.randn(6, 3)
    base = torch.optim.SGD([*backbone.parameters(), *heads.parameters()], lr=0.1)
    opt = gs.MultiTaskOptimizer(base, method, num_tasks=2, method_lr=0.5, **shape)
    for _ in range(steps):
        opt.zero_grad()
        views = opt.fork(backbone(x))
        opt.backward([(h(v) - 1).pow(2).mean() for h, v in zip(heads, views)])
        opt.step()
    return opt, backbone, heads, x


def expected(opt, backbone, head, task, x):
    """``head(R_task z)`` computed here from the rotation matrices, by hand."""
    with torch.no_grad():
        r = opt.rotations.matrices()[task]
        z = backbone(x)
        if z.dim() == 2:
            return head(z @ r.T)
        return head(torch.einsum("ij,bjhw->bihw", r, z))


@pytest.mark.parametrize("conv", [False, True])
def test_state_dict_holds_the_rotation(conv):
    opt, backbone, heads, x = trained(0, conv=conv)
    model = opt.task_model(1, backbone, heads[1])
    r1 = opt.rotations.matrices()[1].detach()
    assert not torch.allclose(r1, opt.rotations.base[1])  # the rotation did move
    rotations = [v for v in model.state_dict().values() if v.shape == r1.shape]
    assert len(rotations) == 1 and torch.allclose(rotations[0], r1)
    torch.testing.assert_close(model(x), expected(opt, backbone, heads[1], 1, x))

    # a deploy script: a fresh optimizer (other random rotations), load, same predictions
    opt2, backbone2, heads2, _ = trained(1, conv=conv, steps=0)
    rebuilt = opt2.task_model(1, backbone2, heads2[1])
    assert not torch.allclose(rebuilt(x), model(x))
    rebuilt.load_state_dict(model.state_dict())
    torch.testing.assert_close(rebuilt(x), model(x))


def test_rebuilt_without_rotation_refuses_the_checkpoint():
    opt, backbone, heads, x = trained(0)
    state = opt.task_model(0, backbone, heads[0]).state_dict()
    plain, backbone2, heads2, _ = trained(1, method="mean", steps=0)
    with pytest.raises(RuntimeError, match="Unexpected key"):
        plain.task_model(0, backbone2, heads2[0]).load_state_dict(state)


def test_snapshot_taken_when_built():
    """The predictor keeps the rotation it was built with; build it again after training."""
    opt, backbone, heads, x = trained(0)
    model = opt.task_model(0, backbone, heads[0])
    head_out = model[1](backbone(x).detach())
    trained_more = opt.rotations.skew_params.detach().clone()
    with torch.no_grad():
        opt.rotations.skew_params.add_(0.3)  # the rotations move on
    assert not torch.equal(trained_more, opt.rotations.skew_params)
    torch.testing.assert_close(model[1](backbone(x).detach()), head_out)
    torch.testing.assert_close(opt.task_model(0, backbone, heads[0])(x), expected(opt, backbone, heads[0], 0, x))


@pytest.mark.parametrize("conv", [False, True])
def test_torch_export(conv):
    opt, backbone, heads, x = trained(0, conv=conv)
    model = opt.task_model(0, backbone, heads[0]).eval()
    exported = torch.export.export(model, (x,))
    torch.testing.assert_close(exported.module()(x), model(x))
    # the rotation is state of the exported program, not a constant folded from the optimizer
    assert any(v.shape == (4, 4) if conv else v.shape == (5, 5) for v in exported.state_dict.values())


@pytest.mark.parametrize("conv", [False, True])
def test_jit_trace(conv):
    opt, backbone, heads, x = trained(0, conv=conv)
    model = opt.task_model(0, backbone, heads[0]).eval()
    traced = torch.jit.trace(model, (x,))
    torch.testing.assert_close(traced(x), model(x))
    other = torch.randn(3, *x.shape[1:])  # another batch size
    torch.testing.assert_close(traced(other), model(other))


def test_without_rotations():
    opt, backbone, heads, x = trained(0, method="mgda")
    model = opt.task_model(1, backbone, heads[1])
    torch.testing.assert_close(model(x), heads[1](backbone(x)))
    torch.testing.assert_close(torch.export.export(model, (x,)).module()(x), model(x))
