"""Measurement: paired, interleaved step times and peak resident memory, each in a child
process forked from a parent that has imported the libraries but run no computation.

**Time.** One child per configuration builds every row's model plus a plain model, warms
them up, then runs rounds: in each round every row runs one plain step and one step of its
own, back to back (which goes first alternates), and contributes the ratio of the two.
Machine-wide slowdowns (other processes, frequency changes) hit both halves of a pair
alike, so the median of the paired ratios is far steadier than a ratio of two medians.
The spread reported is the interquartile range of those ratios.

**Memory.** One child per (row, configuration). After the fork it resets the kernel's
peak-RSS counter (``/proc/self/clear_refs`` ``5``, Linux >= 4.0) and reads the resident
size: that is the baseline "above imports" (the parent imported torch and the libraries;
the child has not allocated anything yet). It then builds the model and runs two steps;
the kernel's high-water mark ``VmHWM`` minus the baseline is the peak. The kernel counts
resident pages, whichever allocator (glibc, torch's CPU allocator, mmap) produced them,
so nothing is missed and no tracing slows the step; and since every child starts from
the same untouched heap, a previous configuration's freed-but-cached memory cannot hide
an allocation. The reported ``peak_mb`` leaves out file-backed pages (``RssFile``,
``RssShmem`` at the end, which only grow): those are library code touched for the first
time (23-34 MB here, more for rows that run more kinds of kernels), shared and not
growing with the model. What remains is the peak of the heap: parameters, optimizer
state, activations, gradients and the method's buffers. ``peak_total_mb`` keeps the
file-backed pages too.
"""
from __future__ import annotations

import functools
import json
import os
import random
import signal
import statistics
import sys
import time
import traceback
from typing import Any, Callable

import _workloads as W
import torch


