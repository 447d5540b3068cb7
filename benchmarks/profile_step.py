"""Where a representation-level gradsurgery step spends its time beyond plain backward.

Usage::

    python benchmarks/profile_step.py [--k 8 32] [--methods sum pcgrad mgda ...] [--d 256] [--clock cpu]

For each method and K: the step's time split by pipeline stage (the stage functions of
``gradsurgery.pipeline.stages``/``.rotation``, the paths' stage methods, the rotations'
map and the method's hooks are wrapped with timers for this script only), next to plain
``sum(losses).backward()``, and
``opt.backward``'s time outside the autograd engine (the library's own overhead: checks,
stats, bookkeeping; the engine's share is the work plain backward does too); then
``torch.profiler``'s operators whose total self-CPU time differs most between the two
steps (the ops that cost the extra time). Interleaved rounds, medians. Runs in the
environment it is started in (no threading-policy override), which it prints.
"""
from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from collections import defaultdict
from pathlib import Path

import torch
from torch.profiler import ProfilerActivity, profile

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.append(str(Path(__file__).resolve().parent.parent))  # gradsurgery from this checkout

import _workloads as W  # noqa: E402

import gradsurgery as gs  # noqa: E402
from gradsurgery.pipeline import checks, paths, rotation, stages  # noqa: E402

#: Functions and methods timed, where they exist (owner, names).
STAGES = [(stages, ["combine", "shared_backward", "accumulate"]),
          (checks, ["finite_flag"]),
          (rotation, ["unrotate", "align"]),
          (rotation.Rotations, ["matrices", "rotate"]),
          (paths.StackedPath, ["__init__", "task_gradients", "gram", "combine", "shared_backward"]),
          (paths.SummedPath, ["__init__", "task_gradients", "gram", "combine"]),
          (paths.RotatedPath, ["__init__", "task_gradients"]),
          (gs.MultiTaskOptimizer, ["_validate", "_reduce_and_check", "_head_params"])]


#: ``--clock``: wall time, or the process's CPU time (all threads; steadier on a machine
#: shared with other jobs, since time spent descheduled does not count).
CLOCKS = {"wall": time.perf_counter, "cpu": time.process_time}
clock = time.perf_counter


class StageTimer:
    """Wraps the pipeline's stage functions (module attributes, looked up at call time by
    the optimizer) with timers, and the autograd engine's entry points (``engine``: their
    total time so far)."""

    def __init__(self):
        self.times: dict[str, float] = defaultdict(float)
        self.engine = 0.0
        for name in ("grad", "backward"):
            setattr(torch.autograd, name, self._engine(getattr(torch.autograd, name)))
        for owner, names in STAGES:
            for name in names:
                if name in vars(owner):  # own attributes only: a subclass's inherited ones are timed once
                    label = f"{owner.__name__.split('.')[-1]}.{name}"
                    setattr(owner, name, self._wrap(label, getattr(owner, name)))

    def _wrap(self, label, fn):
        def timed(*args, **kwargs):
            t0 = clock()
            try:
                return fn(*args, **kwargs)
            finally:
                self.times[label] += clock() - t0
        return timed

    def _engine(self, fn):
        def timed(*args, **kwargs):
            t0 = clock()
            try:
                return fn(*args, **kwargs)
            finally:
                self.engine += clock() - t0
        return timed

    def wrap_method(self, method):
        for name in ("weights", "combine", "loss_weights", "update"):
            if hasattr(method, name):
                setattr(method, name, self._wrap(f"method.{name}", getattr(method, name)))


