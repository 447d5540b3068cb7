"""FSDP2 backbones (``torch.distributed.fsdp.fully_shard``): 2 CPU processes (gloo), each
with half of every batch and half of every backbone parameter, take the steps of
single-process training on the whole batch, as ``tests/test_distributed.py`` checks for
DDP. Representation-level surgery needs nothing from the backbone's wrapper but one
backward through it: FSDP2 all-gathers the parameters for ``z.backward(g)`` and
reduce-scatters (averages) their gradients, as DDP all-reduces them.

One spawn runs every scenario (spawning costs seconds); the single-process references run
in the test process.
"""
from __future__ import annotations

import os

import pytest
import torch
import torch.distributed as dist
from spawn_helpers import max_diff, run_ranks
from torch import nn

import gradsurgery as gs

fsdp = pytest.importorskip("torch.distributed.fsdp")
if not hasattr(fsdp, "fully_shard"):  # torch < 2.6 has FSDP2 under _composable only
    pytest.skip("this torch has no torch.distributed.fsdp.fully_shard (FSDP2)", allow_module_level=True)

WORLD = 2
STEPS = 6
BATCH = 16
FEATURES = 6
METHODS = ["mgda", "gradnorm", "rotograd"]


def _data():
    g = torch.Generator().manual_seed(4321)
    x = torch.randn(STEPS, BATCH, 5, generator=g, dtype=torch.float64)
    y1 = torch.randn(STEPS, BATCH, 1, generator=g, dtype=torch.float64)
    y2 = torch.randn(STEPS, BATCH, 2, generator=g, dtype=torch.float64)
    return x, y1, y2


def _full(p: torch.Tensor) -> torch.Tensor:
    """A parameter's whole value (an FSDP2 parameter is a DTensor sharded across ranks)."""
    return (p.full_tensor() if hasattr(p, "full_tensor") else p).detach().clone()


def _train(method: str, rows: slice, *, shard: bool = False, exact: bool = True) -> dict[str, object]:
    """``STEPS`` Adam steps on rows ``rows`` of every batch; returns every parameter
    (backbone, heads, the method's own) after training and whether the backbone was sharded."""
    torch.manual_seed(0)
    backbone = nn.Sequential(nn.Linear(5, FEATURES), nn.Tanh(), nn.Linear(FEATURES, FEATURES)).double()
    heads = nn.ModuleList([nn.Linear(FEATURES, 1), nn.Linear(FEATURES, 2)]).double()
    if shard:  # the usual FSDP2 layout: each block its own unit, then the root
        fsdp.fully_shard(backbone[0])
        fsdp.fully_shard(backbone[2])
        fsdp.fully_shard(backbone)
    base = torch.optim.Adam([*backbone.parameters(), *heads.parameters()], lr=0.05)
    opt = gs.MultiTaskOptimizer(base, method, num_tasks=2, rep_size=FEATURES, method_lr=0.05,
                                distributed_exact=exact)
    x, y1, y2 = _data()
    for t in range(STEPS):
        opt.zero_grad()
        z1, z2 = opt.fork(backbone(x[t, rows]))
        opt.backward([(heads[0](z1) - y1[t, rows]).pow(2).mean(), (heads[1](z2).tanh() - y2[t, rows]).pow(2).mean()])
        opt.step()
    local = next(iter(backbone.parameters()))
    return {"params": [_full(p) for g in base.param_groups for p in g["params"]],
            "sharded": hasattr(local, "full_tensor") and local.to_local().shape != local.shape}


def _worker(rank: int, port: int, out: str) -> None:
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=WORLD)
    rows = slice(rank * BATCH // WORLD, (rank + 1) * BATCH // WORLD)
    results = {m: _train(m, rows, shard=True) for m in METHODS}
    results["mgda/per-rank"] = _train("mgda", rows, shard=True, exact=False)
    torch.save(results, os.path.join(out, f"rank{rank}.pt"))
    dist.destroy_process_group()



@pytest.fixture(scope="module")
def ranks(tmp_path_factory) -> list[dict]:
    out = tmp_path_factory.mktemp("fsdp")
    return run_ranks(_worker, out, WORLD)



@pytest.mark.parametrize("method", METHODS)
def test_fsdp2_equals_single_process_on_global_batch(ranks, method):
    assert ranks[0][method]["sharded"]  # each rank really held half of the backbone
    reference = _train(method, slice(None))["params"]
    assert max_diff(ranks[0][method]["params"], reference) < 1e-9
    assert max_diff(ranks[0][method]["params"], ranks[1][method]["params"]) == 0


def test_per_rank_surgery_differs_under_fsdp2(ranks):
    """Proves the comparison can fail: deciding from half the batch changes the run."""
    reference = _train("mgda", slice(None))["params"]
    assert max_diff(ranks[0]["mgda/per-rank"]["params"], reference) > 1e-4
    assert max_diff(ranks[0]["mgda/per-rank"]["params"], ranks[1]["mgda/per-rank"]["params"]) == 0
