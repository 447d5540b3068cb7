"""``rotation_param="riemannian"``: rotations held directly, trained by a retraction after
each step (:class:`gradsurgery.pipeline.rotation.RiemannianRotations`,
:mod:`gradsurgery.numerics.retraction`)."""
from __future__ import annotations

import os

import pytest
import torch
import torch.distributed as dist
from spawn_helpers import max_diff, run_ranks
from torch import nn

import gradsurgery as gs
from gradsurgery.numerics import retraction
from gradsurgery.pipeline.rotation import RiemannianRotations, haar

K, D = 3, 6


def _model(dtype=torch.float64, seed: int = 0):
    torch.manual_seed(seed)
    backbone = nn.Sequential(nn.Linear(5, D), nn.Tanh(), nn.Linear(D, D)).to(dtype)
    heads = nn.ModuleList([nn.Linear(D, 1) for _ in range(K)]).to(dtype)
    return backbone, heads


def _opt(backbone, heads, param="riemannian", method="rotograd", **options):
    init = haar(K, D, dtype=next(backbone.parameters()).dtype)
    base = torch.optim.Adam([*backbone.parameters(), *heads.parameters()], lr=0.02)
    return gs.MultiTaskOptimizer(base, method, num_tasks=K, rep_size=D, rotation_init=init, rotation_param=param,
                                 **options)


def _data(steps: int, dtype=torch.float64):
    g = torch.Generator().manual_seed(7)
    return torch.randn(steps, 16, 5, generator=g, dtype=dtype), torch.randn(steps, K, 16, 1, generator=g, dtype=dtype)


def _step(opt, backbone, heads, x, y, scaler=None):
    opt.zero_grad()
    views = opt.fork(backbone(x))
    losses = [nn.functional.mse_loss(h(v), t) for h, v, t in zip(heads, views, y)]
    if scaler is None:
        opt.backward(losses)
        opt.step()
    else:
        opt.backward(losses, scaler=scaler)
        scaler.step(opt)
        scaler.update()


def _state(opt, backbone, heads) -> list[torch.Tensor]:
    return [p.detach().clone() for p in [*backbone.parameters(), *heads.parameters()]] + [opt.rotations.base.clone()]


# -- the gradient -----------------------------------------------------------------------
def test_gradient_is_the_projected_euclidean_gradient():
    """``Omega.grad`` is the Lie-algebra form ``R^T G - G^T R`` of the Euclidean gradient
    ``G`` of the alignment loss, both re-derived here with autograd (float64): the heads'
    rotated-space gradients ``H_k``, ``G_k = R_k^T H_k``, the reference
    ``r = mean_k g_k ||gbar|| / ||g_k||`` and ``l_k = sum_rows ||R_k r - H_k||^2``."""
    backbone, heads = _model()
    opt = _opt(backbone, heads)
    x, y = _data(1)
    r = opt.rotations.base.clone()
    z = backbone(x[0]).detach()
    views = [(z @ r[k].T).requires_grad_() for k in range(K)]
    h = torch.stack([torch.autograd.grad(nn.functional.mse_loss(heads[k](views[k]), y[0, k]), views[k])[0]
                     for k in range(K)])
    g = torch.stack([h[k] @ r[k] for k in range(K)])  # rows: G_k = R_k^T H_k
    flat = g.flatten(1)
    mean = flat.mean(0)
    ref = (mean.norm() * flat / flat.norm(dim=1, keepdim=True)).mean(0).view_as(z)
    leaf = r.clone().requires_grad_()
    loss = sum(((ref @ leaf[k].T - h[k]) ** 2).sum() for k in range(K))
    euclid, = torch.autograd.grad(loss, leaf)
    lie = leaf.detach().mT @ euclid - euclid.mT @ leaf.detach()
    expected = retraction.pack(lie, retraction.tril_indices(D))

    _step_backward_only(opt, backbone, heads, x[0], y[0])
    torch.testing.assert_close(opt.rotations.skew_params.grad, expected, rtol=1e-10, atol=1e-14)
    assert expected.abs().max() > 1e-4  # not a vacuous comparison