def instrumented_step(p: W.Problem, method: str, timer: StageTimer):
    d = p.heads[0][0].in_features
    opt = gs.MultiTaskOptimizer(W._adam(p.backbone, p.heads), method, num_tasks=len(p.heads), rep_size=d,
                                method_lr=W.METHOD_LR)
    timer.wrap_method(opt.method)

    def step():
        t = timer.times
        t0 = clock()
        opt.zero_grad()
        z = p.backbone(p.x)
        t1 = clock()
        views = opt.fork(z)
        t2 = clock()
        losses = W._losses(p.heads, views, p.targets)
        t3 = clock()
        engine = timer.engine
        opt.backward(losses)
        t4 = clock()
        engine = timer.engine - engine
        opt.step()
        t5 = clock()
        t["backbone forward"] += t1 - t0
        t["heads forward + losses"] += t3 - t2
        t["opt.backward total"] += t4 - t3
        t["opt.backward outside autograd"] += t4 - t3 - engine
        t["opt.step (Adam + after_step)"] += t5 - t4
    return step


def plain_split(p: W.Problem, out: dict[str, float]):
    opt = W._adam(p.backbone, p.heads)

    def step():
        t0 = clock()
        opt.zero_grad()
        z = p.backbone(p.x)
        t1 = clock()
        losses = W._losses(p.heads, [z] * len(p.heads), p.targets)
        t2 = clock()
        sum(losses).backward()
        t3 = clock()
        opt.step()
        t4 = clock()
        out["backbone forward"] += t1 - t0
        out["heads forward + losses"] += t2 - t1
        out["backward total"] += t3 - t2
        out["Adam step"] += t4 - t3
    return step


def op_table(fn, steps: int) -> dict[str, float]:
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        for _ in range(steps):
            fn()
    return {e.key: e.self_cpu_time_total / steps / 1e3 for e in prof.key_averages()}


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--k", type=int, nargs="+", default=[8, 32])
    parser.add_argument("--d", type=int, default=256)
    parser.add_argument("--methods", nargs="+", default=["sum", "mean", "pcgrad", "mgda", "gradnorm", "rotograd"])
    parser.add_argument("--rounds", type=int, default=6)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--top", type=int, default=8)
    parser.add_argument("--clock", choices=sorted(CLOCKS), default="wall")
    args = parser.parse_args()
    global clock
    clock = CLOCKS[args.clock]
    torch.set_num_threads(args.threads)
    env = {k: v for k, v in sorted(os.environ.items()) if k.startswith(("OMP_", "MKL_", "KMP_", "GOMP_"))}
    print(f"torch {torch.__version__}, {args.threads} threads, OpenMP/MKL environment: {env or 'defaults'}")
    timer = StageTimer()
    for k in args.k:
        cfg = W.Config(d=args.d, k=k)
        for method in args.methods:
            plain_t: dict[str, float] = defaultdict(float)
            plain = plain_split(W.make_problem(cfg), plain_t)
            step = instrumented_step(W.make_problem(cfg), method, timer)
            for fn in (plain, step, plain, step):
                fn()
            timer.times.clear()
            plain_t.clear()
            ratios, tp, ts = [], [], []
            for _ in range(args.rounds):
                a = clock()
                plain()
                b = clock()
                step()
                c = clock()
                tp.append(b - a)
                ts.append(c - b)
                ratios.append((c - b) / (b - a))
            n = args.rounds
            print(f"\n=== {method}, d={args.d}, K={k}: step {1e3 * statistics.median(ts):.1f} ms vs plain "
                  f"{1e3 * statistics.median(tp):.1f} ms, ratio {statistics.median(ratios):.3f} "
                  f"(min {min(ratios):.3f}) [instrumented, {args.clock} clock]")
            print("  plain:  " + ", ".join(f"{key} {1e3 * v / n:.1f}" for key, v in plain_t.items()))
            for key, v in sorted(timer.times.items(), key=lambda kv: -kv[1]):
                print(f"  {key:32s} {1e3 * v / n:8.2f} ms")
            ops_plain, ops_step = op_table(plain, 2), op_table(step, 2)
            diff = {key: ops_step.get(key, 0) - ops_plain.get(key, 0) for key in set(ops_plain) | set(ops_step)}
            print("  ops with the largest extra self-CPU time per step (ms): " + ", ".join(
                f"{key} {v:+.2f}" for key, v in sorted(diff.items(), key=lambda kv: -abs(kv[1]))[:args.top]))


if __name__ == "__main__":
    main()
