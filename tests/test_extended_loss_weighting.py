"""Loss-weighting methods (UW, DWA, RLW, FAMO, DB-MTL) against their papers' equations
written out here, ``opt.observe``, and resuming every stateful new method from a
``state_dict`` saved with ``torch.save`` and loaded with ``weights_only=True``."""
import io

import pytest
import torch

import gradsurgery as gs
from core_helpers import assert_same, make, snapshot, wrapped_step

D = torch.float64
NEW = ["cagrad", "imtl_g", "nash_mtl", "aligned_mtl", "upgrad", "dualproj", "graddrop", "gradvac", "uw", "dwa",
       "rlw", "famo", "db_mtl"]


def plain_grads(model, x, ys, weights):
    """Gradients of ``sum_k w_k L_k`` on every model parameter (plain autograd)."""
    model.zero_grad()
    losses = model.losses([model.rep(x)] * len(model.heads), ys)
    sum(w * l for w, l in zip(weights, losses)).backward()
    return [p.grad.clone() for p in model.parameters()]


def model_grads(model):
    return [p.grad.clone() for p in model.parameters()]


def assert_all_close(a, b, **kw):
    assert len(a) == len(b)
    for p, q in zip(a, b):
        assert torch.allclose(p, q, **{"atol": 1e-12, "rtol": 1e-10, **kw})


def test_registered_and_buildable_with_defaults():
    assert set(NEW) <= set(gs.methods.available())
    for name in NEW:
        model, x, ys = make(2)
        opt = gs.MultiTaskOptimizer(torch.optim.SGD(model.parameters(), lr=0.01), name, num_tasks=2, method_lr=0.1)
        wrapped_step(model, opt, x, ys)
        assert all(torch.isfinite(p).all() for p in model.parameters())
        assert gs.methods.get(name).__doc__ and gs.methods.get(name).__module__.startswith("gradsurgery.methods.")


def test_uncertainty_weighting_equals_kendall_loss():
    model, x, ys = make(3, seed=1)
    opt = gs.MultiTaskOptimizer(torch.optim.SGD(model.parameters(), lr=0.1), "uw", num_tasks=3, init=0.3)
    s = opt.method.log_vars
    assert any(s is p for p in opt.param_groups[1]["params"])  # trained by the wrapped optimizer
    wrapped_step(model, opt, x, ys, step=False)
    got, got_s = model_grads(model), s.grad.clone()
    log_vars = torch.full((3,), 0.3, dtype=D, requires_grad=True)
    model.zero_grad()
    losses = model.losses([model.rep(x)] * 3, ys)
    total = sum(0.5 * torch.exp(-log_vars[k]) * losses[k] + 0.5 * log_vars[k] for k in range(3))
    total.backward()
    assert_all_close(got, model_grads(model))
    assert torch.allclose(got_s, log_vars.grad)


def test_dwa_weights_follow_loss_ratios():
    model, x, _ = make(3, seed=2)
    gen = torch.Generator().manual_seed(0)
    batches = [3 * torch.randn(3, 4, generator=gen, dtype=D) for _ in range(3)]
    opt = gs.MultiTaskOptimizer(torch.optim.SGD(model.parameters(), lr=0.1), "dwa", num_tasks=3, temperature=1.5)
    history = []
    for t, ys in enumerate(batches):
        if t < 2:
            weights = torch.ones(3, dtype=D)
        else:
            r = history[-1] / history[-2]
            weights = 3 * torch.exp(r / 1.5) / torch.exp(r / 1.5).sum()
        expected = plain_grads(model, x, ys, weights)
        losses = wrapped_step(model, opt, x, ys, step=False)
        assert_all_close(model_grads(model), expected)
        history.append(torch.stack([l.detach() for l in losses]))


def test_rlw_draws_softmax_normal_from_the_generator_and_only_when_accepted():
    model, x, ys = make(3, seed=3)
    opt = gs.MultiTaskOptimizer(torch.optim.SGD(model.parameters(), lr=0.1), "rlw", num_tasks=3)
    gen = torch.Generator()
    gen.set_state(opt.generator.get_state())
    # a rejected step (non-finite loss) draws nothing
    opt.zero_grad()
    views = opt.fork(model.rep(x))
    losses = model.losses(views, ys)
    before = snapshot(model, opt)
    with pytest.raises(ValueError, match="non-finite"):
        opt.backward([losses[0] * float("nan"), losses[1], losses[2]])
    assert_same(before, snapshot(model, opt))
    for _ in range(2):
        weights = torch.softmax(torch.randn(3, generator=gen, dtype=D), 0)
        expected = plain_grads(model, x, ys, weights)
        wrapped_step(model, opt, x, ys, step=False)
        assert_all_close(model_grads(model), expected)


