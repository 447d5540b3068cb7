"""STCH against the official update (Xi-L/STCH, ``STCH_MTL/LibMTL/weighting/STCH.py``, the
same as LibMTL's ``STCH.py``) re-derived as a class run side by side over a schedule of
epochs (its loss weights taken by autograd of its objective), bit-exact resume in every
phase, and end to end through ``MultiTaskOptimizer.end_epoch``."""
import io

import pytest
import torch
from core_helpers import backbone_grads_for, head_grads_plain, make, task_grads, wrapped_step
from gradient_cases import losses_for

import gradsurgery as gs


class OfficialSTCH:
    """Xi-L/STCH, ``STCH_MTL/LibMTL/weighting/STCH.py``, ``STCH.backward``, re-derived (LibMTL
    sets ``epoch`` to the 0-based epoch index): epochs ``< warmup``: ``loss = sum log(L + 1e-20)``;
    epoch ``== warmup``: the same, and ``average_loss += L``, ``count += 1``; after:
    ``nadir = average_loss / count`` (once), ``l = log(L / nadir + 1e-20)``,
    ``loss = mu * log(sum exp((l - max l) / mu)) * K``. ``weights`` returns ``d loss / d L`` by
    autograd, which is what ``loss.backward()`` gives each task loss."""

    def __init__(self, mu=1.0, warmup_epoch=4):
        self.mu, self.warmup_epoch = mu, warmup_epoch
        self.epoch, self.nadir, self.average_loss, self.count = 0, None, 0.0, 0

    def weights(self, losses):
        leaf = losses.detach().clone().requires_grad_()
        if self.epoch <= self.warmup_epoch:
            loss = torch.log(leaf + 1e-20).sum()
            if self.epoch == self.warmup_epoch:
                self.average_loss = self.average_loss + losses.detach()
                self.count += 1
        else:
            if self.nadir is None:
                self.nadir = self.average_loss / self.count
            logs = torch.log(leaf / self.nadir + 1e-20)
            shifted = logs - logs.detach().max()
            loss = self.mu * torch.log(torch.exp(shifted / self.mu).sum()) * leaf.numel()
        loss.backward()
        return leaf.grad


