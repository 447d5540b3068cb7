"""Quickstart: two conflicting regression tasks on synthetic data, one loop over methods.

Run: python examples/quickstart.py   (under a minute on CPU)
"""
import os

import torch
from torch import nn

import gradsurgery as gs


def make_data(n=512, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, 16, generator=g)
    w = torch.randn(16, generator=g)
    y1 = torch.sin(x @ w)[:, None]
    y2 = -10 * torch.sin(x @ w)[:, None] + 0.1 * torch.randn(n, 1, generator=g)  # conflicting, 10x larger
    return x, (y1, y2)


EPOCHS = 2 if os.environ.get("GRADSURGERY_QUICK") else 30  # the test suite runs it at smoke size


def train(method, epochs=EPOCHS, seed=0):
    torch.manual_seed(seed)
    x, (y1, y2) = make_data()
    backbone = nn.Sequential(nn.Linear(16, 64), nn.ReLU(), nn.Linear(64, 32), nn.ReLU())
    heads = nn.ModuleList([nn.Linear(32, 1), nn.Linear(32, 1)])
    base = torch.optim.Adam([*backbone.parameters(), *heads.parameters()], lr=1e-2)
    opt = gs.MultiTaskOptimizer(base, method, num_tasks=2, rep_size=32, method_lr=1e-3)
    for _ in range(epochs):
        for i in range(0, len(x), 64):
            xb, t1, t2 = x[i:i + 64], y1[i:i + 64], y2[i:i + 64]
            opt.zero_grad()
            z1, z2 = opt.fork(backbone(xb))
            losses = [nn.functional.mse_loss(heads[0](z1), t1), nn.functional.mse_loss(heads[1](z2), t2)]
            opt.backward(losses)
            opt.step()
    with torch.no_grad():  # the heads read their own views (rotated, for rotation methods)
        z1, z2 = opt.fork(backbone(x))
        return [nn.functional.mse_loss(heads[0](z1), y1).item(), nn.functional.mse_loss(heads[1](z2), y2).item()]


if __name__ == "__main__":
    print(f"{'method':>14} | {'task 1 MSE':>10} | {'task 2 MSE':>10}")
    for name in gs.methods.available():
        try:
            l1, l2 = train(name)
        except ValueError as err:  # e.g. Krum needs at least 3 tasks; its defaults do not fit 2
            print(f"{name:>14} | not run: {err}")
            continue
        print(f"{name:>14} | {l1:10.4f} | {l2:10.4f}")
