"""Running a test's worker on several gloo ranks (tests of DDP, FSDP2 and Cayley rotations):
each rank saves its results to ``out/rank{r}.pt``; the caller compares them with a
single-process run."""
from __future__ import annotations

import socket
import time
from pathlib import Path
from typing import Callable

import pytest
import torch
import torch.multiprocessing as mp


def free_port() -> int:
    """A free TCP port on the loopback interface, for ``init_method='tcp://127.0.0.1:PORT'``."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def run_ranks(worker: Callable[[int, int, str], None], out: Path, world: int, timeout: float = 180) -> list[dict]:
    """Spawns ``worker(rank, port, out)`` on ``world`` processes and returns each rank's saved
    results; fails the test (killing the workers) when they hang past ``timeout`` seconds.

    A worker killed by a signal (gloo's threads have aborted a process at teardown on this
    loaded 2-core machine: "terminate called without an active exception", not reproducible
    in isolation) is run once more, on a fresh port; an exception raised by the worker's own
    code, or a second death, fails the test."""
    for attempt in (1, 2):
        ctx = mp.spawn(worker, args=(free_port(), str(out)), nprocs=world, join=False)
        deadline = time.monotonic() + timeout
        try:
            while not ctx.join(timeout=5):
                if time.monotonic() > deadline:
                    for p in ctx.processes:
                        p.kill()
                    pytest.fail(f"the {world} workers hung (a collective mismatch?)")
        except mp.ProcessExitedException as err:
            if attempt == 2 or err.signal_name is None:
                raise
            continue
        return [torch.load(Path(out) / f"rank{r}.pt") for r in range(world)]


def max_diff(a: list[torch.Tensor], b: list[torch.Tensor]) -> float:
    """The largest elementwise difference between two lists of tensors of the same shapes."""
    assert len(a) == len(b)
    return max((x - y).abs().max().item() for x, y in zip(a, b))
