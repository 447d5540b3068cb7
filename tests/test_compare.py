"""gs.compare: Δm% against a hand computation, results I/O, validation before training,
divergence and failure handling, reproducibility, bundled benchmarks."""
from __future__ import annotations

import csv
import json
import math
import sys

import pytest
import torch

import gradsurgery as gs
from gradsurgery.compare import Results, Run, delta_m, runner
from gradsurgery.data import get
from gradsurgery.data.base import TensorBenchmark, mlp
from gradsurgery.data.digits import SHIFT, overlay
from gradsurgery.data.toy import STARTS, Toy
from gradsurgery.methods import registry


# -- Δm% and the results object --------------------------------------------------------
def hand_results() -> Results:
    """Two tasks (accuracy up, error down); baseline 'mean' finished seeds 0 and 1."""
    runs = [Run("mean", 0, metrics=[0.8, 0.2], steps=10, step_time=0.01),
            Run("mean", 1, metrics=[0.6, 0.4], steps=10, step_time=0.01),
            Run("mean", 2, status="diverged", error="ValueError: non-finite loss"),
            Run("x", 0, metrics=[0.77, 0.24], steps=10, step_time=0.02),
            Run("x", 1, metrics=[0.7, 0.3], steps=10, step_time=0.03),
            Run("x", 2, status="failed", error="RuntimeError: boom", steps=3, step_time=0.025)]
    return Results(benchmark="hand", tasks=["a", "b"], metrics=["acc", "err"], higher_is_better=[True, False],
                   methods=["mean", "x"], seeds=[0, 1, 2], epochs=1, baseline="mean", runs=runs)


def test_delta_m_matches_hand_computation():
    r = hand_results()
    # baseline = mean of its finished seeds = (0.7, 0.3)
    # x seed 0: 100/2 * ((0.77 - 0.7)/0.7 - (0.24 - 0.3)/0.3) = 50 * (0.1 + 0.2) = 15
    assert r.delta_m(r.runs[3]) == pytest.approx(15.0)
    assert r.delta_m(r.runs[4]) == pytest.approx(0.0, abs=1e-12)
    assert math.isnan(r.delta_m(r.runs[5]))  # failed: no Δm
    # baseline seed 0: 50 * (0.1/0.7 + 0.1/0.3) = 23.809523...
    assert r.delta_m(r.runs[0]) == pytest.approx(50 * (1 / 7 + 1 / 3))
    rows = {row["method"]: row for row in r.summary()}
    assert rows["x"]["delta_m"] == pytest.approx(7.5)
    assert rows["x"]["delta_m_std"] == pytest.approx(math.sqrt(2 * 7.5 ** 2))  # sample std of (15, 0)
    assert rows["x"]["metric"] == pytest.approx([0.735, 0.27])
    assert rows["mean"]["delta_m"] == pytest.approx(0.0, abs=1e-12)
    assert (rows["x"]["finished"], rows["x"]["failed"], rows["mean"]["diverged"]) == (2, 1, 1)
    assert rows["x"]["time_ratio"] == pytest.approx(0.025 / 0.01)
    assert r.best() == "x"


def test_delta_m_function():
    assert delta_m([2.0, 1.0], [1.0, 2.0], [True, False]) == pytest.approx(100 * (1.0 + 0.5) / 2)
    assert math.isnan(delta_m([1.0], [0.0], [True]))
    with pytest.raises(ValueError, match="one value per task"):
        delta_m([1.0, 2.0], [1.0], [True])


def test_table_csv_json(tmp_path):
    r = hand_results()
    text = r.table()
    lines = text.splitlines()
    header = next(line for line in lines if line.startswith("method"))
    for column in ("a acc ↑", "b err ↓", "Δm% ↑", "time/step", "seeds"):
        assert column in header
    row_x = next(line for line in lines if line.startswith("x "))
    assert "+7.50 ± 10.61" in row_x and "2.50x" in row_x and "2/3 (1 failed)" in row_x
    assert "x (seed 2) failed: RuntimeError: boom" in text
    md = r.table("markdown")
    assert "| method | a acc ↑ | b err ↓ | Δm% ↑ | time/step | seeds |" in md
    with pytest.raises(ValueError, match="markdown"):
        r.table("html")

    with r.to_csv(tmp_path / "r.csv").open() as f:
        rows = list(csv.DictReader(f))
    assert [(row["method"], row["seed"], row["status"]) for row in rows] == [
        (run.method, str(run.seed), run.status) for run in r.runs]
    assert float(rows[3]["delta_m_pct"]) == pytest.approx(15.0)
    assert float(rows[3]["a_acc"]) == 0.77 and math.isnan(float(rows[5]["a_acc"]))

    data = json.loads(r.to_json(tmp_path / "r.json").read_text())
    assert data["baseline"] == "mean" and data["tasks"] == ["a", "b"]
    assert data["runs"][3]["delta_m"] == pytest.approx(15.0)
    assert data["runs"][5]["delta_m"] is None  # NaN is written as null
    assert [s["method"] for s in data["summary"]] == ["x", "mean"]

    again = Results.from_json(tmp_path / "r.json")
    assert again.table() == r.table() and again.runs[5].status == "failed"


