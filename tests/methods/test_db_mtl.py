"""DB-MTL against the authors' code (median-research-group/LibMTL,
``LibMTL/weighting/DB_MTL.py``, ``DB_MTL.backward``, defaults ``DB_beta=0.9``,
``DB_beta_sigma=0`` from ``LibMTL/config.py``), re-derived, at the parameter level over
several steps for K = 2..6; and the representation level's documented meaning (the moving
average of the task gradients' norms, the current batch's directions)."""
from __future__ import annotations

import pytest
import torch
from core_helpers import make, wrapped_step

import gradsurgery as gs

D = torch.float64


def libmtl_db_mtl_run(model, x, batches, lr, beta=0.9, beta_sigma=0.0):
    """Per step ``t = 1, 2, ...``: ``g_k = d log(L_k + 1e-8) / d theta`` (shared parameters;
    each head gets its own log-loss gradient),
    ``buf = g + beta / t**beta_sigma * (buf - g)`` from ``buf = 0`` (no bias correction),
    ``alpha_k = max_j ||buf_j|| / (||buf_k|| + 1e-8)``, shared gradient ``sum_k alpha_k buf_k``."""
    k = len(model.heads)
    shared = list(model.backbone.parameters())
    opt = torch.optim.SGD(model.parameters(), lr=lr)
    buf = None
    for t, ys in enumerate(batches, start=1):
        opt.zero_grad()
        logs = [(l + 1e-8).log() for l in model.losses([model.rep(x)] * k, ys)]
        rows = []
        for log_loss in logs:
            grads = torch.autograd.grad(log_loss, shared, retain_graph=True)
            rows.append(torch.cat([g.flatten() for g in grads]))
        g = torch.stack(rows)
        buf = torch.zeros_like(g) if buf is None else buf
        buf = g + beta / t**beta_sigma * (buf - g)
        n = buf.norm(dim=1)
        combined = (n.max() / (n + 1e-8)) @ buf
        sum(logs).backward()  # heads: their own log-loss gradients (the backbone's are replaced)
        offset = 0
        for p in shared:
            p.grad = combined[offset:offset + p.numel()].view_as(p).clone()
            offset += p.numel()
        opt.step()


def batches_for(k, seed, steps=4):
    gen = torch.Generator().manual_seed(seed)
    out = [(1 + 0.5 * s) * torch.randn(k, 4, generator=gen, dtype=D) for s in range(steps)]
    out[1][k - 1] = out[1][0]  # a duplicate task in one batch
    return out


@pytest.mark.parametrize("k", range(2, 7))
def test_equals_libmtl_at_parameter_level_over_steps(k):
    model, x, _ = make(k, seed=k)
    ref_model, _, _ = make(k, seed=k)
    batches = batches_for(k, k)
    opt = gs.MultiTaskOptimizer(torch.optim.SGD(model.parameters(), lr=0.05), "db_mtl", num_tasks=k, level="params")
    for ys in batches:
        wrapped_step(model, opt, x, ys)
    libmtl_db_mtl_run(ref_model, x, batches, 0.05)
    for p, q in zip(model.parameters(), ref_model.parameters()):
        torch.testing.assert_close(p, q, rtol=1e-9, atol=1e-12)


@pytest.mark.parametrize("beta,beta_sigma", [(0.5, 0.5), (0.0, 0.0)])
def test_options_equal_libmtl(beta, beta_sigma):
    model, x, _ = make(3, seed=9)
    ref_model, _, _ = make(3, seed=9)
    batches = batches_for(3, 9)
    opt = gs.MultiTaskOptimizer(torch.optim.SGD(model.parameters(), lr=0.05), "db_mtl", num_tasks=3,
                                level="params", beta=beta, beta_sigma=beta_sigma)
    for ys in batches:
        wrapped_step(model, opt, x, ys)
    libmtl_db_mtl_run(ref_model, x, batches, 0.05, beta, beta_sigma)
    for p, q in zip(model.parameters(), ref_model.parameters()):
        torch.testing.assert_close(p, q, rtol=1e-9, atol=1e-12)


def test_representation_level_averages_the_norms():
    """At ``level="rep"``: ``m = ||g|| + beta / t**beta_sigma (m - ||g||)`` from ``m = 0``
    (the authors' recursion on the norms), ``g = sum_k max_j m_j / (m_k + 1e-8) g_k`` with the
    current log-loss gradients w.r.t. ``z``."""
    k = 3
    model, x, _ = make(k, seed=4)
    ref_model, _, _ = make(k, seed=4)
    batches = batches_for(k, 4)
    opt = gs.MultiTaskOptimizer(torch.optim.SGD(model.parameters(), lr=0.05), "db_mtl", num_tasks=k)
    ref_opt = torch.optim.SGD(ref_model.parameters(), lr=0.05)
    m = torch.zeros(k, dtype=D)
    for ys in batches:
        wrapped_step(model, opt, x, ys)
        ref_opt.zero_grad()
        z = ref_model.rep(x)
        zd = z.detach().requires_grad_()
        logs = [(l + 1e-8).log() for l in ref_model.losses([zd] * k, ys)]
        g = torch.stack([torch.autograd.grad(l, zd, retain_graph=True)[0].flatten() for l in logs])
        sum(logs).backward()
        n = g.norm(dim=1)
        m = n + 0.9 * (m - n)
        z.backward(((m.max() / (m + 1e-8)) @ g).view_as(z))
        ref_opt.step()
    for p, q in zip(model.parameters(), ref_model.parameters()):
        torch.testing.assert_close(p, q, rtol=1e-9, atol=1e-12)


def test_bad_options_raise():
    for bad in ({"beta": 1.5}, {"beta_sigma": -1.0}, {"eps": -1.0}):
        with pytest.raises(ValueError):
            gs.methods.create("db_mtl", **bad)


@pytest.mark.parametrize("level", ["params", "rep"])
def test_resume_continues_bit_for_bit(level):
    import io

    def run(stop_at=None):
        model, x, _ = make(3, seed=8)
        opt = gs.MultiTaskOptimizer(torch.optim.SGD(model.parameters(), lr=0.05), "db_mtl", num_tasks=3, level=level)
        for t, ys in enumerate(batches_for(3, 8, steps=5)):
            if t == stop_at:
                buf = io.BytesIO()
                torch.save(opt.state_dict(), buf)
                buf.seek(0)
                opt = gs.MultiTaskOptimizer(torch.optim.SGD(model.parameters(), lr=0.05), "db_mtl", num_tasks=3,
                                            level=level)
                opt.load_state_dict(torch.load(buf, weights_only=True))
            wrapped_step(model, opt, x, ys)
        return list(model.parameters())

    for a, b in zip(run(), run(stop_at=3)):
        assert torch.equal(a, b)
