"""Distributed-exact surgery: 2 CPU processes (gloo), each with half of every batch, take
the steps of single-process training on the whole batch; per-rank surgery does not.

One spawn runs every scenario in sequence (spawning costs seconds); the single-process
references run in the test process.
"""
from __future__ import annotations

import os

import pytest
import torch
import torch.distributed as dist
from spawn_helpers import max_diff, run_ranks
from torch import nn

import gradsurgery as gs
from gradsurgery.scale.distributed import average_gradients

WORLD = 2
STEPS = 10
BATCH = 16  # global batch; each rank gets BATCH // WORLD rows
FEATURES = 6
#: rotation methods join when the RotoGrad family is registered
EXACT_METHODS = [m for m in ("pcgrad", "mgda", "gradnorm", "rotograd", "rotogradnorm")
                 if m in gs.methods.available()]

#: the overflow scenario: a method whose state a wrongly counted step would change
AMP_RUN, AMP_OPTIONS = (("rotograd",), {"burn_in_period": 7}) if "rotograd" in EXACT_METHODS else (("gradnorm",), {})


def _data() -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(1234)
    x = torch.randn(STEPS, BATCH, 5, generator=g, dtype=torch.float64)
    y1 = torch.randn(STEPS, BATCH, 1, generator=g, dtype=torch.float64)
    y2 = torch.randn(STEPS, BATCH, 2, generator=g, dtype=torch.float64)
    return x, y1, y2


def _train(method: str, rows: slice, *, ddp: bool = False, manual: bool = False, exact: bool = True,
           post: bool = False, poison: bool | None = None, absent: dict | None = None, **options) -> list[torch.Tensor]:
    """10 Adam steps on rows ``rows`` of every batch; returns every parameter (backbone,
    heads, the method's own) after training. ``post``: rotate the 3 channels of a
    ``batch x 3 x 2`` representation at each of its 2 positions, in cooperative mode
    (the rotation loss then averages over the batch instead of summing). ``poison`` (not
    None): with a GradScaler, whose final scale is returned last; True: this process's
    loss is 1e300 times larger at step 4: finite, but its Gram overflows float64 (an
    overflow only this process sees, until the Gram is all-reduced). ``absent``: ``{step:
    ranks}``, the ranks whose rows carry no label for task 1 at that step: a rank among them
    passes None; a single process (``rows`` the whole batch) takes task 1's loss over the
    other ranks' rows (None when it is every rank)."""
    torch.manual_seed(0)
    backbone = nn.Sequential(nn.Linear(5, FEATURES), nn.Tanh(), nn.Linear(FEATURES, FEATURES)).double()
    heads = nn.ModuleList([nn.Linear(FEATURES, 1), nn.Linear(FEATURES, 2)]).double()
    shared = nn.parallel.DistributedDataParallel(backbone) if ddp else backbone
    base = torch.optim.Adam([*backbone.parameters(), *heads.parameters()], lr=0.05)
    shape = dict(rotation_shape=3, post_shape=(2,), coop=True) if post else dict(rep_size=FEATURES)
    opt = gs.MultiTaskOptimizer(base, method, num_tasks=2, method_lr=0.05, distributed_exact=exact, **shape,
                                **options)
    x, y1, y2 = _data()
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0 ** 10, growth_interval=3) if poison is not None else None
    for t in range(STEPS):
        opt.zero_grad()
        z = shared(x[t, rows])
        z1, z2 = (v.flatten(1) for v in opt.fork(z.view(-1, 3, 2) if post else z))
        losses = [(heads[0](z1) - y1[t, rows]).pow(2).mean(), (heads[1](z2).tanh() - y2[t, rows]).pow(2).mean()]
        if absent is not None and t in absent:
            spec = absent[t] if isinstance(absent[t], dict) else {1: absent[t]}
            for task, missing in spec.items():
                labelled = [r for r in range(WORLD) if r not in missing]
                if rows != slice(None):
                    labelled = [r for r in labelled if _rows(r) == rows]
                take = torch.cat([torch.arange(BATCH)[_rows(r)] for r in labelled]) if labelled else None
                if take is None:
                    losses[task] = None
                elif rows == slice(None):
                    losses[task] = ((heads[0](z1[take]) - y1[t, take]) if task == 0 else
                                    (heads[1](z2[take]).tanh() - y2[t, take])).pow(2).mean()
        if scaler is None:
            opt.backward(losses)
        else:
            losses[1] = losses[1] * (1e300 if poison and t == 4 else 1.0)
            opt.backward(losses, scaler=scaler)
        if manual:
            average_gradients(backbone.parameters())
        if scaler is None:
            opt.step()
        else:
            scaler.step(opt)
            scaler.update()
    scale = [] if scaler is None else [torch.tensor(scaler.get_scale(), dtype=torch.float64)]
    return [p.detach().clone() for g in base.param_groups for p in g["params"]] + scale


