"""``rotation_param="cayley"``: ``R_k = B_k (I - X_k/2)^{-1} (I + X_k/2)``, ``X_k = skew(A_k)``
(geotorch's ``triv="cayley"``), with a hand-written backward. Checked against the formula
evaluated by single-matrix ``torch.linalg.solve`` (differentiated by autograd), for
orthogonality through training, resume and 2-rank DDP exactness, like the default."""
from __future__ import annotations

import os
import subprocess
import sys

import pytest
import torch
import torch.distributed as dist
from hypothesis import given, settings
from hypothesis import strategies as st
from spawn_helpers import max_diff, run_ranks
from torch import nn

import gradsurgery as gs
from gradsurgery import compat
from gradsurgery.numerics.cayley import cayley
from gradsurgery.numerics.expm import skew
from gradsurgery.pipeline import rotation

ROTATION_RUNS = [("rotate_only", {}), ("rotograd", {}), ("rotogradnorm", {"alpha": 1.0}), ("mgda", {"rotation": True})]


def _by_solve(x: torch.Tensor) -> torch.Tensor:
    """The Cayley map from its definition, one ``torch.linalg.solve`` per matrix."""
    eye = torch.eye(x.shape[-1], dtype=x.dtype)
    return torch.stack([torch.linalg.solve(eye - x[k] / 2, eye + x[k] / 2) for k in range(x.shape[0])])


@settings(max_examples=20, deadline=None)
@given(st.integers(1, 4), st.integers(1, 9), st.sampled_from([0.0, 1e-3, 0.3, 3.0, 100.0]), st.integers(0, 2**31 - 1))
def test_value_and_derivative_equal_the_definition(k, m, scale, seed):
    """float64: value to 1e-12 (``||C||_2 = 1``) and derivative to 1e-10 relative against
    autograd through per-matrix solves; the result is orthogonal."""
    g = torch.Generator().manual_seed(seed)
    a = (scale * torch.randn(k, m, m, generator=g, dtype=torch.float64)).requires_grad_()
    probe = torch.randn(k, m, m, generator=g, dtype=torch.float64)
    ours = cayley(skew(a))
    want = _by_solve(skew(a))
    torch.testing.assert_close(ours, want, rtol=0, atol=1e-12)
    torch.testing.assert_close(ours @ ours.mT, torch.eye(m, dtype=torch.float64).expand(k, m, m), rtol=0, atol=1e-12)
    got, = torch.autograd.grad((ours * probe).sum(), a)
    ref, = torch.autograd.grad((want * probe).sum(), a)
    torch.testing.assert_close(got, ref, rtol=1e-10, atol=1e-10 * max(1.0, ref.abs().max().item()))


def test_gradcheck_and_rotation():
    a = (0.7 * torch.randn(2, 5, 5, dtype=torch.float64)).requires_grad_()
    assert torch.autograd.gradcheck(lambda b: cayley(skew(b)), (a,))
    c = cayley(skew(a)).detach()
    assert all(abs(torch.linalg.det(c[i]).item() - 1) < 1e-12 for i in range(2))  # SO(m), not O(m)


def test_a_batch_of_full_size_matrices_does_not_hang():
    """Batched LAPACK LU hangs on this torch CPU build (MKL SLASWP errors): the map must
    run on a K = 8, m = 256 batch in a fresh process, orthogonal, within a time limit."""
    code = ("import torch; from gradsurgery.numerics.cayley import cayley; from gradsurgery.numerics.expm import skew\n"
            "a = (0.05 * torch.randn(8, 256, 256)).requires_grad_(); c = cayley(skew(a)); c.sum().backward()\n"
            "e = (c @ c.mT - torch.eye(256)).abs().max().item(); assert e < 1e-4, e; print('ok')")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0 and out.stdout.strip() == "ok", out.stderr
    assert "SLASWP" not in out.stderr


def _model(seed: int = 0):
    torch.manual_seed(seed)
    backbone = nn.Sequential(nn.Linear(5, 6), nn.Tanh(), nn.Linear(6, 6))
    heads = nn.ModuleList([nn.Linear(6, 1), nn.Linear(6, 2)])
    return backbone, heads


def _batch(t: int):
    g = torch.Generator().manual_seed(100 + t)
    return torch.randn(8, 5, generator=g), torch.randn(8, 1, generator=g), torch.randn(8, 2, generator=g)


