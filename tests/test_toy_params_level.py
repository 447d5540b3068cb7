"""The toy at the parameter level (issue 7, item 5): the parameter-level path really runs,
equals the representation level where it must, the Pareto "reached" criterion is right on
points located independently, and the compare tool reports an end point and a reached
flag for every method and start."""
from __future__ import annotations

import ast
import json

import pytest
import torch
from tqdm.auto import tqdm

import gradsurgery as gs
from gradsurgery.compare import Run, cli, runner
from gradsurgery.data.toy import PARETO_TOL, STARTS, Toy, objectives, pareto_curve, pareto_distance, reached, task_loss
from gradsurgery.pipeline import params_level

ROTATIONS = ("rotate_only", "rotograd", "rotogradnorm")


def _formula(x: torch.Tensor) -> torch.Tensor:
    """The toy's losses transcribed from the module docstring (CAGrad's f_1, f_2, then
    L_1 = 0.1 (f_1 + 20), L_2 = f_2 + 20)."""
    x1, x2 = x[..., 0], x[..., 1]
    a, b = torch.tanh(x2 / 2).clamp_min(0), torch.tanh(-x2 / 2).clamp_min(0)
    f1 = (a * (torch.log((0.5 * (-x1 - 7) - torch.tanh(-x2)).abs().clamp_min(1e-6)) + 6)
          + b * (((x1 - 7) ** 2 + 0.1 * (x2 + 8) ** 2) / 10 - 20))
    f2 = (a * (torch.log((0.5 * (-x1 + 3) + torch.tanh(-x2) + 2).abs().clamp_min(1e-6)) + 6)
          + b * (((x1 + 7) ** 2 + 0.1 * (x2 + 8) ** 2) / 10 - 20))
    return torch.stack([0.1 * (f1 + 20), f2 + 20], -1)


def _scalarised_minimum(w: float) -> torch.Tensor:
    """The minimiser of ``w L_1 + (1 - w) L_2`` (L-BFGS in float64 from the valley floor's
    middle): a Pareto point, found without :func:`pareto_curve`'s bisection (the front
    is convex here, so every Pareto point is such a minimiser)."""
    x = torch.tensor([0.0, -8.0], dtype=torch.float64, requires_grad=True)
    opt = torch.optim.LBFGS([x], lr=1, max_iter=200, tolerance_grad=1e-12, tolerance_change=1e-15,
                            line_search_fn="strong_wolfe")

    def closure():
        opt.zero_grad()
        loss = w * task_loss(x, 0) + (1 - w) * task_loss(x, 1)
        loss.backward()
        return loss

    opt.step(closure)
    return x.detach()


def _train(method: str, level: str, seed: int, steps: int = 15) -> Run:
    return runner.train_one(Toy(steps_per_epoch=steps), method, seed, 1, {}, tqdm(disable=True), level)


@pytest.mark.parametrize("method", ["mgda", "pcgrad", "cagrad"])
def test_params_level_runs_and_equals_rep_level(method, monkeypatch):
    """The toy's backbone is the identity on the point, so dL_k/dx = dL_k/dz: both levels
    take the same steps. The parameter level must really build the K x P Jacobian."""
    calls = []
    real = params_level.jacobian

    def spy(*args, **kwargs):
        calls.append(1)
        return real(*args, **kwargs)

    monkeypatch.setattr(params_level, "jacobian", spy)
    for seed in (0, 2):
        rep = _train(method, "rep", seed)
        assert not calls
        par = _train(method, "params", seed)
        assert len(calls) == par.steps == 15
        calls.clear()
        assert rep.ok and par.ok and (rep.level, par.level) == ("rep", "params")
        # float32 rounding only (measured: bitwise equal), for the points and the coefficients
        torch.testing.assert_close(torch.tensor(par.track), torch.tensor(rep.track), rtol=0, atol=1e-6)
        torch.testing.assert_close(torch.tensor(par.weights), torch.tensor(rep.weights), rtol=0, atol=1e-6)
        assert len(par.weights) == 15
        moved = torch.tensor(rep.track[-1]) - torch.tensor(STARTS[seed])
        assert moved.norm() > 0.5  # the runs did go somewhere


