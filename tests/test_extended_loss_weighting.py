"""The extended methods build with their defaults, ``opt.observe``, and resuming every
stateful new method from a ``state_dict`` saved with ``torch.save`` and loaded with
``weights_only=True``. (UW, DWA, RLW, FAMO and DB-MTL against their official code:
tests/methods/.)"""
import io

import pytest
import torch

import gradsurgery as gs
from core_helpers import assert_same, make, snapshot, wrapped_step

D = torch.float64
NEW = ["cagrad", "imtl_g", "nash_mtl", "aligned_mtl", "upgrad", "dualproj", "graddrop", "gradvac", "uw", "dwa",
       "rlw", "famo", "db_mtl"]


def test_registered_and_buildable_with_defaults():
    assert set(NEW) <= set(gs.methods.available())
    for name in NEW:
        model, x, ys = make(2)
        opt = gs.MultiTaskOptimizer(torch.optim.SGD(model.parameters(), lr=0.01), name, num_tasks=2, method_lr=0.1)
        wrapped_step(model, opt, x, ys)
        assert all(torch.isfinite(p).all() for p in model.parameters())
        assert gs.methods.get(name).__doc__ and gs.methods.get(name).__module__.startswith("gradsurgery.methods.")


def test_observe_validates_and_is_ignored_by_other_methods():
    model, x, ys = make(2)
    opt = gs.MultiTaskOptimizer(torch.optim.SGD(model.parameters(), lr=0.1), "mgda", num_tasks=2)
    with pytest.raises(ValueError, match="2 scalar losses"):
        opt.observe([1.0])
    before = snapshot(model, opt)
    opt.observe([torch.tensor(1.0), 2.0])
    assert_same(before, snapshot(model, opt))


@pytest.mark.parametrize("name", ["gradvac", "nash_mtl", "famo", "dwa", "rlw", "uw", "graddrop"])
def test_resume_from_state_dict_continues_bit_for_bit(name):
    def run(stop_after=None):
        model, x, ys = make(3, seed=7)
        torch.manual_seed(3)
        opt = gs.MultiTaskOptimizer(torch.optim.Adam(model.parameters(), lr=1e-2), name, num_tasks=3)
        for t in range(4):
            if t == stop_after:
                buf = io.BytesIO()
                torch.save({"opt": opt.state_dict(), "model": model.state_dict()}, buf)
                buf.seek(0)
                saved = torch.load(buf, weights_only=True)
                model, _, _ = make(3, seed=99)
                torch.manual_seed(123)
                opt = gs.MultiTaskOptimizer(torch.optim.Adam(model.parameters(), lr=1e-2), name, num_tasks=3)
                model.load_state_dict(saved["model"])
                opt.load_state_dict(saved["opt"])
            wrapped_step(model, opt, x, ys * (1 + 0.1 * t))
            with torch.no_grad():
                opt.observe(model.losses(opt.fork(model.rep(x)), ys * (1 + 0.1 * t)))
        return [p.detach() for p in model.parameters()]

    for a, b in zip(run(), run(stop_after=2)):
        assert torch.equal(a, b)
