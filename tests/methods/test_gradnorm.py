"""GradNorm (Chen et al., 2018): weights positive and summing to K, moving the right way
on imbalanced tasks, the weight gradient equal to autograd of the paper's loss, and several
steps equal to the paper's Algorithm 1 re-derived, with the norms at the last shared layer
(``level="params", shared_params=[W]``) or at the representation."""
import copy

import pytest
import torch
from core_helpers import backbone_grads_for, make, task_grads, wrapped_step
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

import gradsurgery as gs

D = torch.float64


@settings(max_examples=6, deadline=None)
@given(k=st.integers(1, 5), alpha=st.floats(0, 3), lr=st.sampled_from([1e-3, 0.1, 1.0]),
       seed=st.integers(0, 2**16), optimizer=st.sampled_from(["sgd", "adam"]))
def test_weights_positive_and_sum_to_k(k, alpha, lr, seed, optimizer):
    model, x, ys = make(k, seed=seed)
    cls = {"sgd": torch.optim.SGD, "adam": torch.optim.Adam}[optimizer]
    opt = gs.MultiTaskOptimizer(cls(model.parameters(), lr=1e-2), "gradnorm", num_tasks=k, alpha=alpha,
                                method_lr=lr)
    w = opt.method.task_weights
    for _ in range(6):
        wrapped_step(model, opt, x, ys)
        assert (w > 0).all()
        torch.testing.assert_close(w.sum(), torch.tensor(float(k), dtype=w.dtype), rtol=1e-12, atol=1e-12)


def test_weights_move_against_the_gradient_imbalance():
    """Task 1's loss is task 0's times 10, so its representation gradient is 10x larger
    (same head, same data: the same training rate). GradNorm equalises w_k ||g_k||, so
    w_0 must grow and w_1 shrink; within 50 steps w_1 / w_0 approaches 1/10."""
    torch.manual_seed(0)
    backbone = nn.Linear(4, 8)
    head = nn.Linear(8, 1)
    heads = nn.ModuleList([head, copy.deepcopy(head)])
    base = torch.optim.SGD([*backbone.parameters(), *heads.parameters()], lr=1e-3)
    opt = gs.MultiTaskOptimizer(base, "gradnorm", num_tasks=2, alpha=1.5, method_lr=0.05)
    x, y = torch.randn(32, 4), torch.randn(32, 1)
    ratios = []
    for _ in range(50):
        opt.zero_grad()
        z0, z1 = opt.fork(backbone(x))
        losses = [nn.functional.mse_loss(heads[0](z0), y), 10 * nn.functional.mse_loss(heads[1](z1), y)]
        opt.backward(losses)
        opt.step()
        norms = opt.stats["grad_norms"]
        ratios.append(float(norms[1] / norms[0]))
        w = opt.method.task_weights.detach()
    assert abs(ratios[0] - 10) < 1.0  # the setting is what it claims
    assert w[0] > 1.5 and w[1] < 0.5, w
    assert w[1] / w[0] < 0.2, w


