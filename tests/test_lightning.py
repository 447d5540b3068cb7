"""The Lightning integration: a ``MultiTaskModule`` fit equals the documented plain loop
(every hook driven), the module's ``state_dict`` carries its predictions, predict/validate/
test run in a fresh ``Trainer``, ``bf16-mixed`` and ``16-mixed`` fits train the rotations,
checkpoint resume is bit-exact, and ``strategy="ddp"`` on 2 CPU processes equals one
process on the global batch."""
from __future__ import annotations

import functools
import os
from pathlib import Path

import pytest
import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

pytest.importorskip("lightning", reason="Lightning is not installed (pip install 'gradsurgery[lightning]')")
import lightning as L
from lightning.pytorch.plugins import MixedPrecision
from spawn_helpers import run_ranks

import gradsurgery as gs
from gradsurgery.integrations.lightning import MultiTaskModule

mse = nn.functional.mse_loss


def _model(dtype=torch.float32):
    torch.manual_seed(0)
    backbone = nn.Sequential(nn.Linear(4, 8), nn.Tanh()).to(dtype)
    heads = nn.ModuleList([nn.Linear(8, 1), nn.Linear(8, 1)]).to(dtype)
    return backbone, heads


def _data(rows: int = 32, dtype=torch.float32) -> TensorDataset:
    g = torch.Generator().manual_seed(5)
    return TensorDataset(*(torch.randn(rows, n, generator=g, dtype=dtype) for n in (4, 1, 1)))


def _module(method: str, dtype=torch.float32, **options) -> MultiTaskModule:
    """The module, its rotations drawn after ``torch.manual_seed(1)`` (as :func:`_plain`'s)."""
    backbone, heads = _model(dtype)
    torch.manual_seed(1)
    return MultiTaskModule(backbone, heads, [mse, mse], method,
                           optimizer=functools.partial(torch.optim.Adam, lr=0.01),
                           **{"rep_size": 8, "method_lr": 0.01, **options})


def _trainer(**options) -> L.Trainer:
    return L.Trainer(**{"accelerator": "cpu", "devices": 1, "logger": False, "enable_checkpointing": False,
                        "enable_progress_bar": False, "enable_model_summary": False, **options})


def _params(module: MultiTaskModule) -> list[torch.Tensor]:
    return [p.detach().clone() for p in [*module.parameters(), *module.buffers()]]


def _plain(method: str, loader: DataLoader, epochs: int, autocast: bool = False, **options) -> list[torch.Tensor]:
    """The documented loop (what ``gs.compare`` runs): step, ``observe`` for the methods
    that learn from post-step losses, ``end_epoch`` after every epoch."""
    backbone, heads = _model()
    torch.manual_seed(1)
    base = torch.optim.Adam([*backbone.parameters(), *heads.parameters()], lr=0.01)
    opt = gs.MultiTaskOptimizer(base, method, num_tasks=2, rep_size=8, method_lr=0.01, **options)
    for _ in range(epochs):
        for x, *ys in loader:
            opt.zero_grad()
            with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
                opt.backward([mse(h(v), y) for h, v, y in zip(heads, opt.fork(backbone(x)), ys)])
            opt.step()
            if opt.method.observes_losses:
                with torch.no_grad():
                    opt.observe([mse(h(v), y) for h, v, y in zip(heads, opt.fork(backbone(x)), ys)])
        opt.end_epoch()
    rotations = [] if opt.rotations is None else [opt.rotations.skew_params, opt.rotations.base]
    return [p.detach().clone() for p in [*backbone.parameters(), *heads.parameters(), *rotations]]


@pytest.mark.parametrize("method", ["pcgrad", "rotograd", "dwa", "famo"])
def test_fit_equals_the_plain_loop(method):
    """3 epochs of 2 batches: DWA's weights move from the third epoch on (``end_epoch``),
    FAMO's from the first step (``observe``), RotoGrad's rotations are the module's."""
    loader = DataLoader(_data(), batch_size=16)
    expected = _plain(method, loader, epochs=3)
    module = _module(method)
    trainer = _trainer(max_epochs=3)
    trainer.fit(module, train_dataloaders=loader)
    assert trainer.global_step == 6
    for a, b in zip(_params(module), expected, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-7)


def _fitted(method: str = "rotograd", steps: int = 2) -> MultiTaskModule:
    module = _module(method, method_lr=0.5)
    _trainer(max_steps=steps).fit(module, DataLoader(_data(), batch_size=16))
    return module


def test_state_dict_carries_the_predictions(tmp_path):
    """A fresh module (other rotations drawn) that loads the fitted module's ``state_dict``,
    or the ``state_dict`` of its Lightning checkpoint, predicts what the fitted one does."""
    module = _fitted()
    trainer = _trainer(max_steps=0)
    trainer.strategy.connect(module)
    trainer.save_checkpoint(tmp_path / "fit.ckpt")
    x = _data()[:][0]
    with torch.no_grad():
        expected = module(x)
    for state in (module.state_dict(), torch.load(tmp_path / "fit.ckpt", weights_only=False)["state_dict"]):
        torch.manual_seed(7)
        fresh = _module("rotograd")
        with torch.no_grad():
            assert not torch.allclose(fresh(x)[0], expected[0])
            fresh.load_state_dict(state)
            for a, b in zip(fresh(x), expected, strict=True):
                assert torch.equal(a, b)


