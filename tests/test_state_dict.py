"""Checkpoints: for every registered method (built-ins, later additions and user methods
alike, built with their defaults), a run resumed from ``state_dict`` continues bit for bit,
through ``torch.save`` / ``torch.load(weights_only=True)``."""
import io

import pytest
import torch
from core_helpers import assert_tree_equal, make, wrapped_step

import gradsurgery as gs

K, REP = 3, 6


def _build(name, seed):
    model, x, ys = make(K, seed=0, rep_shape=(REP,), batch=5)
    torch.manual_seed(seed)  # the optimizer seeds the method's generator from the global one
    opt = gs.MultiTaskOptimizer(torch.optim.Adam(model.parameters(), lr=1e-2), name, num_tasks=K,
                                rep_size=REP, method_lr=1e-2)
    return model, opt, x, ys


def _batches(n):
    gen = torch.Generator().manual_seed(123)
    return [(torch.randn(5, 5, generator=gen).double(), 3 * torch.randn(K, 5, generator=gen).double())
            for _ in range(n)]


def _train(model, opt, batches):
    for x, ys in batches:
        wrapped_step(model, opt, x, ys)


@pytest.mark.parametrize("name", gs.methods.available())
def test_resume_is_bit_exact(name):
    batches = _batches(6)
    model, opt, _, _ = _build(name, seed=1)
    _train(model, opt, batches[:3])
    buf = io.BytesIO()
    torch.save({"model": model.state_dict(), "opt": opt.state_dict()}, buf)
    _train(model, opt, batches[3:])

    resumed, opt2, _, _ = _build(name, seed=2)  # different seed: everything must come from the file
    buf.seek(0)
    saved = torch.load(buf, weights_only=True)
    resumed.load_state_dict(saved["model"])
    opt2.load_state_dict(saved["opt"])
    assert_tree_equal(opt2.state_dict(), _roundtrip(saved["opt"]))
    _train(resumed, opt2, batches[3:])

    for p, q in zip(model.parameters(), resumed.parameters()):
        assert torch.equal(p, q), name
    assert_tree_equal(opt.state_dict(), opt2.state_dict())


def _roundtrip(state):
    buf = io.BytesIO()
    torch.save(state, buf)
    buf.seek(0)
    return torch.load(buf, weights_only=True)


def test_pcgrad_orders_resume():
    """PCGrad's random orders continue: the generator state is in the checkpoint, and a
    fresh optimizer differs without it (so the check above can fail)."""
    batches = _batches(4)
    model, opt, _, _ = _build("pcgrad", seed=1)
    _train(model, opt, batches[:2])
    state = _roundtrip(opt.state_dict())
    _train(model, opt, batches[2:])
    fresh, opt2, _, _ = _build("pcgrad", seed=2)
    fresh.load_state_dict(model.state_dict())
    assert not torch.equal(opt2.generator.get_state(), state["generator"])
    opt2.load_state_dict(state)
    assert torch.equal(opt2.generator.get_state(), state["generator"])


def test_wrong_num_tasks_checkpoint_raises():
    _, opt, _, _ = _build("mean", seed=0)
    model, x, ys = make(2, seed=0)
    other = gs.MultiTaskOptimizer(torch.optim.SGD(model.parameters(), lr=0.1), "mean", num_tasks=2)
    with pytest.raises(ValueError, match="num_tasks"):
        other.load_state_dict(opt.state_dict())
