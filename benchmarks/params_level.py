"""Parameter-level surgery against torchjd 0.18 (``mtl_backward`` + the same aggregator),
and representation-level loss-only methods against plain backward.

The ``gs:<method>:blocks`` rows run gradsurgery with its layer-wise Gram switched off
(``params_level.LAYERWISE = False`` around each step: every layer's ``K x p`` Jacobian
block formed, the 0.1 behaviour), in the same run as the default rows.

Usage::

    python benchmarks/params_level.py            # K in {2, 8, 32}: several minutes on 2 cores
    python benchmarks/params_level.py --quick    # K in {2, 8}, fewer rounds
    python benchmarks/params_level.py --targets --k 8 32   # UPGrad rows only (the targets')
    python benchmarks/params_level.py --targets --k 8 32 --threads 1 --cpu-time   # loaded machine

Model (shared with ``step_time.py``, see ``_workloads.py``): MLP backbone 64-1024-1024-256,
heads 256-256-1 with MSE losses, Adam, batch 256. Every number is a ratio to plain
``sum(losses).backward()`` on the same model: time is the median of paired, interleaved
per-round ratios (interquartile range in brackets), memory the peak resident memory above
imports, each row in a fresh forked process (``_measure.py`` explains both). Writes
``benchmarks/results/params_level[-quick].{json,md}``. Runs in the environment it is
started in (no threading-policy override) and records it: the OpenMP/MKL variables set and
the load average.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time
import types
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

import _measure  # noqa: E402
import _workloads as W  # noqa: E402
import torch  # noqa: E402

#: (gradsurgery method, torchjd aggregator) pairs compared at the parameter level
PAIRS = [("upgrad", "UPGrad"), ("mgda", "MGDA"), ("pcgrad", "PCGrad")]
#: methods also measured with Jacobian blocks only (no layer-wise Gram)
BLOCKS = ["upgrad"]
#: loss-only methods: representation level, target <= 1.03x plain
LOSS_ONLY = ["uw", "dwa", "rlw", "famo"]


def rows(k: int, pairs=PAIRS, loss_only=LOSS_ONLY) -> list[dict]:
    out = []
    for ours, theirs in pairs:
        out.append({"lib": "gradsurgery", "method": ours, "level": "params", "key": f"gs:{ours}"})
        if ours in BLOCKS:
            out.append({"lib": "gradsurgery", "method": ours, "level": "params", "key": f"gs:{ours}:blocks",
                        "blocks": True})
        out.append({"lib": "torchjd", "method": theirs, "key": f"jd:{theirs}"})
    out += [{"lib": "gradsurgery", "method": m, "level": "rep", "key": f"gs:{m}:rep"} for m in loss_only]
    return out


def build(row: dict, p: W.Problem):
    """:func:`_workloads.build`, and for a ``blocks`` row a step with the layer-wise Gram
    off (installed as ``W.build`` so that the forked measuring children use it)."""
    step = _build(row, p)
    if not row.get("blocks"):
        return step
    from gradsurgery.pipeline import params_level

    def blocks_step() -> None:
        params_level.LAYERWISE = False
        try:
            step()
        finally:
            params_level.LAYERWISE = True
    return blocks_step


_build, W.build = W.build, build


def _cpu_time_rows(*args, **kwargs):
    """:func:`_measure.time_rows` with the process's CPU clock for ``time.perf_counter``
    (runs in the forked measuring child, so the parent's log keeps the wall clock)."""
    _measure.time = types.SimpleNamespace(perf_counter=time.process_time, time=time.time)
    return _time_rows(*args, **kwargs)


_time_rows = _measure.time_rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--targets", action="store_true", help="UPGrad's rows only (plain, layer-wise, "
                        "blocks only, torchjd), written to params_level-targets.{json,md}")
    parser.add_argument("--cpu-time", action="store_true", help="time each step by the process's CPU time "
                        "instead of the wall clock: with --threads 1, the compute alone, which other processes "
                        "on a loaded machine do not inflate (results: params_level-...-cpu.{json,md})")
    parser.add_argument("--k", type=int, nargs="+", help="the numbers of tasks (default 2 8 32; --quick: 2 8)")
    parser.add_argument("--threads", type=int, default=torch.get_num_threads())
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    if args.cpu_time:
        _measure.time_rows = _cpu_time_rows
    ks = tuple(args.k or ((2, 8) if args.quick else (2, 8, 32)))
    selected = {"pairs": PAIRS[:1], "loss_only": []} if args.targets else {}
    timing = ({"min_rounds": 3, "max_rounds": 3, "budget_s": 0.0, "warmup": 1} if args.quick
              else {"min_rounds": 5, "max_rounds": 9, "budget_s": 3.0})
    jobs = []
    for k in ks:
        config = W.Config(d=256, k=k).as_dict()
        jobs.append({"kind": "time", "config": config, "rows": rows(k, **selected), "timing": timing,
                     "timeout_s": 1800})
        plain = {"lib": "plain", "method": "sum", "key": "plain"}
        jobs.append({"kind": "memory", "config": config, "rows": [plain] + rows(k, **selected), "timeout_s": 1800})
    env = {k: v for k, v in sorted(os.environ.items()) if k.startswith(("OMP_", "MKL_", "KMP_", "GOMP_"))}
    load = os.getloadavg()[0]
    results = _measure.run_jobs(jobs, args.threads, lambda m: print(m, file=sys.stderr, flush=True))
    load = (load, os.getloadavg()[0])
    table = []
    for k, (times, memory) in zip(ks, zip(results[::2], results[1::2])):
        plain_mb = memory["plain"].get("peak_mb")
        for row in rows(k, **selected):
            t, m = times.get(row["key"], {}), memory.get(row["key"], {})
            table.append({"k": k, "row": row["key"], "time": t.get("ratio"), "q25": t.get("q25"),
                          "q75": t.get("q75"), "row_ms": t.get("row_ms"), "plain_ms": t.get("plain_ms"),
                          "memory": None if "peak_mb" not in m or not plain_mb else m["peak_mb"] / plain_mb,
                          "error": t.get("error") or m.get("error")})
    suffix = "".join(name for name, on in (("-quick", args.quick), ("-targets", args.targets),
                                           ("-cpu", args.cpu_time)) if on)
    out = HERE / "results"
    out.mkdir(exist_ok=True)
    (out / f"params_level{suffix}.json").write_text(json.dumps(
        {"threads": args.threads, "clock": "cpu" if args.cpu_time else "wall", "torch": torch.__version__,
         "environment": env, "load_average": load,
         "rows": table}, indent=1))
    md = render(table, args.threads, env, load, "CPU time" if args.cpu_time else "wall time")
    (out / f"params_level{suffix}.md").write_text(md)
    print(md)


