"""DWA against the authors' code (lorenmt/mtan, ``im2im_pred/utils.py``,
``multi_task_trainer``; LibMTL ``DWA.py`` is ported from it), re-derived: the weights of
epoch ``e`` are ``K softmax(r / T)`` with ``r_k = Lbar_k(e-1) / Lbar_k(e-2)``, ``Lbar``
the epoch's mean of the per-batch training losses, and 1 in epochs 0 and 1 (``T = 2``);
heads and backbone are weighted alike. ``opt.end_epoch()`` marks the epochs."""
from __future__ import annotations

import pytest
import torch
from core_helpers import make, wrapped_step

import gradsurgery as gs

D = torch.float64
EPOCHS, BATCHES = 4, 3


def mtan_dwa_run(model, x, epochs, k, lr, temp=2.0):
    """The reference training loop over ``epochs`` (lists of batches of targets)."""
    opt = torch.optim.SGD(model.parameters(), lr=lr)
    avg = torch.zeros(len(epochs), k, dtype=D)
    for e, batches in enumerate(epochs):
        if e < 2:
            lam = torch.ones(k, dtype=D)
        else:
            w = avg[e - 1] / avg[e - 2]
            lam = k * torch.exp(w / temp) / torch.exp(w / temp).sum()
        for ys in batches:
            opt.zero_grad()
            losses = torch.stack(model.losses([model.rep(x)] * k, ys))
            (lam * losses).sum().backward()
            opt.step()
            avg[e] += losses.detach() / len(batches)


def data(k, seed):
    gen = torch.Generator().manual_seed(seed)
    return [[(1 + e) * torch.randn(k, 4, generator=gen, dtype=D) for _ in range(BATCHES)] for e in range(EPOCHS)]


@pytest.mark.parametrize("k", range(2, 7))
def test_equals_mtan_over_epochs(k):
    model, x, _ = make(k, seed=k)
    ref_model, _, _ = make(k, seed=k)
    epochs = data(k, k)
    opt = gs.MultiTaskOptimizer(torch.optim.SGD(model.parameters(), lr=0.02), "dwa", num_tasks=k)
    for batches in epochs:
        for ys in batches:
            wrapped_step(model, opt, x, ys)
        opt.end_epoch()
    mtan_dwa_run(ref_model, x, epochs, k, 0.02)
    for p, q in zip(model.parameters(), ref_model.parameters()):
        torch.testing.assert_close(p, q, rtol=1e-10, atol=1e-12)


def test_weights_constant_within_an_epoch_and_per_step_option():
    """Without ``end_epoch`` the weights stay 1 (epochs 0 and 1 of the authors'); with
    ``per_step=True`` the previous version's step-level ratios come back."""
    k = 3
    model, x, _ = make(k, seed=1)
    batches = data(k, 1)[0] + data(k, 2)[0]
    opt = gs.MultiTaskOptimizer(torch.optim.SGD(model.parameters(), lr=0.02), "dwa", num_tasks=k)
    for ys in batches:
        wrapped_step(model, opt, x, ys)
        assert torch.equal(opt.method.loss_weights(torch.ones(k, dtype=D)), torch.ones(k, dtype=D))
    model, x, _ = make(k, seed=1)
    opt = gs.MultiTaskOptimizer(torch.optim.SGD(model.parameters(), lr=0.02), "dwa", num_tasks=k, per_step=True)
    seen = []
    for t, ys in enumerate(batches):
        w = opt.method.loss_weights(torch.ones(k, dtype=D))
        if t >= 2:
            r = seen[-1] / seen[-2]
            torch.testing.assert_close(w, k * torch.softmax(r / 2.0, 0), rtol=1e-12, atol=0)
        seen.append(torch.stack([l.detach() for l in wrapped_step(model, opt, x, ys)]))


def test_resume_mid_epoch_continues_bit_for_bit():
    import io
    k = 3
    epochs = data(k, 5)

    def run(stop_at=None):
        model, x, _ = make(k, seed=5)
        opt = gs.MultiTaskOptimizer(torch.optim.SGD(model.parameters(), lr=0.02), "dwa", num_tasks=k)
        t = 0
        for batches in epochs:
            for ys in batches:
                if t == stop_at:
                    buf = io.BytesIO()
                    torch.save(opt.state_dict(), buf)
                    buf.seek(0)
                    opt = gs.MultiTaskOptimizer(torch.optim.SGD(model.parameters(), lr=0.02), "dwa", num_tasks=k)
                    opt.load_state_dict(torch.load(buf, weights_only=True))
                wrapped_step(model, opt, x, ys)
                t += 1
            opt.end_epoch()
        return list(model.parameters())

    for a, b in zip(run(), run(stop_at=7)):
        assert torch.equal(a, b)


def test_bad_temperature_raises():
    with pytest.raises(ValueError, match="temperature"):
        gs.methods.create("dwa", temperature=0.0)
