"""Realistic training patterns (issue 13): a loss read from the wrong view, several shared
tensors, tasks absent from a batch, gradient accumulation, smoothed weights, epochs,
heads weighted by the coefficients. Each either works as documented or is refused with
an error that says how to fix the call, before anything changed."""
from __future__ import annotations

import copy

import pytest
import torch
from core_helpers import assert_same, make, snapshot, task_grads, wrapped_step
from torch import nn

import gradsurgery as gs

D = torch.float64


def _opt(model, method="mgda", k=3, **kw):
    return gs.MultiTaskOptimizer(torch.optim.SGD(model.parameters(), lr=0.1), method, num_tasks=k, **kw)


# -- a loss read from the wrong view --------------------------------------------------------
@pytest.mark.parametrize("method", ["mgda", "pcgrad", "mean"])
def test_every_loss_from_the_first_view_is_refused(method):
    model, x, ys = make(3, seed=1)
    opt = _opt(model, method)
    opt.zero_grad()
    views = opt.fork(model.rep(x))
    before = snapshot(model, opt)
    losses = model.losses([views[0]] * 3, ys)  # a copy-paste bug
    with pytest.raises(ValueError, match=r"task 1 does not read its view.*fork\(\)"):
        opt.backward(losses)
    assert_same(before, snapshot(model, opt))
    # the next ordinary step works and equals a fresh optimizer's first step
    fresh_model = copy.deepcopy(model)
    wrapped_step(model, opt, x, ys)
    wrapped_step(fresh_model, _opt(fresh_model, method), x, ys)
    for p, q in zip(model.parameters(), fresh_model.parameters()):
        torch.testing.assert_close(p, q, rtol=0, atol=0)


def test_loss_reading_z_directly_is_refused():
    model, x, ys = make(2, seed=2)
    opt = _opt(model, k=2)
    opt.zero_grad()
    z = model.rep(x)
    views = opt.fork(z)
    losses = model.losses([views[0], z], ys)
    with pytest.raises(ValueError, match="task 1 reads the backbone's output directly"):
        opt.backward(losses)


@pytest.mark.parametrize("misuse", ["z", "first view", "skip"])
@pytest.mark.parametrize("method", ["mgda", "mean"])
def test_misuse_after_the_first_step_is_refused_before_anything_changes(method, misuse):
    """The readers are checked at every step (issue 21 row 10): a head that reads ``z``,
    another task's view or an unforked backbone tensor at step 3 gets the same clear error
    as at step 1 (not autograd's "backward through the graph a second time"), with
    nothing changed."""
    model, x, ys = make(2, seed=2)
    opt = _opt(model, method, k=2)
    wrapped_step(model, opt, x, ys)
    wrapped_step(model, opt, x, ys)
    opt.zero_grad()
    inner = model.backbone[1](model.backbone[0](x))  # the skip feature: before the last layer
    z = model.backbone[2](inner)
    views = opt.fork(z)
    read = {"z": z, "first view": views[0], "skip": nn.functional.pad(inner, (0, 6 - inner.shape[1]))}[misuse]
    before = snapshot(model, opt)
    with pytest.raises(ValueError, match="reads the backbone's output directly" if misuse != "first view"
                       else "task 1 does not read its view"):
        opt.backward(model.losses([views[0], read], ys))
    assert_same(before, snapshot(model, opt))
    wrapped_step(model, opt, x, ys)  # the next ordinary step works


def test_head_reading_an_unforked_skip_feature_is_refused_with_the_fix():
    torch.manual_seed(0)
    stem, top = nn.Linear(4, 6).double(), nn.Linear(6, 5).double()
    heads = nn.ModuleList(nn.Linear(11, 1).double() for _ in range(2))
    opt = gs.MultiTaskOptimizer(torch.optim.SGD([*stem.parameters(), *top.parameters(), *heads.parameters()],
                                                lr=0.1), "mgda", num_tasks=2)
    x = torch.randn(8, 4, dtype=D)
    skip = torch.tanh(stem(x))
    z = top(skip)
    views = opt.fork(z)
    losses = [head(torch.cat([v, skip], 1)).pow(2).mean() for head, v in zip(heads, views)]
    with pytest.raises(ValueError, match=r"reads the backbone's output directly.*opt.fork\(\(a, b\)\)"):
        opt.backward(losses)


