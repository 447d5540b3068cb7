"""Per-step time: plain sum(losses).backward() vs gradsurgery rotograd/rotogradnorm vs the
rotograd package 0.1.6 (K=8, 256 features, batch 256, MLP 64-1024-1024-256, heads
256-256-1, Adam), interleaved rounds, median per method.

    python benchmarks/rotograd_vs_package.py ROUNDS A_SCALE THREADS

A_SCALE sets both implementations' rotation parameters to A_SCALE * N(0, 1) (0: the first
step; the cost of matrix_exp's derivative, rotograd's, grows with ||A||). Needs the test
extra (rotograd; with geotorch >= 0.4 the tests' geotorch.parametrize alias is used).
"""
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))
import conftest  # noqa: F401,E402  (geotorch.parametrize alias for the package)
import torch, rotograd
from torch import nn
import gradsurgery as gs

K, F, B = 8, 256, 256
torch.manual_seed(0)
def model():
    bb = nn.Sequential(nn.Linear(64, 1024), nn.ReLU(), nn.Linear(1024, 1024), nn.ReLU(), nn.Linear(1024, F))
    hs = [nn.Sequential(nn.Linear(F, 256), nn.ReLU(), nn.Linear(256, 1)) for _ in range(K)]
    return bb, hs
x = torch.randn(B, 64); ys = torch.randn(K, B, 1)
def losses(preds): return [(p - y).pow(2).mean() for p, y in zip(preds, ys)]
def params(bb, hs): return [*bb.parameters(), *(p for h in hs for p in h.parameters())]

def plain():
    bb, hs = model(); opt = torch.optim.Adam(params(bb, hs), 1e-3)
    def step():
        opt.zero_grad(); z = bb(x); sum(losses([h(z) for h in hs])).backward(); opt.step()
    return step
SCALE = float(sys.argv[2]) if len(sys.argv) > 2 else 0.0  # ||A|| of a "trained" rotation
A0 = SCALE * torch.randn(K, F, F)
def ours(name, **kw):
    bb, hs = model()
    opt = gs.MultiTaskOptimizer(torch.optim.Adam(params(bb, hs), 1e-3), name, num_tasks=K, rep_size=F, method_lr=1e-4, **kw)
    with torch.no_grad(): opt.rotations.skew_params.copy_(A0)
    def step():
        opt.zero_grad(); v = opt.fork(bb(x)); opt.backward(losses([h(z) for h, z in zip(hs, v)])); opt.step()
    return step
def package(cls, **kw):
    bb, hs = model()
    m = cls(bb, list(hs), F, **kw); m.train()
    with torch.no_grad():
        for i in range(K): getattr(m.parametrizations, f"rotation_{i}").original.copy_(A0[i])
    om = torch.optim.Adam(m.model_parameters(), 1e-3); orr = torch.optim.Adam(m.parameters(), 1e-4)
    def step():
        om.zero_grad(); orr.zero_grad()
        with rotograd.cached():
            preds = m(x); m.backward(losses(preds))
        om.step(); orr.step()
    return step
steps = {"sum.backward": plain(), "gs rotograd": ours("rotograd"), "gs rotogradnorm": ours("rotogradnorm", alpha=1.0),
         "pkg RotoGrad": package(rotograd.RotoGrad), "pkg RotoGradNorm": package(rotograd.RotoGradNorm, alpha=1.0)}
torch.set_num_threads(int(sys.argv[3]) if len(sys.argv) > 3 else torch.get_num_threads())
times = {k: [] for k in steps}
for k, f in steps.items(): f()  # warm-up
for r in range(int(sys.argv[1]) if len(sys.argv) > 1 else 3):
    for k, f in steps.items():
        t = time.perf_counter(); f(); times[k].append(time.perf_counter() - t)
med = {k: statistics.median(v) for k, v in times.items()}
print("threads", torch.get_num_threads(), "rounds", len(times["sum.backward"]), "A scale", SCALE)
for k, v in med.items(): print(f"{k:18s} {v*1e3:9.1f} ms")
for n in ("rotograd", "rotogradnorm"):
    pk = "pkg RotoGrad" if n == "rotograd" else "pkg RotoGradNorm"
    print(f"gs {n}: {med['gs '+n]/med['sum.backward']:.2f}x plain backward, {med['gs '+n]/med[pk]:.3f}x the package ({med[pk]/med['gs '+n]:.1f}x faster)")