def _step_backward_only(opt, backbone, heads, x, y):
    opt.zero_grad()
    views = opt.fork(backbone(x))
    opt.backward([nn.functional.mse_loss(hd(v), t) for hd, v, t in zip(heads, views, y)])


@pytest.mark.parametrize("coop", [False, True])
def test_first_gradient_equals_expm_at_zero(coop):
    """At ``A = 0`` the exponential's derivative is the identity: the ``expm``
    parametrisation's ``A.grad`` (autograd through ``expm``, cooperative terms included)
    packed equals ``Omega.grad``."""
    grads = {}
    for param in ("expm", "riemannian"):
        backbone, heads = _model()
        opt = _opt(backbone, heads, param, coop=coop)
        x, y = _data(1)
        _step_backward_only(opt, backbone, heads, x[0], y[0])
        grads[param] = opt.rotations.skew_params.grad
    expected = retraction.pack(grads["expm"], retraction.tril_indices(D))
    torch.testing.assert_close(grads["riemannian"], expected, rtol=1e-10, atol=1e-15)
    assert expected.abs().max() > 1e-4


# -- the retraction -----------------------------------------------------------------------
def test_retraction_polynomial_orthogonality_defect():
    """One step in float64: ``P^T P - I = -X^6/8 + X^8/64`` (docs of :mod:`retraction`),
    and ``P`` agrees with ``expm`` to third order."""
    torch.manual_seed(0)
    x = 0.3 * torch.randn(2, 8, 8, dtype=torch.float64)
    x = x - x.mT
    p = torch.eye(8, dtype=torch.float64).repeat(2, 1, 1)
    retraction.retract_(p, x)
    x6 = torch.linalg.matrix_power(x, 6)
    torch.testing.assert_close(p.mT @ p - torch.eye(8, dtype=torch.float64),
                               -x6 / 8 + x6 @ x @ x / 64, rtol=0, atol=1e-14)
    small = x * 1e-3
    q = torch.eye(8, dtype=torch.float64).repeat(2, 1, 1)
    retraction.retract_(q, small)
    assert (q - torch.linalg.matrix_exp(small)).abs().max() < 1e-9  # error ~ ||X||^3 / 6


@pytest.mark.parametrize("lr", [3e-3, 3e-2])
def test_orthogonal_over_2000_float32_steps(lr):
    """2000 retractions of Adam-sized steps (every generator entry +-lr, the first Adam
    steps' size; ``||X||_2`` about 0.03 and 0.3, as Adam at lr 1e-3 and 1e-2 for
    ``m = 256``) in float32 keep ``max |R^T R - I|`` below 1e-6, read every 10 steps."""
    rot = RiemannianRotations(2, 32, dtype=torch.float32)
    steps = lr * (torch.randint(0, 2, (2000, *rot.skew_params.shape), generator=torch.Generator().manual_seed(0))
                  * 2.0 - 1.0)
    worst = 0.0
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # tiny products: threads only add synchronisation on a loaded machine
    try:
        for t in range(2000):
            with torch.no_grad():
                rot.skew_params.copy_(steps[t])
            rot.after_step()
            if t % 10 == 9:
                worst = max(worst, float(retraction.orthogonality_error(rot.base)))
    finally:
        torch.set_num_threads(threads)
    assert worst <= 1e-6
    assert rot.retractions == 2000 and not rot.skew_params.any()


# -- training, checkpoints ------------------------------------------------------------------
@pytest.mark.parametrize("method,options", [("rotograd", {}), ("rotate_only", {}), ("rotogradnorm", {}),
                                            ("pcgrad", {"rotation": True}), ("rotograd", {"coop": True})])