def _step(opt, backbone, heads, t):
    x, y1, y2 = _batch(t)
    opt.zero_grad()
    z1, z2 = opt.fork(backbone(x))
    opt.backward([(heads[0](z1) - y1).pow(2).mean(), (heads[1](z2).tanh() - y2).pow(2).mean()])
    opt.step()


def _optimizer(method, options, backbone, heads, param="cayley"):
    base = torch.optim.Adam([*backbone.parameters(), *heads.parameters()], lr=0.05)
    return gs.MultiTaskOptimizer(base, method, num_tasks=2, rep_size=6, method_lr=0.3, rotation_param=param,
                                 **options)


@pytest.mark.parametrize("method,options", ROTATION_RUNS, ids=[m for m, _ in ROTATION_RUNS])
def test_rotations_stay_orthogonal_and_move(method, options):
    backbone, heads = _model()
    opt = _optimizer(method, options, backbone, heads)
    for t in range(30):
        _step(opt, backbone, heads, t)
    r = opt.rotations.matrices().detach()
    assert (r @ r.mT - torch.eye(6)).abs().max().item() < 1e-5
    assert opt.rotations.skew_params.detach().tril(-1).abs().max().item() > 0.1  # trained, far from the start


def test_one_inverse_per_rotation_per_step(monkeypatch):
    """Each step inverts each task's ``m x m`` matrix once (in ``fork``) and runs no
    exponential, whatever the generators' size."""
    calls = {"inv": 0, "exp": 0}
    original = torch.linalg.inv_ex
    monkeypatch.setattr(torch.linalg, "inv_ex", lambda a, *r, **k: (calls.__setitem__("inv", calls["inv"] + 1),
                                                                       original(a, *r, **k))[1])
    for owner in (torch.linalg, rotation):  # matrix_exp, and the rotations' own exponential
        name = "matrix_exp" if owner is torch.linalg else "expm"
        monkeypatch.setattr(owner, name, lambda *a, **k: calls.__setitem__("exp", calls["exp"] + 1))
    backbone, heads = _model()
    opt = _optimizer("rotograd", {}, backbone, heads)
    with torch.no_grad():
        opt.rotations.skew_params.copy_(5.0 * torch.randn(2, 6, 6))
    for t in range(3):
        calls["inv"] = 0
        _step(opt, backbone, heads, t)
        assert calls == {"inv": 2, "exp": 0}


def test_pipeline_equals_autograd_through_the_definition():
    """The same 5 steps with ``"cayley"`` and with a callable that solves the definition
    (autograd differentiates it): the hand-written backward gives the same training."""
    runs = []
    for param in ("cayley", _by_solve):
        backbone, heads = _model()
        backbone.double(), heads.double()
        opt = gs.MultiTaskOptimizer(torch.optim.Adam([*backbone.parameters(), *heads.parameters()], lr=0.05),
                                    "rotograd", num_tasks=2, rep_size=6, method_lr=0.3, rotation_param=param)
        for t in range(5):
            x, y1, y2 = (v.double() for v in _batch(t))
            opt.zero_grad()
            z1, z2 = opt.fork(backbone(x))
            opt.backward([(heads[0](z1) - y1).pow(2).mean(), (heads[1](z2).tanh() - y2).pow(2).mean()])
            opt.step()
        runs.append([p.detach().clone() for g in opt.param_groups for p in g["params"]])
    assert max((a - b).abs().max().item() for a, b in zip(*runs)) < 1e-10
    assert runs[0][-1].abs().max().item() > 0  # the rotations moved


@pytest.mark.parametrize("method,options", ROTATION_RUNS[1:3], ids=["rotograd", "rotogradnorm"])
def test_resume_continues_bit_for_bit(method, options):
    backbone, heads = _model()
    opt = _optimizer(method, options, backbone, heads)
    for t in range(6):
        _step(opt, backbone, heads, t)
    expected = [p.detach().clone() for g in opt.param_groups for p in g["params"]]

    backbone, heads = _model()
    opt = _optimizer(method, options, backbone, heads)
    for t in range(3):
        _step(opt, backbone, heads, t)
    state = (backbone.state_dict(), heads.state_dict(), opt.state_dict())
    backbone, heads = _model(seed=7)
    opt = _optimizer(method, options, backbone, heads)
    backbone.load_state_dict(state[0]), heads.load_state_dict(state[1]), opt.load_state_dict(state[2])
    for t in range(3, 6):
        _step(opt, backbone, heads, t)
    got = [p.detach().clone() for g in opt.param_groups for p in g["params"]]
    assert all(torch.equal(a, b) for a, b in zip(got, expected))


