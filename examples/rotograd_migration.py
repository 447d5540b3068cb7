"""Migrating from the ``rotograd`` package: its README's training step, run by gradsurgery.

The only change to a rotograd user's code is the import::

    import rotograd                          # before
    import gradsurgery.compat as rotograd    # after

``step`` below is the README's step function (rotograd 0.1.2) as written there, except for
one typo of the README (``pred1, pred_2 = model(x)`` then ``loss_task2(pred2, y2)``). The
README's optimizer lines (``nn.Adam({...})``) do not run as printed either; the lines below
are what they mean. With the same seed the facade starts from the package's random
rotations and takes its steps (``tests/test_rotograd_reference.py`` checks it).

Run: ``python examples/rotograd_migration.py`` (a few seconds on CPU).
"""
from __future__ import annotations

import torch
from torch import nn

import gradsurgery.compat


def train(rotograd=gradsurgery.compat, steps: int = 200, seed: int = 0):
    """Trains a two-task regression with ``rotograd.RotoGradNorm`` (``rotograd`` being the
    package or :mod:`gradsurgery.compat`); returns the model and the loss history."""
    torch.manual_seed(seed)
    size_z, learning_rate_model, learning_rate_rotograd = 16, 1e-2, 1e-3
    x_all = torch.randn(steps, 32, 8)
    y1_all = x_all.sum(-1, keepdim=True).sin()
    y2_all = 10 * x_all[..., :2].prod(-1, keepdim=True)  # a task ~10x larger
    backbone = nn.Sequential(nn.Linear(8, 32), nn.ReLU(), nn.Linear(32, size_z))
    head1 = nn.Sequential(nn.Linear(size_z, 16), nn.ReLU(), nn.Linear(16, 1))
    head2 = nn.Sequential(nn.Linear(size_z, 16), nn.ReLU(), nn.Linear(16, 1))
    loss_task1 = loss_task2 = nn.functional.mse_loss

    RotoGradNorm = rotograd.RotoGradNorm
    model = RotoGradNorm(backbone, [head1, head2], size_z, alpha=1.)
    optim_model = torch.optim.Adam([{'params': m.parameters()} for m in [backbone, head1, head2]],
                                   lr=learning_rate_model)
    optim_rotograd = torch.optim.Adam([{'params': model.parameters()}], lr=learning_rate_rotograd)

    def step(x, y1, y2):
        model.train()

        optim_model.zero_grad()
        optim_rotograd.zero_grad()

        with rotograd.cached():  # Speeds-up computations by caching Rotograd's parameters
            pred1, pred2 = model(x)

            loss1 = loss_task1(pred1, y1)
            loss2 = loss_task2(pred2, y2)

            model.backward([loss1, loss2])

        optim_model.step()
        optim_rotograd.step()

        return loss1, loss2

    history = [torch.stack([loss.detach() for loss in step(x, y1, y2)])
               for x, y1, y2 in zip(x_all, y1_all, y2_all)]
    return model, torch.stack(history)


def main() -> None:
    model, history = train()
    first, last = history[:20].mean(0), history[-20:].mean(0)
    print(f"task losses, first 20 steps: {first.tolist()}")
    print(f"task losses, last 20 steps:  {last.tolist()}")
    with torch.no_grad():
        print(f"task weights: {[round(float(w), 3) for w in model.weight]}")
        # end-to-end predictor of task 0: backbone, rotation, head
        print("prediction of task 0 for a zero input:", float(model[0](torch.zeros(1, 8))))


if __name__ == "__main__":
    main()