def test_every_rotation_method_trains(method, options):
    backbone, heads = _model()
    opt = _opt(backbone, heads, method=method, **options)
    before = opt.rotations.base.clone()
    x, y = _data(4)
    for t in range(4):
        _step(opt, backbone, heads, x[t], y[t])
    assert (opt.rotations.base - before).abs().max() > 1e-3
    assert retraction.orthogonality_error(opt.rotations.base) < 1e-6


def test_resume_is_bit_exact_and_other_parametrisations_refused():
    """A checkpoint taken mid-cadence (5 steps, re-orthogonalisation every 8) resumes bit
    for bit: ``R``, Adam's moments (in the Lie algebra) and the retraction counter."""
    assert retraction.REORTHOGONALISE_EVERY not in (1, 2, 5)
    steps = 2 * retraction.REORTHOGONALISE_EVERY
    x, y = _data(steps, torch.float32)
    backbone, heads = _model(torch.float32)
    opt = _opt(backbone, heads)
    for t in range(steps):
        _step(opt, backbone, heads, x[t], y[t])
    reference = _state(opt, backbone, heads)

    backbone, heads = _model(torch.float32)
    opt = _opt(backbone, heads)
    for t in range(5):
        _step(opt, backbone, heads, x[t], y[t])
    saved = {"opt": opt.state_dict(), "backbone": backbone.state_dict(), "heads": heads.state_dict()}
    backbone, heads = _model(torch.float32, seed=1)
    opt = _opt(backbone, heads)
    opt.load_state_dict(saved["opt"])
    backbone.load_state_dict(saved["backbone"]), heads.load_state_dict(saved["heads"])
    assert opt.rotations.retractions == 5
    for t in range(5, steps):
        _step(opt, backbone, heads, x[t], y[t])
    assert max_diff(_state(opt, backbone, heads), reference) == 0

    for other in ("expm", "cayley"):
        expm_opt = _opt(*_model(torch.float32), param=other)
        with pytest.raises(ValueError, match="rotation_param='riemannian'"):
            expm_opt.load_state_dict(saved["opt"])


def test_grad_scaler_skipped_step_does_not_retract():
    """An overflowing step under ``GradScaler`` calls no ``step()``: ``R`` and the counter
    stay; the other steps retract."""
    backbone, heads = _model(torch.float32)
    opt = _opt(backbone, heads)
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0 ** 10)
    x, y = _data(3, torch.float32)
    _step(opt, backbone, heads, x[0], y[0], scaler)
    before, count = opt.rotations.base.clone(), opt.rotations.retractions
    _step(opt, backbone, heads, x[1], y[1] * float("inf"), scaler)
    assert torch.equal(opt.rotations.base, before) and opt.rotations.retractions == count == 1
    _step(opt, backbone, heads, x[2], y[2], scaler)
    assert not torch.equal(opt.rotations.base, before) and opt.rotations.retractions == 2


def test_compiled_heads_do_not_recompile():
    """Compiled backbone and heads (the ``aot_eager`` backend, counted): the rotations
    moving in place between steps cause no recompilation, and the steps are the eager ones."""
    from torch._dynamo.testing import CompileCounterWithBackend
    torch._dynamo.reset()
    x, y = _data(4, torch.float32)
    results = []
    counters = []
    for compiled in (False, True):
        backbone, heads = _model(torch.float32)
        opt = _opt(backbone, heads)
        counter = CompileCounterWithBackend("aot_eager")
        run_backbone = torch.compile(backbone, backend=counter) if compiled else backbone
        head_fns = [torch.compile(h, backend=counter) if compiled else h for h in heads]
        for t in range(4):
            if t == 2:
                counters.append(counter.frame_count)
            opt.zero_grad()
            views = opt.fork(run_backbone(x[t]))
            opt.backward([nn.functional.mse_loss(h(v), target) for h, v, target in zip(head_fns, views, y[t])])
            opt.step()
        counters.append(counter.frame_count)
        results.append(_state(opt, backbone, heads))
    assert counters[2] == counters[3] > 0  # frames compiled in the first two steps only
    for a, b in zip(*results):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)


