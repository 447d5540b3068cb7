"""MultiTaskOptimizer as an optimizer: wrapped optimizers, LR schedulers, param groups,
the method's own group, ``backbone_loss``, ``stats``, host reads, the package surface."""
import copy
import io
import warnings

import pytest
import torch
from core_helpers import (
    assert_same,
    backbone_grads_for,
    make,
    representative_methods,
    snapshot,
    task_grads,
    wrapped_step,
)

import gradsurgery as gs

#: one method of each kind, the first with parameters and the first rotation method
BUILTINS = representative_methods()


class SignSGD(torch.optim.Optimizer):
    """A custom optimizer whose ``step`` takes no closure."""

    def __init__(self, params, lr=0.01):
        super().__init__(params, {"lr": lr})

    @torch.no_grad()
    def step(self):
        for group in self.param_groups:
            for p in group["params"]:
                if p.grad is not None:
                    p.add_(p.grad.sign(), alpha=-group["lr"])
                    self.state[p]["steps"] = self.state[p].get("steps", 0) + 1


OPTIMIZERS = {
    "sgd": lambda ps: torch.optim.SGD(ps, lr=0.05, momentum=0.9),
    "adam": lambda ps: torch.optim.Adam(ps, lr=0.01),
    "adamw": lambda ps: torch.optim.AdamW(ps, lr=0.01, weight_decay=0.1),
    "rmsprop": lambda ps: torch.optim.RMSprop(ps, lr=0.01),
    "custom": lambda ps: SignSGD(ps, lr=0.01),
}


@pytest.mark.parametrize("name", OPTIMIZERS)
def test_wrapped_optimizers_follow_plain_training(name):
    """With "sum", three wrapped steps equal three plain steps of the same optimizer."""
    model, x, ys = make(3, seed=1)
    plain = copy.deepcopy(model)
    opt = gs.MultiTaskOptimizer(OPTIMIZERS[name](model.parameters()), "sum", num_tasks=3)
    ref = OPTIMIZERS[name](plain.parameters())
    for _ in range(3):
        wrapped_step(model, opt, x, ys)
        ref.zero_grad()
        z = plain.rep(x)
        sum(plain.losses([z] * 3, ys)).backward()
        ref.step()
    for p, q in zip(model.parameters(), plain.parameters()):
        torch.testing.assert_close(p, q, rtol=1e-12, atol=1e-12)
    assert len(opt.state) == len(ref.state)


@pytest.mark.parametrize("method", BUILTINS)
@pytest.mark.parametrize("name", OPTIMIZERS)
def test_every_method_trains_with_every_optimizer(method, name):
    model, x, ys = make(3, seed=2)
    rotation = {"rep_size": 6} if gs.methods.get(method).rotation else {}
    opt = gs.MultiTaskOptimizer(OPTIMIZERS[name](model.parameters()), method, num_tasks=3, method_lr=0.01, **rotation)
    before = [p.detach().clone() for p in model.parameters()]
    for _ in range(2):
        wrapped_step(model, opt, x, ys)
    assert all(torch.isfinite(p).all() for p in model.parameters())
    assert any(not torch.equal(p, q) for p, q in zip(model.parameters(), before))


def test_param_groups_are_the_wrapped_optimizers_and_method_group():
    model, x, ys = make(2)
    base = torch.optim.AdamW([{"params": model.backbone.parameters()},
                              {"params": model.heads.parameters(), "lr": 0.5}], lr=0.1, weight_decay=0.2)
    opt = gs.MultiTaskOptimizer(base, "gradnorm", num_tasks=2, method_lr=0.123)
    assert opt.param_groups is base.param_groups
    assert opt.state is base.state and opt.defaults is base.defaults
    assert len(base.param_groups) == 3
    own = base.param_groups[-1]
    assert own["params"] == [opt.method.task_weights]
    assert own["lr"] == 0.123 and own["weight_decay"] == 0.0
    # default method_lr: the first group's lr
    model2, _, _ = make(2)
    opt2 = gs.MultiTaskOptimizer(torch.optim.SGD(model2.parameters(), lr=0.07), "gradnorm", num_tasks=2)
    assert opt2.param_groups[-1]["lr"] == 0.07
    # methods without parameters add no group, whatever method_lr says
    model3, _, _ = make(2)
    opt3 = gs.MultiTaskOptimizer(torch.optim.SGD(model3.parameters(), lr=0.07), "pcgrad", num_tasks=2, method_lr=1.0)
    assert len(opt3.param_groups) == 1
    # the method's weights are stepped by the wrapped optimizer with method_lr
    wrapped_step(model, opt, x, ys)
    assert opt.method.task_weights in base.state


