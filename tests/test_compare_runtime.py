"""gs.compare at run time: a method that raises anywhere in a run (fork, backward,
evaluation) is recorded as failed and the other runs are kept; rotation options on
feature maps; the command line loads a user's benchmark and methods; the subpackage
``gradsurgery.compare`` and the function ``gs.compare`` coexist; ``import gradsurgery``
stays light and the dependencies point compare -> data -> core."""
from __future__ import annotations

import ast
import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from torch import nn

import gradsurgery as gs
from gradsurgery.data.base import TensorBenchmark
from gradsurgery.methods import registry

PACKAGE = Path(gs.__file__).parent


class ConvHead(nn.Module):
    def __init__(self, channels: int):
        super().__init__()
        self.conv = nn.Conv2d(channels, 1, 1)

    def forward(self, z):
        return self.conv(z).mean(dim=(1, 2, 3)).unsqueeze(1)


class FeatureMaps(TensorBenchmark):
    """Two regression tasks read from a ``4 x 3 x 3`` feature map."""

    name = "feature-maps"
    tasks = ("a", "b")
    metrics = ("mse", "mse")
    higher_is_better = (False, False)
    rep_size = 4 * 3 * 3
    batch_size = 16
    threads = 1

    def __init__(self):
        g = torch.Generator().manual_seed(0)
        x = torch.randn(48, 2, 3, 3, generator=g)
        ys = [x.mean(dim=(1, 2, 3)).unsqueeze(1), x[:, :1].pow(2).mean(dim=(1, 2, 3)).unsqueeze(1)]
        self.x_train, self.x_test = x[:32], x[32:]
        self.y_train, self.y_test = [y[:32] for y in ys], [y[32:] for y in ys]

    def build(self, seed):
        return nn.Sequential(nn.Conv2d(2, 4, 3, padding=1), nn.Tanh()), [ConvHead(4), ConvHead(4)]

    def losses(self, outputs, targets):
        return [nn.functional.mse_loss(o, t) for o, t in zip(outputs, targets)]

    def metric_values(self, outputs, targets):
        return [nn.functional.mse_loss(o, t).item() for o, t in zip(outputs, targets)]


def test_rotations_on_feature_maps():
    """``rotation_shape``/``post_shape`` in method_options: rotate the 4 channels at each of
    the 3 x 3 positions (the benchmark's ``rep_size`` is not used then)."""
    options = {"rotograd": {"rotation_shape": 4, "post_shape": (3, 3), "method_lr": 0.01}}
    r = gs.compare(FeatureMaps(), ["rotograd"], seeds=[0], epochs=1, method_options=options, progress=False)
    run = r.runs_of("rotograd")[0]
    assert run.ok, run.error
    assert run.steps == 2 and len(run.curves) == 1 and len(run.weights) == 2


def test_rotations_added_to_any_method():
    options = {"mgda": {"rotation": True, "rotation_shape": 4, "post_shape": (3, 3)}}
    r = gs.compare(FeatureMaps(), ["mgda"], seeds=[0], epochs=1, method_options=options, progress=False)
    assert r.runs_of("mgda")[0].ok, r.runs_of("mgda")[0].error
    with pytest.raises(ValueError, match="rotation=True"):  # the shape without the rotations
        gs.compare(FeatureMaps(), ["mgda"], method_options={"mgda": {"rotation_shape": 4}}, progress=False)


def test_rotation_failing_at_run_time_marks_the_method_failed():
    """Eight rotated channels do not fit four: fork raises in the first step of every
    rotograd run; those runs are failed, the others finish."""
    options = {"rotograd": {"rotation_shape": 8, "post_shape": (3, 3)}}
    with pytest.warns(RuntimeWarning, match="rotograd.*does not fit"):
        r = gs.compare(FeatureMaps(), ["mgda", "rotograd"], seeds=[0, 1], epochs=1, method_options=options,
                       progress=False)
    status = {(run.method, run.seed): run.status for run in r.runs}
    assert status == {("mean", 0): "ok", ("mean", 1): "ok", ("mgda", 0): "ok", ("mgda", 1): "ok",
                      ("rotograd", 0): "failed", ("rotograd", 1): "failed"}
    assert all("does not fit" in run.error and run.steps == 0 for run in r.runs_of("rotograd"))
    assert "0/2 (2 failed)" in r.table()


def test_rotation_options_are_validated_before_training():
    with pytest.raises(ValueError, match="post_shape"):  # a method without rotations
        gs.compare(FeatureMaps(), ["mgda"], method_options={"mgda": {"post_shape": (3, 3)}}, progress=False)