def _status_kb(key: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(key + ":"):
                return int(line.split()[1])
    raise RuntimeError(f"{key} not in /proc/self/status (Linux only)")


def in_child(fn: Callable[[], Any], timeout_s: float, threads: int) -> Any:
    """Runs ``fn`` in a forked child and returns its JSON-able result (or
    ``{"error": ...}`` when it raised or ran past ``timeout_s``)."""
    read, write = os.pipe()
    pid = os.fork()
    if pid == 0:  # child
        os.close(read)
        try:
            torch.set_num_threads(threads)
            signal.signal(signal.SIGALRM, _raise_timeout)
            signal.alarm(max(1, int(timeout_s)))
            result = fn()
            signal.alarm(0)
        except BaseException as e:  # noqa: BLE001 - reported to the parent
            last = traceback.format_exception_only(type(e), e)[-1].strip()
            result = {"error": last[:300]}
        with os.fdopen(write, "w") as f:
            json.dump(result, f)
        os._exit(0)
    os.close(write)
    with os.fdopen(read) as f:
        data = f.read()
    os.waitpid(pid, 0)
    return json.loads(data) if data else {"error": "child died without a result"}


class _Timeout(Exception):
    pass


def _raise_timeout(signum, frame):
    raise _Timeout("ran past the configuration's time limit")


def time_rows(cfg: W.Config, rows: list[dict[str, Any]], *, min_rounds: int, max_rounds: int,
              budget_s: float, warmup: int = 2, seed: int = 0, deadline: float | None = None) -> dict[str, Any]:
    """Paired interleaved timing of ``rows`` against plain on ``cfg`` (call in a child).
    Each row runs at least ``min_rounds`` rounds, then more until it has spent
    ``budget_s`` or ``max_rounds`` rounds, or the wall clock passed ``deadline``."""
    plain = W.build({"lib": "plain"}, W.make_problem(cfg))
    steps, errors = {}, {}
    for row in rows:
        try:
            steps[row["key"]] = W.build(row, W.make_problem(cfg))
        except Exception as e:  # noqa: BLE001 - the row is reported as skipped
            errors[row["key"]] = traceback.format_exception_only(type(e), e)[-1].strip()[:300]
    for _ in range(warmup):
        plain()
    for key, step in list(steps.items()):
        try:
            for _ in range(warmup):
                t0 = time.perf_counter()
                step()
                elapsed = time.perf_counter() - t0
                if elapsed > 1.0:  # slow rows: one warm-up step is enough
                    break
            print(f"    warm {key}: {1e3 * elapsed:.0f} ms/step", file=sys.stderr, flush=True)
        except Exception as e:  # noqa: BLE001
            errors[key] = traceback.format_exception_only(type(e), e)[-1].strip()[:300]
            del steps[key]
    samples: dict[str, list[tuple[float, float]]] = {key: [] for key in steps}
    spent = {key: 0.0 for key in steps}
    rng = random.Random(seed)
    for r in range(max_rounds):
        late = deadline is not None and time.time() > deadline
        active = [k for k in steps if len(samples[k]) < min_rounds or (spent[k] < budget_s and not late)]
        if not active:
            break
        rng.shuffle(active)
        for key in active:
            pair = (plain, steps[key]) if (r % 2 == 0) else (steps[key], plain)
            times = []
            for fn in pair:
                t0 = time.perf_counter()
                fn()
                times.append(time.perf_counter() - t0)
            t_plain, t_row = (times[0], times[1]) if r % 2 == 0 else (times[1], times[0])
            samples[key].append((t_plain, t_row))
            spent[key] += t_plain + t_row
    out: dict[str, Any] = {}
    for key, pairs in samples.items():
        ratios = sorted(t / p for p, t in pairs)
        out[key] = {"rounds": len(pairs), "ratio": statistics.median(ratios),
                    "q25": _quantile(ratios, 0.25), "q75": _quantile(ratios, 0.75),
                    "plain_ms": 1e3 * statistics.median(p for p, _ in pairs),
                    "row_ms": 1e3 * statistics.median(t for _, t in pairs)}
    for key, err in errors.items():
        out[key] = {"error": err}
    return out


def _quantile(sorted_values: list[float], q: float) -> float:
    """Linear-interpolation quantile of an already sorted list."""
    pos = q * (len(sorted_values) - 1)
    lo = int(pos)
    hi = min(lo + 1, len(sorted_values) - 1)
    return sorted_values[lo] + (pos - lo) * (sorted_values[hi] - sorted_values[lo])


def peak_memory(cfg: W.Config, row: dict[str, Any], steps: int = 2) -> dict[str, Any]:
    """Peak memory above the forked baseline of building ``row`` on ``cfg`` and running
    ``steps`` steps (call in a child), in MB: ``peak_mb``, the anonymous (heap) memory,
    and ``peak_total_mb``, all resident memory."""
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")  # reset the peak-RSS counter to the current RSS
    base = _status_kb("VmRSS"), _status_kb("RssFile") + _status_kb("RssShmem")
    step = W.build(row, W.make_problem(cfg))
    for _ in range(steps):
        step()
    peak, mapped = _status_kb("VmHWM"), _status_kb("RssFile") + _status_kb("RssShmem")
    return {"peak_mb": ((peak - mapped) - (base[0] - base[1])) / 1024, "peak_total_mb": (peak - base[0]) / 1024}


def run_jobs(jobs: list[dict[str, Any]], threads: int, log: Callable[[str], None]) -> list[Any]:
    """Runs timing and memory jobs, each in its own forked child, in order."""
    libs = {row["lib"] for job in jobs for row in job["rows"]}
    missing = W.preload(libs)
    results = []
    for job in jobs:
        cfg = W.Config(**job["config"])
        rows = [r for r in job["rows"] if r["lib"] not in missing]
        skipped = {r["key"]: {"error": missing[r["lib"]]} for r in job["rows"] if r["lib"] in missing}
        t0 = time.perf_counter()
        if job["kind"] == "time":
            timing = functools.partial(time_rows, cfg, rows, **job["timing"])
            res = in_child(timing, job["timeout_s"], threads) if rows else {}
            if "error" in res and len(res) == 1:
                res = {r["key"]: dict(res) for r in rows}
        else:
            res = {}
            for row in rows:
                res[row["key"]] = in_child(functools.partial(peak_memory, cfg, row), job["timeout_s"], threads)
        res.update(skipped)
        log(f"  {job['kind']:6s} d={cfg.d} K={cfg.k}: {len(job['rows'])} rows in {time.perf_counter() - t0:.1f}s")
        results.append(res)
    return results