def test_step_lr_scheduler_on_the_wrapper():
    model, x, ys = make(2)
    opt = gs.MultiTaskOptimizer(torch.optim.SGD(model.parameters(), lr=1.0), "gradnorm", num_tasks=2, method_lr=0.5)
    sched = torch.optim.lr_scheduler.StepLR(opt, step_size=2, gamma=0.1)
    lrs = []
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # e.g. "lr_scheduler.step() before optimizer.step()"
        for _ in range(5):
            wrapped_step(model, opt, x, ys)
            sched.step()
            lrs.append([g["lr"] for g in opt.optimizer.param_groups])
    for got, want in zip(lrs, [[1.0, 0.5], [0.1, 0.05], [0.1, 0.05], [0.01, 0.005], [0.01, 0.005]]):
        assert got == pytest.approx(want)


def test_backbone_loss_is_added_unchanged():
    model, x, ys = make(3, seed=3)
    plain = copy.deepcopy(model)
    opt = gs.MultiTaskOptimizer(torch.optim.SGD(model.parameters(), lr=0.1), "sum", num_tasks=3)
    views = opt.fork(model.rep(x))
    reg = 0.3 * sum(p.square().sum() for p in model.backbone.parameters())
    opt.backward(model.losses(views, ys), backbone_loss=reg)
    z = plain.rep(x)
    (sum(plain.losses([z] * 3, ys)) + 0.3 * sum(p.square().sum() for p in plain.backbone.parameters())).backward()
    for p, q in zip(model.parameters(), plain.parameters()):
        torch.testing.assert_close(p.grad, q.grad, rtol=1e-12, atol=1e-14)


def test_fork_under_no_grad_records_nothing():
    model, x, ys = make(3)
    opt = gs.MultiTaskOptimizer(torch.optim.SGD(model.parameters(), lr=0.1), "pcgrad", num_tasks=3)
    with torch.no_grad():
        views = opt.fork(model.rep(x))
    assert len(views) == 3 and all(torch.equal(v, views[0]) for v in views)
    wrapped_step(model, opt, x, ys)  # no pending fork was left


@pytest.mark.parametrize("method", [name for name in BUILTINS if not gs.methods.get(name).rotation])
def test_stats_keys_shapes_and_values(method):
    k = 4
    model, x, ys = make(k, seed=6, rep_shape=(2, 3))
    opt = gs.MultiTaskOptimizer(torch.optim.SGD(model.parameters(), lr=0.1), method, num_tasks=k)
    grads = task_grads(model, x, ys)
    losses = wrapped_step(model, opt, x, ys, step=False)
    stats = opt.stats
    assert set(stats) == {"losses", "weights", "grad_norms", "cosines", "present", "micro_batches"}
    assert all(not v.requires_grad for v in stats.values())
    torch.testing.assert_close(stats["losses"], torch.stack(losses).detach())
    assert stats["weights"].shape == (k,) and stats["present"].all() and int(stats["micro_batches"]) == 1
    if isinstance(opt.method, gs.methods.LossWeighting):  # never forms the task gradients
        assert stats["grad_norms"].isnan().all() and stats["cosines"].isnan().all()
    if not isinstance(opt.method, gs.methods.GramWeighting) or opt.method.loss_weights(stats["losses"]) is not None:
        return  # the values below are those of a Gram weighting of the unweighted task gradients
    norms = grads.norm(dim=1)
    torch.testing.assert_close(stats["grad_norms"], norms)
    torch.testing.assert_close(stats["cosines"], (grads @ grads.T) / (norms[:, None] * norms[None, :]))
    # the weights are those of the unweighted task gradients in what the backbone received
    direction = stats["weights"] @ grads
    for p, e in zip(model.backbone.parameters(), backbone_grads_for(model, x, direction)):
        torch.testing.assert_close(p.grad, e, rtol=1e-9, atol=1e-12)


READS = ("item", "__bool__", "tolist", "__float__", "__int__", "__index__", "numpy")


