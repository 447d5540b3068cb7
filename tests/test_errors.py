"""Bad input raises a clear error before anything changes: parameters, ``.grad``, the
optimizer's and the method's state, the generator, the pending fork. After a rejected
``backward``, ``zero_grad`` and an ordinary step equal the step of a run that never saw
the bad batch."""
import pytest
import torch
from core_helpers import assert_same, make, representative_methods, snapshot, wrapped_step

import gradsurgery as gs

#: the detailed checks run on one method of each kind; the no-trace check on every method
METHODS = representative_methods()
K = 3


def _ready(method, seed=0):
    """An optimizer that has taken two steps (so Adam, GradNorm and the generator have
    state) and holds gradients of a third backward, plus a model and a batch."""
    model, x, ys = make(K, seed=seed)
    torch.manual_seed(seed)
    rotation = {"rep_size": 6} if gs.methods.get(method).rotation else {}
    opt = gs.MultiTaskOptimizer(torch.optim.Adam(model.parameters(), lr=1e-2), method, num_tasks=K, method_lr=1e-2,
                                level=gs.methods.get(method).levels[0], **rotation)
    wrapped_step(model, opt, x, ys)
    wrapped_step(model, opt, x, ys)
    wrapped_step(model, opt, x, ys, step=False)  # .grad populated, no pending fork
    return model, opt, x, ys


def _nan_loss(losses):
    return [losses[0], losses[1] * float("nan"), losses[2]]


def _inf_loss(losses):
    return [losses[0], losses[1], losses[2] + float("inf")]


BAD_LOSSES = {
    "too few": (lambda ls: ls[:2], ValueError, "got 2 losses but num_tasks=3"),
    "too many": (lambda ls: ls + [ls[0]], ValueError, "got 4 losses"),
    "non-scalar": (lambda ls: [ls[0], torch.stack([ls[1], ls[1]]), ls[2]], ValueError, "task 1 must be a scalar"),
    "not a list": (lambda ls: torch.stack(ls), TypeError, "list of 3 scalar losses"),
    "detached": (lambda ls: [ls[0].detach(), ls[1], ls[2]], ValueError, "task 0 does not require grad"),
    "nan": (_nan_loss, ValueError, r"non-finite loss for task\(s\) \[1\]"),
    "inf": (_inf_loss, ValueError, r"non-finite loss for task\(s\) \[2\]"),
}


@pytest.mark.parametrize("method", METHODS)
@pytest.mark.parametrize("bad", BAD_LOSSES)
def test_bad_losses_leave_everything_unchanged(method, bad):
    model, opt, x, ys = _ready(method)
    views = opt.fork(model.rep(x))
    before = snapshot(model, opt)
    make_bad, error, message = BAD_LOSSES[bad]
    with pytest.raises(error, match=message):
        opt.backward(make_bad(model.losses(views, ys)))
    assert_same(before, snapshot(model, opt))


@pytest.mark.parametrize("method", METHODS)
def test_non_finite_backbone_loss_and_head_gradient(method):
    model, opt, x, ys = _ready(method)
    views = opt.fork(model.rep(x))
    before = snapshot(model, opt)
    reg = sum(p.square().sum() for p in model.backbone.parameters()) * float("inf")
    with pytest.raises(ValueError, match="backbone_loss is not finite"):
        opt.backward(model.losses(views, ys), backbone_loss=reg)
    assert_same(before, snapshot(model, opt))
    with pytest.raises(ValueError, match="backbone_loss must be a scalar"):
        opt.backward(model.losses(views, ys), backbone_loss=torch.ones(2, requires_grad=True))
    assert_same(before, snapshot(model, opt))
    # finite losses but an infinite task gradient (a hook on task 1's view blows it up)
    opt.zero_grad()
    views = opt.fork(model.rep(x))
    views[1].register_hook(lambda g: g * float("inf"))
    before = snapshot(model, opt)
    with pytest.raises(FloatingPointError, match=r"non-finite gradient in task\(s\) \[1\]"):
        opt.backward(model.losses(views, ys))
    assert_same(before, snapshot(model, opt))