# -- several shared tensors -----------------------------------------------------------------
class SkipNet(nn.Module):
    """A backbone with a skip feature: heads read ``cat(z, skip)``."""

    def __init__(self, k):
        super().__init__()
        self.stem, self.top = nn.Linear(4, 6), nn.Linear(6, 5)
        self.heads = nn.ModuleList(nn.Sequential(nn.Linear(11, 7), nn.Tanh(), nn.Linear(7, 1)) for _ in range(k))

    def shared(self, x):
        skip = torch.tanh(self.stem(x))
        return self.top(skip), skip

    def losses(self, views, ys):
        return [(head(torch.cat(v, 1)).squeeze(-1) - y).pow(2).mean() for head, v, y in zip(self.heads, views, ys)]


@pytest.mark.parametrize("method", ["mgda", "pcgrad", "upgrad", "sum"])
def test_several_shared_tensors_are_one_task_gradient(method):
    """The backbone receives ``c^T G`` with ``G`` the task gradients over both tensors and
    ``c`` decided from ``G G^T`` (the sum of the per-tensor Grams)."""
    k = 3
    torch.manual_seed(3)
    net = SkipNet(k).double()
    x, ys = torch.randn(8, 4, dtype=D), torch.randn(k, 8, dtype=D)
    torch.manual_seed(9)
    opt = gs.MultiTaskOptimizer(torch.optim.SGD(net.parameters(), lr=0.1), method, num_tasks=k)
    reference = copy.deepcopy(opt.method)
    opt.zero_grad()
    views = opt.fork(net.shared(x))
    assert len(views) == k and all(isinstance(v, tuple) and len(v) == 2 for v in views)
    opt.backward(net.losses(views, ys))
    # independently: per-task gradients w.r.t. (z, skip), flattened together
    z, skip = (t.detach().requires_grad_() for t in net.shared(x))
    rows = []
    for head, y in zip(net.heads, ys):
        loss = (head(torch.cat([z, skip], 1)).squeeze(-1) - y).pow(2).mean()
        rows.append(torch.cat([g.flatten() for g in torch.autograd.grad(loss, [z, skip])]))
    g = torch.stack(rows)
    values = torch.stack([l.detach() for l in net.losses([(z, skip)] * k, ys)])
    if isinstance(reference, gs.methods.GramWeighting):
        reference.prepare()
        c = reference.weights(g @ g.T, values)
    else:
        c = torch.ones(k, dtype=D)
    direction = c @ g
    z2, skip2 = net.shared(x)
    n = z2.numel()
    expected = torch.autograd.grad([z2, skip2], [*net.stem.parameters(), *net.top.parameters()],
                                   [direction[:n].view_as(z2), direction[n:].view_as(skip2)])
    for p, e in zip([*net.stem.parameters(), *net.top.parameters()], expected):
        torch.testing.assert_close(p.grad, e, rtol=1e-9, atol=1e-12)
    torch.testing.assert_close(opt.stats["grad_norms"] if method != "sum" else g.norm(dim=1), g.norm(dim=1))


def test_several_shared_tensors_with_rotations_rotate_the_first():
    net = SkipNet(2).double()
    opt = gs.MultiTaskOptimizer(torch.optim.SGD(net.parameters(), lr=0.1), "rotograd", num_tasks=2, rep_size=5)
    x, ys = torch.randn(8, 4, dtype=D), torch.randn(2, 8, dtype=D)
    z, skip = net.shared(x)
    views = opt.fork((z, skip))
    r = opt.rotations.matrices().detach()
    for k, (zk, sk) in enumerate(views):
        torch.testing.assert_close(zk, z.detach() @ r[k].T)
        torch.testing.assert_close(sk, skip.detach())
    opt.backward(net.losses(views, ys))
    assert opt.rotations.skew_params.grad is not None and net.stem.weight.grad is not None


def test_fork_rejects_a_non_tensor_in_the_tuple():
    model, x, ys = make(2)
    opt = _opt(model, k=2)
    with pytest.raises(TypeError, match="tuple/list of such tensors"):
        opt.fork((model.rep(x), 3))


