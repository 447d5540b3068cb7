"""Compare methods the way you would in your own code: a plain Python loop over method
names. Nothing but the ``method=`` argument changes between runs.

The data are the bundled ``multidigits`` benchmark's (two overlapping 8x8 digits; task 1
names the left one, task 2 the right one), so this needs scikit-learn:
``pip install -e ".[examples]"``. ``gs.compare("multidigits")`` does the same in one call,
with seeds, plots and the time per step.

Run: python examples/compare_methods.py   (under a minute on CPU)
"""
import os

import torch
from torch import nn

import gradsurgery as gs
from gradsurgery.compare import delta_m
from gradsurgery.data import get

QUICK = os.environ.get("GRADSURGERY_QUICK") == "1"  # smoke-test size (used by the tests)
METHODS = ["mean", "pcgrad", "mgda", "imtl_g", "rotograd"] if not QUICK else ["mean", "pcgrad"]
EPOCHS = 1 if QUICK else 5


def train(method: str, data, seed: int = 0) -> list[float]:
    """Trains a fresh model with ``method``; returns the held-out accuracy of each task."""
    torch.manual_seed(seed)
    backbone = nn.Sequential(nn.Linear(96, 128), nn.ReLU(), nn.Linear(128, 32), nn.ReLU())
    heads = nn.ModuleList([nn.Linear(32, 10), nn.Linear(32, 10)])
    base = torch.optim.Adam([*backbone.parameters(), *heads.parameters()], lr=2e-3)
    opt = gs.MultiTaskOptimizer(base, method, num_tasks=2, rep_size=32, method_lr=1e-3)
    shuffle = torch.Generator().manual_seed(seed)
    for _ in range(EPOCHS):
        order = torch.randperm(len(data.x_train), generator=shuffle)
        for i in range(0, len(order), 128):
            idx = order[i:i + 128]
            opt.zero_grad()
            z_left, z_right = opt.fork(backbone(data.x_train[idx]))
            losses = [nn.functional.cross_entropy(heads[0](z_left), data.y_train[0][idx]),
                      nn.functional.cross_entropy(heads[1](z_right), data.y_train[1][idx])]
            opt.backward(losses)
            opt.step()
    with torch.no_grad():  # evaluation: fork under no_grad records nothing
        views = opt.fork(backbone(data.x_test))
        return [(head(v).argmax(1) == y).float().mean().item()
                for head, v, y in zip(heads, views, data.y_test)]


if __name__ == "__main__":
    torch.set_num_threads(1)  # tiny model: one thread is fastest
    data = get("multidigits")
    results = {method: train(method, data) for method in METHODS}
    print(f"{'method':>12} | {'left acc':>8} | {'right acc':>9} | {'Δm% vs mean':>11}")
    for method, (left, right) in results.items():
        dm = delta_m([left, right], results["mean"], higher_is_better=[True, True])
        print(f"{method:>12} | {left:8.4f} | {right:9.4f} | {dm:+11.2f}")
