"""IMTL (IMTL-L + IMTL-G) against the authors' group's update (LibMTL ``IMTL.py``), over
several steps (the loss scales are learned), K = 2..6, and end to end through the optimizer.

Cases (``gradient_cases``): random rows and norms six orders apart (where the authors'
closed form exists); the degenerate rows are IMTL-G's (``test_imtl_g.py``)."""
import copy

import pytest
import torch
from core_helpers import make
from gradient_cases import gradient_matrix, losses_for

import gradsurgery as gs

D = torch.float64


def official_imtl_g(g: torch.Tensor) -> torch.Tensor:
    """LibMTL ``IMTL.backward``'s IMTL-G: ``u_k = g_k / ||g_k||``, ``D = g_1 - g_{2..K}``,
    ``U = u_1 - u_{2..K}``, ``a_{2..K} = g_1 U^T (D U^T)^{-1}``, ``a_1 = 1 - sum a_{2..K}``."""
    u = g / g.norm(dim=1, keepdim=True)
    d, uu = g[0] - g[1:], u[0] - u[1:]
    rest = g[0] @ uu.T @ torch.linalg.inv(d @ uu.T)
    return torch.cat([(1 - rest.sum()).reshape(1), rest])


def official_imtl_step(g: torch.Tensor, losses: torch.Tensor, s: torch.Tensor):
    """One step of LibMTL ``IMTL.backward`` (re-derived): ``L~_k = e^{s_k} L_k - s_k`` is
    backpropagated task by task, so the shared gradients are ``e^{s_k} g_k``, the heads get
    ``e^{s_k} dL_k`` and ``s`` gets ``e^{s_k} L_k - 1``; the shared update is
    ``sum_k a_k e^{s_k} g_k`` with ``a`` IMTL-G's of those gradients. Returns
    ``(update, head weights, grad of s)``."""
    scaled = torch.exp(s)[:, None] * g
    return official_imtl_g(scaled) @ scaled, torch.exp(s), torch.exp(s) * losses - 1


@pytest.mark.parametrize("k", range(2, 7))
@pytest.mark.parametrize("kind", ["random", "scaled"])
def test_several_steps_equal_the_authors(k, kind):
    """Four steps, ``s`` trained by SGD (lr 0.5) on both sides from the gradient each writes."""
    method = gs.methods.create("imtl")
    method.bind(k, device=torch.device("cpu"), dtype=D, generator=torch.Generator())
    sgd = torch.optim.SGD(method.parameters(), lr=0.5)
    s = torch.zeros(k, dtype=D)  # LibMTL's init_param
    for step in range(4):
        g = gradient_matrix(k, kind, seed=10 * k + step)
        losses = losses_for(k, seed=step)
        ref, head_weights, s_grad = official_imtl_step(g, losses, s)
        weights = method.loss_weights(losses)
        torch.testing.assert_close(weights, head_weights)
        weighted = weights[:, None] * g
        d = method.weights(weighted @ weighted.T, losses) @ weighted
        scale = float(weighted.norm(dim=1).max())
        torch.testing.assert_close(d, ref, atol=1e-8 * scale, rtol=0)
        torch.testing.assert_close(method.loss_scale.grad, s_grad)
        sgd.step()
        sgd.zero_grad()
        s = s - 0.5 * s_grad
        torch.testing.assert_close(method.loss_scale.detach(), s)


def test_end_to_end_equals_the_authors_loop():
    """Three SGD steps of the whole model: the authors' backward written with plain autograd
    (heads from ``sum_k e^{s_k} L_k``, the backbone from IMTL-G's combination of the scaled
    representation gradients, ``s`` from ``e^{s_k} L_k - 1`` at ``method_lr``) against the
    optimizer with ``"imtl"``."""
    k, lr, method_lr = 3, 0.05, 0.2
    model, x, ys = make(k, seed=3, rep_shape=(5,), batch=6)
    reference = copy.deepcopy(model)
    opt = gs.MultiTaskOptimizer(torch.optim.SGD(model.parameters(), lr=lr), "imtl", num_tasks=k, method_lr=method_lr)
    s = torch.zeros(k, dtype=D)
    for step in range(3):
        opt.zero_grad()
        opt.backward(model.losses(opt.fork(model.rep(x)), ys * (1 + 0.2 * step)))
        opt.step()

        z = reference.rep(x)
        zk = [z.detach().clone().requires_grad_() for _ in range(k)]
        losses = reference.losses(zk, ys * (1 + 0.2 * step))
        g = torch.stack([torch.autograd.grad(l, v, retain_graph=True)[0].flatten() for l, v in zip(losses, zk)])
        values = torch.stack([l.detach() for l in losses])
        update, head_weights, s_grad = official_imtl_step(g, values, s)
        reference.zero_grad()
        sum(w * l for w, l in zip(head_weights, losses)).backward()
        z.backward(update.view_as(z))
        with torch.no_grad():
            for p in reference.parameters():
                p -= lr * p.grad
        s = s - method_lr * s_grad
    for p, q in zip(model.parameters(), reference.parameters()):
        torch.testing.assert_close(p, q, atol=1e-10, rtol=1e-8)
    torch.testing.assert_close(opt.method.loss_scale.detach(), s)


def test_registered_with_its_loss_scales_in_the_method_group():
    model, _, _ = make(2)
    opt = gs.MultiTaskOptimizer(torch.optim.SGD(model.parameters(), lr=0.1), "imtl", num_tasks=2, method_lr=0.01)
    group = [g for g in opt.param_groups if g.get("name") == "method"]
    assert len(group) == 1 and group[0]["lr"] == 0.01
    assert group[0]["params"][0] is opt.method.loss_scale
    assert "imtl" in gs.methods.available() and "imtl_g" in gs.methods.available()


def test_bad_options_raise():
    for bad in (float("nan"), float("inf"), "0", True):
        with pytest.raises(ValueError, match="init"):
            gs.methods.create("imtl", init=bad)
