"""The benchmark script runs end to end (``--smoke``: tiny model, one configuration) and
its table and JSON have the promised structure. Times are not checked: this is about the
script, the performance itself is guarded by tests/test_cost_model.py."""
import json
import subprocess
import sys
from pathlib import Path

import pytest

import gradsurgery as gs

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "benchmarks" / "step_time.py"


@pytest.fixture(scope="module")
def smoke(tmp_path_factory):
    out = tmp_path_factory.mktemp("bench")
    proc = subprocess.run([sys.executable, str(SCRIPT), "--smoke", "--threads", "1", "--out", str(out)],
                          capture_output=True, text=True, timeout=300, cwd=ROOT)
    assert proc.returncode == 0, proc.stderr[-3000:]
    report = json.loads((out / "step_time-smoke.json").read_text())
    return proc.stdout, report, (out / "step_time-smoke.md").read_text()


def _table_rows(markdown: str) -> list[list[str]]:
    return [[c.strip() for c in line.strip().strip("|").split("|")]
            for line in markdown.splitlines() if line.startswith("| ") and not line.startswith("| row")]


def test_every_registered_method_has_a_row(smoke):
    _, report, _ = smoke
    rep = {r["method"] for r in report["records"] if r["lib"] == "gradsurgery" and r["level"] == "rep"}
    assert rep == {name for name in gs.methods.available() if "rep" in gs.methods.get(name).levels}
    for r in report["records"]:  # the harness runs no method at a level it refuses (moco: params only)
        if r["lib"] == "gradsurgery" and r["method"] in gs.methods.available():
            assert r["level"] in gs.methods.get(r["method"]).levels, r["key"]
    for r in report["records"]:
        if r["lib"] == "gradsurgery" and r["level"] == "rep":  # measured, or its defaults need more tasks
            needs_tasks = "needs at least 3 tasks" in " ".join(r.get("notes", []))  # (Krum, TrimmedMean at K=2)
            assert ("time_ratio" in r and "memory_ratio" in r) or needs_tasks, (r["key"], r.get("notes"))


def test_reference_rows_are_measured_or_explained(smoke):
    _, report, _ = smoke
    libs = {}
    for r in report["records"]:
        libs.setdefault(r["lib"], set()).add(r["method"])
    assert libs["torchjd"] == {"Mean", "PCGrad", "MGDA", "UPGrad"}
    assert libs["naive"] == {"PCGrad"}
    assert libs["rotograd"] == {"RotateOnly", "RotoGrad", "RotoGradNorm"}
    for r in report["records"]:
        # a row either has both measurements or a note saying why not
        assert ("time_ratio" in r and "memory_ratio" in r) or r.get("notes"), r["key"]


def test_measurements_are_consistent(smoke):
    _, report, _ = smoke
    measured = [r for r in report["records"] if "time_ratio" in r]
    assert measured
    for r in measured:
        assert r["rounds"] >= 2
        assert 0 < r["time_q25"] <= r["time_ratio"] <= r["time_q75"]
        assert r["plain_ms"] > 0 and r["row_ms"] > 0
    for r in report["records"]:
        if "memory_ratio" in r:
            assert r["peak_mb"] > 0 and r["plain_peak_mb"] > 0
            assert r["memory_ratio"] == pytest.approx(r["peak_mb"] / r["plain_peak_mb"])


def test_table_matches_json(smoke):
    stdout, report, markdown = smoke
    assert markdown in stdout
    assert "### d = 16" in markdown and "| row | time K=2 | memory K=2 |" in markdown
    rows = _table_rows(markdown.split("### Targets")[0])
    assert rows[0][0].startswith("plain") and rows[0][1].endswith("ms") and rows[0][2].endswith("MB")
    labels = [row[0] for row in rows[1:]]
    assert labels == [r["label"] for r in report["records"]]
    for row, rec in zip(rows[1:], report["records"]):
        if "time_ratio" in rec:
            assert row[1].startswith(f"{rec['time_ratio']:.2f}x (")
        else:
            assert row[1] == "skipped"
    machine = report["machine"]
    assert machine["cpu"] and machine["torch_threads"] == 1
    assert "Machine: " in markdown and "1 threads" in markdown
    assert "OpenMP/MKL environment variables" in markdown and "OMP_WAIT_POLICY=PASSIVE" not in markdown


def test_targets_are_listed(smoke):
    _, report, markdown = smoke
    names = [t["target"] for t in report["targets"]]
    assert "`pcgrad` <= 1.3x at K=32" in names and "`rotograd` <= 0.4x rotograd's `RotoGrad`" in names
    # the smoke configuration is not the targets' (d=256): nothing can be claimed
    assert {t["status"] for t in report["targets"]} == {"n/a"}
    assert "### Targets" in markdown
