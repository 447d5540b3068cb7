"""What :func:`gradsurgery.compare` returns: per run (method x seed) the held-out metrics,
curves and per-step statistics; per method the summary MTL papers report.

Δm% (Maninis et al., 2019) is the mean over tasks of the signed relative change of the
metric against the baseline method, signed so that **positive is better**:

.. math::  \\Delta_m = \\frac{100}{K} \\sum_{k=1}^{K} \\sigma_k \\frac{M_{m,k} - M_{b,k}}{M_{b,k}},
           \\qquad \\sigma_k = +1 \\text{ if higher is better, else } -1

where ``M_{b,k}`` is the baseline's metric averaged over its finished seeds. It is computed
for every seed of a method, then reported as mean ± std over seeds.
"""
from __future__ import annotations

import csv
import json
import math
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Sequence

from ..data.report import format_table

#: Reference method of the time-per-step ratio.
TIME_REFERENCE = "mean"


def delta_m(values: Sequence[float], baseline: Sequence[float], higher_is_better: Sequence[bool]) -> float:
    """Δm% of ``values`` against ``baseline`` (one metric per task; positive is better).

    NaN when a baseline metric is zero (the relative change is undefined) or a value is
    missing (NaN).
    """
    if not len(values) == len(baseline) == len(higher_is_better):
        raise ValueError(f"delta_m needs one value per task: got {len(values)} values, "
                         f"{len(baseline)} baseline values, {len(higher_is_better)} directions")
    total = 0.0
    for v, b, up in zip(values, baseline, higher_is_better):
        if b == 0:
            return math.nan
        total += (1 if up else -1) * (v - b) / abs(b)
    return 100 * total / len(values)


def mean_std(xs: Sequence[float]) -> tuple[float, float]:
    """Mean and sample standard deviation (0 for one value) of the finite ``xs``; NaNs if none."""
    xs = [x for x in xs if math.isfinite(x)]
    if not xs:
        return math.nan, math.nan
    m = sum(xs) / len(xs)
    if len(xs) == 1:
        return m, 0.0
    return m, math.sqrt(sum((x - m) ** 2 for x in xs) / (len(xs) - 1))


@dataclass
class Run:
    """One training run: ``method`` trained with ``seed``.

    ``status`` is ``"ok"``, ``"diverged"`` (a non-finite loss or metric; ``error`` says
    where) or ``"failed"`` (something raised while the method ran: building the optimizer,
    ``fork``, ``backward``, ``step`` or evaluation; ``error`` holds the message). ``curves``
    holds the held-out metrics after every epoch (``epochs x K``), ``train_losses`` the
    mean training losses of every epoch; ``cosine`` (mean pairwise cosine of the task
    gradients), ``weights`` (the method's coefficients) and ``track`` (the benchmark's
    tracked value, e.g. the toy point) have one entry per step, empty when unavailable.
    ``level`` is where the method decided (``"rep"`` or ``"params"``); ``outcome`` holds
    what the benchmark's ``outcome(backbone, heads)`` reported at the end of training
    (the toy: start, end point, distance to the Pareto set, ``reached``), empty without.
    """

    method: str
    seed: int
    status: str = "ok"
    error: str | None = None
    metrics: list[float] = field(default_factory=list)
    curves: list[list[float]] = field(default_factory=list)
    train_losses: list[list[float]] = field(default_factory=list)
    steps: int = 0
    step_time: float = math.nan
    cosine: list[float] = field(default_factory=list)
    weights: list[list[float]] = field(default_factory=list)
    track: list[list[float]] = field(default_factory=list)
    level: str = "rep"
    outcome: dict[str, Any] = field(default_factory=dict)

    @property
    def ok(self) -> bool:
        return self.status == "ok"