@settings(max_examples=15, deadline=None)
@given(k=st.integers(2, 5), alpha=st.floats(0, 3), seed=st.integers(0, 2**16))
def test_weight_gradient_is_autograd_of_gradnorm_loss(k, alpha, seed):
    """After two steps (so the weights and loss ratios differ from 1), the gradient the
    method writes to its weights equals autograd of
    L_grad = sum_k | ||w_k g_k|| - mean_j ||w_j g_j|| * r_k^alpha |
    with the target detached, r_k = (L_k / L_k(0)) / mean_j (L_j / L_j(0)); and the
    backbone receives sum_k w_k g_k."""
    model, x, ys = make(k, seed=seed, rep_shape=(2, 3))
    opt = gs.MultiTaskOptimizer(torch.optim.SGD(model.parameters(), lr=0.05), "gradnorm", num_tasks=k,
                                alpha=alpha, method_lr=0.3)
    initial = torch.stack(wrapped_step(model, opt, x, ys)).detach()
    wrapped_step(model, opt, x, ys)
    w_now = opt.method.task_weights.detach().clone()
    reference = copy.deepcopy(model)
    grads = task_grads(reference, x, ys)
    opt.zero_grad()
    losses = torch.stack(wrapped_step(model, opt, x, ys, step=False)).detach()

    w = w_now.clone().requires_grad_()
    gw = torch.stack([(w[i] * grads[i]).norm() for i in range(k)])
    rate = losses / initial
    target = (gw.mean() * (rate / rate.mean()) ** alpha).detach()
    expected = torch.autograd.grad((gw - target).abs().sum(), w)[0]
    torch.testing.assert_close(opt.method.task_weights.grad, expected, rtol=1e-9, atol=1e-12)
    torch.testing.assert_close(opt.stats["weights"], w_now)
    for p, e in zip(model.backbone.parameters(), backbone_grads_for(reference, x, w_now @ grads)):
        torch.testing.assert_close(p.grad, e, rtol=1e-9, atol=1e-12)


def test_initial_losses_taken_at_first_step_and_zero_loss_stays_finite():
    model, x, ys = make(2, seed=0)
    opt = gs.MultiTaskOptimizer(torch.optim.SGD(model.parameters(), lr=0.1), "gradnorm", num_tasks=2)
    assert opt.method.initial_losses is None
    first = torch.stack(wrapped_step(model, opt, x, ys)).detach()
    torch.testing.assert_close(opt.method.initial_losses, first)
    wrapped_step(model, opt, x, ys)
    torch.testing.assert_close(opt.method.initial_losses, first)
    opt.method.initial_losses = torch.zeros(2, dtype=torch.float64)
    wrapped_step(model, opt, x, ys)
    assert torch.isfinite(opt.method.task_weights).all()


def test_bad_alpha_raises():
    with pytest.raises(ValueError, match="alpha"):
        gs.methods.create("gradnorm", alpha=-1.0)


def paper_gradnorm_run(model, x, batches, lr, method_lr, alpha=1.5, layer=None, weight_heads=False):
    """GradNorm, Algorithm 1 of Chen et al. (ICML 2018; no authors' code), re-derived:
    ``G_i = ||grad_W w_i L_i||`` at the last shared layer's weight ``W`` (``layer``; the
    whole representation ``z`` when ``None``), ``r_i = Ltilde_i / mean Ltilde``,
    ``Ltilde_i = L_i(t) / L_i(0)``, ``L_grad = sum_i |G_i - const(mean(G) r_i^alpha)|``
    differentiated w.r.t. ``w`` only; the shared parameters get ``grad sum_i w_i L_i``, each
    head its own unweighted loss gradient (gradsurgery's contract; ``weight_heads``: ``w_i``
    times it, the paper's ``sum_i w_i L_i``); then both steps and
    ``w`` renormalised to sum to ``K``."""
    k = len(model.heads)
    w = torch.ones(k, dtype=D, requires_grad=True)
    opt = torch.optim.SGD([{"params": model.parameters(), "lr": lr}, {"params": [w], "lr": method_lr}])
    initial = None
    for ys in batches:
        opt.zero_grad()
        z = model.rep(x)
        zd = z.detach().requires_grad_()
        losses = model.losses([zd] * k, ys)
        initial = torch.stack([l.detach() for l in losses]) if initial is None else initial
        if layer is None:
            rows = [torch.autograd.grad(l, zd, retain_graph=True)[0].flatten() for l in losses]
        else:
            rows = [torch.autograd.grad(l, layer, retain_graph=True)[0].flatten()
                    for l in model.losses([z] * k, ys)]
        norms = torch.stack(rows).norm(dim=1)
        g_w = w * norms
        ratio = torch.stack([l.detach() for l in losses]) / initial
        target = (g_w.mean() * (ratio / ratio.mean()) ** alpha).detach()
        (g_w - target).abs().sum().backward()
        scale = w.detach() if weight_heads else torch.ones(k, dtype=D)
        sum(c * l for c, l in zip(scale, losses)).backward()  # the heads' gradients
        zgrad = sum(w[i].detach() * r for i, r in enumerate(torch.stack(
            [torch.autograd.grad(l, zd, retain_graph=True)[0] for l in model.losses([zd] * k, ys)])))
        z.backward(zgrad)
        opt.step()
        with torch.no_grad():
            w.mul_(k / w.sum())
    return w.detach()