def bound(k, **opts):
    method = gs.methods.create("stch", **opts)
    method.bind(k, device=torch.device("cpu"), dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    return method


def schedule(k, epochs, steps_per_epoch, seed=0):
    """Losses decreasing over the epochs with noise, one ``K`` vector per step."""
    gen = torch.Generator().manual_seed(seed)
    scale = torch.rand(k, generator=gen, dtype=torch.float64) * 10 + 0.1
    return [[scale * 0.8 ** (e + s / steps_per_epoch) * (1 + 0.2 * torch.rand(k, generator=gen, dtype=torch.float64))
             for s in range(steps_per_epoch)] for e in range(epochs)]


@pytest.mark.parametrize("k,mu,warmup", [(2, 1.0, 4), (3, 0.5, 0), (5, 2.0, 2), (6, 0.1, 1)])
def test_equals_official_over_epochs(k, mu, warmup):
    ref, ours = OfficialSTCH(mu, warmup), bound(k, mu=mu, warmup_epoch=warmup)
    for epoch in schedule(k, warmup + 4, 3, seed=k):
        for losses in epoch:
            expected = ref.weights(losses)
            got = ours.loss_weights(losses)
            ours.update(losses)
            assert torch.allclose(got, expected, rtol=1e-12, atol=0)
        ref.epoch += 1
        ours.end_epoch()
    assert ours.nadir is not None and torch.allclose(ours.nadir, ref.nadir, rtol=1e-15, atol=0)


def test_loss_weights_is_pure():
    method = bound(3, warmup_epoch=0)
    losses = losses_for(3, 0)
    before = method.state_dict()
    method.loss_weights(losses)
    assert method.state_dict()["count"] == before["count"] == 0


@pytest.mark.parametrize("split", [1, 3, 4, 6, 8, 11])
def test_resume_is_bit_exact_in_every_phase(split):
    """Save after ``split`` events (steps and epoch ends: in the warm-up, the nadir epoch,
    after it), restore through torch.save/torch.load(weights_only=True), continue: the same
    weights bit for bit as an uninterrupted run."""
    events = []
    for epoch in schedule(3, 5, 2, seed=1):
        events += [("step", losses) for losses in epoch] + [("end", None)]

    def run(method, items):
        out = []
        for kind, losses in items:
            if kind == "end":
                method.end_epoch()
            else:
                out.append(method.loss_weights(losses))
                method.update(losses)
        return out

    expected = run(bound(3, warmup_epoch=1), events)
    first = bound(3, warmup_epoch=1)
    done = run(first, events[:split])
    buf = io.BytesIO()
    torch.save(first.state_dict(), buf)
    buf.seek(0)
    resumed = bound(3, warmup_epoch=1)
    resumed.load_state_dict(torch.load(buf, weights_only=True))
    rest = run(resumed, events[split:])
    assert len(done) + len(rest) == len(expected)
    for a, b in zip(done + rest, expected):
        assert torch.equal(a, b)


def test_nadir_epoch_without_steps_and_bad_losses_raise():
    method = bound(2, warmup_epoch=0)
    with pytest.raises(RuntimeError, match="no step during epoch 0"):
        method.end_epoch()
    for bad in ([1.0, 0.0], [1.0, -2.0]):  # NaN weight: the optimizer's finite check rejects the step
        assert torch.isnan(method.loss_weights(torch.tensor(bad, dtype=torch.float64))[1])


def test_bad_options_raise():
    for opts in (dict(mu=0.0), dict(mu=-1.0), dict(mu=float("inf")), dict(warmup_epoch=-1),
                 dict(warmup_epoch=1.5), dict(warmup_epoch=True)):
        with pytest.raises(ValueError, match=next(iter(opts))):
            gs.methods.create("stch", **opts)


def test_end_to_end_through_end_epoch():
    """warmup_epoch=0: epoch 0 sets the nadir; in epoch 1 the step is the official STCH
    objective backpropagated plainly (heads and backbone weighted)."""
    model, x, ys = make(3, seed=9)
    ref = OfficialSTCH(mu=1.0, warmup_epoch=0)
    opt = gs.MultiTaskOptimizer(torch.optim.SGD(model.parameters(), lr=0.01), "stch", num_tasks=3, warmup_epoch=0)
    for _epoch in range(2):
        for _ in range(2):
            losses = wrapped_step(model, opt, x, ys, step=False)
            w = ref.weights(torch.stack([l.detach() for l in losses]))
            expected = w @ task_grads(model, x, ys)
            for p, e in zip(model.backbone.parameters(), backbone_grads_for(model, x, expected)):
                assert torch.allclose(p.grad, e, rtol=1e-9, atol=1e-13)
            for p, e in zip(model.heads.parameters(), head_grads_plain(model, x, ys, w.tolist())):
                assert torch.allclose(p.grad, e, rtol=1e-9, atol=1e-13)
            opt.step()
        opt.end_epoch()
        ref.epoch += 1


def test_a_non_positive_loss_is_rejected_by_the_finite_check_and_nothing_changes():
    """STCH reads nothing itself: a non-positive loss gets a NaN weight and the optimizer's
    one finiteness check rejects the step, saying STCH needs positive losses, before anything
    changes (the state's running sum included)."""
    from core_helpers import assert_same, snapshot
    model, x, ys = make(3, seed=2)
    opt = gs.MultiTaskOptimizer(torch.optim.SGD(model.parameters(), lr=0.1), "stch", num_tasks=3, warmup_epoch=0)
    weights = opt.method.loss_weights(torch.tensor([1.0, -1.0, 2.0], dtype=torch.float64))
    assert torch.isnan(weights[1]) and torch.isfinite(weights[[0, 2]]).all()
    before = snapshot(model, opt)
    opt.zero_grad()
    losses = model.losses(opt.fork(model.rep(x)), ys)
    with pytest.raises(ValueError, match="positive losses"):
        opt.backward([losses[0], -losses[1], losses[2]])
    opt.zero_grad()
    assert_same(before, snapshot(model, opt))
