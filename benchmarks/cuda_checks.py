"""CUDA checks of the scale features, printed as one JSON report (needs a CUDA device).

1. Sync-free hot path: for every registered method, a few ``fork``/``backward``/``step``
   with ``check_finite=False`` under ``torch.cuda.set_sync_debug_mode``: ``"warn"`` with
   every warning's gradsurgery frame recorded (all sync points, not only the first), then
   ``"error"`` for a yes/no. Single-process, and on the distributed path (NCCL, one rank:
   the all-reduces and the ranks' check run for real).
2. Mixed precision with float16 autocast and ``torch.amp.GradScaler("cuda")``: distance to
   the float32 run after 10 steps, a forced overflow (step skipped, nothing changed), and
   the coefficients under two loss scales (must be equal; the steps compared are counted,
   and "nothing compared" is reported rather than success when a skip came first).
3. Time per ``weights`` call of the methods with an eigen-decomposition (Jacobi sweeps, the
   default off the CPU, vs ``torch.linalg.eigh``, which syncs) and of Nash-MTL's solve.

Run: ``python benchmarks/cuda_checks.py``.
"""
from __future__ import annotations

import copy
import json
import time
import traceback
import warnings

import torch
import torch.distributed as dist
from torch import nn

import gradsurgery as gs
import gradsurgery.numerics.eigh
from gradsurgery.scale.distributed import is_exact

DEV = torch.device("cuda", 0)
K, F = 3, 64
#: loss scales compared (powers of two: scaling and unscaling are exact without overflow)
SCALES = (2.0 ** 4, 2.0 ** 12)


def _setup(method: str, *, check_finite: bool = False, lr: float = 0.01):
    torch.manual_seed(0)
    backbone = nn.Sequential(nn.Linear(32, F), nn.Tanh(), nn.Linear(F, F)).to(DEV)
    heads = nn.ModuleList([nn.Linear(F, 1) for _ in range(K)]).to(DEV)
    base = torch.optim.SGD([*backbone.parameters(), *heads.parameters()], lr=lr)
    exact = is_exact(gs.methods.create(method)) if dist.is_initialized() else True
    opt = gs.MultiTaskOptimizer(base, method, num_tasks=K, rep_size=F, method_lr=lr,
                                check_finite=check_finite, distributed_exact=exact)
    return backbone, heads, opt


