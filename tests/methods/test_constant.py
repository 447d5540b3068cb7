"""Constant loss weights against the linear scalarisation sum_k w_k L_k by plain autograd,
against torchjd 0.18's Constant on the same matrices, and end to end."""
import pytest
import torch
from core_helpers import backbone_grads_for, head_grads_plain, make, task_grads, wrapped_step
from gradient_cases import CASES, gradient_matrix, losses_for

import gradsurgery as gs


def bound(k, **opts):
    method = gs.methods.create("constant", **opts)
    method.bind(k, device=torch.device("cpu"), dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    return method


@pytest.mark.parametrize("k,kind,seed", CASES)
def test_equals_torchjd_constant(k, kind, seed):
    """torchjd 0.18 ``Constant(weights)``: ``weights^T J``; here ``g = sum_k w_k g_k`` with
    ``w = loss_weights(L)``, whatever the losses."""
    jd = pytest.importorskip("torchjd.aggregation")
    g = gradient_matrix(k, kind, seed)
    w = torch.randn(k, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)
    method = bound(k, task_weights=w.tolist())
    ours = method.loss_weights(losses_for(k, seed)) @ g
    assert torch.allclose(ours, jd.Constant(w)(g), rtol=0, atol=1e-14 * float(g.abs().max()))


def test_default_is_the_sum_and_weights_keep_the_losses_dtype():
    method = bound(3)
    assert torch.equal(method.loss_weights(torch.tensor([1.0, 2.0, 3.0])), torch.ones(3))
    assert bound(2, task_weights=torch.tensor([0.5, 2.0])).loss_weights(torch.ones(2, dtype=torch.float64)).dtype \
        == torch.float64


def test_bad_options_raise():
    for bad in ([[1.0, 2.0]], [1.0, float("inf")], "ab", [], 3.0):
        with pytest.raises(ValueError, match="task_weights"):
            gs.methods.create("constant", task_weights=bad)
    with pytest.raises(ValueError, match="3 tasks"):
        bound(3, task_weights=[1.0, 2.0])


def test_end_to_end_equals_plain_weighted_sum():
    """sum_k w_k L_k backpropagated plainly: the backbone gets sum_k w_k g_k, each head w_k dL_k."""
    w = [0.3, 2.0, -0.5]
    model, x, ys = make(3, seed=5)
    opt = gs.MultiTaskOptimizer(torch.optim.SGD(model.parameters(), lr=0.1), "constant", num_tasks=3, task_weights=w)
    wrapped_step(model, opt, x, ys, step=False)
    expected = torch.tensor(w, dtype=torch.float64) @ task_grads(model, x, ys)
    for p, e in zip(model.backbone.parameters(), backbone_grads_for(model, x, expected)):
        assert torch.allclose(p.grad, e, rtol=1e-10, atol=1e-13)
    for p, e in zip(model.heads.parameters(), head_grads_plain(model, x, ys, w)):
        assert torch.allclose(p.grad, e, rtol=1e-10, atol=1e-13)