def render(table: list[dict], threads: int, env: dict[str, str] | None = None,
           load: tuple[float, float] | None = None, clock: str = "wall time") -> str:
    def fmt(x, spec=".2f"):
        return "—" if x is None else format(x, spec)

    by = {(r["k"], r["row"]): r for r in table}
    setting = ", ".join(f"{k}={v}" for k, v in (env or {}).items()) or "none set (the defaults)"
    where = "" if load is None else f"; load average {load[0]:.2f} at start, {load[1]:.2f} at end"
    lines = [(f"Parameter level vs torchjd 0.18 (CPU, {threads} threads; OpenMP/MKL environment variables: "
              f"{setting}{where}; ratios to plain backward; "
              f"time ({clock}): median [IQR] of paired ratios; memory: peak RSS above imports)"), "",
             ("| K | method | gradsurgery time | blocks only time | torchjd time | gs / torchjd | "
              "gradsurgery memory | blocks only memory | torchjd memory |"),
             "| --- | --- | --- | --- | --- | --- | --- | --- | --- |"]
    none = {"time": None, "q25": None, "q75": None, "memory": None}
    for k in sorted({r["k"] for r in table}):
        for ours, theirs in PAIRS:
            if (k, f"gs:{ours}") not in by:
                continue
            a, b = by[(k, f"gs:{ours}")], by[(k, f"jd:{theirs}")]
            old = by.get((k, f"gs:{ours}:blocks"), none)
            speed = None if a["time"] is None or b["time"] is None else a["time"] / b["time"]
            lines.append(f"| {k} | {ours} | {fmt(a['time'])}x [{fmt(a['q25'])}-{fmt(a['q75'])}] | "
                         f"{fmt(old['time'])}x [{fmt(old['q25'])}-{fmt(old['q75'])}] | "
                         f"{fmt(b['time'])}x [{fmt(b['q25'])}-{fmt(b['q75'])}] | {fmt(speed)} | "
                         f"{fmt(a['memory'])}x | {fmt(old['memory'])}x | {fmt(b['memory'])}x |")
    loss_only = [(k, m) for k in sorted({r["k"] for r in table}) for m in LOSS_ONLY if (k, f"gs:{m}:rep") in by]
    if loss_only:
        lines += ["", "Representation-level loss-only methods (target <= 1.03x plain):", "",
                  "| K | method | time | memory |", "| --- | --- | --- | --- |"]
    for k, m in loss_only:
        r = by[(k, f"gs:{m}:rep")]
        lines.append(f"| {k} | {m} | {fmt(r['time'])}x [{fmt(r['q25'])}-{fmt(r['q75'])}] | {fmt(r['memory'])}x |")
    errors = [f"- {r['row']} (K={r['k']}): {r['error']}" for r in table if r.get("error")]
    return "\n".join(lines + (["", "Errors:"] + errors if errors else [])) + "\n"


if __name__ == "__main__":
    main()
