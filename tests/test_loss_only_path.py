"""The loss-only fast path: methods that only weight the losses (``LossWeighting``)
get the heads' gradients added up as plain ``sum(L).backward()`` adds them, instead of
the ``K x N`` task-gradient matrix and ``c^T G``.

Checked here: ``sum`` is bit-for-bit plain backward; every loss-only method takes the
same steps (and keeps the same state) as the general stacked path; the ``K x N`` matrix is
never allocated on the fast path (and still is on the general one); low precision keeps
the general path (which sums in float32)."""
from __future__ import annotations

import copy

import pytest
import torch
from core_helpers import make, wrapped_step
from torch.utils._python_dispatch import TorchDispatchMode

import gradsurgery as gs

LOSS_ONLY = [name for name in gs.methods.available()
             if issubclass(gs.methods.get(name), gs.methods.LossWeighting) and not gs.methods.get(name).rotation]


def test_the_loss_only_methods():
    assert {"sum", "mean", "uw", "dwa", "rlw", "famo"} <= set(LOSS_ONLY)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("k", [1, 3, 8])
@pytest.mark.parametrize("check_finite", [True, False])
def test_sum_is_plain_backward_bit_for_bit(dtype, k, check_finite):
    model, x, ys = make(k, seed=3, dtype=dtype, batch=16)
    plain = copy.deepcopy(model)
    opt = gs.MultiTaskOptimizer(torch.optim.Adam(model.parameters(), lr=0.05), "sum", num_tasks=k,
                                check_finite=check_finite)
    ref = torch.optim.Adam(plain.parameters(), lr=0.05)
    for _ in range(3):
        wrapped_step(model, opt, x, ys)
        ref.zero_grad()
        z = plain.rep(x)
        sum(plain.losses([z] * k, ys)).backward()
        ref.step()
    for p, q in zip(model.parameters(), plain.parameters()):
        assert torch.equal(p, q)


@pytest.mark.parametrize("name", LOSS_ONLY)
def test_fast_path_takes_the_general_paths_steps(name, monkeypatch):
    """Same parameters, stats and method state after a few steps (the two paths only sum
    the K task gradients in a different order)."""
    runs = []
    for general in (False, True):
        if general:  # the same method forced onto the general path (stacked G, c^T G)
            monkeypatch.setattr(gs.pipeline.paths, "SummedPath", gs.pipeline.paths.StackedPath)
        model, x, ys = make(3, seed=4)
        torch.manual_seed(7)  # the method's generator (rlw) is seeded from it
        opt = gs.MultiTaskOptimizer(torch.optim.SGD(model.parameters(), lr=0.05), name, num_tasks=3,
                                    method_lr=0.01)
        assert isinstance(opt._path, gs.pipeline.paths.SummedPath) or opt._path is None
        for _ in range(3):
            losses = wrapped_step(model, opt, x, ys)
            with torch.no_grad():
                opt.observe([loss * 0.9 for loss in losses])  # famo learns from it
        runs.append((model, opt))
    (fast, opt_fast), (general, opt_general) = runs
    for p, q in zip(fast.parameters(), general.parameters()):
        torch.testing.assert_close(p, q, rtol=1e-12, atol=1e-12)
    assert opt_fast.stats.keys() == opt_general.stats.keys()
    for key in opt_fast.stats:
        torch.testing.assert_close(opt_fast.stats[key], opt_general.stats[key], rtol=1e-12, atol=1e-12,
                                   equal_nan=True)
    for p, q in zip(opt_fast.method.parameters(), opt_general.method.parameters()):
        torch.testing.assert_close(p, q, rtol=1e-12, atol=1e-12)


class _LargestOutput(TorchDispatchMode):
    """Records the largest tensor any operator returns."""

    def __init__(self):
        super().__init__()
        self.largest = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in out if isinstance(out, (tuple, list)) else [out]:
            if isinstance(t, torch.Tensor):
                self.largest = max(self.largest, t.numel())
        return out


@pytest.mark.parametrize("name,formed", [("sum", False), ("mean", False), ("uw", False), ("pcgrad", True)])
def test_task_gradient_matrix_is_never_formed_on_the_fast_path(name, formed):
    k, batch, width = 4, 16, 32  # K x N is the largest tensor of a step, when it is formed
    model, x, ys = make(k, seed=5, batch=batch, rep_shape=(width,), hidden=5)
    opt = gs.MultiTaskOptimizer(torch.optim.SGD(model.parameters(), lr=0.01), name, num_tasks=k)
    opt.zero_grad()
    views = opt.fork(model.rep(x))
    losses = model.losses(views, ys)
    with _LargestOutput() as mode:
        opt.backward(losses)
    assert (mode.largest >= k * batch * width) == formed


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_low_precision_sums_in_float32(dtype):
    """Half-precision representations keep the general path: ``c^T G`` in float32, not
    autograd's half-precision sum."""
    model, x, ys = make(3, seed=6, dtype=dtype, batch=8)
    opt = gs.MultiTaskOptimizer(torch.optim.SGD(model.parameters(), lr=0.01), "sum", num_tasks=3)
    opt.zero_grad()
    z = model.rep(x)
    views = opt.fork(z)
    captured = []
    z.register_hook(captured.append)
    rows = [torch.autograd.grad(loss, view, retain_graph=True)[0] for loss, view in
            zip(model.losses(views, ys), views)]
    opt.backward(model.losses(views, ys))
    expected = torch.stack(rows).float().sum(0).to(dtype)
    assert torch.equal(captured[0], expected)
