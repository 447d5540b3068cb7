"""The cost of checking, at every ``backward``, that each head reads its own view
(:func:`gradsurgery.pipeline.graph.check_readers`), on a small MLP where it weighs most.

Usage::

    python benchmarks/reader_check.py [--rounds 400]

Three step loops in one process, interleaved round by round: plain
``sum(losses).backward()``, ``mgda`` with the check at every step (the library), and
``mgda`` with the check on the first step only (what 0.1.0 did: ``check_readers``
replaced by its cached first answer). Prints the medians of the paired per-round ratios.
Model: MLP 32-64-64-16, K=4 heads 16-16-1, batch 64, SGD.
"""
from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch
from torch import nn

sys.path.append(str(Path(__file__).resolve().parent.parent))
import gradsurgery as gs  # noqa: E402
from gradsurgery.pipeline import graph  # noqa: E402

K = 4


def _setup(method: str | None):
    torch.manual_seed(0)
    backbone = nn.Sequential(nn.Linear(32, 64), nn.ReLU(), nn.Linear(64, 64), nn.ReLU(), nn.Linear(64, 16))
    heads = nn.ModuleList(nn.Sequential(nn.Linear(16, 16), nn.ReLU(), nn.Linear(16, 1)) for _ in range(K))
    base = torch.optim.SGD([*backbone.parameters(), *heads.parameters()], lr=1e-3)
    x, y = torch.randn(64, 32), torch.randn(K, 64, 1)
    if method is None:
        def step():
            base.zero_grad()
            z = backbone(x)
            sum(nn.functional.mse_loss(h(z), t) for h, t in zip(heads, y)).backward()
            base.step()
        return step
    opt = gs.MultiTaskOptimizer(base, method, num_tasks=K)

    def step():
        opt.zero_grad()
        views = opt.fork(backbone(x))
        opt.backward([nn.functional.mse_loss(h(v), t) for h, v, t in zip(heads, views, y)])
        opt.step()
    return step


def _first_only(check):
    cache: dict = {}

    def cached(losses, path, shared):
        if "owners" not in cache:
            cache["owners"] = check(losses, path, shared)
        return cache["owners"]
    return cached


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--rounds", type=int, default=400)
    args = parser.parse_args()
    check = graph.check_readers
    cached = _first_only(check)  # the optimizer calls graph.check_readers: swapped per loop
    loops = {"plain": (_setup(None), check), "every": (_setup("mgda"), check), "first": (_setup("mgda"), cached)}
    times: dict[str, list[float]] = {name: [] for name in loops}
    for r in range(20 + args.rounds):  # 20 warm-up rounds
        for name, (fn, reader_check) in loops.items():
            graph.check_readers = reader_check
            t = time.perf_counter()
            fn()
            if r >= 20:
                times[name].append(time.perf_counter() - t)
    graph.check_readers = check
    ratio = statistics.median(e / f for e, f in zip(times["every"], times["first"], strict=True))
    print(f"torch {torch.__version__}, threads {torch.get_num_threads()}, {args.rounds} rounds")
    for name in ("every", "first"):
        over_plain = statistics.median(t / p for t, p in zip(times[name], times["plain"], strict=True))
        label = "every step" if name == "every" else "first step only"
        print(f"mgda, check {label} / plain backward: {over_plain:.3f}")
    print(f"every step / first step only: {ratio:.4f}")
    print("median step times (ms): " + ", ".join(f"{n} {1e3 * statistics.median(t):.3f}" for n, t in times.items()))


if __name__ == "__main__":
    main()
