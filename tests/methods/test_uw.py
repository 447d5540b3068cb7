"""Uncertainty weighting against LibMTL's ``UW.backward`` (median-research-group/LibMTL,
``LibMTL/weighting/UW.py``; the same loss and start as MTAN's ``uncert``, lorenmt/mtan
``im2im_pred/utils.py``), re-derived: ``sum_k L_k / (2 e^{s_k}) + s_k / 2`` with
``s = -0.5`` at the start, trained by the optimizer; several steps, K = 2..6."""
from __future__ import annotations

import pytest
import torch
from core_helpers import make, wrapped_step

import gradsurgery as gs

D = torch.float64


def libmtl_uw_run(model, x, batches, lr, method_lr, init=-0.5):
    """The reference loop: one SGD over the model (``lr``) and the log-variances
    (``method_lr``), the loss ``sum_k L_k / (2 exp(s_k)) + s_k / 2``."""
    k = len(model.heads)
    s = torch.full((k,), init, dtype=D, requires_grad=True)
    opt = torch.optim.SGD([{"params": model.parameters(), "lr": lr}, {"params": [s], "lr": method_lr}])
    for ys in batches:
        opt.zero_grad()
        losses = model.losses([model.rep(x)] * k, ys)
        sum(l / (2 * s[i].exp()) + s[i] / 2 for i, l in enumerate(losses)).backward()
        opt.step()
    return s.detach()


@pytest.mark.parametrize("k", range(2, 7))
def test_equals_libmtl_over_steps_with_default_start(k):
    model, x, _ = make(k, seed=k)
    ref_model, _, _ = make(k, seed=k)
    gen = torch.Generator().manual_seed(k)
    batches = [3 * torch.randn(k, 4, generator=gen, dtype=D) for _ in range(4)]
    batches[1][0] = 0.0  # a task whose targets are zero: tiny loss
    opt = gs.MultiTaskOptimizer(torch.optim.SGD(model.parameters(), lr=0.05), "uw", num_tasks=k, method_lr=0.1)
    for ys in batches:
        wrapped_step(model, opt, x, ys)
    s = libmtl_uw_run(ref_model, x, batches, 0.05, 0.1)
    torch.testing.assert_close(opt.method.log_vars.detach(), s, rtol=1e-10, atol=1e-12)
    for p, q in zip(model.parameters(), ref_model.parameters()):
        torch.testing.assert_close(p, q, rtol=1e-10, atol=1e-12)


def test_default_start_is_libmtl_and_weights_are_half_exp_minus_s():
    method = gs.methods.create("uw")
    method.bind(3, device=torch.device("cpu"), dtype=D, generator=torch.Generator())
    torch.testing.assert_close(method.log_vars.detach(), torch.full((3,), -0.5, dtype=D))
    w = method.loss_weights(torch.ones(3, dtype=D))
    torch.testing.assert_close(w, torch.full((3,), 0.5 * torch.e ** 0.5, dtype=D))


def test_init_option_and_bad_init():
    model, x, ys = make(2, seed=1)
    ref_model, _, _ = make(2, seed=1)
    opt = gs.MultiTaskOptimizer(torch.optim.SGD(model.parameters(), lr=0.05), "uw", num_tasks=2, init=0.3,
                                method_lr=0.2)
    for _ in range(2):
        wrapped_step(model, opt, x, ys)
    s = libmtl_uw_run(ref_model, x, [ys, ys], 0.05, 0.2, init=0.3)
    torch.testing.assert_close(opt.method.log_vars.detach(), s, rtol=1e-10, atol=1e-12)
    with pytest.raises(ValueError, match="init"):
        gs.methods.create("uw", init=float("nan"))