def _batches(n: int, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    return [(torch.randn(64, 32, generator=g).to(DEV), torch.randn(K, 64, 1, generator=g).to(DEV))
            for _ in range(n)]


def _step(backbone, heads, opt, x, y, *, scaler=None, autocast=False, blow_up=1.0):
    opt.zero_grad()
    with torch.autocast("cuda", dtype=torch.float16, enabled=autocast):
        views = opt.fork(backbone(x))
        losses = [(h(v).float() - t).pow(2).mean() for h, v, t in zip(heads, views, y)]
    losses[-1] = losses[-1] * blow_up
    opt.backward(losses, scaler=scaler)
    if scaler is None:
        opt.step()
    else:
        scaler.step(opt)
        scaler.update()


def sync_points(method: str) -> dict:
    backbone, heads, opt = _setup(method)
    batches = _batches(4)
    _step(backbone, heads, opt, *batches[0])  # warm-up: caches, the ranks' agreement check
    torch.cuda.synchronize()
    found: list[str] = []

    def record(message, category, filename, lineno, file=None, line=None):
        frames = [f for f in traceback.extract_stack() if "gradsurgery/" in f.filename]
        where = f"{frames[-1].filename.split('gradsurgery/')[-1]}:{frames[-1].lineno}" if frames else filename
        found.append(f"{where}: {str(message).splitlines()[0][:90]}")

    shown = warnings.showwarning
    warnings.showwarning = record
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("always")
            warnings.showwarning = record
            torch.cuda.set_sync_debug_mode("warn")
            for x, y in batches[1:3]:
                _step(backbone, heads, opt, x, y)
    finally:
        torch.cuda.set_sync_debug_mode(0)
        warnings.showwarning = shown
    torch.cuda.synchronize()
    error = None
    torch.cuda.set_sync_debug_mode("error")
    try:
        _step(backbone, heads, opt, *batches[3])
    except RuntimeError as e:
        error = str(e).splitlines()[0][:160]
    finally:
        torch.cuda.set_sync_debug_mode(0)
    return {"sync_points": sorted(set(found)), "error_mode": error or "ok"}


def _params(opt):
    return [p.detach().clone() for g in opt.param_groups for p in g["params"]]


def amp_checks(method: str) -> dict:
    out = {}
    batches = _batches(10, seed=1)
    runs = {}
    for mode in ("float32", "float16"):
        backbone, heads, opt = _setup(method, check_finite=True)
        scaler = torch.amp.GradScaler("cuda") if mode == "float16" else None
        for x, y in batches:
            _step(backbone, heads, opt, x, y, scaler=scaler, autocast=mode == "float16")
        runs[mode] = torch.cat([p.flatten() for p in _params(opt)])
    start = torch.cat([p.detach().flatten() for m in _setup(method)[:2] for p in m.parameters()])
    n = start.numel()
    out["fp16_rel_dist_to_fp32"] = ((runs["float16"] - runs["float32"]).norm() / runs["float32"].norm()).item()
    out["fp32_distance_travelled_rel"] = ((runs["float32"][:n] - start).norm() / start.norm()).item()

    # the scale never changes a decision: compared step by step while both runs took the
    # same steps (a step GradScaler skipped has no coefficients, and after it the runs'
    # parameters differ, so later steps are not comparable)
    weights = []
    for scale in SCALES:
        backbone, heads, opt = _setup(method, check_finite=True)
        scaler = torch.amp.GradScaler("cuda", init_scale=scale)
        w = []
        for x, y in batches[:5]:
            _step(backbone, heads, opt, x, y, scaler=scaler, autocast=True)
            w.append(opt.stats.get("weights"))
        weights.append(w)
    compared, equal = 0, True
    for a, b in zip(*weights):
        if a is None or b is None:
            break
        compared += 1
        equal = equal and torch.equal(a, b)
    out["coefficients_steps_compared"] = compared
    out["coefficients_steps_not_compared"] = len(weights[0]) - compared
    out["coefficients_equal_across_scales"] = equal if compared else "nothing compared (a step was skipped first)"

    # a forced overflow skips the step and changes nothing
    backbone, heads, opt = _setup(method, check_finite=True)
    scaler = torch.amp.GradScaler("cuda", init_scale=2.0 ** 16)
    _step(backbone, heads, opt, *batches[0], scaler=scaler, autocast=True)
    before, params = copy.deepcopy(opt.state_dict()), _params(opt)
    _step(backbone, heads, opt, *batches[1], scaler=scaler, autocast=True, blow_up=float("inf"))
    out["overflow_scale_halved"] = scaler.get_scale() == 2.0 ** 15
    out["overflow_params_unchanged"] = all(torch.equal(a, b) for a, b in zip(_params(opt), params))
    try:
        torch.testing.assert_close(opt.state_dict(), before, rtol=0, atol=0, equal_nan=True)
        out["overflow_state_unchanged"] = True
    except AssertionError as e:
        out["overflow_state_unchanged"] = str(e).splitlines()[0][:120]
    return out


def weights_timing() -> dict:
    """Milliseconds per ``weights`` call (median of 20, after 3 warm-ups), K = 3, 8, 32."""
    out = {}
    for k in (3, 8, 32):
        g = torch.randn(k, 256, device=DEV)
        gram, losses = g @ g.T, torch.ones(k, device=DEV)
        for name, solver in (("aligned_mtl", "jacobi"), ("aligned_mtl", "torch"), ("imtl_g", "jacobi"),
                             ("imtl_g", "torch"), ("nash_mtl", None)):
            method = gs.methods.create(name)
            method.bind(k, device=DEV, dtype=torch.float32, generator=torch.Generator())
            original = gs.numerics.eigh._uses_torch
            if solver is not None:
                gs.numerics.eigh._uses_torch = lambda a, _s, use=solver == "torch": use
            try:
                times = []
                for _ in range(23):
                    torch.cuda.synchronize()
                    start = time.perf_counter()
                    method.weights(gram, losses)
                    torch.cuda.synchronize()
                    times.append(time.perf_counter() - start)
                out[f"K={k} {name}" + (f" {solver}" if solver else "")] = round(sorted(times[3:])[10] * 1e3, 3)
            except Exception as e:
                out[f"K={k} {name} {solver}"] = f"crashed: {type(e).__name__}: {str(e)[:120]}"
            finally:
                gs.numerics.eigh._uses_torch = original
    return out


def main() -> None:
    report = {"torch": torch.__version__, "device": torch.cuda.get_device_name(), "single": {}, "nccl": {},
              "amp_float16": {}, "weights_ms": weights_timing()}
    for method in gs.methods.available():
        try:
            report["single"][method] = sync_points(method)
        except Exception as e:  # report and go on: one run must say everything
            report["single"][method] = f"crashed: {type(e).__name__}: {str(e)[:200]}"
    try:
        dist.init_process_group("nccl", store=dist.HashStore(), rank=0, world_size=1, device_id=DEV)
        for method in gs.methods.available():
            try:
                report["nccl"][method] = sync_points(method)
            except Exception as e:
                report["nccl"][method] = f"crashed: {type(e).__name__}: {str(e)[:200]}"
        dist.destroy_process_group()
    except Exception as e:
        report["nccl"] = f"crashed: {type(e).__name__}: {str(e)[:200]}"
    for method in ("pcgrad", "mgda", "gradnorm", "rotograd", "upgrad"):
        if method in gs.methods.available():
            try:
                report["amp_float16"][method] = amp_checks(method)
            except Exception as e:
                report["amp_float16"][method] = f"crashed: {type(e).__name__}: {traceback.format_exc()[-400:]}"
    print(json.dumps(report, indent=1))


if __name__ == "__main__":
    torch.cuda.set_device(DEV)
    main()
