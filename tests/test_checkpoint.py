"""Checkpoints describe who wrote them (method name, options, ``num_tasks``, format version);
``load_state_dict`` checks all of it before restoring anything and names both methods when
they differ; ``method_state=False`` switches method on purpose; and ``torch.optim``'s
state-dict hooks fire on ``MultiTaskOptimizer`` as on any optimizer (issue #21 rows 9, 11)."""
import copy
import io

import pytest
import torch
from core_helpers import assert_tree_equal, make, wrapped_step

import gradsurgery as gs

K, REP = 3, 6


def _trained(method, steps=2, seed=0, **options):
    model, x, ys = make(K, seed=0, rep_shape=(REP,), batch=5)
    torch.manual_seed(seed)
    opt = gs.MultiTaskOptimizer(torch.optim.Adam(model.parameters(), lr=1e-2), method, num_tasks=K,
                                rep_size=REP, method_lr=1e-3, **options)
    for _ in range(steps):
        wrapped_step(model, opt, x, ys)
    return model, opt, x, ys


def _roundtrip(state):
    buf = io.BytesIO()
    torch.save(state, buf)
    buf.seek(0)
    return torch.load(buf, weights_only=True)


def _snapshot(opt):
    return copy.deepcopy({"opt": opt.optimizer.state_dict(), "method": opt.method.state_dict(),
                          "generator": opt.generator.get_state(),
                          "rotations": None if opt.rotations is None else opt.rotations.state_dict()})


def test_checkpoint_records_its_writer():
    _, opt, _, _ = _trained("nash_mtl", max_iter=12)
    state = _roundtrip(opt.state_dict())  # weights_only: plain data only
    assert state["format_version"] == gs.checkpoint.FORMAT_VERSION
    assert state["method_name"] == "nash_mtl"
    assert state["num_tasks"] == K
    assert state["method_options"]["max_iter"] == 12
    assert set(state["method_options"]) == set(gs.methods.options("nash_mtl"))


@pytest.mark.parametrize(("saved", "loaded"), [("mgda", "nash_mtl"), ("pcgrad", "mgda"), ("dwa", "rlw"),
                                               ("rotograd", "rotate_only"), ("uw", "gradnorm")])
def test_another_methods_checkpoint_is_refused_before_anything_changes(saved, loaded):
    _, source, _, _ = _trained(saved, seed=1)
    state = _roundtrip(source.state_dict())
    _, target, _, _ = _trained(loaded, seed=2)
    before = _snapshot(target)
    lr = [g["lr"] for g in target.param_groups]
    with pytest.raises(ValueError, match=f"'{saved}'.*'{loaded}'") as info:
        target.load_state_dict(state)
    assert "method_state=False" in str(info.value)
    assert_tree_equal(_snapshot(target), before)
    assert [g["lr"] for g in target.param_groups] == lr


def test_other_options_are_refused():
    _, source, _, _ = _trained("nash_mtl", max_iter=10)
    _, target, _, _ = _trained("nash_mtl", max_iter=20)
    before = _snapshot(target)
    with pytest.raises(ValueError, match="max_iter=10.*max_iter=20"):
        target.load_state_dict(_roundtrip(source.state_dict()))
    assert_tree_equal(_snapshot(target), before)


def test_a_checkpoint_without_record_is_checked_for_its_method_state():
    """0.1.0 checkpoints carry no method name: the method state's keys still tell dwa from rlw."""
    _, source, _, _ = _trained("dwa")
    state = _roundtrip(source.state_dict())
    for key in ("format_version", "method_name", "method_options"):
        del state[key]
    _, target, _, _ = _trained("rlw")
    before = _snapshot(target)
    with pytest.raises(ValueError, match="'rlw'"):
        target.load_state_dict(state)
    assert_tree_equal(_snapshot(target), before)


def test_wrong_method_state_shape_is_refused():
    _, source, _, _ = _trained("uw")
    state = _roundtrip(source.state_dict())
    state["method"]["log_vars"] = torch.zeros(K + 1, dtype=torch.float64)
    _, target, _, _ = _trained("uw")
    before = _snapshot(target)
    with pytest.raises(ValueError, match="log_vars"):
        target.load_state_dict(state)
    assert_tree_equal(_snapshot(target), before)


