"""RLW against LibMTL's ``RLW.backward`` (median-research-group/LibMTL,
``LibMTL/weighting/RLW.py``; LibMTL's authors wrote RLW), re-derived: every step
``w = softmax(randn(K))`` weights the losses, heads and backbone alike; the draws come from
the method's generator (a twin generator with its state gives the reference's draws)."""
from __future__ import annotations

import pytest
import torch
from core_helpers import make, wrapped_step

import gradsurgery as gs

D = torch.float64


@pytest.mark.parametrize("k", range(2, 7))
def test_equals_libmtl_over_steps(k):
    model, x, _ = make(k, seed=k)
    ref_model, _, _ = make(k, seed=k)
    data = torch.Generator().manual_seed(k)
    batches = [3 * torch.randn(k, 4, generator=data, dtype=D) for _ in range(4)]
    opt = gs.MultiTaskOptimizer(torch.optim.SGD(model.parameters(), lr=0.05), "rlw", num_tasks=k)
    twin = torch.Generator()
    twin.set_state(opt.generator.get_state())
    ref_opt = torch.optim.SGD(ref_model.parameters(), lr=0.05)
    for ys in batches:
        wrapped_step(model, opt, x, ys)
        ref_opt.zero_grad()
        w = torch.softmax(torch.randn(k, generator=twin, dtype=D), -1)
        (torch.stack(ref_model.losses([ref_model.rep(x)] * k, ys)) * w).sum().backward()
        ref_opt.step()
    for p, q in zip(model.parameters(), ref_model.parameters()):
        torch.testing.assert_close(p, q, rtol=1e-10, atol=1e-12)


def test_a_rejected_step_draws_nothing():
    """After a rejected ``backward`` the generator is untouched and the next accepted step
    uses the first draw, as a run that never saw the bad batch."""
    model, x, ys = make(3, seed=3)
    ref_model, _, _ = make(3, seed=3)
    opt = gs.MultiTaskOptimizer(torch.optim.SGD(model.parameters(), lr=0.1), "rlw", num_tasks=3)
    state = opt.generator.get_state().clone()
    opt.zero_grad()
    losses = model.losses(opt.fork(model.rep(x)), ys)
    with pytest.raises(ValueError, match="non-finite"):
        opt.backward([losses[0] * float("nan"), losses[1], losses[2]])
    assert torch.equal(opt.generator.get_state(), state)
    twin = torch.Generator()
    twin.set_state(state)
    wrapped_step(model, opt, x, ys)
    ref_opt = torch.optim.SGD(ref_model.parameters(), lr=0.1)
    w = torch.softmax(torch.randn(3, generator=twin, dtype=D), -1)
    (torch.stack(ref_model.losses([ref_model.rep(x)] * 3, ys)) * w).sum().backward()
    ref_opt.step()
    for p, q in zip(model.parameters(), ref_model.parameters()):
        torch.testing.assert_close(p, q, rtol=1e-10, atol=1e-12)
