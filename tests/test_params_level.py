"""``level="params"``: the methods decide from the task gradients w.r.t. the shared
parameters. Checked against an independent computation: per-task ``autograd.grad`` on the
backbone's parameters, the Gram, a fresh method's weights, the combination."""
import pytest
import torch
from core_helpers import assert_same, backbone_grads_for, head_grads_plain, make, snapshot, task_grads, wrapped_step

import gradsurgery as gs

D = torch.float64


def param_jacobian(model, x, ys, params):
    """``K x P``: every task's gradient w.r.t. ``params``, one task at a time (plain autograd)."""
    rows = []
    for k in range(len(model.heads)):
        z = model.rep(x)
        loss = model.losses([z] * len(model.heads), ys)[k]
        grads = torch.autograd.grad(loss, params, allow_unused=True)
        rows.append(torch.cat([(torch.zeros_like(p) if g is None else g).flatten() for p, g in zip(params, grads)]))
    return torch.stack(rows)


def reference_method(name, k, generator_state, **opts):
    method = gs.methods.create(name, **opts)
    gen = torch.Generator()
    gen.set_state(generator_state)
    method.bind(k, device=torch.device("cpu"), dtype=D, generator=gen)
    return method


def flat_grads(params):
    return torch.cat([p.grad.flatten() for p in params])


@pytest.mark.parametrize("name,k", [("upgrad", 3), ("mgda", 3), ("cagrad", 3), ("imtl_g", 3), ("nash_mtl", 3),
                                    ("aligned_mtl", 3), ("dualproj", 3), ("pcgrad", 3), ("gradvac", 3),
                                    ("graddrop", 3)])
def test_equals_independent_parameter_level_computation(name, k):
    model, x, ys = make(k, seed=1, batch=5)
    opt = gs.MultiTaskOptimizer(torch.optim.SGD(model.parameters(), lr=0.1), name, num_tasks=k, level="params")
    state = opt.generator.get_state()
    wrapped_step(model, opt, x, ys, step=False)
    backbone = list(model.backbone.parameters())
    values = torch.stack([l.detach() for l in model.losses([model.rep(x)] * k, ys)])
    scale = opt.method.loss_weights(values)
    scale = torch.ones(k, dtype=D) if scale is None else scale
    jac = param_jacobian(model, x, ys, backbone) * scale[:, None]
    ref = reference_method(name, k, state)
    if name == "graddrop":
        expected = ref.combine(jac, values, None)
    else:
        expected = ref.weights(jac @ jac.T, values) @ jac
    assert torch.allclose(flat_grads(backbone), expected, atol=1e-10, rtol=1e-8)
    for got, want in zip(model.heads.parameters(), head_grads_plain(model, x, ys, weights=list(scale))):
        assert torch.allclose(got.grad, want, atol=1e-12, rtol=1e-10)  # heads: their own (loss-weighted) gradients
    if name != "graddrop":
        assert torch.allclose(opt.stats["grad_norms"], (jac @ jac.T).diagonal().sqrt())


class Ones(gs.methods.GramWeighting):
    """A Gram-based method with unit coefficients: exercises the Jacobian path."""

    def weights(self, gram, losses):
        return torch.ones_like(losses)


@pytest.mark.parametrize("method", ["sum", Ones()])
def test_sum_at_parameter_level_equals_plain_backward(method):
    model, x, ys = make(3, seed=2)
    opt = gs.MultiTaskOptimizer(torch.optim.SGD(model.parameters(), lr=0.1), method, num_tasks=3, level="params")
    wrapped_step(model, opt, x, ys, step=False)
    got = [p.grad.clone() for p in model.parameters()]
    model.zero_grad()
    sum(model.losses([model.rep(x)] * 3, ys)).backward()
    for g, p in zip(got, model.parameters()):
        assert torch.allclose(g, p.grad, atol=1e-12, rtol=1e-10)


def test_loss_weighting_method_same_at_both_levels():
    grads = []
    for level in ("rep", "params"):
        model, x, ys = make(2, seed=3)
        opt = gs.MultiTaskOptimizer(torch.optim.SGD(model.parameters(), lr=0.1), "uw", num_tasks=2, level=level)
        wrapped_step(model, opt, x, ys, step=False)
        grads.append([p.grad.clone() for g in opt.param_groups for p in g["params"]])
    for a, b in zip(*grads):
        assert torch.allclose(a, b, atol=1e-12)


def test_explicit_shared_params_and_backbone_loss():
    model, x, ys = make(2, seed=4)
    last = list(model.backbone[2].parameters())
    opt = gs.MultiTaskOptimizer(torch.optim.SGD(model.parameters(), lr=0.1), "upgrad", num_tasks=2,
                                level="params", shared_params=last)
    state = opt.generator.get_state()
    reg = sum(p.square().sum() for p in model.backbone.parameters())
    wrapped_step(model, opt, x, ys, step=False, backbone_loss=reg)
    values = torch.stack([l.detach() for l in model.losses([model.rep(x)] * 2, ys)])
    jac = param_jacobian(model, x, ys, last)
    c = reference_method("upgrad", 2, state).weights(jac @ jac.T, values)
    expected = c @ jac + torch.cat([2 * p.detach().flatten() for p in last])
    assert torch.allclose(flat_grads(last), expected, atol=1e-10, rtol=1e-8)
    # the rest of the backbone is trained too, with the same combination pulled back through
    # z (c^T J = (c^T G) dz/dtheta), plus the backbone loss: never left without a gradient
    first = model.backbone[0]
    pulled = backbone_grads_for(model, x, c @ task_grads(model, x, ys))[0]
    assert torch.allclose(first.weight.grad, 2 * first.weight.detach() + pulled, atol=1e-10, rtol=1e-8)


def test_errors_before_any_state_change():
    model, x, ys = make(2)
    base = torch.optim.SGD(model.parameters(), lr=0.1)
    with pytest.raises(ValueError, match="level must be"):
        gs.MultiTaskOptimizer(base, "mgda", num_tasks=2, level="parameters")
    with pytest.raises(ValueError, match="shared_params only applies"):
        gs.MultiTaskOptimizer(base, "mgda", num_tasks=2, shared_params=list(model.backbone.parameters()))
    with pytest.raises(ValueError, match="level"):
        gs.MultiTaskOptimizer(base, "rotograd", num_tasks=2, rep_size=6, level="params")
    assert len(base.param_groups) == 1  # nothing was added by the rejected constructions
    heads_only = torch.optim.SGD(model.heads.parameters(), lr=0.1)
    opt = gs.MultiTaskOptimizer(heads_only, "mgda", num_tasks=2, level="params")
    before = snapshot(model, opt)
    with pytest.raises(ValueError, match="found no shared parameter"):
        opt.fork(model.rep(x))
    assert_same(before, snapshot(model, opt))


def test_parameter_level_training_is_reproducible_and_resumable():
    runs = []
    for _ in range(2):
        model, x, ys = make(3, seed=5)
        torch.manual_seed(11)
        opt = gs.MultiTaskOptimizer(torch.optim.Adam(model.parameters(), lr=1e-2), "pcgrad", num_tasks=3,
                                    level="params")
        for _ in range(3):
            wrapped_step(model, opt, x, ys)
        runs.append([p.detach().clone() for p in model.parameters()])
    for a, b in zip(*runs):
        assert torch.equal(a, b)
