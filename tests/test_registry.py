"""The method registry: ``available``, ``get``, ``create``, ``options``, ``register``, and a
user-defined method in five lines working end to end."""
import pytest
import torch
from core_helpers import backbone_grads_for, head_grads_plain, make, task_grads

import gradsurgery as gs
from gradsurgery.methods import registry


@pytest.fixture(autouse=True)
def scratch_registry(monkeypatch):
    """Methods registered by a test are gone after it (other tests loop over available())."""
    monkeypatch.setattr(registry, "_REGISTRY", dict(registry._REGISTRY))


def test_builtins_available_and_created():
    names = gs.methods.available()
    assert names == sorted(names)
    assert {"sum", "mean", "pcgrad", "mgda", "gradnorm", "rotograd"} <= set(names)
    assert "alpha" in gs.methods.options("gradnorm") and "normalization" in gs.methods.options("mgda")


@pytest.mark.parametrize("name", gs.methods.available())
def test_every_method_is_created_with_its_defaults_and_each_listed_option(name):
    """Every registered method builds with no option (rotation methods need only the
    size, given to the optimizer), is an instance of exactly one kind, and accepts each
    option ``options(name)`` lists, passed back with its default value."""
    import inspect

    cls = gs.methods.get(name)
    method = gs.methods.create(name)
    assert type(method) is cls and cls.name == name
    assert cls.__doc__ and cls.__module__ == f"gradsurgery.methods.{cls.__module__.rsplit('.', 1)[-1]}"
    assert sum(isinstance(method, kind) for kind in (gs.methods.GramWeighting, gs.methods.LossWeighting,
                                                     gs.methods.ElementWise)) == 1
    defaults = inspect.signature(cls.__init__).parameters
    for option in gs.methods.options(name):
        assert defaults[option].default is not inspect.Parameter.empty, f"{name}.{option} has no default"
        assert type(gs.methods.create(name, **{option: defaults[option].default})) is cls
    with pytest.raises(ValueError, match="does not take option"):
        gs.methods.create(name, no_such_option=1)


def test_instance_passes_through_and_rejects_options():
    method = gs.methods.create("mgda", normalization="l2")
    assert gs.methods.create(method) is method
    with pytest.raises(ValueError, match="method instance"):
        gs.methods.create(method, normalization="l2")


def test_unknown_name_lists_available():
    with pytest.raises(ValueError) as err:
        gs.methods.get("nope")
    for name in gs.methods.available():
        assert name in str(err.value)
    with pytest.raises(ValueError, match="available methods"):
        gs.methods.create(3)


def test_register_rejects_bad_use():
    with pytest.raises(TypeError, match="GramWeighting, LossWeighting or ElementWise"):
        gs.methods.register("not_a_method")(object)
    with pytest.raises(TypeError, match="GramWeighting, LossWeighting or ElementWise"):
        gs.methods.register("bare_method")(type("Bare", (gs.methods.Method,), {}))
    with pytest.raises(ValueError, match="non-empty string"):
        gs.methods.register("")
    with pytest.raises(ValueError, match="already registered"):
        @gs.methods.register("pcgrad")
        class Impostor(gs.methods.GramWeighting):
            pass


def test_user_method_end_to_end():
    """A user method in five lines: weights inversely proportional to the task gradients'
    norms (every task contributes a unit-norm gradient). It is listed, created by name,
    and the backbone receives sum_k g_k / ||g_k||."""
    @gs.methods.register("test_unit_norm")
    class UnitNorm(gs.methods.GramWeighting):
        def weights(self, gram, losses):
            return gram.diagonal().rsqrt()

    assert "test_unit_norm" in gs.methods.available()
    assert gs.methods.get("test_unit_norm") is UnitNorm
    model, x, ys = make(3, seed=4, rep_shape=(2, 2))
    opt = gs.MultiTaskOptimizer(torch.optim.SGD(model.parameters(), lr=0.1), "test_unit_norm", num_tasks=3,
                                method_lr=1e-3)  # accepted and ignored: no parameters
    assert len(opt.param_groups) == 1
    grads = task_grads(model, x, ys)
    opt.zero_grad()
    opt.backward(model.losses(opt.fork(model.rep(x)), ys))
    direction = (grads / grads.norm(dim=1, keepdim=True)).sum(0)
    for p, e in zip(model.backbone.parameters(), backbone_grads_for(model, x, direction)):
        torch.testing.assert_close(p.grad, e, rtol=1e-10, atol=1e-13)
    for p, e in zip(model.heads.parameters(), head_grads_plain(model, x, ys)):
        torch.testing.assert_close(p.grad, e, rtol=1e-12, atol=1e-14)
    before = [p.detach().clone() for p in model.parameters()]
    opt.step()
    assert all(not torch.equal(p, q) for p, q in zip(model.parameters(), before))
    # the same class re-registered under its name (e.g. a re-imported module) is fine
    gs.methods.register("test_unit_norm")(UnitNorm)


def test_method_without_weights_says_so():
    @gs.methods.register("test_incomplete")
    class Incomplete(gs.methods.GramWeighting):
        pass

    model, x, ys = make(2)
    opt = gs.MultiTaskOptimizer(torch.optim.SGD(model.parameters(), lr=0.1), "test_incomplete", num_tasks=2)
    with pytest.raises(NotImplementedError, match=r"must implement weights\(gram, losses\)"):
        opt.backward(model.losses(opt.fork(model.rep(x)), ys))