@pytest.fixture
def flaky_methods():
    @gs.methods.register("_test_fails_in_eval")
    class FailsInEval(gs.methods.GramWeighting):
        """Fine while training; its evaluation (a fork under no_grad) raises."""

        def weights(self, gram, losses):
            return torch.ones_like(losses)

    yield FailsInEval
    registry._REGISTRY.pop("_test_fails_in_eval")


def test_failure_during_evaluation_is_recorded(flaky_methods, monkeypatch):
    original = gs.MultiTaskOptimizer.fork

    def fork(self, z):
        if not torch.is_grad_enabled() and isinstance(self.method, flaky_methods):
            raise RuntimeError("evaluation exploded")
        return original(self, z)

    monkeypatch.setattr(gs.MultiTaskOptimizer, "fork", fork)
    with pytest.warns(RuntimeWarning, match="evaluation exploded"):
        r = gs.compare(FeatureMaps(), ["_test_fails_in_eval"], seeds=[0], epochs=2, progress=False)
    bad = r.runs_of("_test_fails_in_eval")[0]
    assert bad.status == "failed" and "evaluation exploded" in bad.error and bad.steps == 2
    assert r.runs_of("mean")[0].ok


# -- the subpackage and the function ----------------------------------------------------------
def test_subpackage_and_function_coexist(tmp_path):
    import gradsurgery
    import gradsurgery.compare as module
    assert gradsurgery.compare is module
    results = gradsurgery.compare(FeatureMaps(), ["mean"], seeds=[0], epochs=1, progress=False)
    path = results.to_json(tmp_path / "r.json")
    again = gradsurgery.compare.Results.from_json(path)
    assert again.table() == results.table()
    from gradsurgery.compare import compare
    assert compare(FeatureMaps(), ["mean"], seeds=[0], epochs=1, progress=False).runs[0].ok


def test_import_is_light():
    """``import gradsurgery`` adds no compare tool, benchmarks, tqdm or matplotlib to what
    ``import torch`` loads (torch.hub itself imports tqdm's core when it is installed); the
    benchmarks import without the compare tool; ``gs.compare`` loads it on first use."""
    code = ("import sys, torch\n"
            "before = set(sys.modules)\n"
            "heavy = ('gradsurgery.compare', 'gradsurgery.data', 'tqdm', 'matplotlib')\n"
            "added = lambda: [h for h in heavy if any(m.startswith(h) for m in set(sys.modules) - before)]\n"
            "import gradsurgery as gs\n"
            "print(added())\n"
            "import gradsurgery.data, gradsurgery.data.toy\n"
            "print(added())\n"
            "gs.compare\n"
            "print(added())\n")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True,
                         cwd=PACKAGE.parent).stdout
    assert out.splitlines() == ["[]", "['gradsurgery.data']", "['gradsurgery.compare', 'gradsurgery.data', 'tqdm']"]


def _imports(path: Path) -> set[str]:
    """The gradsurgery subpackages ``path`` imports (top level and inside functions)."""
    package = list(path.relative_to(PACKAGE.parent).parent.parts)  # e.g. ["gradsurgery", "data"]
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        names = []
        if isinstance(node, ast.Import):
            names = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                base = ".".join(package[:len(package) - node.level + 1] + ([base] if base else []))
            names = [base] + [f"{base}.{a.name}" for a in node.names]
        for name in names:
            parts = name.split(".")
            if parts[0] == "gradsurgery" and len(parts) > 1:
                found.add(parts[1])
    return found


def test_dependencies_point_compare_data_core():
    for path in sorted(PACKAGE.rglob("*.py")):
        top = path.relative_to(PACKAGE).parts[0].removesuffix(".py")
        if top in ("__init__", "__main__", "compare"):
            continue
        used = _imports(path)
        forbidden = {"compare"} if top == "data" else {"compare", "data"}
        assert not used & forbidden, f"{path.relative_to(PACKAGE)} imports {sorted(used & forbidden)}"