def test_losses_follow_the_documented_formula():
    x = torch.rand(4000, 2, dtype=torch.float64, generator=torch.Generator().manual_seed(0)) * 20 - 10
    torch.testing.assert_close(objectives(x), _formula(x), rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(torch.stack([task_loss(x, 0), task_loss(x, 1)], -1), _formula(x),
                               rtol=1e-12, atol=1e-12)


def test_pareto_curve_is_the_set_of_scalarised_minimisers():
    found = torch.stack([_scalarised_minimum(w) for w in (0.1, 0.5, 0.9, 0.97, 0.99)])
    assert (pareto_distance(found) < 0.01).all()
    assert reached(found).all()
    # the ends are the single-task minima (w = 1 and w = 0)
    curve = pareto_curve()
    torch.testing.assert_close(curve[-1], _scalarised_minimum(1.0), rtol=0, atol=2e-3)
    torch.testing.assert_close(curve[0], _scalarised_minimum(0.0), rtol=0, atol=2e-3)
    # no point of a brute-force grid dominates a curve point
    axis = torch.linspace(-10, 10, 201, dtype=torch.float64)
    grid = _formula(torch.cartesian_prod(axis, axis))
    mine = _formula(curve[::20])
    assert not ((grid[None] < mine[:, None] - 1e-9).all(-1)).any()


def test_reached_criterion_on_known_points():
    floor = torch.stack([_scalarised_minimum(w) for w in (0.1, 0.5, 0.9)])
    assert reached(floor).all()
    away = torch.tensor([[9.0, 9.0], [0.0, 0.0], [-8.5, 7.5], [0.0, -6.0], [0.0, -10.0],
                         [8.5, -8.4], [-8.5, -8.4]], dtype=torch.float64)
    assert not reached(away).any()
    # above the floor by more than the tolerance is out, by less is in
    up = torch.tensor([0.0, 1.0], dtype=torch.float64)
    assert not reached(floor + 1.2 * PARETO_TOL * up).any()
    assert reached(floor + 0.8 * PARETO_TOL * up).all()
    # past the minimum of L_1 the point is dominated by that minimum, and not reached
    best1 = _scalarised_minimum(1.0)
    beyond = best1 + torch.tensor([1.0, 0.0], dtype=torch.float64)
    assert (_formula(best1) <= _formula(beyond)).all() and not reached(beyond)


def test_params_level_rejects_rotations_with_a_fix():
    with pytest.raises(ValueError, match=r"\['rotate_only', 'rotograd', 'rotogradnorm'\] cannot run at level='params'"
                                         r".*--method-option rotograd.level=rep") as info:
        gs.compare("toy", ["mgda", *ROTATIONS], level="params", progress=False)
    fix = ast.literal_eval(str(info.value).split("method_options=")[1].split(" (command line")[0])  # the suggested fix
    plan = runner.prepare("toy", ["mgda", *ROTATIONS], level="params", method_options=fix)
    assert plan.level == "params" and all(plan.options[m] == {"level": "rep"} for m in ROTATIONS)
    with pytest.raises(ValueError, match="level must be one of"):
        gs.compare("toy", ["mgda"], level="parameters", progress=False)


def _builds_for_two_tasks(method: str) -> bool:
    try:
        gs.methods.create(method).bind(2, device=torch.device("cpu"), dtype=torch.float64,
                                       generator=torch.Generator())
    except ValueError:
        return False
    return True


def test_compare_toy_reports_end_point_and_reached_for_every_method_and_start(tmp_path):
    methods = gs.methods.available()
    rep_only = [m for m in methods if "params" not in gs.methods.get(m).levels]
    assert set(ROTATIONS) <= set(rep_only)
    results = gs.compare(Toy(steps_per_epoch=3), methods, epochs=1, level="params", progress=False,
                         method_options={m: {"level": "rep"} for m in rep_only})
    data = json.loads(results.to_json(tmp_path / "r.json").read_text())
    assert data["level"] == "params"
    runs = {(r["method"], r["seed"]): r for r in data["runs"]}
    assert set(runs) == {(m, s) for m in methods for s in range(len(STARTS))}
    table = results.table("markdown")
    assert "| method | from (-8.5, 7.5) | from (-8.5, -5) | from (9, 9) | from (-7.5, -0.5) | from (9, -1) |" in table
    for (method, seed), r in runs.items():
        if not _builds_for_two_tasks(method):  # e.g. Krum needs n_byzantine + 3 tasks: marked failed, with why
            assert r["status"] == "failed" and "tasks" in r["error"]
            continue
        if method in ("modo", "sdmgrad"):  # they split the batch; the toy's batch is one point
            assert r["status"] == "failed" and "batch of 1" in r["error"]
            continue
        assert r["status"] == "ok", r["error"]
        assert r["level"] == ("rep" if method in rep_only else "params")
        out = r["outcome"]
        assert out["start"] == list(STARTS[seed])
        end = torch.tensor(out["end"], dtype=torch.float64)
        torch.testing.assert_close(end, torch.tensor(r["track"][-1], dtype=torch.float64))
        assert out["reached"] == bool(pareto_distance(end) <= PARETO_TOL)
        row = table.split(f"| {method} |")[-1].splitlines()[0]  # its row in the end-point table
        assert f"{'✓' if out['reached'] else '✗'} ({end[0]:.2f}, {end[1]:.2f})" in row


def test_cli_level_flag_reaches_the_runs(tmp_path):
    argv = ["compare", "--benchmark", "toy", "--level", "params", "--methods", "mgda", "--seeds", "0,4",
            "--epochs", "1", "--quiet", "--no-plots", "--format", "markdown", "--out", str(tmp_path)]
    assert cli.main(argv) == 0
    data = json.loads((tmp_path / "results.json").read_text())
    assert {r["level"] for r in data["runs"]} == {"params"}
    with (tmp_path / "results.csv").open() as f:
        header = f.readline().strip().split(",")
    for column in ("level", "end_0", "end_1", "pareto_distance", "reached"):
        assert column in header
    assert "from (9, -1)" in (tmp_path / "table.md").read_text()