@pytest.mark.parametrize("check_finite", [False, True])
@pytest.mark.parametrize("method", [name for name in BUILTINS if not gs.methods.get(name).rotation])
def test_host_reads_during_backward(method, check_finite, monkeypatch):
    """None with check_finite=False (sync-free training), exactly one with it (the finiteness
    flag and the zero-gradient tasks of the masked-loss warning, read together)."""
    model, x, ys = make(3, seed=0)
    opt = gs.MultiTaskOptimizer(torch.optim.SGD(model.parameters(), lr=0.1), method, num_tasks=3,
                                check_finite=check_finite)
    wrapped_step(model, opt, x, ys)  # first step (GradNorm's initial losses) ...
    for _ in range(2):  # ... and later ones
        opt.zero_grad()
        losses = model.losses(opt.fork(model.rep(x)), ys)
        calls = []
        with monkeypatch.context() as patch:
            for name in READS:
                original = getattr(torch.Tensor, name)

                def spy(self, *args, _name=name, _original=original, _calls=calls, **kwargs):
                    _calls.append(_name)
                    return _original(self, *args, **kwargs)

                patch.setattr(torch.Tensor, name, spy)
            opt.backward(losses)
        assert calls == (["tolist"] if check_finite else []), calls
        opt.step()


def test_package_surface_and_repr():
    assert isinstance(gs.__version__, str) and gs.__version__
    assert gs.MultiTaskOptimizer and gs.methods.available
    model, _, _ = make(2)
    opt = gs.MultiTaskOptimizer(torch.optim.SGD(model.parameters(), lr=0.1), "mgda", num_tasks=2,
                                normalization="l2")
    text = repr(opt)
    assert "MGDA" in text and "l2" in text and "num_tasks=2" in text and "SGD" in text
    with pytest.raises(TypeError, match="already a MultiTaskOptimizer"):
        gs.MultiTaskOptimizer(opt, "mean", num_tasks=2)


def test_zero_grad_discards_pending_fork_and_grads():
    model, x, ys = make(2)
    opt = gs.MultiTaskOptimizer(torch.optim.SGD(model.parameters(), lr=0.1), "mean", num_tasks=2)
    wrapped_step(model, opt, x, ys, step=False)
    opt.fork(model.rep(x))
    opt.zero_grad()
    assert all(p.grad is None for p in model.parameters())
    opt.fork(model.rep(x))  # no "fork twice" error


def test_observe_validates_and_is_ignored_by_other_methods():
    model, x, ys = make(2)
    opt = gs.MultiTaskOptimizer(torch.optim.SGD(model.parameters(), lr=0.1), "mgda", num_tasks=2)
    with pytest.raises(ValueError, match="2 scalar losses"):
        opt.observe([1.0])
    before = snapshot(model, opt)
    opt.observe([torch.tensor(1.0), 2.0])
    assert_same(before, snapshot(model, opt))


@pytest.mark.parametrize("name", gs.methods.available())
def test_resume_with_observe_and_epochs_is_bit_exact(name):
    """A run with ``observe`` after every step and an epoch mark every two steps, resumed
    from a checkpoint (``torch.save``, ``torch.load(weights_only=True)``) into a differently
    seeded optimizer, ends bit-identical to the uninterrupted run."""
    rotation = {"rep_size": 6} if gs.methods.get(name).rotation else {}

    def run(stop_after=None):
        model, x, ys = make(3, seed=7)
        torch.manual_seed(3)
        opt = gs.MultiTaskOptimizer(torch.optim.Adam(model.parameters(), lr=1e-2), name, num_tasks=3, **rotation)
        for t in range(4):
            if t == stop_after:
                buf = io.BytesIO()
                torch.save({"opt": opt.state_dict(), "model": model.state_dict()}, buf)
                buf.seek(0)
                saved = torch.load(buf, weights_only=True)
                model, _, _ = make(3, seed=99)
                torch.manual_seed(123)
                opt = gs.MultiTaskOptimizer(torch.optim.Adam(model.parameters(), lr=1e-2), name, num_tasks=3,
                                            **rotation)
                model.load_state_dict(saved["model"])
                opt.load_state_dict(saved["opt"])
            wrapped_step(model, opt, x, ys * (1 + 0.1 * t))
            with torch.no_grad():
                opt.observe(model.losses(opt.fork(model.rep(x)), ys * (1 + 0.1 * t)))
            if t % 2:
                opt.end_epoch()
        return [p.detach() for p in model.parameters()]

    for a, b in zip(run(), run(stop_after=3)):
        assert torch.equal(a, b)
