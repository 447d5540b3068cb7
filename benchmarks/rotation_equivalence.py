"""Training equivalence of the rotations' parametrisations on a small RotoGrad problem,
over a longer run than the bundled benchmarks: ``rotation_param="riemannian"`` against
``"expm"`` (and ``"cayley"``), several seeds, the same data and initial model per seed.

Usage::

    python benchmarks/rotation_equivalence.py                 # 4 seeds x 1000 steps
    python benchmarks/rotation_equivalence.py --seeds 3 --steps 300

The problem: 3 regression tasks sharing a 2-layer MLP backbone (16 -> 64 -> 32), linear
heads, targets from a random teacher with conflicting per-task readouts plus noise;
Adam at 1e-3 (rotations at ``method_lr`` 1e-3), batch 64. Prints, per parametrisation,
the mean and standard deviation over seeds of the final held-out loss of every task (the
mean of the last 10 evaluations, run every 10 steps) and the final orthogonality error.
"""
from __future__ import annotations

import argparse
import statistics
import sys
from pathlib import Path

sys.path.append(str(Path(__file__).resolve().parent.parent))

import torch  # noqa: E402
from torch import nn  # noqa: E402

import gradsurgery as gs  # noqa: E402
from gradsurgery.numerics.retraction import orthogonality_error  # noqa: E402

K, IN, HID, REP, BATCH = 3, 16, 64, 32, 64


def run(param: str, seed: int, steps: int) -> tuple[list[float], float]:
    g = torch.Generator().manual_seed(1000 + seed)
    teacher = torch.randn(IN, REP, generator=g) / IN ** 0.5
    readouts = torch.randn(K, REP, generator=g)
    test_x = torch.randn(512, IN, generator=g)

    def targets(x: torch.Tensor) -> torch.Tensor:
        return torch.tanh(x @ teacher) @ readouts.T  # (batch, K)

    test_y = targets(test_x)
    torch.manual_seed(seed)
    backbone = nn.Sequential(nn.Linear(IN, HID), nn.ReLU(), nn.Linear(HID, REP))
    heads = nn.ModuleList([nn.Linear(REP, 1) for _ in range(K)])
    base = torch.optim.Adam([*backbone.parameters(), *heads.parameters()], lr=1e-3)
    opt = gs.MultiTaskOptimizer(base, "rotograd", num_tasks=K, rep_size=REP, method_lr=1e-3, rotation_param=param)
    history = []
    for t in range(steps):
        x = torch.randn(BATCH, IN, generator=g)
        y = targets(x) + 0.1 * torch.randn(BATCH, K, generator=g)
        opt.zero_grad()
        views = opt.fork(backbone(x))
        opt.backward([nn.functional.mse_loss(h(v).squeeze(1), y[:, k]) for k, (h, v) in enumerate(zip(heads, views))])
        opt.step()
        if t % 10 != 9:
            continue
        with torch.no_grad():
            views = opt.fork(backbone(test_x))
            history.append([float(nn.functional.mse_loss(h(v).squeeze(1), test_y[:, k]))
                            for k, (h, v) in enumerate(zip(heads, views))])
    final = [statistics.mean(h[k] for h in history[-10:]) for k in range(K)]
    return final, float(orthogonality_error(opt.rotations.matrices().detach()))


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seeds", type=int, default=4)
    parser.add_argument("--steps", type=int, default=1000)
    parser.add_argument("--params", default="expm,riemannian")
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    print(f"{args.seeds} seeds x {args.steps} steps; final held-out loss per task: mean ± std over seeds")
    print("| rotation_param | " + " | ".join(f"task {k}" for k in range(K)) + " | mean | max ‖RᵀR − I‖ |")
    print("| --- " * (K + 3) + "|")
    for param in args.params.split(","):
        runs = [run(param, seed, args.steps) for seed in range(args.seeds)]
        cells = [[r[0][k] for r in runs] for k in range(K)] + [[statistics.mean(r[0]) for r in runs]]
        fmt = [f"{statistics.mean(c):.4f} ± {statistics.stdev(c) if len(c) > 1 else 0:.4f}" for c in cells]
        print(f"| `{param}` | " + " | ".join(fmt) + f" | {max(r[1] for r in runs):.1e} |", flush=True)


if __name__ == "__main__":
    main()
