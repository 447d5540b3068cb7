"""Absent tasks (``None`` losses) for every method (issue 21 row 7): a method with a
natural semantics decides over the present tasks, with the state of the absent task left
alone; every other method refuses with its own reason, before anything changed."""
from __future__ import annotations

import copy
import re

import pytest
import torch
from core_helpers import assert_same, make, snapshot, wrapped_step
from torch import nn

import gradsurgery as gs

K, PRESENT = 3, [0, 2]


def _opt(model, method, k=K, **options):
    rotation = {"rep_size": 6} if gs.methods.get(method).rotation else {}
    level = gs.methods.get(method).levels[0]
    return gs.MultiTaskOptimizer(torch.optim.SGD(model.parameters(), lr=0.1), method, num_tasks=k, level=level,
                                 **rotation, **options)


def _absent_step(model, opt, x, ys):
    opt.zero_grad()
    losses = model.losses(opt.fork(model.rep(x)), ys)
    opt.backward([losses[0], None, losses[2]])


def _present_only(model, method, x, ys, **options):
    """The same model and batch through an optimizer built on the present tasks only."""
    two = copy.deepcopy(model)
    two.heads = nn.ModuleList([two.heads[k] for k in PRESENT])
    opt = _opt(two, method, k=len(PRESENT), **options)
    opt.zero_grad()
    opt.backward(two.losses(opt.fork(two.rep(x)), ys[PRESENT]))
    return two, opt


def _assert_same_grads(model, two):
    for p, q in zip(model.backbone.parameters(), two.backbone.parameters()):
        torch.testing.assert_close(p.grad, q.grad, rtol=1e-12, atol=1e-14)
    for p, q in zip([p for k in PRESENT for p in model.heads[k].parameters()], two.heads.parameters()):
        torch.testing.assert_close(p.grad, q.grad, rtol=1e-12, atol=1e-14)
    assert all(p.grad is None for p in model.heads[1].parameters())


@pytest.mark.parametrize("method,options", [("constant", {"task_weights": [1.0, 5.0, 3.0]}), ("pcgrad", {}),
                                            ("uw", {})])
def test_method_decides_as_an_optimizer_built_on_the_present_tasks(method, options):
    """Constant keeps the present tasks' weights; PCGrad over two tasks has one order only
    (so its draw cannot matter); UW's present terms are those of a 2-task UW with the same
    log-variances, and the absent task's log-variance gets a zero gradient."""
    model, x, ys = make(K, seed=3)
    opt = _opt(model, method, **options)
    _absent_step(model, opt, x, ys)
    reference = {k: [v[i] for i in PRESENT] for k, v in options.items()}
    two, ref = _present_only(model, method, x, ys, **reference)
    _assert_same_grads(model, two)
    if method == "uw":
        grad = opt.method.log_vars.grad
        torch.testing.assert_close(grad[PRESENT], ref.method.log_vars.grad, rtol=1e-12, atol=0)
        assert grad[1] == 0


def test_rlw_weights_the_present_tasks_by_the_softmax_of_their_draws():
    model, x, ys = make(K, seed=4)
    opt = _opt(model, "rlw")
    preview = torch.Generator()
    preview.set_state(opt.generator.get_state())
    xi = torch.randn(K, generator=preview, dtype=torch.float64)  # the paper's N(0, I_K) draw
    _absent_step(model, opt, x, ys)
    weights = torch.softmax(xi[PRESENT], 0)
    two, _ = _present_only(model, "constant", x, ys, task_weights=weights.tolist())
    _assert_same_grads(model, two)
    torch.testing.assert_close(opt.stats["weights"][PRESENT], weights, rtol=1e-12, atol=0)
    # the draw is committed: the next step draws anew from the advanced generator
    after = torch.Generator()
    after.set_state(opt.generator.get_state())
    assert not torch.equal(torch.randn(K, generator=after, dtype=torch.float64), xi)


REFUSING = [m for m in gs.methods.available() if not gs.methods.get(m).subset_safe]


def test_the_four_over_refused_methods_accept_absent_tasks():
    assert not {"pcgrad", "rlw", "constant", "uw"} & set(REFUSING)


@pytest.mark.parametrize("method", REFUSING)
def test_refusal_states_the_method_s_own_reason_and_changes_nothing(method):
    reason = gs.methods.get(method).subset_refusal
    assert reason and "per-task state" not in reason
    model, x, ys = make(K, seed=5)
    opt = _opt(model, method)
    wrapped_step(model, opt, x, ys)
    opt.zero_grad()
    losses = model.losses(opt.fork(model.rep(x)), ys)
    before = snapshot(model, opt)
    with pytest.raises(ValueError, match=r"absent task\(s\) \[1\].*" + re.escape(reason)):
        opt.backward([losses[0], None, losses[2]])
    assert_same(before, snapshot(model, opt))


@pytest.mark.parametrize("method,options", [("upgrad", {"pref_vector": [1.0, 2.0, 1.0]}),
                                            ("config", {"pref_vector": [1.0, 2.0, 1.0]}),
                                            ("aligned_mtl", {"pref_vector": [1.0, 2.0, 1.0]})])
def test_refusal_of_per_task_options_names_the_option(method, options):
    model, x, ys = make(K, seed=6)
    opt = _opt(model, method, **options)
    opt.zero_grad()
    losses = model.losses(opt.fork(model.rep(x)), ys)
    with pytest.raises(ValueError, match=f"{next(iter(options))} gives one .* per task"):
        opt.backward([losses[0], None, losses[2]])


# -- the masked-loss trap (issue 21 row 8) ---------------------------------------------------
def _masked_losses(model, views, ys, labelled):
    """Task 1 as a masked loss: the mean over its labelled rows, ``sum / max(n, 1)``, the
    natural way to write it; with no labelled row it is exactly 0 with a zero gradient."""
    losses = model.losses(views, ys)
    per_row = (model.heads[1](views[1]).squeeze(-1) - ys[1]).pow(2) * labelled
    losses[1] = per_row.sum() / labelled.sum().clamp(min=1)
    return losses


@pytest.mark.parametrize("method", ["mgda", "mean", "rotograd"])
def test_masked_loss_over_an_unlabelled_batch_warns_once_naming_the_task(method, recwarn):
    model, x, ys = make(K, seed=7)
    opt = _opt(model, method)
    for labelled in (torch.ones(4), torch.zeros(4), torch.zeros(4), torch.tensor([1.0, 0, 0, 0])):
        opt.zero_grad()
        opt.backward(_masked_losses(model, opt.fork(model.rep(x)), ys, labelled.to(x.dtype)))
        opt.step()
    warned = [w for w in recwarn if "exactly zero gradient" in str(w.message)]
    assert len(warned) == 1  # once, at the first unlabelled batch
    assert "task(s) [1]" in str(warned[0].message) and "Pass None" in str(warned[0].message)


def test_no_warning_for_ordinary_and_absent_tasks(recwarn):
    model, x, ys = make(K, seed=8)
    opt = _opt(model, "mgda")
    wrapped_step(model, opt, x, ys)
    _absent_step(model, opt, x, ys)
    assert not [w for w in recwarn if "exactly zero gradient" in str(w.message)]