@dataclass
class Results:
    """The outcome of :func:`gradsurgery.compare`: ``runs`` and how to read them.

    ``table()`` (text or markdown), ``to_csv(path)``, ``to_json(path)`` and ``plot(dir)``
    present them; ``summary()`` gives the per-method numbers behind the table.
    """

    benchmark: str
    tasks: list[str]
    metrics: list[str]
    higher_is_better: list[bool]
    methods: list[str]
    seeds: list[int]
    epochs: int
    baseline: str
    runs: list[Run]
    level: str = "rep"
    source: Any = field(default=None, repr=False, compare=False)  # the benchmark object (for its plots)

    # -- numbers ------------------------------------------------------------------------
    def runs_of(self, method: str) -> list[Run]:
        return [r for r in self.runs if r.method == method]

    def baseline_metrics(self) -> list[float]:
        """The baseline's held-out metrics, averaged over its finished seeds."""
        return [mean_std([r.metrics[k] for r in self.runs_of(self.baseline) if r.ok])[0]
                for k in range(len(self.tasks))]

    def delta_m(self, run: Run) -> float:
        """Δm% of one run against the baseline (NaN unless the run finished)."""
        if not run.ok:
            return math.nan
        return delta_m(run.metrics, self.baseline_metrics(), self.higher_is_better)

    def time_ratio(self, method: str) -> float:
        """Mean time per training step of ``method`` over that of ``mean`` in this run."""
        def per_step(name: str) -> float:
            return mean_std([r.step_time for r in self.runs_of(name) if r.steps])[0]
        return per_step(method) / per_step(TIME_REFERENCE)

    def summary(self) -> list[dict[str, Any]]:
        """One dict per method, best Δm% first (runs that did not finish last): ``method``,
        per-task ``metric`` and ``metric_std`` lists, ``delta_m``, ``delta_m_std``,
        ``time_ratio``, ``finished``, ``diverged``, ``failed`` (seed counts) and, for
        every yes/no entry of the runs' ``outcome`` (e.g. the toy's ``reached``), how many
        seeds said yes (``outcome_counts``; a run that stopped reports where it stopped)."""
        rows: list[dict[str, Any]] = []
        for name in self.methods:
            runs = self.runs_of(name)
            done = [r for r in runs if r.ok]
            per_task = [mean_std([r.metrics[k] for r in done]) for k in range(len(self.tasks))]
            dm = mean_std([self.delta_m(r) for r in done])
            rows.append({"method": name, "metric": [m for m, _ in per_task], "metric_std": [s for _, s in per_task],
                         "delta_m": dm[0], "delta_m_std": dm[1], "time_ratio": self.time_ratio(name),
                         "finished": len(done), "diverged": sum(r.status == "diverged" for r in runs),
                         "failed": sum(r.status == "failed" for r in runs),
                         "outcome_counts": {key: self.outcome_count(name, key) for key in self.flag_outcomes()}})
        rows.sort(key=lambda row: -row["delta_m"] if math.isfinite(row["delta_m"]) else math.inf)
        return rows

    def outcome_count(self, method: str, key: str) -> int:
        """How many of ``method``'s runs said yes to the outcome ``key`` (e.g. ``"reached"``)."""
        return sum(bool(r.outcome.get(key)) for r in self.runs_of(method))

    def flag_outcomes(self) -> list[str]:
        """The yes/no entries of the runs' ``outcome`` (in first-seen order)."""
        keys = {k: None for r in self.runs for k, v in r.outcome.items() if isinstance(v, bool)}
        return list(keys)

    def best(self) -> str:
        """The method with the highest mean Δm%."""
        return self.summary()[0]["method"]

    # -- presentation -------------------------------------------------------------------
    def table(self, fmt: str = "text") -> str:
        """The comparison table: per-task held-out metric (mean ± std over seeds), Δm% against
        the baseline (positive is better), time per step relative to ``mean``, for each
        yes/no outcome the seeds that said yes, and a note for seeds that diverged
        or failed; then the benchmark's own table when it has one (``extra_table(results,
        fmt)``: the toy's end points). ``fmt``: ``"text"`` or ``"markdown"``."""
        if fmt not in ("text", "markdown"):
            raise ValueError(f"fmt must be 'text' or 'markdown', got {fmt!r}")
        arrows = ["↑" if up else "↓" for up in self.higher_is_better]
        header = (["method"] + [f"{t} {m} {a}" for t, m, a in zip(self.tasks, self.metrics, arrows)]
                  + ["Δm% ↑", "time/step", *self.flag_outcomes(), "seeds"])
        body = []
        spread = len(self.seeds) > 1  # a single seed has no ± std
        for row in self.summary():
            cells = [row["method"]]
            cells += [_pm(m, s if spread else None) for m, s in zip(row["metric"], row["metric_std"])]
            cells.append(_pm(row["delta_m"], row["delta_m_std"] if spread else None, ".2f", signed=True))
            cells.append(f"{row['time_ratio']:.2f}x" if math.isfinite(row["time_ratio"]) else "-")
            cells += [f"{n}/{len(self.seeds)}" for n in row["outcome_counts"].values()]
            cells.append(_seeds(row, len(self.seeds)))
            body.append(cells)
        notes = [f"{r.method} (seed {r.seed}) {r.status}: {_shorten(r.error or '')}" for r in self.runs if not r.ok]
        caption = (f"{self.benchmark}: held-out metrics after {self.epochs} epochs, mean ± std over "
                   f"{len(self.seeds)} seed(s); Δm% against {self.baseline!r} (positive is better); "
                   f"time per step relative to {TIME_REFERENCE!r}; {self._level_note()}.")
        extra = getattr(self.source, "extra_table", None)
        extra = "" if extra is None else "\n" + extra(self, fmt)
        table = format_table(header, body, fmt)
        if fmt == "markdown":
            return (caption + "\n\n" + table + "\n" + "".join(f"\n- {n}" for n in notes)
                    + ("\n" if notes else "") + extra)
        return "\n".join([caption, table, *notes]) + "\n" + extra

    def _level_note(self) -> str:
        """Where the methods decided: the comparison's level, and the methods run at another."""
        other = {r.method: r.level for r in self.runs if r.level != self.level}
        names = {"rep": "representation", "params": "parameter"}
        note = f"methods decide at the {names.get(self.level, self.level)} level ({self.level!r})"
        if other:
            note += ", except " + ", ".join(f"{m} ({lvl!r})" for m, lvl in other.items())
        return note

    def to_csv(self, path: str | Path) -> Path:
        """One row per run: method, seed, level, status, each task's metric, Δm%, seconds per
        step, time ratio to ``mean``, the ``outcome`` entries (a list entry ``end`` becomes
        columns ``end_0``, ``end_1``, ...), error message."""
        path = Path(path)
        columns = [f"{t}_{m}" for t, m in zip(self.tasks, self.metrics)]
        outcomes = [_flat_outcome(r.outcome) for r in self.runs]
        extra = list({k: None for o in outcomes for k in o})
        with path.open("w", newline="") as f:
            writer = csv.writer(f)
            writer.writerow(["method", "seed", "level", "status", *columns, "delta_m_pct", "step_time_s",
                             "time_ratio", *extra, "error"])
            for r, o in zip(self.runs, outcomes):
                metrics = r.metrics if r.ok else [math.nan] * len(self.tasks)
                writer.writerow([r.method, r.seed, r.level, r.status, *metrics, self.delta_m(r), r.step_time,
                                 self.time_ratio(r.method), *[o.get(k, "") for k in extra], r.error or ""])
        return path

    def to_dict(self) -> dict[str, Any]:
        """Everything, JSON-ready (NaN as ``None``): settings, ``summary`` and ``runs``
        (each with its ``delta_m``)."""
        runs = [{**asdict(r), "delta_m": self.delta_m(r)} for r in self.runs]
        data = {"benchmark": self.benchmark, "tasks": self.tasks, "metrics": self.metrics,
                "higher_is_better": self.higher_is_better, "methods": self.methods, "seeds": self.seeds,
                "epochs": self.epochs, "baseline": self.baseline, "level": self.level, "time_reference": TIME_REFERENCE,
                "summary": self.summary(), "runs": runs}
        return _no_nan(data)

    def to_json(self, path: str | Path) -> Path:
        path = Path(path)
        path.write_text(json.dumps(self.to_dict(), indent=1, allow_nan=False))
        return path

    @classmethod
    def from_json(cls, path: str | Path) -> "Results":
        """Reads what :meth:`to_json` wrote (e.g. to plot again without training)."""
        from .. import data
        d = json.loads(Path(path).read_text())
        fields = set(Run.__dataclass_fields__)
        runs = [Run(**_run_fields(r, fields)) for r in d["runs"]]
        source = data.get(d["benchmark"]) if d["benchmark"] in data.available() else None
        return cls(benchmark=d["benchmark"], tasks=d["tasks"], metrics=d["metrics"],
                   higher_is_better=d["higher_is_better"], methods=d["methods"], seeds=d["seeds"],
                   epochs=d["epochs"], baseline=d["baseline"], runs=runs, level=d.get("level", "rep"),
                   source=source)

    def plot(self, out_dir: str | Path) -> list[Path]:
        """Writes the PNG figures into ``out_dir`` (created if missing) and returns their
        paths: per-task metric curves, Δm% bars, gradient cosines and task weights over
        training, and the benchmark's own figures (the toy's trajectories). Needs
        matplotlib (``pip install 'gradsurgery[plot]'``)."""
        from .plotting import plot_all
        return plot_all(self, Path(out_dir))