def test_predict_validate_and_test_in_a_fresh_trainer():
    module = _fitted()
    fresh = _module("rotograd")
    fresh.load_state_dict(module.state_dict())
    data = _data()
    x, y1, y2 = data[:]
    with torch.no_grad():
        expected = module(x)
    batches = _trainer().predict(fresh, DataLoader(x, batch_size=16))
    for k in range(2):
        torch.testing.assert_close(torch.cat([b[k] for b in batches]), expected[k], rtol=0, atol=0)
    losses = [mse(expected[0], y1).item(), mse(expected[1], y2).item()]
    for run, stage in ((_trainer().validate, "val"), (_trainer().test, "test")):
        (metrics,) = run(fresh, DataLoader(data, batch_size=32), verbose=False)
        assert metrics[f"{stage}_loss_0"] == pytest.approx(losses[0], rel=1e-6)
        assert metrics[f"{stage}_loss_1"] == pytest.approx(losses[1], rel=1e-6)


def test_bf16_mixed_fit_with_rotograd():
    """``precision="bf16-mixed"`` (autocast around ``training_step``, so around
    ``opt.backward``) takes the steps of the plain loop under the same autocast, with
    rotations large enough for products in the exponential's backward."""
    loader = DataLoader(_data(), batch_size=16)
    expected = _plain("rotograd", loader, epochs=2, autocast=True)
    module = _module("rotograd")
    _trainer(max_epochs=2, precision="bf16-mixed").fit(module, train_dataloaders=loader)
    for a, b in zip(_params(module), expected, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-7)
    assert module.rotations.skew_params.dtype == torch.float32


def test_16_mixed_fit_with_rotograd_and_a_grad_scaler():
    """Lightning maps ``precision="16-mixed"`` to bf16 on the CPU, so the float16 plugin
    (autocast to float16 and a ``GradScaler``) is built explicitly: it trains, the scaler's
    scale reaches ``backward``."""
    plugin = MixedPrecision("16-mixed", "cpu", scaler=torch.amp.GradScaler("cpu", init_scale=2.0 ** 8))
    module = _module("rotograd", method_lr=0.5)
    before = _params(module)
    _trainer(max_steps=4, plugins=[plugin]).fit(module, DataLoader(_data(), batch_size=16))
    after = _params(module)
    assert all(torch.isfinite(p).all() for p in after)
    assert not torch.equal(module.rotations.skew_params, torch.zeros_like(module.rotations.skew_params))
    assert all(not torch.equal(a, b) for a, b in zip(after[:6], before[:6]))


@pytest.mark.parametrize("method", ["rotograd", "famo"])
def test_checkpoint_resume_is_bit_exact(method, tmp_path):
    """2 epochs straight equal 1 epoch, a checkpoint, and ``fit(..., ckpt_path=...)`` of a
    fresh module (other rotations drawn) for the second, bit for bit."""
    loader = DataLoader(_data(), batch_size=16)
    straight = _module(method)
    _trainer(max_epochs=2).fit(straight, loader)
    first = _module(method)
    trainer = _trainer(max_epochs=1)
    trainer.fit(first, loader)
    trainer.save_checkpoint(tmp_path / "epoch1.ckpt")
    torch.manual_seed(7)
    resumed = _module(method)
    _trainer(max_epochs=2).fit(resumed, loader, ckpt_path=tmp_path / "epoch1.ckpt")
    for a, b in zip(_params(resumed), _params(straight), strict=True):
        assert torch.equal(a, b)


DDP_STEPS = 4


def _ddp_worker(rank: int, port: int, out: str) -> None:
    """One of 2 ranks of ``Trainer(strategy="ddp", devices=2)``, launched as ``torchrun``
    launches (the environment names the rank): rows ``rank, rank + 2, ...`` (Lightning's own
    ``DistributedSampler`` would shuffle them), so 8 of each global batch's 16 rows."""
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), LOCAL_RANK=str(rank), NODE_RANK="0",
                      RANK=str(rank), WORLD_SIZE="2")
    torch.set_num_threads(1)
    module = _module("mgda", dtype=torch.float64)
    rows = TensorDataset(*(t[rank::2] for t in _data(dtype=torch.float64).tensors))
    _trainer(strategy="ddp", devices=2, max_steps=DDP_STEPS, use_distributed_sampler=False).fit(
        module, DataLoader(rows, batch_size=8))
    torch.save(_params(module), Path(out) / f"rank{rank}.pt")
    torch.distributed.destroy_process_group()


def test_ddp_on_two_processes_equals_one_process_on_the_global_batch(tmp_path):
    """Each step's global batch is 16 consecutive rows, which one process takes at once."""
    ranks = run_ranks(_ddp_worker, tmp_path, world=2)
    module = _module("mgda", dtype=torch.float64)
    _trainer(max_steps=DDP_STEPS).fit(module, DataLoader(_data(dtype=torch.float64), batch_size=16))
    for got in ranks:
        for a, b in zip(got, _params(module), strict=True):
            torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-12)