@pytest.mark.parametrize("k", range(2, 7))
def test_first_step_weights_use_the_norms_at_the_last_shared_layer(k):
    """``level="params", shared_params=[W]``: the weights' step uses the norms at ``W``."""
    model, x, _ = make(k, seed=k)
    ref_model, _, _ = make(k, seed=k)
    ys = torch.randn(k, 4, generator=torch.Generator().manual_seed(k), dtype=D)
    opt = gs.MultiTaskOptimizer(torch.optim.SGD(model.parameters(), lr=0.05), "gradnorm", num_tasks=k,
                                method_lr=0.02, level="params", shared_params=[model.backbone[2].weight])
    wrapped_step(model, opt, x, ys)
    w = paper_gradnorm_run(ref_model, x, [ys], 0.05, 0.02, layer=ref_model.backbone[2].weight)
    torch.testing.assert_close(opt.method.task_weights.detach(), w, rtol=1e-9, atol=1e-12)


@pytest.mark.parametrize("k", [3])
def test_equals_paper_with_norms_at_the_last_shared_layer(k):
    """``level="params", shared_params=[W]``: the norms at ``W``, the whole backbone trained
    with ``sum_i w_i grad L_i``."""
    model, x, _ = make(k, seed=k)
    ref_model, _, _ = make(k, seed=k)
    gen = torch.Generator().manual_seed(k)
    batches = [(1 + s) * torch.randn(k, 4, generator=gen, dtype=D) for s in range(4)]
    opt = gs.MultiTaskOptimizer(torch.optim.SGD(model.parameters(), lr=0.05), "gradnorm", num_tasks=k,
                                method_lr=0.02, level="params", shared_params=[model.backbone[2].weight])
    for ys in batches:
        wrapped_step(model, opt, x, ys)
    w = paper_gradnorm_run(ref_model, x, batches, 0.05, 0.02, layer=ref_model.backbone[2].weight)
    torch.testing.assert_close(opt.method.task_weights.detach(), w, rtol=1e-9, atol=1e-12)
    for p, q in zip(model.parameters(), ref_model.parameters()):
        torch.testing.assert_close(p, q, rtol=1e-9, atol=1e-12)


@pytest.mark.parametrize("weight_heads", [False, True])
def test_equals_paper_with_norms_at_the_representation(weight_heads):
    k = 3
    model, x, _ = make(k, seed=11)
    ref_model, _, _ = make(k, seed=11)
    gen = torch.Generator().manual_seed(11)
    batches = [(1 + s) * torch.randn(k, 4, generator=gen, dtype=D) for s in range(4)]
    opt = gs.MultiTaskOptimizer(torch.optim.SGD(model.parameters(), lr=0.05), "gradnorm", num_tasks=k,
                                method_lr=0.02, weight_heads=weight_heads)
    for ys in batches:
        wrapped_step(model, opt, x, ys)
    w = paper_gradnorm_run(ref_model, x, batches, 0.05, 0.02, weight_heads=weight_heads)
    torch.testing.assert_close(opt.method.task_weights.detach(), w, rtol=1e-9, atol=1e-12)
    for p, q in zip(model.parameters(), ref_model.parameters()):
        torch.testing.assert_close(p, q, rtol=1e-9, atol=1e-12)
