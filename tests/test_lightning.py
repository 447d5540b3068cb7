"""The Lightning integration: two training steps of ``MultiTaskModule`` under a
``Trainer`` equal two steps of the plain gradsurgery loop."""
from __future__ import annotations

import pytest
import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

pytest.importorskip("lightning", reason="Lightning is not installed (pip install 'gradsurgery[lightning]')")
import lightning as L  # noqa: E402

import gradsurgery as gs  # noqa: E402
from gradsurgery.integrations.lightning import MultiTaskModule  # noqa: E402


def _model():
    torch.manual_seed(0)
    backbone = nn.Sequential(nn.Linear(4, 8), nn.Tanh())
    heads = nn.ModuleList([nn.Linear(8, 1), nn.Linear(8, 1)])
    return backbone, heads


def _loader():
    g = torch.Generator().manual_seed(5)
    data = TensorDataset(torch.randn(32, 4, generator=g), torch.randn(32, 1, generator=g),
                         torch.randn(32, 1, generator=g))
    return DataLoader(data, batch_size=16)


@pytest.mark.parametrize("method", ["pcgrad", "rotograd"])
def test_two_training_steps_equal_the_plain_loop(method):
    loader = _loader()
    mse = nn.functional.mse_loss

    backbone, heads = _model()
    torch.manual_seed(1)  # the optimizer's generator and rotations are drawn when it is built
    base = torch.optim.Adam([*backbone.parameters(), *heads.parameters()], lr=0.01)
    opt = gs.MultiTaskOptimizer(base, method, num_tasks=2, rep_size=8, method_lr=0.01)
    for x, *ys in loader:
        opt.zero_grad()
        views = opt.fork(backbone(x))
        opt.backward([mse(h(v), y) for h, v, y in zip(heads, views, ys)])
        opt.step()

    module = MultiTaskModule(*_model(), [mse, mse], method, rep_size=8, method_lr=0.01,
                             optimizer=lambda params: torch.optim.Adam(params, lr=0.01))
    trainer = L.Trainer(max_steps=2, accelerator="cpu", devices=1, logger=False, enable_checkpointing=False,
                        enable_progress_bar=False, enable_model_summary=False)
    torch.manual_seed(1)
    trainer.fit(module, train_dataloaders=loader)
    assert trainer.global_step == 2
    expected = [*backbone.parameters(), *heads.parameters()]
    got = [*module.backbone.parameters(), *module.heads.parameters()]
    for a, b in zip(got, expected):
        torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-7)
    with torch.no_grad():
        preds = module(torch.zeros(16, 4))
    assert len(preds) == 2 and preds[0].shape == (16, 1)