# -- validation before training ----------------------------------------------------------
@pytest.fixture
def no_training(monkeypatch):
    def forbidden(*args, **kwargs):
        raise AssertionError("training started although the arguments are invalid")
    monkeypatch.setattr(runner, "train_one", forbidden)


@pytest.mark.parametrize("kwargs, match", [
    ({"benchmark": "nope"}, "available benchmarks: regression, toy, multidigits, celeba-like"),
    ({"methods": ["mean", "nope"]}, "available methods: .*mgda"),
    ({"methods": ["mean"], "baseline": "nope"}, "unknown method"),
    ({"methods": "pcgrad"}, "list of names"),
    ({"methods": ["gradnorm"], "method_options": {"gradnorm": {"beta": 1}}}, "takes: alpha"),
    ({"methods": ["gradnorm"], "method_options": {"gradnorm": {"alpha": -1.0}}}, "alpha"),
    ({"methods": ["mean"], "method_options": {"pcgrad": {}}}, "not compared"),
    ({"methods": ["mean"], "seeds": []}, "seeds"),
    ({"methods": ["mean"], "seeds": [0, 0]}, "distinct"),
    ({"methods": ["mean"], "epochs": 0}, "epochs"),
    ({"benchmark": object()}, "lacks"),
])
def test_errors_before_training(no_training, kwargs, match):
    kwargs = {"benchmark": "regression", **kwargs}
    with pytest.raises((ValueError, TypeError), match=match):
        gs.compare(kwargs.pop("benchmark"), progress=False, **kwargs)


def test_missing_scikit_learn_names_the_install(monkeypatch):
    monkeypatch.setitem(sys.modules, "sklearn.datasets", None)
    with pytest.raises(ImportError, match=r"pip install 'gradsurgery\[examples\]'"):
        get("multidigits")


# -- divergence and failures: recorded, the other runs finish ------------------------------
@pytest.fixture
def broken_methods():
    @gs.methods.register("_test_nan_after_2")
    class NanAfter2(gs.methods.GramWeighting):
        def __init__(self):
            self.calls = 0

        def weights(self, gram, losses):
            self.calls += 1
            return torch.ones_like(losses) * (1.0 if self.calls <= 2 else float("nan"))

    @gs.methods.register("_test_raises")
    class Raises(gs.methods.GramWeighting):
        def weights(self, gram, losses):
            raise RuntimeError("solver exploded")

    @gs.methods.register("_test_live_weights")
    class LiveWeights(gs.methods.GramWeighting):
        """Returns the same tensor every step and changes it in place after the step."""

        def bind(self, num_tasks, **kwargs):
            super().bind(num_tasks, **kwargs)
            self.w = torch.ones(num_tasks)

        def weights(self, gram, losses):
            return self.w

        def after_step(self):
            self.w += 1

    yield
    for name in ("_test_nan_after_2", "_test_raises", "_test_live_weights"):
        registry._REGISTRY.pop(name)


def test_diverged_and_failed_runs_are_recorded(broken_methods):
    with pytest.warns(RuntimeWarning, match="solver exploded"):
        r = gs.compare("regression", ["_test_nan_after_2", "_test_raises"], seeds=[0, 1], epochs=2, progress=False)
    status = {(run.method, run.seed): run.status for run in r.runs}
    assert status == {("mean", 0): "ok", ("mean", 1): "ok",
                      ("_test_nan_after_2", 0): "diverged", ("_test_nan_after_2", 1): "diverged",
                      ("_test_raises", 0): "failed", ("_test_raises", 1): "failed"}
    nan_run = r.runs_of("_test_nan_after_2")[0]
    assert nan_run.steps == 3 and "non-finite" in nan_run.error  # the NaN step ran, the next loss was NaN
    text = r.table()
    assert "0/2 (2 diverged)" in text and "0/2 (2 failed)" in text
    assert r.best() == "mean"


def test_recorded_weights_are_snapshots(broken_methods):
    r = gs.compare(TinyThreeTasks(), ["_test_live_weights"], seeds=[0], epochs=2, progress=False)
    assert r.runs_of("_test_live_weights")[0].weights == [[float(i)] * 3 for i in range(1, 5)]


