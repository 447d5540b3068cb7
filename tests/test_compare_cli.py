"""``python -m gradsurgery compare``: a smoke run on tiny settings (table columns, CSV,
JSON, valid PNGs) and the errors raised before any training."""
from __future__ import annotations

import csv
import json
import math
import runpy
import sys

import pytest

from gradsurgery.compare import cli, runner

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


def test_cli_smoke(tmp_path, capsys, monkeypatch):
    """``python -m gradsurgery compare`` on tiny settings, run in-process through the
    package's ``__main__``."""
    out = tmp_path / "out"
    monkeypatch.setattr(sys, "argv", ["gradsurgery", "compare", "--benchmark", "regression", "--methods",
                                      "mean,mgda", "--seeds", "0", "--epochs", "1", "--out", str(out), "--quiet"])
    with pytest.raises(SystemExit) as exit_:
        runpy.run_module("gradsurgery", run_name="__main__", alter_sys=True)
    assert exit_.value.code == 0
    captured = capsys.readouterr()
    assert "epoch/s" not in captured.err  # --quiet: no progress bar
    printed = captured.out
    header = next(line for line in printed.splitlines() if line.startswith("method"))
    assert header.split() == ["method", "y1", "nmse", "↓", "y2", "nmse", "↓", "y3", "nmse", "↓",
                              "y4", "nmse", "↓", "Δm%", "↑", "time/step", "seeds"]
    assert "best Δm%:" in printed

    with (out / "results.csv").open() as f:
        rows = list(csv.DictReader(f))
    assert [(r["method"], r["seed"], r["status"]) for r in rows] == [("mean", "0", "ok"), ("mgda", "0", "ok")]
    assert float(rows[0]["delta_m_pct"]) == 0.0 and float(rows[0]["time_ratio"]) == 1.0
    for row in rows:
        assert all(math.isfinite(float(row[f"y{k}_nmse"])) for k in range(1, 5))
        assert float(row["step_time_s"]) > 0

    data = json.loads((out / "results.json").read_text())
    assert data["benchmark"] == "regression" and data["methods"] == ["mean", "mgda"] and data["epochs"] == 1
    runs = {r["method"]: r for r in data["runs"]}
    assert runs["mgda"]["metrics"] == [float(rows[1][f"y{k}_nmse"]) for k in range(1, 5)]
    assert len(runs["mgda"]["curves"]) == 1 and len(runs["mgda"]["weights"]) == runs["mgda"]["steps"] == 10
    assert (out / "table.md").read_text().startswith("regression:")

    import matplotlib.image
    pngs = sorted(p.name for p in out.glob("*.png"))
    assert pngs == ["delta_m.png", "grad_cosine.png", "metrics.png", "task_weights.png"]
    for name in pngs:
        path = out / name
        assert path.read_bytes()[:8] == PNG_SIGNATURE
        image = matplotlib.image.imread(path)
        assert image.ndim == 3 and min(image.shape[:2]) > 100


def test_list(capsys):
    assert cli.main(["compare", "--list"]) == 0
    printed = capsys.readouterr().out
    for name in ("regression", "toy", "multidigits", "celeba-like", "mean", "pcgrad", "gradnorm"):
        assert f"  {name} " in printed
    assert "alpha" in printed  # methods are listed with their options


@pytest.fixture
def no_training(monkeypatch):
    def forbidden(*args, **kwargs):
        raise AssertionError("training started although the command line is invalid")
    monkeypatch.setattr(runner, "train_one", forbidden)


@pytest.mark.parametrize("extra, match", [
    (["--benchmark", "imagenet"], "available benchmarks: regression"),
    (["--methods", "mean,nope"], "available methods:"),
    (["--method-option", "gradnorm.beta=2", "--methods", "gradnorm"], "takes: alpha"),
    (["--method-option", "gradnorm-alpha=2"], "METHOD.OPTION=VALUE"),
    (["--seeds", "0,x"], "--seeds"),
])
def test_cli_errors_before_training(no_training, tmp_path, capsys, extra, match):
    code = cli.main(["compare", "--out", str(tmp_path), "--quiet", *extra])
    assert code == 2
    assert match in capsys.readouterr().err


def test_cli_unwritable_out_dir(no_training, tmp_path, capsys):
    blocker = tmp_path / "a-file"
    blocker.write_text("")
    assert cli.main(["compare", "--out", str(blocker / "out"), "--quiet"]) == 2
    err = capsys.readouterr().err
    assert "cannot write to the output folder" in err and "--out" in err


def test_cli_missing_matplotlib(no_training, tmp_path, capsys, monkeypatch):
    monkeypatch.setitem(sys.modules, "matplotlib", None)
    assert cli.main(["compare", "--out", str(tmp_path), "--quiet"]) == 2
    assert "pip install 'gradsurgery[plot]'" in capsys.readouterr().err


def test_parse_method_options():
    assert cli.parse_method_options(["gradnorm.alpha=0.5", "mgda.normalization=loss", "x.y=[1, 2]"]) == {
        "gradnorm": {"alpha": 0.5}, "mgda": {"normalization": "loss"}, "x": {"y": [1, 2]}}
