"""Cost of distributed-exact surgery under DDP: 2 CPU processes (gloo), step time of

- ``plain``: DDP over backbone and heads, ``mean(losses).backward()``;
- ``per-rank``: DDP backbone + ``MultiTaskOptimizer(..., distributed_exact=False)``;
- ``exact``: DDP backbone + ``MultiTaskOptimizer(...)`` (distributed-exact),

as ratios to ``plain``, and the bytes the surgery all-reduces per step (the Gram, the
losses and a finiteness flag: ``O(K^2)``, whatever the model size), next to the bytes of
the heads' gradients (which plain DDP all-reduces too) and of the model's gradients.

Run: ``python benchmarks/ddp.py [--method mgda] [--steps 30] [--width 512]``.
"""
from __future__ import annotations

import argparse
import json
import os
import socket
import statistics
import time

import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch import nn

import gradsurgery as gs

WORLD = 2


def _model(width: int, tasks: int):
    torch.manual_seed(0)
    backbone = nn.Sequential(nn.Linear(128, width), nn.ReLU(), nn.Linear(width, width), nn.ReLU(),
                             nn.Linear(width, 256))
    heads = nn.ModuleList([nn.Linear(256, 1) for _ in range(tasks)])
    return backbone, heads


class _Whole(nn.Module):
    def __init__(self, backbone, heads):
        super().__init__()
        self.backbone, self.heads = backbone, heads

    def forward(self, x):
        z = self.backbone(x)
        return [h(z) for h in self.heads]


def _runner(mode: str, args):
    backbone, heads = _model(args.width, args.tasks)
    if mode == "plain":
        model = nn.parallel.DistributedDataParallel(_Whole(backbone, heads))
        opt = torch.optim.SGD(model.parameters(), lr=1e-3)

        def step(x, y):
            opt.zero_grad()
            losses = [(p - t).pow(2).mean() for p, t in zip(model(x), y)]
            torch.stack(losses).mean().backward()
            opt.step()
        return step, None
    shared = nn.parallel.DistributedDataParallel(backbone)
    base = torch.optim.SGD([*backbone.parameters(), *heads.parameters()], lr=1e-3)
    mto = gs.MultiTaskOptimizer(base, args.method, num_tasks=args.tasks, rep_size=256,
                                distributed_exact=mode == "exact", check_finite=False)

    def step(x, y):
        mto.zero_grad()
        views = mto.fork(shared(x))
        mto.backward([(h(v) - t).pow(2).mean() for h, v, t in zip(heads, views, y)])
        mto.step()
    return step, mto


def _worker(rank: int, port: int, args, out: str):
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=WORLD)
    g = torch.Generator().manual_seed(rank)
    x = torch.randn(args.batch // WORLD, 128, generator=g)
    y = torch.randn(args.tasks, args.batch // WORLD, 1, generator=g)
    modes = ("plain", "per-rank", "exact")
    runners = {m: _runner(m, args) for m in modes}
    times: dict[str, list[float]] = {m: [] for m in modes}
    for m in modes:  # warm-up (and the first step's check of the ranks' agreement)
        for _ in range(3):
            runners[m][0](x, y)
    for r in range(args.rounds):  # interleaved and rotated, so that load changes hit every mode alike
        for m in modes[r % 3:] + modes[:r % 3]:
            dist.barrier()
            t0 = time.perf_counter()
            for _ in range(args.steps):
                runners[m][0](x, y)
            times[m].append((time.perf_counter() - t0) / args.steps)
    if rank == 0:
        per_step = {m: statistics.median(v) for m, v in times.items()}
        sync = runners["exact"][1].distributed.bytes_last_step
        model_bytes = sum(p.numel() * p.element_size() for p in _model(args.width, args.tasks)[0].parameters())
        result = {
            "method": args.method, "tasks": args.tasks, "global_batch": args.batch, "width": args.width,
            "ms_per_step": {m: round(1e3 * t, 3) for m, t in per_step.items()},
            "ratio_to_plain_ddp": {m: round(t / per_step["plain"], 3) for m, t in per_step.items()},
            "exact_over_per_rank": round(per_step["exact"] / per_step["per-rank"], 3),
            "bytes_all_reduced_per_step": {"surgery": sync["surgery"], "heads": sync["heads"],
                                           "backbone_by_ddp": model_bytes},
        }
        with open(out, "w") as f:
            json.dump(result, f)
    dist.destroy_process_group()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--method", default="mgda")
    parser.add_argument("--tasks", type=int, default=4)
    parser.add_argument("--batch", type=int, default=256, help="global batch")
    parser.add_argument("--width", type=int, default=512)
    parser.add_argument("--steps", type=int, default=30)
    parser.add_argument("--rounds", type=int, default=6)
    args = parser.parse_args()
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    out = os.path.join(os.environ.get("TMPDIR", "/tmp"), f"gradsurgery-ddp-{os.getpid()}.json")
    mp.spawn(_worker, args=(port, args, out), nprocs=WORLD, join=True)
    with open(out) as f:
        result = json.load(f)
    os.remove(out)
    print(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