def test_task_model_exports():
    backbone, heads = _model(torch.float32)
    opt = _opt(backbone, heads)
    x, y = _data(2, torch.float32)
    _step(opt, backbone, heads, x[0], y[0])
    model = opt.task_model(1, backbone, heads[1])
    program = torch.export.export(model, (x[1],))
    expected = heads[1](backbone(x[1]) @ opt.rotations.base[1].T)
    torch.testing.assert_close(program.module()(x[1]), expected)
    torch.testing.assert_close(model(x[1]), expected)


def test_compat_classes():
    backbone, heads = _model(torch.float32)
    model = gs.compat.RotoGrad(backbone, list(heads), D, rotation_param="riemannian")
    base = torch.optim.Adam(model.parameters(), lr=0.02)
    x, y = _data(3, torch.float32)
    before = model.rotations.base.clone()
    for t in range(3):
        base.zero_grad()
        preds = model(x[t])
        model.backward([nn.functional.mse_loss(p, target) for p, target in zip(preds, y[t])])
        base.step()
    # the compat facade steps through its wrapper: the rotations moved and stay orthogonal
    assert (model.rotations.base - before).abs().max() > 1e-4
    assert retraction.orthogonality_error(model.rotations.base) < 1e-5
    package = {f"parametrizations.rotation_{k}.original": torch.zeros(D, D) for k in range(K)}
    with pytest.raises(ValueError, match="rotation_param='expm'"):
        model.load_state_dict(package)


# -- torch.distributed ---------------------------------------------------------------------
WORLD, STEPS, BATCH = 2, 6, 16


def _train_ddp(rows: slice, ddp: bool, coop: bool) -> list[torch.Tensor]:
    torch.manual_seed(0)
    backbone = nn.Sequential(nn.Linear(5, D), nn.Tanh(), nn.Linear(D, D)).double()
    heads = nn.ModuleList([nn.Linear(D, 1), nn.Linear(D, 2)]).double()
    shared = nn.parallel.DistributedDataParallel(backbone) if ddp else backbone
    base = torch.optim.Adam([*backbone.parameters(), *heads.parameters()], lr=0.05)
    opt = gs.MultiTaskOptimizer(base, "rotograd", num_tasks=2, rep_size=D, method_lr=0.05, coop=coop,
                                rotation_param="riemannian")
    g = torch.Generator().manual_seed(1234)
    x = torch.randn(STEPS, BATCH, 5, generator=g, dtype=torch.float64)
    y1 = torch.randn(STEPS, BATCH, 1, generator=g, dtype=torch.float64)
    y2 = torch.randn(STEPS, BATCH, 2, generator=g, dtype=torch.float64)
    for t in range(STEPS):
        opt.zero_grad()
        z1, z2 = opt.fork(shared(x[t, rows]))
        opt.backward([(heads[0](z1) - y1[t, rows]).pow(2).mean(), (heads[1](z2).tanh() - y2[t, rows]).pow(2).mean()])
        opt.step()
    return [p.detach().clone() for p in [*backbone.parameters(), *heads.parameters()]] + [opt.rotations.base.clone()]


def _worker(rank: int, port: int, out: str) -> None:
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=WORLD)
    rows = slice(rank * BATCH // WORLD, (rank + 1) * BATCH // WORLD)
    results = {coop: _train_ddp(rows, True, coop) for coop in (False, True)}
    torch.save(results, os.path.join(out, f"rank{rank}.pt"))
    dist.destroy_process_group()


def test_ddp_two_ranks_equal_one_process_on_the_global_batch(tmp_path):
    ranks = run_ranks(_worker, tmp_path, WORLD)
    for coop in (False, True):
        reference = _train_ddp(slice(None), False, coop)
        assert max_diff(ranks[0][coop], reference) < 1e-9
        assert max_diff(ranks[0][coop], ranks[1][coop]) == 0
        half = _train_ddp(slice(0, BATCH // WORLD), False, coop)
        assert max_diff(half, reference) > 1e-4  # the comparison can fail