# -- reproducibility ---------------------------------------------------------------------
def test_same_seed_same_numbers():
    def run(seeds):
        r = gs.compare("regression", ["pcgrad"], seeds=seeds, epochs=1, progress=False)
        return [(x.metrics, x.curves, x.train_losses, x.weights, x.cosine) for x in r.runs]

    first = run([0])
    assert first == run([0])
    assert first != run([1])


# -- a user's own benchmark ------------------------------------------------------------------
class TinyThreeTasks(TensorBenchmark):
    name = "tiny"
    tasks = ("u", "v", "w")
    metrics = ("mse", "mse", "mse")
    higher_is_better = (False, False, False)
    rep_size = 8
    batch_size = 32

    def __init__(self):
        g = torch.Generator().manual_seed(0)
        x = torch.randn(96, 4, generator=g)
        ys = [x[:, :1] * 2, -x[:, 1:2], x[:, 2:3] ** 2]
        self.x_train, self.x_test = x[:64], x[64:]
        self.y_train, self.y_test = [y[:64] for y in ys], [y[64:] for y in ys]

    def build(self, seed):
        return mlp([4, self.rep_size]), [torch.nn.Linear(self.rep_size, 1) for _ in self.tasks]

    def losses(self, outputs, targets):
        return [torch.nn.functional.mse_loss(o, t) for o, t in zip(outputs, targets)]

    def metric_values(self, outputs, targets):
        return [torch.nn.functional.mse_loss(o, t).item() for o, t in zip(outputs, targets)]


def test_custom_benchmark_and_options():
    r = gs.compare(TinyThreeTasks(), ["mgda", "gradnorm"], seeds=[3], epochs=2,
                   method_options={"gradnorm": {"alpha": 0.5, "method_lr": 0.0}}, progress=False)
    assert r.benchmark == "tiny" and r.methods == ["mean", "mgda", "gradnorm"]
    for run in r.runs:
        assert run.ok and len(run.curves) == 2 and len(run.metrics) == 3 and run.steps == 4
        assert all(len(w) == 3 for w in run.weights)
    # method_lr=0 freezes GradNorm's weights at their start (ones)
    assert r.runs_of("gradnorm")[0].weights[-1] == [1.0, 1.0, 1.0]
    assert len(r.runs_of("mgda")[0].cosine) == 4 and not r.runs_of("mean")[0].cosine


# -- bundled benchmarks ------------------------------------------------------------------
def test_benchmarks_are_generated_from_a_seed():
    a, b, c = get("regression"), get("regression"), get("regression", seed=1)
    assert torch.equal(a.x_train, b.x_train) and torch.equal(a.y_train[3], b.y_train[3])
    assert not torch.equal(a.x_train, c.x_train)
    celeba = get("celeba-like")
    assert len(celeba.tasks) >= 8
    rates = torch.cat([y.mean(0) for y in celeba.y_train])
    assert set(torch.cat(celeba.y_train).unique().tolist()) == {0.0, 1.0}
    assert 0.05 < rates.min() < rates.max() < 0.6


def test_regression_conflict_and_scale():
    def corr(bench):
        y = torch.cat([bench.y_train[0], bench.y_train[1]], 1).T
        return torch.corrcoef(y)[0, 1].item()

    assert corr(get("regression", conflict=0.0)) > 0.98  # one shared function, up to noise
    assert abs(corr(get("regression", conflict=1.0))) < 0.6
    bench = get("regression")
    ratio = bench.y_train[3].std() / bench.y_train[0].std()
    assert 30 < ratio < 300  # the last task's targets are ~100x larger


def test_multidigits_overlay():
    bench = get("multidigits", n_train=50, n_test=20)
    assert bench.x_train.shape == (50, 8 * (8 + SHIFT))
    left, right = torch.rand(3, 8, 8), torch.rand(3, 8, 8)
    canvas = overlay(left, right)
    assert torch.equal(canvas[:, :, :SHIFT], left[:, :, :SHIFT])
    assert torch.equal(canvas[:, :, 8:], right[:, :, 8 - SHIFT:])
    assert torch.equal(canvas[:, :, SHIFT:8], torch.maximum(left[:, :, SHIFT:], right[:, :, :8 - SHIFT]))


def test_toy_tracks_trajectories(tmp_path):
    r = gs.compare(Toy(steps_per_epoch=4), ["mgda"], seeds=[0, 2], epochs=2, progress=False)
    for run in r.runs:
        assert len(run.track) == 8
        start = torch.tensor(STARTS[run.seed])
        assert torch.allclose(torch.tensor(run.track[0]), start, atol=2 * Toy.lr)
    paths = r.plot(tmp_path)
    assert tmp_path / "toy_trajectories.png" in paths