def test_compat_classes_take_rotation_param():
    backbone, heads = _model()
    model = compat.RotoGradNorm(backbone, list(heads), 6, alpha=1.0, rotation_param="cayley")
    assert model.rotations.param == "cayley"
    r = torch.stack(model.rotation).detach()
    assert (r @ r.mT - torch.eye(6)).abs().max().item() < 1e-5


def test_errors_name_the_option():
    backbone, heads = _model()
    with pytest.raises(ValueError, match="rotation_param must be one of"):
        _optimizer("rotograd", {}, backbone, heads, param="caley")
    with pytest.raises(ValueError, match="rotation_param='cayley' only applies with rotations"):
        _optimizer("mgda", {}, backbone, heads)


# -- DDP: 2 ranks (gloo), each with half the batch, equal single-process training -------
WORLD, STEPS, BATCH = 2, 6, 16
DDP_RUNS = ["rotograd", "rotogradnorm", "rotate_only"]


def _ddp_train(method: str, rows: slice, ddp: bool) -> list[torch.Tensor]:
    torch.manual_seed(0)
    backbone = nn.Sequential(nn.Linear(5, 6), nn.Tanh(), nn.Linear(6, 6)).double()
    heads = nn.ModuleList([nn.Linear(6, 1), nn.Linear(6, 2)]).double()
    shared = nn.parallel.DistributedDataParallel(backbone) if ddp else backbone
    opt = gs.MultiTaskOptimizer(torch.optim.Adam([*backbone.parameters(), *heads.parameters()], lr=0.05), method,
                                num_tasks=2, rep_size=6, method_lr=0.05, rotation_param="cayley",
                                **({"alpha": 1.0} if method == "rotogradnorm" else {}))
    g = torch.Generator().manual_seed(1234)
    for _ in range(STEPS):
        x = torch.randn(BATCH, 5, generator=g, dtype=torch.float64)
        y1 = torch.randn(BATCH, 1, generator=g, dtype=torch.float64)
        y2 = torch.randn(BATCH, 2, generator=g, dtype=torch.float64)
        opt.zero_grad()
        z1, z2 = opt.fork(shared(x[rows]))
        opt.backward([(heads[0](z1) - y1[rows]).pow(2).mean(), (heads[1](z2).tanh() - y2[rows]).pow(2).mean()])
        opt.step()
    return [p.detach().clone() for group in opt.param_groups for p in group["params"]]


def _ddp_worker(rank: int, port: int, out: str) -> None:
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=WORLD)
    rows = slice(rank * BATCH // WORLD, (rank + 1) * BATCH // WORLD)
    torch.save({m: _ddp_train(m, rows, ddp=True) for m in DDP_RUNS}, os.path.join(out, f"rank{rank}.pt"))
    dist.destroy_process_group()


def test_ddp_equals_single_process_on_global_batch(tmp_path):
    ranks = run_ranks(_ddp_worker, tmp_path, WORLD)
    for method in DDP_RUNS:
        reference = _ddp_train(method, slice(None), ddp=False)
        assert max_diff(ranks[0][method], reference) < 1e-6, method
        assert all(torch.equal(a, b) for a, b in zip(ranks[0][method], ranks[1][method])), method
        assert reference[-1].abs().max().item() > 0  # the rotations were trained


def test_checkpoint_of_another_parametrisation_is_refused_and_nothing_changes():
    """The same generators give other rotations under the other map: a Cayley checkpoint
    loaded into an exponential optimizer is refused before anything is restored."""
    import copy
    torch.manual_seed(0)
    params = [torch.nn.Parameter(torch.randn(3))]
    cay = gs.MultiTaskOptimizer(torch.optim.SGD(params, lr=0.1), "rotograd", num_tasks=2, rep_size=4,
                                rotation_param="cayley")
    exp = gs.MultiTaskOptimizer(torch.optim.SGD([torch.nn.Parameter(torch.randn(3))], lr=0.1), "rotograd",
                                num_tasks=2, rep_size=4)
    saved = cay.state_dict()
    assert saved["rotation"]["param"] == "cayley"
    before = copy.deepcopy(exp.state_dict())
    with pytest.raises(ValueError, match="rotation_param='cayley'"):
        exp.load_state_dict(saved)
    after = exp.state_dict()
    assert all(torch.equal(after["rotation"][k], v) for k, v in before["rotation"].items()
               if isinstance(v, torch.Tensor))
    cay.load_state_dict(copy.deepcopy(saved))  # the same parametrisation loads
