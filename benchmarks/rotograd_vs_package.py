"""Per-step time of the RotoGrad family: plain ``sum(losses).backward()`` vs gradsurgery's
``rotograd``/``rotogradnorm`` (both parametrisations) vs the rotograd 0.1.6 package, on
the workload of ``step_time.py`` (K=8, 256 features, batch 256, MLP 64-1024-1024-256,
heads 256-256-1, Adam), interleaved rounds, medians of the per-round ratios to plain.

    python benchmarks/rotograd_vs_package.py [--rounds 5] [--scale 0.03] [--threads 2]

``--scale`` sets every implementation's rotation parameters to ``scale * N(0, 1)``
(default 0: the first steps; about 0.03 gives ``||skew(A)||_2 ~ 1``, trained generators:
the exponential's cost grows with ``||A||``, the Cayley map's does not). Self-contained:
the models come from ``_workloads.py``, the package is imported by
:func:`_workloads.import_rotograd`. Runs in the environment it is started in.
"""
from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.append(str(Path(__file__).resolve().parent.parent))  # gradsurgery from this checkout

import _workloads as W  # noqa: E402


def _set_generators(step, scale: float, k: int, m: int) -> None:
    """Sets the rotation parameters ``A`` the step function's model trains (its closure)."""
    a = scale * torch.randn(k, m, m, generator=torch.Generator().manual_seed(1))
    for cell in step.__closure__ or ():
        obj = cell.cell_contents
        with torch.no_grad():
            if hasattr(obj, "rotations"):  # gradsurgery.MultiTaskOptimizer
                obj.rotations.skew_params.copy_(a)
            elif hasattr(obj, "parametrizations"):  # the package's model
                for i in range(k):
                    getattr(obj.parametrizations, f"rotation_{i}").original.copy_(a[i])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--scale", type=float, default=0.0)
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    cfg = W.Config(d=256, k=8)
    rows = {"gs rotograd": {"lib": "gradsurgery", "method": "rotograd"},
            "gs rotograd cayley": {"lib": "gradsurgery", "method": "rotograd", "rotation_param": "cayley"},
            "gs rotogradnorm": {"lib": "gradsurgery", "method": "rotogradnorm"},
            "pkg RotoGrad": {"lib": "rotograd", "method": "RotoGrad"},
            "pkg RotoGradNorm": {"lib": "rotograd", "method": "RotoGradNorm"}}
    plain = W.build({"lib": "plain"}, W.make_problem(cfg))
    steps = {}
    for name, row in rows.items():
        steps[name] = W.build(row, W.make_problem(cfg))
        _set_generators(steps[name], args.scale, cfg.k, cfg.d)
    ratios: dict[str, list[float]] = {name: [] for name in steps}
    ms: dict[str, list[float]] = {name: [] for name in ["plain", *steps]}
    for f in (plain, *steps.values()):  # warm-up
        f()
    for _ in range(args.rounds):
        for name, f in steps.items():
            t0 = time.perf_counter()
            plain()
            t1 = time.perf_counter()
            f()
            t2 = time.perf_counter()
            ratios[name].append((t2 - t1) / (t1 - t0))
            ms["plain"].append(t1 - t0)
            ms[name].append(t2 - t1)
    med = {name: statistics.median(v) for name, v in ratios.items()}
    print(f"threads {args.threads}, rounds {args.rounds}, A scale {args.scale}; plain "
          f"{1e3 * statistics.median(ms['plain']):.1f} ms (median)")
    for name in steps:
        print(f"{name:20s} {1e3 * statistics.median(ms[name]):8.1f} ms  {med[name]:.2f}x plain")
    for ours, theirs in (("gs rotograd", "pkg RotoGrad"), ("gs rotograd cayley", "pkg RotoGrad"),
                         ("gs rotogradnorm", "pkg RotoGradNorm")):
        print(f"{ours} / {theirs}: {med[ours] / med[theirs]:.3f}")


if __name__ == "__main__":
    main()