@pytest.mark.parametrize("method", METHODS)
def test_call_order_errors(method):
    model, opt, x, ys = _ready(method)
    before = snapshot(model, opt)
    with pytest.raises(RuntimeError, match="without fork"):
        opt.backward(model.losses([model.rep(x)] * K, ys))
    assert_same(before, snapshot(model, opt))

    views = opt.fork(model.rep(x))
    before = snapshot(model, opt)
    with pytest.raises(RuntimeError, match="fork\\(\\) was called twice"):
        opt.fork(model.rep(x))
    assert_same(before, snapshot(model, opt))
    opt.backward(model.losses(views, ys))  # the first fork is still usable

    before = snapshot(model, opt)
    with pytest.raises(ValueError, match="does not require grad"):
        opt.fork(model.rep(x).detach())
    with pytest.raises(TypeError, match="floating-point"):
        opt.fork(torch.ones(3, 2, dtype=torch.long))
    assert_same(before, snapshot(model, opt))


@pytest.mark.parametrize("num_tasks", [0, -1, 1.5, True, "2"])
def test_bad_num_tasks(num_tasks):
    model, _, _ = make(2)
    base = torch.optim.SGD(model.parameters(), lr=0.1)
    groups = len(base.param_groups)
    with pytest.raises(ValueError, match="num_tasks must be an integer >= 1"):
        gs.MultiTaskOptimizer(base, "gradnorm", num_tasks=num_tasks)
    assert len(base.param_groups) == groups


def test_unknown_method_and_options():
    model, _, _ = make(2)
    base = torch.optim.SGD(model.parameters(), lr=0.1)
    with pytest.raises(ValueError, match="unknown method 'pcgard'.*available methods: .*mgda.*pcgrad"):
        gs.MultiTaskOptimizer(base, "pcgard", num_tasks=2)
    with pytest.raises(ValueError, match=r"does not take option\(s\) \['alpah'\].*alpha"):
        gs.MultiTaskOptimizer(base, "gradnorm", num_tasks=2, alpah=1.0)
    with pytest.raises(ValueError, match="no options"):
        gs.MultiTaskOptimizer(base, "pcgrad", num_tasks=2, alpha=1.0)
    with pytest.raises(ValueError, match="method_lr"):
        gs.MultiTaskOptimizer(base, "gradnorm", num_tasks=2, method_lr=-1.0)
    with pytest.raises(TypeError, match="torch.optim.Optimizer"):
        gs.MultiTaskOptimizer(model, "mean", num_tasks=2)
    assert len(base.param_groups) == 1  # nothing was added by the failed constructions


@pytest.mark.parametrize("method", gs.methods.available())
@pytest.mark.parametrize("bad", ["nan", "too few"])
def test_rejected_batch_leaves_no_trace(method, bad):
    """Run A sees a bad batch (rejected), then zero_grad and an ordinary step; run B
    never sees it. Parameters, optimizer and method state end bit-identical."""
    model_a, opt_a, x, ys = _ready(method)
    model_b, opt_b, _, _ = _ready(method)
    views = opt_a.fork(model_a.rep(x))
    make_bad, error, _ = BAD_LOSSES[bad]
    with pytest.raises(error):
        opt_a.backward(make_bad(model_a.losses(views, ys)))
    for model, opt in [(model_a, opt_a), (model_b, opt_b)]:
        opt.zero_grad()
        wrapped_step(model, opt, x, 0.5 * ys)
        wrapped_step(model, opt, x, ys)
    for p, q in zip(model_a.parameters(), model_b.parameters()):
        assert torch.equal(p, q)
    a, b = snapshot(model_a, opt_a), snapshot(model_b, opt_b)
    assert a["state"] == b["state"]


def test_snapshot_detects_changes():
    """The comparison used above is sensitive: a real step changes the snapshot."""
    model, opt, x, ys = _ready("pcgrad")
    before = snapshot(model, opt)
    views = opt.fork(model.rep(x))
    opt.backward(model.losses(views, ys))
    with pytest.raises(AssertionError):
        assert_same(before, snapshot(model, opt))
    after_backward = snapshot(model, opt)
    opt.step()
    with pytest.raises(AssertionError):
        assert_same(after_backward, snapshot(model, opt))