def _rows(rank: int) -> slice:
    return slice(rank * BATCH // WORLD, (rank + 1) * BATCH // WORLD)


#: task 1 unlabelled on rank 1 at steps 1, 3, 5, 8, on both ranks at step 6
ABSENT = {1: {1}, 3: {1}, 5: {1}, 6: {0, 1}, 8: {1}}
#: methods deciding after the Gram's all-reduce (mgda, sum, gradnorm) or folding R/n_k into
#: the losses before the task backward (mean, gls: loss weights from the global losses)
ABSENT_METHODS = ["mgda", "sum", "mean", "gls"]
#: rank 1 has no task at all at step 2 (it still calls fork and backward); task 0 only on rank 1 at 4
ABSENT_EMPTY_RANK = {2: {0: {1}, 1: {1}}, 4: {0: {0}}, 7: {0: {1}, 1: {0}}}
#: present on one rank is present globally: methods that refuse absent tasks train on
ABSENT_SOME_ONLY = {1: {1}, 3: {0}, 8: {1}}


class _ElementWise(gs.methods.ElementWise):
    """A method that needs the raw gradients (cannot be distributed-exact)."""

    def combine(self, grads, losses, rep):
        return grads.sum(0)


def _expect_error(fn) -> str:
    try:
        fn()
    except (RuntimeError, ValueError) as e:
        return f"{type(e).__name__}: {e}"
    return "no error"


def _worker(rank: int, port: int, out: str) -> None:
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=WORLD)
    rows = slice(rank * BATCH // WORLD, (rank + 1) * BATCH // WORLD)
    results: dict[str, object] = {m: _train(m, rows, ddp=True) for m in EXACT_METHODS}
    if "rotograd" in EXACT_METHODS:
        results["rotograd/post+coop"] = _train("rotograd", rows, ddp=True, post=True)
    # an overflow on rank 1 only: both ranks skip the step, the method's state untouched
    results["amp"] = _train(*AMP_RUN, rows, ddp=True, poison=rank == 1, **AMP_OPTIONS)
    results["mgda/manual"] = _train("mgda", rows, manual=True)
    results["mgda/per-rank"] = _train("mgda", rows, ddp=True, exact=False)
    # a Gram-free method: the losses are reduced, nothing else
    results["mean"] = _train("mean", rows, ddp=True)

    params = [nn.Parameter(torch.zeros(3))]
    results["elementwise"] = _expect_error(
        lambda: gs.MultiTaskOptimizer(torch.optim.SGD(params, lr=0.1), _ElementWise(), num_tasks=2))
    gs.MultiTaskOptimizer(torch.optim.SGD(params, lr=0.1), _ElementWise(), num_tasks=2, distributed_exact=False)

    def mismatched(num_tasks: int, method: str):
        lin = nn.Linear(3, 3)
        opt = gs.MultiTaskOptimizer(torch.optim.SGD(lin.parameters(), lr=0.1), method, num_tasks=num_tasks)
        views = opt.fork(lin(torch.ones(2, 3)))
        opt.backward([v.sum() for v in views])

    for m in ABSENT_METHODS:
        results[f"absent/{m}"] = _train(m, rows, ddp=True, absent=ABSENT)
    results["absent/gradnorm"] = _train("gradnorm", rows, ddp=True, absent=ABSENT_SOME_ONLY)
    results["absent/empty rank"] = _train("mgda", rows, ddp=True, absent=ABSENT_EMPTY_RANK)
    results["absent/per-rank"] = _train("mgda", rows, ddp=True, exact=False, absent=ABSENT_SOME_ONLY)
    # loss weights of this rank's tasks (UW's own parameters are per-rank in this mode: not compared)
    results["absent/per-rank uw"] = _expect_error(
        lambda: _train("uw", rows, ddp=True, exact=False, absent=ABSENT_SOME_ONLY))
    results["absent/per-rank gradnorm"] = _expect_error(
        lambda: _train("gradnorm", rows, ddp=True, exact=False, absent=ABSENT_SOME_ONLY))
    results["absent/refused"] = _refused_on_every_rank(rank, rows)
    results["absent/unchecked"] = _refused_without_the_read(rows)
    results["whole model"] = _whole_model_in_ddp(rows)

    results["num_tasks"] = _expect_error(lambda: mismatched(2 + rank, "pcgrad"))
    results["method"] = _expect_error(lambda: mismatched(2, ("pcgrad", "mgda")[rank]))
    torch.save(results, os.path.join(out, f"rank{rank}.pt"))
    dist.destroy_process_group()


def _refused_on_every_rank(rank: int, rows: slice) -> list:
    """GradNorm, task 1 absent on both ranks: each rank raises the same error before
    anything changed (nothing left half-reduced), and the next step works on both."""
    torch.manual_seed(0)
    backbone = nn.parallel.DistributedDataParallel(nn.Linear(5, FEATURES).double())
    heads = nn.ModuleList([nn.Linear(FEATURES, 1), nn.Linear(FEATURES, 2)]).double()
    opt = gs.MultiTaskOptimizer(torch.optim.SGD([*backbone.parameters(), *heads.parameters()], lr=0.1),
                                "gradnorm", num_tasks=2)
    x, y1, y2 = _data()

    def step(t: int, drop: bool) -> None:
        opt.zero_grad()
        z1, z2 = opt.fork(backbone(x[t, rows]))
        opt.backward([(heads[0](z1) - y1[t, rows]).pow(2).mean(),
                      None if drop else (heads[1](z2) - y2[t, rows]).pow(2).mean()])
        opt.step()

    step(0, False)
    before = [p.detach().clone() for p in opt.param_groups[0]["params"]] + [opt.method.state_dict()]
    error = _expect_error(lambda: step(1, True))
    unchanged = all(torch.equal(a, b) for a, b in zip(before[:-1], opt.param_groups[0]["params"]))
    step(1, False)
    return [error, unchanged, [p.detach().clone() for p in opt.param_groups[0]["params"]]]

def _refused_without_the_read(rows: slice) -> list:
    """check_finite=False: presence has no host read to travel with, so ``None`` is refused
    (here on both ranks, which both pass it) saying to pass check_finite=True, before
    anything changed; the next step, every task present, runs on both ranks."""
    torch.manual_seed(0)
    backbone = nn.parallel.DistributedDataParallel(nn.Linear(5, FEATURES).double())
    heads = nn.ModuleList([nn.Linear(FEATURES, 1), nn.Linear(FEATURES, 2)]).double()
    opt = gs.MultiTaskOptimizer(torch.optim.SGD([*backbone.parameters(), *heads.parameters()], lr=0.1),
                                "mean", num_tasks=2, check_finite=False)
    x, y1, y2 = _data()

    def step(drop: bool) -> None:
        opt.zero_grad()
        z1, z2 = opt.fork(backbone(x[0, rows]))
        opt.backward([(heads[0](z1) - y1[0, rows]).pow(2).mean(),
                      None if drop else (heads[1](z2) - y2[0, rows]).pow(2).mean()])
        opt.step()

    before = [p.detach().clone() for p in opt.param_groups[0]["params"]]
    error = _expect_error(lambda: step(True))
    unchanged = all(torch.equal(a, b) for a, b in zip(before, opt.param_groups[0]["params"]))
    step(False)
    return [error, unchanged, [p.detach().clone() for p in opt.param_groups[0]["params"]]]


def _whole_model_in_ddp(rows: slice) -> list:
    """DDP(model) with the heads inside: refused at the first step, before anything
    changed, saying to wrap the backbone only (DDP's reducer would otherwise wait for
    the heads' gradients and fail at the next forward)."""
    torch.manual_seed(0)

    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.backbone = nn.Linear(5, FEATURES).double()
            self.heads = nn.ModuleList([nn.Linear(FEATURES, 1), nn.Linear(FEATURES, 2)]).double()

        def forward(self, x):
            return self.backbone(x)

    model = nn.parallel.DistributedDataParallel(Net())
    opt = gs.MultiTaskOptimizer(torch.optim.SGD(model.parameters(), lr=0.1), "mgda", num_tasks=2)
    x, y1, y2 = _data()
    before = [p.detach().clone() for p in model.parameters()]
    views = opt.fork(model(x[0, rows]))
    error = _expect_error(lambda: opt.backward([(model.module.heads[0](views[0]) - y1[0, rows]).pow(2).mean(),
                                                (model.module.heads[1](views[1]) - y2[0, rows]).pow(2).mean()]))
    unchanged = all(torch.equal(a, b) for a, b in zip(before, model.parameters())) and all(
        p.grad is None for p in model.parameters())
    return [error, unchanged]


@pytest.fixture(scope="module")
def ranks(tmp_path_factory) -> list[dict]:
    out = tmp_path_factory.mktemp("ddp")
    return run_ranks(_worker, out, WORLD)



@pytest.mark.parametrize("method", EXACT_METHODS)
def test_ddp_equals_single_process_on_global_batch(ranks, method):
    reference = _train(method, slice(None))
    assert max_diff(ranks[0][method], reference) < 1e-6
    assert max_diff(ranks[0][method], ranks[1][method]) == 0


@pytest.mark.skipif("rotograd" not in EXACT_METHODS, reason="the RotoGrad family is not registered")
def test_rotations_averaged_over_batch_in_coop_mode(ranks):
    reference = _train("rotograd", slice(None), post=True)
    assert max_diff(ranks[0]["rotograd/post+coop"], reference) < 1e-6
    assert max_diff(ranks[0]["rotograd/post+coop"], ranks[1]["rotograd/post+coop"]) == 0


def test_overflow_on_one_rank_skips_the_step_on_all(ranks):
    """GradScaler on both ranks, rank 1's gradients overflow at step 4: the global flag makes
    every rank skip that step and leave the method's state alone (RotoGrad's step counter:
    with ``burn_in_period=7`` a rank that counted the skipped step re-takes its initial
    values a step early), as one process on the whole (overflowing) batch does."""
    reference = _train(*AMP_RUN, slice(None), poison=True, **AMP_OPTIONS)
    assert max_diff(ranks[0]["amp"], reference) < 1e-6
    assert max_diff(ranks[0]["amp"], ranks[1]["amp"]) == 0
    clean = _train(*AMP_RUN, slice(None), poison=False, **AMP_OPTIONS)
    assert reference[-1] < clean[-1]  # the overflow did lower the scale
    assert max_diff(reference[:-1], clean[:-1]) > 1e-4  # and did skip a step


@pytest.mark.parametrize("scenario,method", [("mgda/manual", "mgda"), ("mean", "mean")])
def test_without_ddp_and_gram_free(ranks, scenario, method):
    reference = _train(method, slice(None))
    assert max_diff(ranks[0][scenario], reference) < 1e-6
    assert max_diff(ranks[1][scenario], reference) < 1e-6


def test_per_rank_surgery_differs(ranks):
    """Proves the comparison can fail: deciding from half the batch changes the run."""
    reference = _train("mgda", slice(None))
    assert max_diff(ranks[0]["mgda/per-rank"], reference) > 1e-4
    # the heads (and DDP's backbone) are still averaged: the replicas stay identical
    assert max_diff(ranks[0]["mgda/per-rank"], ranks[1]["mgda/per-rank"]) == 0


def test_elementwise_method_refused_under_distributed(ranks):
    for r in ranks:
        assert r["elementwise"].startswith("ValueError") and "distributed_exact=False" in r["elementwise"]


def test_ranks_that_disagree_fail_fast(ranks):
    for r in ranks:
        assert r["num_tasks"].startswith("RuntimeError") and "num_tasks differs across ranks" in r["num_tasks"]
        assert r["method"].startswith("RuntimeError") and "method or its options differ" in r["method"]


@pytest.mark.parametrize("method", ABSENT_METHODS)
def test_task_absent_on_some_ranks_equals_one_process_on_the_labelled_rows(ranks, method):
    """Issue 21 row 6: task 1 unlabelled on rank 1 (passes None) at some steps, on both at
    step 6: the ranks take the steps of one process on the global batch whose task-1 loss
    is the mean over the labelled rows (absent for the step at step 6)."""
    reference = _train(method, slice(None), absent=ABSENT)
    assert max_diff(ranks[0][f"absent/{method}"], reference) < 1e-6
    assert max_diff(ranks[0][f"absent/{method}"], ranks[1][f"absent/{method}"]) == 0
    # the comparison can fail: the plain mean over the whole batch is another run
    assert max_diff(reference, _train(method, slice(None))) > 1e-4


def test_absent_task_without_check_finite_is_refused_saying_to_pass_it(ranks):
    for r in ranks:
        error, unchanged, _ = r["absent/unchecked"]
        assert error.startswith("ValueError") and "pass check_finite=True" in error and unchanged
    assert max_diff(ranks[0]["absent/unchecked"][2], ranks[1]["absent/unchecked"][2]) == 0


def test_task_absent_on_one_rank_is_present_for_a_method_that_refuses_absent_tasks(ranks):
    reference = _train("gradnorm", slice(None), absent=ABSENT_SOME_ONLY)
    assert max_diff(ranks[0]["absent/gradnorm"], reference) < 1e-6
    assert max_diff(ranks[0]["absent/gradnorm"], ranks[1]["absent/gradnorm"]) == 0


def test_a_rank_without_any_task_and_tasks_on_disjoint_ranks(ranks):
    """A rank with None for every task still takes part (zeros of its own); tasks present on
    different ranks only (step 7) are each the mean over their own rows."""
    reference = _train("mgda", slice(None), absent=ABSENT_EMPTY_RANK)
    assert max_diff(ranks[0]["absent/empty rank"], reference) < 1e-6
    assert max_diff(ranks[0]["absent/empty rank"], ranks[1]["absent/empty rank"]) == 0


def test_per_rank_surgery_decides_over_each_rank_s_tasks(ranks):
    """distributed_exact=False: each rank decides over its own tasks; the replicas stay
    identical (heads averaged over the ranks that have their task); a method that refuses
    absent tasks refuses on both ranks."""
    assert max_diff(ranks[0]["absent/per-rank"], ranks[1]["absent/per-rank"]) == 0
    assert ranks[0]["absent/per-rank uw"] == ranks[1]["absent/per-rank uw"] == "no error"
    for r in ranks:
        assert r["absent/per-rank gradnorm"].startswith("ValueError")
        assert "on some ranks (per-rank surgery)" in r["absent/per-rank gradnorm"]


def test_task_absent_on_every_rank_is_refused_on_every_rank_together(ranks):
    for r in ranks:
        error, unchanged, _ = r["absent/refused"]
        assert error.startswith("ValueError") and "absent task(s) [1] on every rank" in error
        assert "GradNorm" in error and unchanged
    assert max_diff(ranks[0]["absent/refused"][2], ranks[1]["absent/refused"][2]) == 0


def test_whole_model_in_ddp_is_refused_at_the_first_step(ranks):
    """Issue 21 row 13."""
    for r in ranks:
        error, unchanged = r["whole model"]
        assert error.startswith("ValueError") and "wrap the backbone only" in error and "heads.0.weight" in error
        assert unchanged
