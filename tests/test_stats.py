"""``gs.stats_to_scalars``: ``opt.stats`` as flat ``name -> float`` scalars for any logger."""
from __future__ import annotations

import math

import pytest
import torch
from torch import nn

import gradsurgery as gs


def test_names_and_values_from_hand_made_stats():
    stats = {"losses": torch.tensor([0.5, 2.0, 3.0]),
             "weights": torch.tensor([0.2, 0.3, 0.5], dtype=torch.float64),
             "cosines": torch.tensor([[1.0, -0.25, 0.5], [-0.25, 1.0, 0.75], [0.5, 0.75, 1.0]]),
             "overflow": torch.tensor(False)}
    out = gs.stats_to_scalars(stats)
    assert out == {"losses/0": 0.5, "losses/1": 2.0, "losses/2": 3.0,
                   "weights/0": 0.2, "weights/1": 0.3, "weights/2": 0.5,
                   "cosines/0_1": -0.25, "cosines/0_2": 0.5, "cosines/1_2": 0.75,
                   "overflow": 0.0}
    assert all(type(v) is float for v in out.values())


def test_prefix_nan_and_other_matrices():
    stats = {"losses": torch.tensor([1.0, float("nan")]), "coefficients": torch.tensor([[1.0, 2.0], [3.0, 4.0]])}
    out = gs.stats_to_scalars(stats, prefix="mtl/")
    assert out["mtl/losses/0"] == 1.0 and math.isnan(out["mtl/losses/1"])  # an absent task stays visible
    # a matrix that is not pairwise keeps every entry
    assert {k: v for k, v in out.items() if "coefficients" in k} == {
        "mtl/coefficients/0_0": 1.0, "mtl/coefficients/0_1": 2.0, "mtl/coefficients/1_0": 3.0,
        "mtl/coefficients/1_1": 4.0}


def test_bad_input_says_what_to_pass():
    with pytest.raises(TypeError, match="opt.stats"):
        gs.stats_to_scalars([torch.ones(2)])
    with pytest.raises(TypeError, match="'weights'.*list"):
        gs.stats_to_scalars({"weights": [0.5, 0.5]})


@pytest.mark.parametrize("method", ["mean", "mgda", "rotograd"])
def test_real_step(method):
    torch.manual_seed(0)
    backbone, heads = nn.Linear(3, 4), nn.ModuleList([nn.Linear(4, 1), nn.Linear(4, 1)])
    opt = gs.MultiTaskOptimizer(torch.optim.SGD([*backbone.parameters(), *heads.parameters()], lr=0.1),
                                method, num_tasks=2, rep_size=4)
    x = torch.randn(8, 3)
    opt.zero_grad()
    views = opt.fork(backbone(x))
    opt.backward([heads[k](v).pow(2).mean() for k, v in enumerate(views)])
    opt.step()
    out = gs.stats_to_scalars(opt.stats)
    for key, value in opt.stats.items():
        value = value.detach().double().cpu()
        if value.dim() == 0:
            assert out[key] == pytest.approx(float(value), rel=1e-12, nan_ok=True)
        elif value.dim() == 1:
            assert [out[f"{key}/{k}"] for k in range(len(value))] == pytest.approx(value.tolist(), nan_ok=True)
        elif key == "cosines":
            assert out[f"{key}/0_1"] == pytest.approx(float(value[0, 1]), nan_ok=True)
            assert f"{key}/0_0" not in out and f"{key}/1_0" not in out
    assert out["losses/0"] > 0