# -- the command line: a user's benchmark and methods -----------------------------------------
USER_BENCHMARK = '''
import torch
from torch import nn
from gradsurgery.data.base import TensorBenchmark, mlp

class Tiny(TensorBenchmark):
    name = "user-tiny"
    tasks = ("u", "v")
    metrics = ("mse", "mse")
    higher_is_better = (False, False)
    rep_size = 6
    batch_size = 16

    def __init__(self):
        g = torch.Generator().manual_seed(0)
        x = torch.randn(48, 3, generator=g)
        ys = [x[:, :1], -x[:, 1:2] * 3]
        self.x_train, self.x_test = x[:32], x[32:]
        self.y_train, self.y_test = [y[:32] for y in ys], [y[32:] for y in ys]

    def build(self, seed):
        return mlp([3, 6]), [nn.Linear(6, 1), nn.Linear(6, 1)]

    def losses(self, outputs, targets):
        return [nn.functional.mse_loss(o, t) for o, t in zip(outputs, targets)]

    def metric_values(self, outputs, targets):
        return [nn.functional.mse_loss(o, t).item() for o, t in zip(outputs, targets)]

INSTANCE = Tiny()
'''

USER_METHOD = '''
import torch
import gradsurgery as gs

@gs.methods.register("_cli_user_halves")
class Halves(gs.methods.GramWeighting):
    def weights(self, gram, losses):
        return torch.full_like(losses, 0.5)
'''


@pytest.fixture
def user_code(tmp_path, monkeypatch):
    (tmp_path / "user_bench_mod.py").write_text(USER_BENCHMARK)
    (tmp_path / "user_method_mod.py").write_text(USER_METHOD)
    monkeypatch.syspath_prepend(str(tmp_path))
    yield tmp_path
    registry._REGISTRY.pop("_cli_user_halves", None)
    for name in ("user_bench_mod", "user_method_mod"):
        sys.modules.pop(name, None)


@pytest.mark.parametrize("target", ["user_bench_mod:Tiny", "user_bench_mod:INSTANCE"])
def test_cli_user_benchmark_and_method(user_code, capsys, target):
    from gradsurgery.compare import cli
    out = user_code / "out"
    code = cli.main(["compare", "--benchmark", target, "--import", "user_method_mod", "--methods",
                     "_cli_user_halves", "--seeds", "0", "--epochs", "1", "--no-plots", "--quiet", "--out", str(out)])
    assert code == 0, capsys.readouterr().err
    data = json.loads((out / "results.json").read_text())
    assert data["benchmark"] == "user-tiny" and data["methods"] == ["mean", "_cli_user_halves"]
    assert all(run["status"] == "ok" for run in data["runs"])
    halves = next(run for run in data["runs"] if run["method"] == "_cli_user_halves")
    assert halves["weights"][0] == [0.5, 0.5]


def test_cli_list_shows_imported_methods(user_code, capsys):
    from gradsurgery.compare import cli
    assert cli.main(["compare", "--import", "user_method_mod", "--list"]) == 0
    assert "_cli_user_halves" in capsys.readouterr().out


@pytest.mark.parametrize("extra, match", [
    (["--benchmark", "no_such_module_xyz:Bench"], "cannot import module 'no_such_module_xyz'"),
    (["--benchmark", "user_bench_mod:Nope"], "has no attribute 'Nope'"),
    (["--benchmark", "user_bench_mod:"], "package.module:Name"),
    (["--import", "no_such_module_xyz"], "--import"),
    (["--methods", "_cli_user_halves"], "--import"),  # an unknown method: the hint says how to load one
])
def test_cli_user_code_errors(user_code, capsys, monkeypatch, extra, match):
    from gradsurgery.compare import cli, runner

    def forbidden(*args, **kwargs):
        raise AssertionError("training started although the command line is invalid")

    monkeypatch.setattr(runner, "train_one", forbidden)
    assert cli.main(["compare", "--out", str(user_code / "o"), "--quiet", "--no-plots", *extra]) == 2
    assert match in capsys.readouterr().err


def test_runs_mark_epochs_and_hand_famo_its_post_step_losses():
    """The runner calls ``opt.end_epoch()`` after each epoch (DWA's, STCH's statistics) and,
    for methods that learn from the losses after the step (FAMO), ``opt.observe`` after each
    step with the same batch re-evaluated."""
    calls = {"epochs": 0, "observed": []}

    @gs.methods.register("test_counting_observer")
    class CountingObserver(gs.methods.LossWeighting):
        observes_losses = True

        def end_epoch(self):
            calls["epochs"] += 1

        def observe(self, losses):
            calls["observed"].append(losses.clone())

    try:
        r = gs.compare(FeatureMaps(), ["test_counting_observer"], seeds=[0], epochs=3, progress=False)
    finally:
        registry._REGISTRY.pop("test_counting_observer")
    run = r.runs_of("test_counting_observer")[0]
    assert run.ok, run.error
    assert calls["epochs"] == 3 and len(calls["observed"]) == run.steps == 6
    assert all(o.shape == (2,) and torch.isfinite(o).all() for o in calls["observed"])
