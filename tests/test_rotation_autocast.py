"""Rotations under autocast (what Lightning's ``bf16-mixed`` runs around ``training_step``):
the exponential and its backward run in float32 or wider whatever autocast is active."""
from __future__ import annotations

import pytest
import torch
from torch import nn

import gradsurgery as gs
from gradsurgery.numerics.expm import expm, skew


def _generators() -> torch.Tensor:
    """Two 16 x 16 generators large enough for a degree > 1 plan with squarings."""
    a = torch.randn(2, 16, 16, generator=torch.Generator().manual_seed(0))
    return (2 * skew(a)).requires_grad_()


@pytest.mark.parametrize("sync_free", [False, True])
def test_expm_and_its_backward_ignore_autocast(sync_free):
    """Forward and backward under a bfloat16 autocast (the backward too: ``opt.backward``
    runs inside it) give the float32 results bit for bit."""
    x, g = _generators(), torch.randn(2, 16, 16, generator=torch.Generator().manual_seed(1))
    out = expm(x, sync_free=sync_free)
    (grad,) = torch.autograd.grad(out, x, g)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out_ac = expm(x, sync_free=sync_free)
        (grad_ac,) = torch.autograd.grad(out_ac, x, g)
    assert out_ac.dtype == grad_ac.dtype == torch.float32
    assert torch.equal(out_ac, out) and torch.equal(grad_ac, grad)


def test_expm_of_half_precision_generators_runs_in_float32():
    x = _generators().detach()
    assert torch.equal(expm(x.bfloat16()), expm(x.bfloat16().float()).bfloat16())


@pytest.mark.parametrize("method, options", [("rotograd", {}), ("rotate_only", {}), ("mgda", {"rotation": True}),
                                             ("rotograd", {"rotation_param": "cayley"})])
def test_rotation_methods_train_under_bfloat16_autocast(method, options):
    """Six steps with fork and backward inside ``torch.autocast("cpu", bfloat16)``, the
    rotations large enough after the first steps for products in the backward: they train,
    stay float32 and orthogonal."""
    torch.manual_seed(0)
    backbone, heads = nn.Linear(4, 16), nn.ModuleList([nn.Linear(16, 1) for _ in range(2)])
    opt = gs.MultiTaskOptimizer(torch.optim.SGD([*backbone.parameters(), *heads.parameters()], lr=0.1),
                                method, num_tasks=2, rep_size=16, method_lr=0.5, **options)
    g = torch.Generator().manual_seed(2)
    for _ in range(6):
        x, y = torch.randn(8, 4, generator=g), torch.randn(2, 8, 1, generator=g)
        opt.zero_grad()
        with torch.autocast("cpu", dtype=torch.bfloat16):
            views = opt.fork(backbone(x))
            opt.backward([(h(v).float() - t).pow(2).mean() for h, v, t in zip(heads, views, y)])
        opt.step()
    a = opt.rotations.skew_params
    assert a.dtype == torch.float32 and torch.isfinite(a).all() and skew(a).norm() > 0.1
    r = opt.rotations.matrices().detach()
    torch.testing.assert_close(r @ r.mT, torch.eye(16).expand(2, 16, 16), rtol=0, atol=1e-5)
