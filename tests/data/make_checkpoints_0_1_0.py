"""Writes ``tests/data/checkpoints-0.1.0.pt``: checkpoints written by gradsurgery 0.1.0, which
every later version must keep loading (``tests/test_checkpoint_compat.py``).

Run once, with the 0.1.0 package on the path (the file in the repository was written so)::

    PYTHONPATH=<a 0.1.0 checkout> python tests/data/make_checkpoints_0_1_0.py

For each case of :data:`CASES` (a method and its options) it trains a tiny seeded model a few
steps, saves the model's parameters (one vector) and the optimizer's ``state_dict``, then takes
:data:`FURTHER` more steps and saves the parameters after each: a version that loads the checkpoint and takes the
same steps must reproduce them bit for bit. The test imports :func:`build` and
:func:`train_step` from this file, so both sides run the same loop.
"""
from __future__ import annotations

import copy
import pathlib

import torch
from torch import nn

import gradsurgery as gs

K, IN, REP = 3, 4, 4
TRAIN, FURTHER = 3, 2
PATH = pathlib.Path(__file__).with_name("checkpoints-0.1.0.pt")

#: (case name, method, MultiTaskOptimizer options).
CASES: list[tuple[str, str, dict]] = [
    ("mgda", "mgda", {}),
    ("pcgrad", "pcgrad", {}),
    ("uw", "uw", {}),
    ("gradnorm", "gradnorm", {}),
    ("nash_mtl", "nash_mtl", {"update_weights_every": 2}),
    ("dwa", "dwa", {}),
    ("famo", "famo", {}),
    ("rlw", "rlw", {}),
    ("rotograd", "rotograd", {"rep_size": REP}),
    ("rotate_only", "rotate_only", {"rep_size": REP}),
    ("mgda_rotation", "mgda", {"rotation": True, "rep_size": REP}),
    ("cagrad", "cagrad", {}),
    ("pcgrad_ema", "pcgrad", {"weight_ema": 0.5}),
    ("graddrop", "graddrop", {}),
    ("imtl", "imtl", {}),
    ("gradvac", "gradvac", {}),
    ("moco", "moco", {}),
    ("stch", "stch", {}),
]


def build(method: str, options: dict) -> tuple[nn.Module, gs.MultiTaskOptimizer]:
    """The tiny model (float64; ``model[0]`` the backbone, ``model[1]`` the heads) and its optimizer."""
    torch.manual_seed(0)
    backbone = nn.Sequential(nn.Linear(IN, 5), nn.Tanh(), nn.Linear(5, REP))
    heads = nn.ModuleList(nn.Linear(REP, 1) for _ in range(K))
    model = nn.ModuleList([backbone, heads]).double()
    opt = gs.MultiTaskOptimizer(torch.optim.Adam(model.parameters(), lr=1e-2), method, num_tasks=K,
                                method_lr=1e-2, **options)
    return model, opt


def batch(i: int) -> tuple[torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(1000 + i)
    return torch.randn(6, IN, generator=gen).double(), 3 * torch.randn(K, 6, generator=gen).double()


def train_step(model: nn.Module, opt: gs.MultiTaskOptimizer, i: int) -> None:
    """Step ``i``: fork, backward, step, then the hooks a training loop drives (``observe``
    every step, ``end_epoch`` every second step)."""
    backbone, heads = model
    x, ys = batch(i)

    def losses(views):
        return [nn.functional.mse_loss(h(v).squeeze(-1), y) for h, v, y in zip(heads, views, ys, strict=True)]

    opt.zero_grad()
    opt.backward(losses(opt.fork(backbone(x))))
    opt.step()
    with torch.no_grad():
        opt.observe(losses([backbone(x)] * K))
    if i % 2 == 1:
        opt.end_epoch()


def flat(model: nn.Module) -> torch.Tensor:
    """The model's parameters as one vector (``torch.nn.utils.vector_to_parameters`` restores them)."""
    return torch.nn.utils.parameters_to_vector(model.parameters()).detach().clone()


def main() -> None:
    out = {"version": gs.__version__, "cases": {}}
    for case, method, options in CASES:
        model, opt = build(method, options)
        torch.manual_seed(7)
        for i in range(TRAIN):
            train_step(model, opt, i)
        saved = {"model": flat(model), "optimizer": copy.deepcopy(opt.state_dict())}  # not the live tensors
        after = []
        for i in range(TRAIN, TRAIN + FURTHER):
            train_step(model, opt, i)
            after.append(flat(model))
        out["cases"][case] = {**saved, "after": after}
    torch.save(out, PATH, _use_new_zipfile_serialization=False)  # the legacy format: a few KB per case
    print(f"wrote {PATH} ({PATH.stat().st_size} bytes) with gradsurgery {gs.__version__}")


if __name__ == "__main__":
    main()
