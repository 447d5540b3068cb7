"""GLS against the gradient of LibMTL's objective ``(prod_k L_k)^(1/K)`` by autograd,
its effect end to end (heads and backbone weighted), and its error on non-positive losses."""
import pytest
import torch
from core_helpers import backbone_grads_for, head_grads_plain, make, task_grads, wrapped_step
from gradient_cases import losses_for

import gradsurgery as gs


def libmtl_gls_weights(losses: torch.Tensor) -> torch.Tensor:
    """median-research-group/LibMTL, ``LibMTL/weighting/GLS.py``, ``GLS.backward``,
    re-derived: ``loss = pow(losses.prod(), 1 / K)``; ``loss.backward()``. The weight each
    task loss receives is ``d loss / d L_k``, taken here by autograd."""
    leaf = losses.detach().clone().requires_grad_()
    torch.pow(leaf.prod(), 1.0 / leaf.numel()).backward()
    return leaf.grad


def bound(k):
    method = gs.methods.create("gls")
    method.bind(k, device=torch.device("cpu"), dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    return method


@pytest.mark.parametrize("k,seed", [(k, s) for k in range(1, 7) for s in range(4)])
def test_equals_libmtl_gradient(k, seed):
    losses = losses_for(k, seed)
    assert torch.allclose(bound(k).loss_weights(losses), libmtl_gls_weights(losses), rtol=1e-12, atol=0)


def test_finite_where_the_product_would_overflow_or_underflow():
    """40 losses of 1e-9 (product 1e-360) or 1e9: the weights are still the exact
    (prod L)^(1/K) / (K L_k), from the log-space form."""
    for value in (1e-9, 1e9):
        losses = torch.full((40,), value, dtype=torch.float64)
        losses[0] = 2 * value
        w = bound(40).loss_weights(losses)
        geo = value * 2 ** (1 / 40)
        expected = geo / (40 * losses)
        assert torch.allclose(w, expected, rtol=1e-12, atol=0)


def test_scale_invariant_weights_times_loss():
    """w_k L_k = geometric mean / K: the same for every task."""
    losses = losses_for(5, 3)
    w = bound(5).loss_weights(losses)
    assert torch.allclose(w * losses, (w * losses).mean().expand(5), rtol=1e-12, atol=0)


def test_end_to_end_equals_plain_geometric_mean_backward():
    model, x, ys = make(3, seed=6)
    opt = gs.MultiTaskOptimizer(torch.optim.SGD(model.parameters(), lr=0.1), "gls", num_tasks=3)
    losses = wrapped_step(model, opt, x, ys, step=False)
    w = libmtl_gls_weights(torch.stack([l.detach() for l in losses]))
    expected = w @ task_grads(model, x, ys)
    for p, e in zip(model.backbone.parameters(), backbone_grads_for(model, x, expected)):
        assert torch.allclose(p.grad, e, rtol=1e-9, atol=1e-13)
    for p, e in zip(model.heads.parameters(), head_grads_plain(model, x, ys, w.tolist())):
        assert torch.allclose(p.grad, e, rtol=1e-9, atol=1e-13)


def test_absent_task_is_gls_on_the_others():
    model, x, ys = make(3, seed=2)
    opt = gs.MultiTaskOptimizer(torch.optim.SGD(model.parameters(), lr=0.1), "gls", num_tasks=3)
    opt.zero_grad()
    losses = model.losses(opt.fork(model.rep(x)), ys)
    present = torch.stack([losses[0].detach(), losses[2].detach()])
    losses[1] = None
    opt.backward(losses)
    expected = libmtl_gls_weights(present) @ task_grads(model, x, ys)[[0, 2]]
    for p, e in zip(model.backbone.parameters(), backbone_grads_for(model, x, expected)):
        assert torch.allclose(p.grad, e, rtol=1e-9, atol=1e-13)


def test_a_non_positive_loss_is_rejected_by_the_finite_check_and_nothing_changes():
    """GLS reads nothing itself: a zero loss gives that task a NaN weight, a negative one NaN
    everywhere, and the optimizer's one finiteness check rejects the step with an error that
    says GLS needs positive losses, before anything changes."""
    from core_helpers import assert_same, snapshot
    model, x, ys = make(3, seed=2)
    opt = gs.MultiTaskOptimizer(torch.optim.SGD(model.parameters(), lr=0.1), "gls", num_tasks=3)
    assert torch.isnan(opt.method.loss_weights(torch.tensor([1.0, 0.0, 2.0]))).tolist() == [False, True, False]
    assert torch.isnan(opt.method.loss_weights(torch.tensor([1.0, -1.0, 2.0]))).all()
    before = snapshot(model, opt)
    opt.zero_grad()
    losses = model.losses(opt.fork(model.rep(x)), ys)
    with pytest.raises(ValueError, match="positive losses"):
        opt.backward([losses[0], -losses[1], losses[2]])
    opt.zero_grad()
    assert_same(before, snapshot(model, opt))