# -- absent tasks ---------------------------------------------------------------------------
@pytest.mark.parametrize("method", ["mgda", "cagrad", "upgrad", "aligned_mtl", "mean", "sum"])
def test_absent_task_the_method_decides_over_the_present_ones(method):
    """Task 1 is absent: the backbone gets what the method gives for tasks {0, 2} alone
    (an optimizer built for those two tasks), the absent head no gradient."""
    model, x, ys = make(3, seed=4)
    twin = copy.deepcopy(model)
    opt = _opt(model, method)
    opt.zero_grad()
    views = opt.fork(model.rep(x))
    losses = model.losses(views, ys)
    opt.backward([losses[0], None, losses[2]])
    # the same two tasks through a 2-task optimizer
    two = copy.deepcopy(twin)
    two.heads = nn.ModuleList([two.heads[0], two.heads[2]])
    ref = _opt(two, method, k=2)
    ref.zero_grad()
    ref.backward(two.losses(ref.fork(two.rep(x)), ys[[0, 2]]))
    for p, q in zip(model.backbone.parameters(), two.backbone.parameters()):
        torch.testing.assert_close(p.grad, q.grad, rtol=1e-9, atol=1e-12)
    for p, q in zip([*model.heads[0].parameters(), *model.heads[2].parameters()], two.heads.parameters()):
        torch.testing.assert_close(p.grad, q.grad, rtol=1e-9, atol=1e-12)
    assert all(p.grad is None for p in model.heads[1].parameters())
    assert opt.stats["present"].tolist() == [True, False, True]
    assert opt.stats["losses"][1].isnan() and opt.stats["weights"][1] == 0


@pytest.mark.parametrize("method", ["gradnorm", "nash_mtl", "rotograd", "dwa"])
def test_absent_task_with_a_stateful_method_is_refused_and_nothing_changes(method):
    model, x, ys = make(3, seed=5)
    opt = _opt(model, method, rep_size=6)
    wrapped_step(model, opt, x, ys)
    opt.zero_grad()
    views = opt.fork(model.rep(x))
    losses = model.losses(views, ys)
    before = snapshot(model, opt)
    with pytest.raises(ValueError, match=r"absent task\(s\) \[1\].*methods that can: .*mgda"):
        opt.backward([losses[0], None, losses[2]])
    assert_same(before, snapshot(model, opt))


def test_all_tasks_absent_is_refused():
    model, x, ys = make(2)
    opt = _opt(model, k=2)
    opt.fork(model.rep(x))
    with pytest.raises(ValueError, match="None for every task"):
        opt.backward([None, None])


# -- gradient accumulation ------------------------------------------------------------------
def test_accumulation_draws_once_per_step_and_stats_cover_the_step():
    """RLW's weights and PCGrad's orders are drawn once per optimizer step: the
    micro-batches of a step share them; the stats average the micro-batches."""
    for method in ("rlw", "pcgrad"):
        model, x, ys = make(3, seed=6, batch=8)
        torch.manual_seed(0)
        opt = _opt(model, method)
        state = opt.generator.get_state()
        per_micro = []
        opt.zero_grad()
        for half in (slice(0, 4), slice(4, 8)):
            losses = model.losses(opt.fork(model.rep(x[half])), ys[:, half])
            opt.backward(losses)
            per_micro.append({k: v.clone() for k, v in opt.stats.items()})
        stats = opt.stats
        assert int(stats["micro_batches"]) == 2
        torch.testing.assert_close(stats["losses"], (per_micro[0]["losses"] + torch.stack(
            [l.detach() for l in losses])) / 2)
        if method == "rlw":  # the same weights in both micro-batches
            assert torch.equal(per_micro[0]["weights"], stats["weights"])
        # exactly one draw was taken from the generator for the step
        once = torch.Generator()
        once.set_state(state)
        (torch.randn(3, generator=once, dtype=D) if method == "rlw" else torch.rand(3, 3, generator=once))
        assert torch.equal(opt.generator.get_state(), once.get_state())
        opt.step()
        opt.zero_grad()
        opt.backward(model.losses(opt.fork(model.rep(x)), ys))
        assert int(opt.stats["micro_batches"]) == 1