class FamoReference:
    """FAMO's Algorithm 1, written from the paper: softmax logits, weights
    ``z_k / (c (L_k - l_k))``, logits' gradient ``J_softmax^T delta`` with
    ``delta = log L_prev - log L_new``, one Adam step with weight decay."""

    def __init__(self, k, w_lr, gamma):
        self.xi = torch.zeros(k, dtype=D, requires_grad=True)
        self.opt = torch.optim.Adam([self.xi], lr=w_lr, weight_decay=gamma)

    def weights(self, losses):
        z = torch.softmax(self.xi.detach(), 0)
        d = losses + 1e-8
        return z / d / (z / d).sum()

    def update(self, prev, new):
        delta = (prev + 1e-8).log() - (new + 1e-8).log()
        with torch.enable_grad():
            (grad,) = torch.autograd.grad(torch.softmax(self.xi, 0), self.xi, grad_outputs=delta)
        self.xi.grad = grad
        self.opt.step()


def test_famo_equals_paper_algorithm_with_observe():
    model, x, ys = make(3, seed=4)
    ref_model, _, _ = make(3, seed=4)
    opt = gs.MultiTaskOptimizer(torch.optim.SGD(model.parameters(), lr=0.05), "famo", num_tasks=3, w_lr=0.1)
    ref = FamoReference(3, w_lr=0.1, gamma=0.01)
    ref_opt = torch.optim.SGD(ref_model.parameters(), lr=0.05)
    for _ in range(3):
        prev = torch.stack([l.detach() for l in ref_model.losses([ref_model.rep(x)] * 3, ys)])
        weights = ref.weights(prev)
        plain_grads(ref_model, x, ys, weights)
        ref_opt.step()
        wrapped_step(model, opt, x, ys)
        with torch.no_grad():
            new = ref_model.losses([ref_model.rep(x)] * 3, ys)
            ref.update(prev, torch.stack(new))
            opt.observe(model.losses(opt.fork(model.rep(x)), ys))
        for p, q in zip(model.parameters(), ref_model.parameters()):
            assert torch.allclose(p, q, atol=1e-12, rtol=1e-10)
        assert torch.allclose(opt.method.logits.detach(), ref.xi.detach(), atol=1e-12)
    with pytest.raises(RuntimeError, match="after a step"):
        opt.observe([1.0, 1.0, 1.0])


def test_observe_validates_and_is_ignored_by_other_methods():
    model, x, ys = make(2)
    opt = gs.MultiTaskOptimizer(torch.optim.SGD(model.parameters(), lr=0.1), "mgda", num_tasks=2)
    with pytest.raises(ValueError, match="2 scalar losses"):
        opt.observe([1.0])
    before = snapshot(model, opt)
    opt.observe([torch.tensor(1.0), 2.0])
    assert_same(before, snapshot(model, opt))


def test_db_mtl_balances_log_loss_gradient_norms():
    model, x, ys = make(3, seed=6)
    opt = gs.MultiTaskOptimizer(torch.optim.SGD(model.parameters(), lr=0.1), "db_mtl", num_tasks=3)
    wrapped_step(model, opt, x, ys, step=False)
    got = model_grads(model)
    z = model.rep(x).detach()
    rep_grads = []
    for k in range(3):
        zk = z.clone().requires_grad_()
        loss = model.losses([zk] * 3, ys)[k]
        rep_grads.append(torch.autograd.grad(loss.log(), zk)[0].flatten())
    g = torch.stack(rep_grads)
    n = g.norm(dim=1)
    direction = (n.max() / n) @ g
    model.zero_grad()
    zz = model.rep(x)
    zz.backward(direction.view_as(zz))
    backbone = [p.grad.clone() for p in model.backbone.parameters()]
    model.zero_grad()
    sum(l.log() for l in model.losses([model.rep(x).detach()] * 3, ys)).backward()
    heads = [p.grad.clone() for p in model.heads.parameters()]
    assert_all_close(got, backbone + heads, atol=1e-10, rtol=1e-8)


@pytest.mark.parametrize("name", ["gradvac", "nash_mtl", "famo", "dwa", "rlw", "uw", "graddrop"])
def test_resume_from_state_dict_continues_bit_for_bit(name):
    def run(stop_after=None):
        model, x, ys = make(3, seed=7)
        torch.manual_seed(3)
        opt = gs.MultiTaskOptimizer(torch.optim.Adam(model.parameters(), lr=1e-2), name, num_tasks=3)
        for t in range(4):
            if t == stop_after:
                buf = io.BytesIO()
                torch.save({"opt": opt.state_dict(), "model": model.state_dict()}, buf)
                buf.seek(0)
                saved = torch.load(buf, weights_only=True)
                model, _, _ = make(3, seed=99)
                torch.manual_seed(123)
                opt = gs.MultiTaskOptimizer(torch.optim.Adam(model.parameters(), lr=1e-2), name, num_tasks=3)
                model.load_state_dict(saved["model"])
                opt.load_state_dict(saved["opt"])
            wrapped_step(model, opt, x, ys * (1 + 0.1 * t))
            with torch.no_grad():
                opt.observe(model.losses(opt.fork(model.rep(x)), ys * (1 + 0.1 * t)))
        return [p.detach() for p in model.parameters()]

    for a, b in zip(run(), run(stop_after=2)):
        assert torch.equal(a, b)