def test_wrapped_optimizer_groups_are_checked_first():
    _, source, _, _ = _trained("mgda")
    state = _roundtrip(source.state_dict())
    state["optimizer"]["param_groups"][0]["params"].pop()
    _, target, _, _ = _trained("mgda")
    before = _snapshot(target)
    with pytest.raises(ValueError, match="param groups"):
        target.load_state_dict(state)
    assert_tree_equal(_snapshot(target), before)


def test_rotations_shapes_are_checked_first():
    _, source, _, _ = _trained("rotograd")
    state = _roundtrip(source.state_dict())
    state["rotation"] = {k: v[:, :-1, :-1] if isinstance(v, torch.Tensor) and v.dim() == 3 else v
                         for k, v in state["rotation"].items()}
    _, target, _, _ = _trained("rotograd")
    before = _snapshot(target)
    with pytest.raises(ValueError, match="rotations"):
        target.load_state_dict(state)
    assert_tree_equal(_snapshot(target), before)


def test_a_newer_format_is_refused():
    _, opt, _, _ = _trained("mean")
    state = _roundtrip(opt.state_dict())
    state["format_version"] = gs.checkpoint.FORMAT_VERSION + 1
    with pytest.raises(ValueError, match="format version"):
        opt.load_state_dict(state)


@pytest.mark.parametrize(("saved", "loaded"), [("uw", "gradnorm"), ("mgda", "uw"), ("uw", "mgda")])
def test_switching_method_keeps_the_wrapped_optimizers_state_only(saved, loaded):
    model, source, x, ys = _trained(saved, steps=3, seed=1)
    state = _roundtrip(source.state_dict())
    fresh, target, _, _ = _trained(loaded, steps=0, seed=2)
    fresh.load_state_dict(model.state_dict())
    method_before = copy.deepcopy(target.method.state_dict())
    generator_before = target.generator.get_state()
    target.load_state_dict(state, method_state=False)
    model_params = list(model.parameters())
    for p, q in zip(source.param_groups[0]["params"], target.param_groups[0]["params"], strict=True):
        assert_tree_equal(target.state[q], source.state[p])
    assert len(model_params) == len(target.param_groups[0]["params"])
    assert_tree_equal(target.method.state_dict(), method_before)
    assert torch.equal(target.generator.get_state(), generator_before)
    wrapped_step(fresh, target, x, ys)  # trains on
    assert target.state_dict()["method_name"] == loaded


def test_switching_refuses_another_model():
    _, source, _, _ = _trained("mgda")
    state = _roundtrip(source.state_dict())
    state["optimizer"]["param_groups"][0]["params"].pop()
    _, target, _, _ = _trained("uw")
    before = _snapshot(target)
    with pytest.raises(ValueError, match="param groups"):
        target.load_state_dict(state, method_state=False)
    assert_tree_equal(_snapshot(target), before)


# -- torch.optim's state-dict hooks (row 11) ------------------------------------------------
def test_state_dict_hooks_fire_as_on_any_optimizer():
    _, opt, _, _ = _trained("pcgrad")
    calls = []
    opt.register_state_dict_pre_hook(lambda o: calls.append(("pre", o)))
    opt.register_state_dict_post_hook(lambda o, sd: calls.append(("post", o, sorted(sd))))
    state = opt.state_dict()
    assert [c[0] for c in calls] == ["pre", "post"] and all(c[1] is opt for c in calls)
    assert calls[1][2] == sorted(state)
    opt.register_state_dict_post_hook(lambda o, sd: {**sd, "extra": 1})  # a returned dict replaces it
    assert opt.state_dict()["extra"] == 1


def test_load_state_dict_hooks_fire_as_on_any_optimizer():
    _, opt, _, _ = _trained("pcgrad")
    state = _roundtrip(opt.state_dict())
    calls = []

    def pre(o, sd):  # e.g. a checkpointing library adapting an older layout
        calls.append("pre")
        return {k: v for k, v in sd.items() if k != "legacy"}

    opt.register_load_state_dict_pre_hook(pre)
    opt.register_load_state_dict_post_hook(lambda o: calls.append(("post", o is opt)))
    opt.load_state_dict({**state, "legacy": "dropped by the pre-hook"})
    assert calls == ["pre", ("post", True)]
