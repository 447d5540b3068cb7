"""The rotations' exponential on CUDA: accuracy and cost of both plans of
:func:`gradsurgery.numerics.expm.expm` against ``torch.linalg.matrix_exp`` (one JSON report).

For ``K = 8`` generators ``skew(A)``, ``A ~ scale N(0, 1)``, ``m`` in {64, 256, 1024}:
the largest relative error of the value and of the derivative (a random probe) against
``matrix_exp`` and its autograd derivative in float64, and the time of one forward and
backward in float32 (CUDA events, median of 20 after warm-up) for the host-chosen plan,
the sync-free plan and ``matrix_exp``. The ratio of the two plans is what
:data:`gradsurgery.numerics.expm.SYNC_FREE_MAX_SIZE` weighs against one synchronisation.

Also times the Cayley map (``rotation_param="cayley"``) the same way. Run (needs a CUDA
device): ``python benchmarks/cuda_expm.py > docs/cuda_expm.json``; ``step_time.py --docs``
renders that file in docs/benchmarks.md.
"""
from __future__ import annotations

import json
import statistics

import torch

from gradsurgery.numerics import expm as numerics_expm
from gradsurgery.numerics.cayley import cayley

DEV = torch.device("cuda", 0)
K = 8


def _exp(plan: str):
    if plan == "matrix_exp":
        return torch.linalg.matrix_exp
    if plan == "cayley":
        return cayley
    return lambda x: numerics_expm.expm(x, sync_free=plan == "sync_free")


def accuracy(m: int, scale: float) -> dict:
    g = torch.Generator(device=DEV).manual_seed(0)
    a = (scale * torch.randn(K, m, m, generator=g, device=DEV, dtype=torch.float64)).requires_grad_()
    probe = torch.randn(K, m, m, generator=g, device=DEV, dtype=torch.float64)
    ref = torch.linalg.matrix_exp(numerics_expm.skew(a))
    ref_grad, = torch.autograd.grad((ref * probe).sum(), a)
    out = {}
    for plan in ("host", "sync_free"):
        val = _exp(plan)(numerics_expm.skew(a))
        grad, = torch.autograd.grad((val * probe).sum(), a)
        out[plan] = {"value": ((val - ref).norm() / ref.norm()).item(),
                     "derivative": ((grad - ref_grad).norm() / ref_grad.norm()).item()}
    return out


def timing(m: int, scale: float) -> dict:
    a = (scale * torch.randn(K, m, m, device=DEV)).requires_grad_()
    probe = torch.randn(K, m, m, device=DEV)
    out = {}
    for plan in ("host", "sync_free", "matrix_exp", "cayley"):
        f = _exp(plan)
        times = []
        for i in range(25):
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            (f(numerics_expm.skew(a)) * probe).sum().backward()
            end.record()
            torch.cuda.synchronize()
            if i >= 5:
                times.append(start.elapsed_time(end))
        out[plan + "_ms"] = statistics.median(times)
    out["sync_free_over_host"] = out["sync_free_ms"] / out["host_ms"]
    return out


def main() -> None:
    report = {"torch": torch.__version__, "device": torch.cuda.get_device_name(), "K": K, "rows": []}
    for m in (64, 256, 1024):
        for scale in (0.001, 0.01, 0.1):
            report["rows"].append({"m": m, "scale": scale, "float64_rel_error": accuracy(m, scale),
                                   "float32_time": timing(m, scale)})
    print(json.dumps(report, indent=1))


if __name__ == "__main__":
    torch.backends.cuda.matmul.allow_tf32 = False
    main()