def _pm(mean: float, std: float | None, spec: str = ".4g", signed: bool = False) -> str:
    if not math.isfinite(mean):
        return "-"
    text = f"{mean:{'+' if signed else ''}{spec}}"
    return text if std is None else f"{text} ± {std:{spec}}"


def _seeds(row: dict[str, Any], total: int) -> str:
    notes = [f"{row[k]} {k}" for k in ("diverged", "failed") if row[k]]
    return f"{row['finished']}/{total}" + (f" ({', '.join(notes)})" if notes else "")


def _shorten(text: str, limit: int = 160) -> str:
    text = " ".join(text.split())
    return text if len(text) <= limit else text[:limit - 3] + "..."


def _flat_outcome(outcome: dict[str, Any]) -> dict[str, Any]:
    """``{"end": [1, 2], "reached": True}`` -> ``{"end_0": 1, "end_1": 2, "reached": True}``."""
    flat: dict[str, Any] = {}
    for key, value in outcome.items():
        if isinstance(value, (list, tuple)):
            flat.update({f"{key}_{i}": v for i, v in enumerate(value)})
        else:
            flat[key] = value
    return flat


def _run_fields(saved: dict[str, Any], fields: set[str]) -> dict[str, Any]:
    """A saved run's ``Run`` fields (others dropped); a ``None`` step time is NaN again."""
    return {k: math.nan if k == "step_time" and v is None else v for k, v in saved.items() if k in fields}


def _no_nan(x: Any) -> Any:
    if isinstance(x, float) and not math.isfinite(x):
        return None
    if isinstance(x, dict):
        return {k: _no_nan(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [_no_nan(v) for v in x]
    return x
