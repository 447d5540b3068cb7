"""Per-step cost of every gradsurgery method against plain ``sum(losses).backward()``,
the ``rotograd`` package, torchjd's ``mtl_backward`` and naive K-pass PCGrad.

Usage::

    python benchmarks/step_time.py --quick        # d=256, K in {2, 8}: under 2 minutes
    python benchmarks/step_time.py                # the full grid, capped by --max-minutes (12)
    python benchmarks/step_time.py --docs         # full grid, and regenerate docs/benchmarks.md

Prints a markdown table and writes ``benchmarks/results/step_time[-quick|-smoke].{json,md}``.

Time is a ratio to plain backward measured in the same process, interleaved: the median of
paired per-round ratios, with the interquartile range. Memory is the peak heap memory
above imports, one fresh forked process per (row, configuration), as a ratio to plain's.
How both are measured is explained in ``benchmarks/_measure.py``. The model: an MLP backbone
64-1024-1024-d, heads d-256-1 with MSE losses, Adam, batch 256.

The measurements run in the environment users have: no ``OMP_WAIT_POLICY`` or other
threading-policy override (the environment variables that steer OpenMP/MKL, whatever they
are, are recorded with the results). The ``rotograd`` rows run in this interpreter (with
geotorch 0.4, through :func:`_workloads.import_rotograd`'s alias), or in another one given
by ``--ref-python`` (e.g. one with geotorch 0.3); without rotograd or torchjd, those rows
are skipped with a note.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import re
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
sys.path.append(str(HERE.parent))  # gradsurgery from this checkout when it is not installed

import _measure  # noqa: E402
import _workloads as W  # noqa: E402
import torch  # noqa: E402

ROOT = HERE.parent
DOCS = ROOT / "docs"
REF_PYTHONS = (ROOT / ".venv-ref" / "bin" / "python", ROOT / ".venv-bench" / "bin" / "python")
#: Environment variables recorded with the results (threading policies of OpenMP and MKL).
ENV_PREFIXES = ("OMP_", "MKL_", "KMP_", "GOMP_")

#: Every configuration row set: ``all`` (every row), ``rep`` (no parameter-level rows),
#: ``rotations`` (only rotation rows, at full width even above ``SUBSPACE``), ``riemannian``
#: (``rotograd`` with ``rotation_param="riemannian"`` at full width: the other
#: parametrisations cost 30-150x plain at d = 2048).
_FULL_TIMING = {"min_rounds": 3, "max_rounds": 9, "budget_s": 1.0}
#: Modes: per configuration (d, K, row set, measure memory?, timing rounds), in the order
#: they run (the full run stops starting new ones after --max-minutes: targets first).
MODES: dict[str, dict[str, Any]] = {
    "full": {"grid": [(256, 8, "all", True, _FULL_TIMING), (256, 32, "rep", False, _FULL_TIMING),
                      (256, 2, "all", True, _FULL_TIMING), (64, 8, "rep", True, _FULL_TIMING),
                      (1024, 8, "rep", True, _FULL_TIMING), (1024, 2, "rotations", True, _FULL_TIMING),
                      (2048, 8, "riemannian", True, _FULL_TIMING)]},
    "quick": {"grid": [(256, 8, "all", True, {"min_rounds": 3, "max_rounds": 3, "budget_s": 0.0, "warmup": 1}),
                       (2048, 8, "riemannian", True, {"min_rounds": 3, "max_rounds": 3, "budget_s": 0.0,
                                                      "warmup": 1}),
                       (256, 2, "all", False, {"min_rounds": 3, "max_rounds": 3, "budget_s": 0.0, "warmup": 1})]},
    "smoke": {"grid": [(16, 2, "all", True, {"min_rounds": 2, "max_rounds": 2, "budget_s": 0.0, "warmup": 1})],
              "tiny": True},
}
#: Subspace width of the rotation rows at d > this width (except in ``rotations`` sets).
SUBSPACE = 256


# -- rows -------------------------------------------------------------------------------
def rows_for(d: int, row_set: str) -> list[dict[str, Any]]:
    """The benchmarked rows for features ``d``: each registered gradsurgery method at the
    representation level (and, in the ``all`` set, the parameter level when it exists),
    torchjd, naive PCGrad and the rotograd package. Rotations wider than ``SUBSPACE`` act on
    a ``SUBSPACE``-wide subspace, except in the ``rotations`` set (full width)."""
    import gradsurgery as gs
    if row_set == "riemannian":
        return [_keyed({"lib": "gradsurgery", "method": "rotograd", "level": "rep", "rotation_param": "riemannian"})]
    rows: list[dict[str, Any]] = []
    wide = row_set == "rotations"
    levels = ["rep"] + (["params"] if row_set == "all" and W.gradsurgery_supports("level") else [])
    sub = {"rotation_size": SUBSPACE} if d > SUBSPACE and not wide else {}
    for name in gs.methods.available():
        rotation = bool(getattr(gs.methods.get(name), "rotation", False))
        if wide and not rotation:
            continue
        accepted = getattr(gs.methods.get(name), "levels", ("rep", "params"))  # skip what a method refuses
        for level in (lv for lv in levels if lv in accepted):
            rows.append({"lib": "gradsurgery", "method": name, "level": level} | (sub if rotation else {}))
    if not wide:
        rows += [{"lib": "torchjd", "method": a} for a in W.TORCHJD_AGGREGATORS]
        rows.append({"lib": "naive", "method": "PCGrad"})
    rows += [{"lib": "rotograd", "method": cls} | sub for cls in W.ROTOGRAD_CLASSES]
    if d == SUBSPACE or wide:  # the parametrisations side by side, as trained and as started
        for param in ("cayley", "riemannian"):
            rows.append({"lib": "gradsurgery", "method": "rotograd", "level": "rep", "rotation_param": param})
        for param in ("expm", "cayley"):
            rows.append({"lib": "gradsurgery", "method": "rotograd", "level": "rep", "rotation_param": param,
                         "trained": True})
        rows.append({"lib": "rotograd", "method": "RotoGrad", "trained": True})
    return [_keyed(row) for row in rows]


def _keyed(row: dict[str, Any]) -> dict[str, Any]:
    return row | {"key": row_key(row), "label": row_label(row)}


def row_key(row: dict[str, Any]) -> str:
    parts = [row["lib"], row["method"]] + ([row["level"]] if "level" in row else [])
    if row.get("rotation_size"):
        parts.append(f"r{row['rotation_size']}")
    if row.get("rotation_param", "expm") != "expm":
        parts.append(row["rotation_param"])
    if row.get("trained"):
        parts.append("trained")
    return ":".join(parts)


def row_label(row: dict[str, Any]) -> str:
    sub = f", {row['rotation_size']}-wide subspace" if row.get("rotation_size") else ""
    sub += f", {row['rotation_param']}" if row.get("rotation_param", "expm") != "expm" else ""
    sub += ", trained generators" if row.get("trained") else ""
    if row["lib"] == "gradsurgery":
        return f"gradsurgery `{row['method']}` ({row['level']}{sub})"
    if row["lib"] == "rotograd":
        return f"rotograd 0.1.6 `{row['method']}` (cached{sub})"
    if row["lib"] == "torchjd":
        return f"torchjd 0.18 `mtl_backward` + `{row['method']}`"
    return "naive PCGrad (K backward passes)"


# -- orchestration ----------------------------------------------------------------------
def plan(mode: str, only: str | None) -> list[dict[str, Any]]:
    """The jobs of ``mode``: per configuration, one timing job and (when asked) one
    memory job."""
    spec = MODES[mode]
    tiny = spec.get("tiny", False)
    timeout = 120 if tiny else 1800
    jobs = []
    for d, k, row_set, memory, timing in spec["grid"]:
        rows = [r for r in rows_for(d, row_set) if only is None or re.search(only, r["label"])]
        if not rows:
            continue
        config = W.Config(d=d, k=k, tiny=tiny).as_dict()
        jobs.append({"kind": "time", "config": config, "rows": rows, "timing": timing, "timeout_s": timeout})
        if memory:
            plain = {"lib": "plain", "method": "sum", "key": "plain", "label": "plain"}
            jobs.append({"kind": "memory", "config": config, "rows": [plain] + rows, "timeout_s": timeout})
    return jobs


NOT_RUN = "not run: the run's time budget (--max-minutes) was spent"


def run(jobs: list[dict[str, Any]], threads: int, ref_python: Path | None, *, overlap: bool = False,
        deadline: float = float("inf")) -> list[dict[str, Any]]:
    """Runs the jobs configuration by configuration (in the plan's order): the rotograd
    rows in the reference interpreter, the others here. Returns one result dict (row key
    -> measurement) per job. A configuration that would start after ``deadline`` (a
    ``time.perf_counter`` value) is skipped, its rows noted. ``overlap`` runs both
    interpreters at once (only for smoke runs: it spoils the timings)."""
    results: list[dict[str, Any]] = [{} for _ in jobs]
    by_config: dict[tuple, list[int]] = {}
    for i, job in enumerate(jobs):
        by_config.setdefault(tuple(job["config"].values()), []).append(i)
    for indices in by_config.values():
        group = [jobs[i] for i in indices]
        if time.perf_counter() > deadline:
            note = NOT_RUN
            for i in indices:
                results[i] = {r["key"]: {"error": note} for r in jobs[i]["rows"]}
            continue
        for job in group:  # optional rounds stop at the deadline too
            if job["kind"] == "time" and deadline != float("inf"):
                job["timing"] = dict(job["timing"], deadline=time.time() + deadline - time.perf_counter())
        if ref_python is None:  # the rotograd rows run here, paired with this interpreter's plain step
            own, ref = group, [dict(job, rows=[]) for job in group]
        else:
            own = [dict(job, rows=[r for r in job["rows"] if r["lib"] != "rotograd"]) for job in group]
            ref = [dict(job, rows=[r for r in job["rows"] if r["lib"] in ("rotograd", "plain")]) for job in group]
        wanted = any(r["lib"] == "rotograd" for job in ref for r in job["rows"])
        worker = _RefWorker(ref, threads, ref_python) if wanted and overlap else None
        own_results = _measure.run_jobs(own, threads, log)
        if wanted and worker is None:
            worker = _RefWorker(ref, threads, ref_python)
        ref_results = worker.results() if worker else [{} for _ in group]
        for i, job, mine, theirs in zip(indices, group, own_results, ref_results):
            if job["kind"] == "memory" and theirs:  # rotograd rows' memory ratio: the plain of their interpreter
                theirs = {("plain@ref" if k == "plain" else k): v for k, v in theirs.items()}
            results[i] = mine | theirs
    return results


class _RefWorker:
    """The reference interpreter running ``jobs`` (``--worker``), started at once."""

    def __init__(self, jobs: list[dict[str, Any]], threads: int, ref_python: Path | None):
        self.jobs, self.proc = jobs, None
        if ref_python is None or not Path(ref_python).exists():
            self.note = ("reference interpreter (rotograd 0.1.6 + geotorch 0.3) not found; pass "
                         f"--ref-python (looked for {', '.join(map(str, REF_PYTHONS))})")
            return
        log(f"rotograd rows in {ref_python}")
        self.proc = subprocess.Popen([str(ref_python), str(Path(__file__).resolve()), "--worker"],
                                     stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                     text=True)
        self.payload = json.dumps({"jobs": jobs, "threads": threads})

    def results(self) -> list[dict[str, Any]]:
        if self.proc is not None:
            out, err = self.proc.communicate(self.payload)
            sys.stderr.write(err)
            if self.proc.returncode == 0 and out.strip():
                return json.loads(out)
            self.note = f"reference interpreter failed (exit {self.proc.returncode}): {err.strip().splitlines()[-1:]}"
        return [{r["key"]: {"error": self.note} for r in j["rows"] if r["lib"] == "rotograd"} for j in self.jobs]


def worker() -> None:
    """``--worker``: runs the jobs read from stdin, writes their results to stdout."""
    spec = json.load(sys.stdin)
    json.dump(_measure.run_jobs(spec["jobs"], spec["threads"], log), sys.stdout)


def log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def machine(threads: int) -> dict[str, Any]:
    model = platform.processor() or "unknown"
    try:
        with open("/proc/cpuinfo") as f:
            model = next(line.split(":", 1)[1].strip() for line in f if line.startswith("model name"))
    except (OSError, StopIteration):
        pass
    env = {k: v for k, v in sorted(os.environ.items()) if k.startswith(ENV_PREFIXES)}
    return {"cpu": model, "logical_cpus": os.cpu_count(), "torch_threads": threads,
            "torch": torch.__version__, "python": platform.python_version(), "platform": platform.platform(),
            "environment": env, "omp_wait_policy": os.environ.get("OMP_WAIT_POLICY"),
            "load_average_start": list(os.getloadavg())}


# -- results ----------------------------------------------------------------------------
def collect(jobs: list[dict[str, Any]], results: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """One record per (row, configuration) with the time and memory ratios."""
    records: dict[tuple[str, int, int], dict[str, Any]] = {}
    for job, res in zip(jobs, results):
        cfg = job["config"]
        for row in job["rows"]:
            if row["lib"] == "plain":
                continue
            rec = records.setdefault((row["key"], cfg["d"], cfg["k"]),
                                     {k: v for k, v in row.items()} | {"d": cfg["d"], "k": cfg["k"]})
            got = res.get(row["key"], {"error": "no result"})
            if "error" in got:
                rec.setdefault("notes", []).append(f"{job['kind']}: {got['error']}")
            elif job["kind"] == "time":
                rec.update({"time_ratio": got["ratio"], "time_q25": got["q25"], "time_q75": got["q75"],
                            "rounds": got["rounds"], "plain_ms": got["plain_ms"], "row_ms": got["row_ms"]})
            else:
                plain = res.get("plain@ref" if row["lib"] == "rotograd" and "plain@ref" in res else "plain", {})
                rec["peak_mb"], rec["peak_total_mb"] = got["peak_mb"], got["peak_total_mb"]
                if "peak_mb" in plain and plain["peak_mb"] > 0:
                    rec["plain_peak_mb"] = plain["peak_mb"]
                    rec["memory_ratio"] = got["peak_mb"] / plain["peak_mb"]
    return list(records.values())


#: (description, row key, d, K, bound) — each a ratio to plain (issue 14's targets).
TIME_TARGETS = [
    *((f"`{m}` <= 1.03x", f"gradsurgery:{m}:rep", 256, 8, 1.03) for m in ("sum", "mean", "uw", "dwa", "rlw", "famo")),
    *((f"`{m}` <= 1.08x", f"gradsurgery:{m}:rep", 256, 8, 1.08) for m in ("pcgrad", "mgda", "gradnorm")),
    ("`pcgrad` <= 1.3x at K=32", "gradsurgery:pcgrad:rep", 256, 32, 1.3),
    ("`mgda` <= 1.5x at K=32", "gradsurgery:mgda:rep", 256, 32, 1.5),
]
ROTATIONS = {"rotate_only": "RotateOnly", "rotograd": "RotoGrad", "rotogradnorm": "RotoGradNorm"}


def targets(records: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """The issue's targets at d=256 (K=8 unless noted) against this run's numbers."""
    by = {(r["key"], r["d"], r["k"]): r for r in records}
    out = []

    def add(what, value, bound):
        status = "n/a" if value is None else ("met" if value <= bound else "MISSED")
        out.append({"target": what, "value": value, "bound": bound, "status": status})

    for what, key, d, k, bound in TIME_TARGETS:
        add(what, by.get((key, d, k), {}).get("time_ratio"), bound)
    for name, cls in ROTATIONS.items():
        ours = by.get((f"gradsurgery:{name}:rep", 256, 8), {}).get("time_ratio")
        ref = by.get((f"rotograd:{cls}", 256, 8), {}).get("time_ratio")
        add(f"`{name}` <= 2.0x plain (stretch 1.5x)", ours, 2.0)
        add(f"`{name}` <= 0.4x rotograd's `{cls}`", None if ours is None or ref is None else ours / ref, 0.4)
    ours = by.get(("gradsurgery:rotograd:rep:trained", 256, 8), {}).get("time_ratio")
    ref = by.get(("rotograd:RotoGrad:trained", 256, 8), {}).get("time_ratio")
    add("`rotograd` <= 0.4x rotograd's `RotoGrad`, trained generators",
        None if ours is None or ref is None else ours / ref, 0.4)
    add("`rotograd` (riemannian) <= 1.5x plain (issue 22)",
        by.get(("gradsurgery:rotograd:rep:riemannian", 256, 8), {}).get("time_ratio"), 1.5)
    for r in records:
        if r["lib"] == "gradsurgery" and r.get("level") == "rep" and r["d"] == 256 and r["k"] == 8:
            rotation = r["method"] in ROTATIONS or bool(r.get("rotation_param"))
            bound = 1.3 if rotation else 1.10
            variant = ", ".join(v for v in (r.get("rotation_param"), "trained generators" if r.get("trained") else None)
                                if v and v != "expm")
            add(f"`{r['method']}`{f' ({variant})' if variant else ''} peak memory <= {bound:.2f}x",
                r.get("memory_ratio"), bound)
    return out


def _fmt_time(r: dict[str, Any] | None) -> str:
    if r is None:
        return ""
    if "time_ratio" not in r:
        return "skipped"
    return f"{r['time_ratio']:.2f}x ({r['time_q25']:.2f}-{r['time_q75']:.2f})"


def _fmt_mem(r: dict[str, Any] | None) -> str:
    if r is None or "memory_ratio" not in r:
        return ""
    return f"{r['memory_ratio']:.2f}x"


def markdown(report: dict[str, Any]) -> str:
    """Tables per feature size ``d`` (rows x K), then targets, machine and notes.
    Configurations the time budget left out are listed, not tabulated."""
    not_run = {(r["d"], r["k"]) for r in report["records"] if r.get("notes") and all(NOT_RUN in n for n in r["notes"])}
    recs = [r for r in report["records"] if (r["d"], r["k"]) not in not_run]
    m = report["machine"]
    if "environment" in m:
        env = ", ".join(f"{k}={v}" for k, v in m["environment"].items()) or "none set: the defaults users get"
    elif "omp_wait_policy" in m:
        env = f"OMP_WAIT_POLICY={m['omp_wait_policy']}"
    else:
        env = "not recorded by that version of the script"
    lines = [f"Machine: {m['cpu']}, {m['logical_cpus']} logical CPUs, torch {m['torch']} on "
             f"{m['torch_threads']} threads, Python {m['python']}; OpenMP/MKL environment variables: {env}; "
             f"load average at start "
             f"{m['load_average_start'][0]:.2f}, at end {m.get('load_average_end', [0])[0]:.2f}. "
             f"Mode `{report['mode']}`, batch {report['batch']}.", ""]
    for d in sorted({r["d"] for r in recs}):
        ks = sorted({r["k"] for r in recs if r["d"] == d})
        rows = list(dict.fromkeys(r["key"] for r in recs if r["d"] == d))
        by = {(r["key"], r["k"]): r for r in recs if r["d"] == d}
        label = {r["key"]: r["label"] for r in recs}
        has_mem = any("memory_ratio" in r for r in recs if r["d"] == d)
        lines.append(f"### d = {d}")
        lines.append("")
        header = ["row"] + [f"time K={k}" for k in ks] + ([f"memory K={k}" for k in ks] if has_mem else [])
        lines.append("| " + " | ".join(header) + " |")
        lines.append("|" + "---|" * len(header))
        plain_ms = {k: next((r["plain_ms"] for r in recs if r["d"] == d and r["k"] == k and "plain_ms" in r
                             and r["lib"] != "rotograd"), None) for k in ks}
        plain_mb = {k: next((r["plain_peak_mb"] for r in recs if r["d"] == d and r["k"] == k
                             and "plain_peak_mb" in r and r["lib"] != "rotograd"), None) for k in ks}
        cells = ["plain `sum(losses).backward()` (absolute)"]
        cells += [f"{plain_ms[k]:.1f} ms" if plain_ms[k] else "" for k in ks]
        if has_mem:
            cells += [f"{plain_mb[k]:.1f} MB" if plain_mb[k] else "" for k in ks]
        lines.append("| " + " | ".join(cells) + " |")
        for key in rows:
            cells = [label[key]] + [_fmt_time(by.get((key, k))) for k in ks]
            if has_mem:
                cells += [_fmt_mem(by.get((key, k))) for k in ks]
            lines.append("| " + " | ".join(cells) + " |")
        lines.append("")
    lines += ["### Targets (d = 256, K = 8 unless noted)", "", "| target | measured | status |", "|---|---|---|"]
    for t in report["targets"]:
        value = "" if t["value"] is None else f"{t['value']:.2f}x"
        lines.append(f"| {t['target']} | {value} | {t['status']} |")
    if not_run:
        lines += ["", "Not run (time budget of the run spent): "
                  + ", ".join(f"d={d} K={k}" for d, k in sorted(not_run)) + "."]
    grouped: dict[tuple[int, int, str], list[str]] = {}
    for r in recs:
        for n in r.get("notes", []):
            grouped.setdefault((r["d"], r["k"], n), []).append(r["label"])
    if grouped:
        lines += ["", "### Notes (rows skipped or failed)", ""]
        for (d, k, n), labels in grouped.items():
            who = ", ".join(labels) if len(labels) <= 3 else f"{len(labels)} rows"
            lines.append(f"- d={d}, K={k}, {who}: {n}")
    return "\n".join(lines) + "\n"


def plot(report: dict[str, Any], path: Path, d: int = 256) -> None:
    """Time ratio vs K (log-log) at features ``d`` in three panels: gradsurgery at the
    representation level, at the parameter level, and the other libraries next to
    gradsurgery's matching representation-level methods."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    recs = [r for r in report["records"] if r["d"] == d and "time_ratio" in r and not r.get("rotation_size")]
    panels = [("gradsurgery, representation level", [r for r in recs if r.get("level") == "rep"]),
              ("gradsurgery, parameter level", [r for r in recs if r.get("level") == "params"]),
              ("other libraries (dashed) and gradsurgery (rep)",
               [r for r in recs if r["lib"] != "gradsurgery"
                or (r.get("level") == "rep" and r["method"] in ("mean", "pcgrad", "mgda", *ROTATIONS))])]
    fig, axes = plt.subplots(1, 3, figsize=(16, 8), sharey=True)
    colors = plt.get_cmap("tab20").colors
    for ax, (title, group) in zip(axes, panels):
        for i, key in enumerate(dict.fromkeys(r["key"] for r in group)):
            pts = sorted((r["k"], r["time_ratio"], r["time_q25"], r["time_q75"]) for r in group if r["key"] == key)
            ks, med, lo, hi = zip(*pts)
            label = next(r["label"] for r in group if r["key"] == key).replace("`", "")
            ax.errorbar(ks, med, yerr=[[m - q for m, q in zip(med, lo)], [q - m for m, q in zip(med, hi)]],
                        fmt=("-" if key.startswith("gradsurgery") else "--") + "ox^sd"[i % 5], ms=4, capsize=2,
                        color=colors[i % len(colors)], label=label)
        ax.axhline(1.0, color="k", lw=0.8)
        ax.set_xscale("log", base=2)
        ax.set_yscale("log")
        ax.set_xlabel("K (number of tasks)")
        ax.set_title(title, fontsize=10)
        ax.grid(True, which="both", alpha=0.3)
        if group:
            ax.legend(fontsize=6.5, loc="upper center", bbox_to_anchor=(0.5, -0.1), ncol=2, frameon=False)
    axes[0].set_ylabel(f"step time / plain backward (d={d}; median, IQR bars)")
    fig.tight_layout()
    fig.savefig(path, dpi=100, bbox_inches="tight")
    plt.close(fig)


DOC_HEADER = """# Benchmarks

<!-- generated by `python benchmarks/step_time.py --docs` (or `--quick --docs`); do not edit by hand -->

What one training step costs, as a **ratio to plain `sum(losses).backward()`** on the same
model, timed in the same process and interleaved with it: every round runs one plain
step and one step of the row back to back, and the table gives the median of those
paired ratios with, in brackets, their interquartile range. Memory is the **peak
heap memory above imports**: a fresh process forked per row and configuration resets
the kernel's peak-RSS counter, builds the model and runs two steps (library code pages,
file-backed and shared, are left out; the JSON also has the total); the ratio is to
plain's peak measured the same way (not at K = 32, to keep the full run within its time budget).
Model: MLP backbone 64-1024-1024-d, heads d-256-1 with MSE
losses, Adam, batch 256, K tasks, 2 torch threads.

**Environment.** The numbers are measured in the environment users have: no
`OMP_WAIT_POLICY` or other threading-policy override (the OpenMP/MKL variables set, if any,
are listed under each table). Earlier versions of these pages ran with
`OMP_WAIT_POLICY=PASSIVE`, which on this shared 2-core machine doubled plain's step (17 ms to
36 ms) while the library's own work stayed the same, so every ratio looked smaller than what a
user gets. The machine is shared with other jobs: the load average is printed with each
table, and the interquartile ranges show how much the rounds disagreed; ratios are steadier
than absolute times (both halves of a pair see the same load).

- `rep` rows run gradsurgery's pipeline: one backward through the heads for all task
  gradients w.r.t. the representation, the surgery on the `K x K` Gram, one backward
  through the backbone. `params` rows decide from the per-task gradients of the shared
  parameters (a batched Jacobian: about K backbone backward passes, as in the papers).
- The `rotograd` package's rows run in this interpreter (geotorch 0.4, through an alias of
  the module the package imports; `--ref-python` runs them in another one) and are paired
  with the same plain step; torchjd rows call `mtl_backward` then `jac_to_grad` with the
  aggregator; naive PCGrad is K `autograd.grad` passes through the whole model and the
  projections on the flattened parameter gradients.
- Rotation rows start at `A = 0` and take the steps of the measurement (tens), so their
  generators stay small. The **trained generators** rows set `A = 0.03 N(0, 1)`
  (`||skew(A)||_2` about 1, where a few hundred steps at `method_lr = 1e-4` take it) in
  every library alike: the exponential's cost grows with `||A||` (higher Taylor degree,
  squarings), the Cayley map's does not.
- **Which parametrisation.** `rotation_param="expm"` (default) is the paper's and the
  package's, and the only one that reproduces the package's steps. `rotation_param="cayley"`
  costs one `m x m` inverse per rotation and two products in its backward whatever `||A||`:
  compare the `cayley` rows with the `expm` rows above. On this CPU build the inverses run one
  matrix at a time (batched LAPACK LU hangs here) and cost about as much as the exponential of
  small generators, so Cayley pays off once the generators have grown (the trained rows),
  and for long runs or large `method_lr`; with fresh rotations the exponential is as cheap or
  slightly cheaper. `rotation_param="riemannian"` holds `R` directly: no matrix function and
  no backward through one; its step adds `R z`, `R^T H`, one alignment product and a
  three-product retraction after the step (plus a Newton-Schulz step every 8), whatever
  `||A||`, so its rows need no trained variant; it has a d = 2048, K = 8 row at full width.
- **Where the rotations' time goes, and the gap to the targets.** Beyond plain's work, a
  RotoGrad-family step does batched `K x m x m` products (each about one `8 x 256 x 256`
  `bmm`, 1.3 ms on 2 quiet threads here, about 1/15 of plain's 20 ms step): `R z` in `fork`, `R^T H` in
  the task backward, `R r` and `(R r - H) r^T` for the alignment gradient, `B E` and `B^T G`
  for the fixed base, and the exponential: forward and hand-written backward together 0
  (`A = 0`), 5 (degree 4), 8 (degree 6), 11, 14, 16 (degree 16) products, plus 3 per
  squaring (`gradsurgery/numerics/expm.py`). That is 11-14 products with fresh generators
  and about 20 with trained ones, so about 2x plain is the floor of this parametrisation at
  d = 256, K = 8 (`python benchmarks/profile_step.py --methods rotograd` shows the split).
  The Cayley map replaces the exponential by one inverse per rotation plus two products.
  Memory: the rotations' own state (`A`, its gradient, Adam's two moments, the base: 5 K m^2
  floats, 10 MB here) and the step's `K x batch x d` gradients come on top of plain's 51 MB,
  so the 1.3x target is not reachable by freeing the exponential's saved products alone.
- Rotations wider than 256 act on a 256-wide subspace, except in the d = 1024, K = 2 rows.
- The full run goes configuration by configuration (the targets' d = 256, K = 8 first)
  and starts no new one after `--max-minutes`; those left out are listed below the tables.

Reproduce: `python benchmarks/step_time.py` (full grid; `--docs` rewrites this page) or
`--quick` (a few minutes). Where the time goes inside a step: `python
benchmarks/profile_step.py`. The RotoGrad family against the package at a chosen
generator size: `python benchmarks/rotograd_vs_package.py --scale 0.03`. Measurement
details: `benchmarks/_measure.py`.

![step time / plain vs K](benchmarks_time_vs_k.png)

"""

QUIET_HEADER = """
## Appendix: `--quick` on a quiet machine (older run)

An earlier version of the script in `--quick` mode on an otherwise idle server, pinned to two
of its cores (`taskset -c 2,3`), with that machine's torch build and an older gradsurgery (the
JSON is `docs/benchmarks_quiet_quick.json`; torchjd's `UPGrad` needs `quadprog`, which that
machine lacked; its memory column is the total resident peak, library code pages included,
an earlier version of the measure). That version of the script did not record its
environment and may have set `OMP_WAIT_POLICY=PASSIVE`; read it as an upper bound on how
small the ratios get on a quiet machine, not as the default environment. Render it with
`python benchmarks/step_time.py --render docs/benchmarks_quiet_quick.json`.

"""

GPU_SECTION = """
## GPU

`benchmarks/cuda_expm.py` measures the exponential's two plans (host-chosen degree, and the
sync-free fixed plan) against `torch.linalg.matrix_exp` on CUDA; its report, when it has been
run, is `docs/cuda_expm.json` and is rendered here. {status}
"""


def gpu_section() -> str:
    """The GPU section: ``docs/cuda_expm.json`` rendered, or a line saying it was not run."""
    path = DOCS / "cuda_expm.json"
    if not path.exists():
        return GPU_SECTION.format(status="**Not run yet**: no CUDA device was available when this page was "
                                         "generated; `gradsurgery.numerics.expm.SYNC_FREE_MAX_SIZE` (512) is "
                                         "therefore not set from measurements, and there is no GPU step-time table.")
    report = json.loads(path.read_text())
    lines = [GPU_SECTION.format(status=f"Device: {report['device']}, torch {report['torch']}, K = {report['K']}."),
             "| m | A scale | host plan ms | sync-free ms | matrix_exp ms | sync-free / host | float64 rel. error "
             "(value, derivative; host) |", "|---|---|---|---|---|---|---|"]
    for row in report["rows"]:
        t, e = row["float32_time"], row["float64_rel_error"]["host"]
        lines.append(f"| {row['m']} | {row['scale']} | {t['host_ms']:.2f} | {t['sync_free_ms']:.2f} | "
                     f"{t['matrix_exp_ms']:.2f} | {t['sync_free_over_host']:.2f} | "
                     f"{e['value']:.1e}, {e['derivative']:.1e} |")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    mode = parser.add_mutually_exclusive_group()
    mode.add_argument("--quick", action="store_true", help="d=256, K in {2, 8}, few rounds (< 2 min)")
    mode.add_argument("--smoke", action="store_true", help="tiny model, one configuration (seconds; for tests)")
    parser.add_argument("--docs", action="store_true", help="also regenerate docs/benchmarks.md, .json and the plot")
    parser.add_argument("--ref-python", type=Path, default=next((p for p in REF_PYTHONS if p.exists()), None),
                        help="interpreter with rotograd 0.1.6 + geotorch 0.3 for the rotograd rows")
    parser.add_argument("--threads", type=int, default=2, help="torch threads (default 2)")
    parser.add_argument("--only", help="regex: keep only rows whose label matches")
    parser.add_argument("--rounds", type=int, help="timing rounds per row (overrides the mode's; more on a loaded "
                                                   "machine)")
    parser.add_argument("--max-minutes", type=float, default=12.0,
                        help="after this many minutes (default 12) start no new configuration and stop "
                             "optional timing rounds; configurations run in order of importance, the "
                             "skipped ones are noted")
    parser.add_argument("--out", type=Path, default=HERE / "results", help="output folder for JSON and markdown")
    parser.add_argument("--render", type=Path, help="print the markdown of a saved JSON report and exit")
    parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.worker:
        worker()
        return 0
    if args.render:
        print(markdown(json.loads(args.render.read_text())))
        return 0
    if args.docs and (args.smoke or args.only):
        parser.error("--docs records the full or the quick grid; drop --smoke/--only")
    name = "quick" if args.quick else "smoke" if args.smoke else "full"
    # threads are set in the forked children only: an OpenMP runtime initialised before a
    # fork (Intel's, in some torch builds) hangs the child's first parallel region
    info = machine(args.threads)
    started = time.perf_counter()
    jobs = plan(name, args.only)
    if args.rounds:
        for job in jobs:
            if job["kind"] == "time":
                job["timing"] = dict(job["timing"], min_rounds=args.rounds, max_rounds=max(args.rounds, 1))
    results = run(jobs, args.threads, args.ref_python, overlap=name == "smoke",
                  deadline=started + 60 * args.max_minutes)
    info["load_average_end"] = list(os.getloadavg())
    records = collect(jobs, results)
    report = {"mode": name, "machine": info, "batch": jobs[0]["config"]["batch"] if jobs else None,
              "seconds": time.perf_counter() - started, "records": records}
    report["targets"] = targets(records)
    table = markdown(report)
    print(table)
    args.out.mkdir(parents=True, exist_ok=True)
    stem = "step_time" + ("" if name == "full" else f"-{name}")
    (args.out / f"{stem}.json").write_text(json.dumps(report, indent=1))
    (args.out / f"{stem}.md").write_text(table)
    if args.docs:
        (DOCS / "benchmarks.json").write_text(json.dumps(report, indent=1))
        plot(report, DOCS / "benchmarks_time_vs_k.png")
        quiet = DOCS / "benchmarks_quiet_quick.json"
        appendix = (QUIET_HEADER + markdown(json.loads(quiet.read_text()))) if quiet.exists() else ""
        title = f"## {'Full' if name == 'full' else 'Quick'} run ({time.strftime('%Y-%m-%d', time.gmtime())})\n\n"
        (DOCS / "benchmarks.md").write_text(DOC_HEADER + title + table + gpu_section() + appendix)
    log(f"done in {report['seconds']:.0f}s; wrote {args.out / stem}.json/.md")
    return 0


if __name__ == "__main__":
    sys.exit(main())