# -- weight_ema -----------------------------------------------------------------------------
@pytest.mark.parametrize("method", ["mgda", "uw"])
def test_weight_ema_smooths_the_weights_and_resumes(method):
    """``lambda_t = a lambda_{t-1} + (1 - a) lambdahat_t``, ``lambda_1 = lambdahat_1``, with
    ``lambdahat`` the method's own weights at that step (MGDA: a fresh MGDA's decision on the
    same model and batch; UW: ``exp(-s) / 2`` of its current log-variances)."""
    a = 0.7
    model, x, ys = make(3, seed=7)
    opt = _opt(model, method, weight_ema=a, method_lr=0.05)
    previous = None
    for step in range(4):
        xs = x + 0.1 * step
        if method == "mgda":
            probe_model = copy.deepcopy(model)
            probe = _opt(probe_model, "mgda")
            wrapped_step(probe_model, probe, xs, ys, step=False)
            hat = probe.stats["weights"]
        else:
            hat = 0.5 * torch.exp(-opt.method.log_vars.detach())
        if step == 3:  # resume from here: the same next step
            resumed_model = copy.deepcopy(model)
            resumed = _opt(resumed_model, method, weight_ema=a, method_lr=0.05)
            resumed.load_state_dict(copy.deepcopy(opt.state_dict()))
            wrapped_step(resumed_model, resumed, xs, ys)
        wrapped_step(model, opt, xs, ys)
        expected = hat if previous is None else a * previous + (1 - a) * hat
        torch.testing.assert_close(opt.stats["weights"], expected, rtol=1e-10, atol=1e-12)
        previous = opt.stats["weights"].clone()
    assert torch.equal(resumed.stats["weights"], opt.stats["weights"])
    for p, q in zip(model.parameters(), resumed_model.parameters()):
        assert torch.equal(p, q)


@pytest.mark.parametrize("method", ["modo", "sdmgrad", "excess_mtl"])
def test_weight_ema_smooths_an_element_wise_methods_weights(method):
    """Element-wise methods with weights: the weights they combine with are smoothed, their
    own state is not (the same parameters, the same batch, several backward calls: the
    smoothed run reports the EMA of the plain run's weights)."""
    a = 0.6
    model, x, ys = make(3, seed=9, batch=6)
    plain_model = copy.deepcopy(model)
    torch.manual_seed(1)
    opt = gs.MultiTaskOptimizer(torch.optim.SGD(model.parameters(), lr=0.0), method, num_tasks=3, weight_ema=a)
    torch.manual_seed(1)
    plain = gs.MultiTaskOptimizer(torch.optim.SGD(plain_model.parameters(), lr=0.0), method, num_tasks=3)
    previous = None
    for _ in range(3):  # lr 0: the same parameters every step
        wrapped_step(plain_model, plain, x, ys)
        wrapped_step(model, opt, x, ys)
        hat = plain.stats["weights"]
        assert torch.isfinite(hat).all()
        expected = hat if previous is None else a * previous + (1 - a) * hat
        torch.testing.assert_close(opt.stats["weights"], expected, rtol=1e-10, atol=1e-12)
        previous = opt.stats["weights"].clone()


def test_weight_ema_is_refused_for_element_wise_methods():
    model, x, ys = make(2)
    with pytest.raises(ValueError, match="element by element"):
        _opt(model, "graddrop", k=2, weight_ema=0.5)
    with pytest.raises(ValueError, match=r"\[0, 1\)"):
        _opt(model, "mgda", k=2, weight_ema=1.0)


# -- epochs and heads -----------------------------------------------------------------------
def test_end_epoch_reaches_the_method():
    calls = []

    class Counting(gs.methods.GramWeighting):
        def weights(self, gram, losses):
            return torch.ones_like(losses)

        def end_epoch(self):
            calls.append(1)

    model, x, ys = make(2)
    opt = _opt(model, Counting(), k=2)
    opt.end_epoch()
    opt.end_epoch()
    assert len(calls) == 2


def test_weight_heads_scales_each_head_by_its_coefficient():
    model, x, ys = make(3, seed=8)
    plain_model = copy.deepcopy(model)
    opt = _opt(model, "mgda", weight_heads=True)
    plain = _opt(plain_model, "mgda")
    wrapped_step(model, opt, x, ys, step=False)
    wrapped_step(plain_model, plain, x, ys, step=False)
    c = opt.stats["weights"]
    for k in range(3):
        for p, q in zip(model.heads[k].parameters(), plain_model.heads[k].parameters()):
            torch.testing.assert_close(p.grad, c[k] * q.grad, rtol=1e-12, atol=1e-15)
    for p, q in zip(model.backbone.parameters(), plain_model.backbone.parameters()):
        torch.testing.assert_close(p.grad, q.grad, rtol=0, atol=0)
    grads = task_grads(model, x, ys)
    assert grads.shape[0] == 3


def test_method_param_group_is_named():
    model, x, ys = make(2)
    opt = _opt(model, "uw", k=2, method_lr=0.01)
    assert [g.get("name") for g in opt.param_groups] == [None, "method"]
