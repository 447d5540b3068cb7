"""Differential tests: the RotoGrad family against the reference package rotograd 0.1.6.

Same seeds, models, data and initial rotations (read from the reference and passed as
``rotation_init``), Adam for the model and for the method's parameters; after 30 steps
every backbone, head, rotation (``A``) and RotoGradNorm weight parameter must agree, to
1e-8 relative in float64 and 1e-4 in float32 (relative error of each parameter tensor).
The reference runs with geotorch 0.3 as it is, and with newer geotorch through the
``geotorch.parametrize`` alias of ``conftest.py``.
"""
from __future__ import annotations

import copy
import importlib.util
from contextlib import contextmanager
from pathlib import Path

import pytest
import rotograd
import torch
from torch import nn

import gradsurgery as gs

pytestmark = pytest.mark.usefixtures("single_thread")

STEPS = 30
LR, METHOD_LR = 1e-2, 5e-3
REFERENCE = {"rotate_only": rotograd.RotateOnly, "rotograd": rotograd.RotoGrad,
             "rotogradnorm": rotograd.RotoGradNorm}


@contextmanager
def default_dtype(dtype):
    old = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        yield
    finally:
        torch.set_default_dtype(old)


class ConvHead(nn.Module):
    """A head for a ``C x H x W`` representation."""

    def __init__(self, channels: int):
        super().__init__()
        self.conv = nn.Conv2d(channels, 3, 1)
        self.out = nn.Linear(3, 1)

    def forward(self, z):
        return self.out(torch.tanh(self.conv(z)).mean(dim=(2, 3)))


def build(kind: str, k: int, seed: int):
    """Backbone, heads, data and loss function for a small problem."""
    torch.manual_seed(seed)
    if kind == "conv":  # z: batch x 4 channels x 3 x 3, rotate the channels
        backbone = nn.Sequential(nn.Conv2d(2, 4, 3, padding=1), nn.Tanh())
        heads = [ConvHead(4) for _ in range(k)]
        xs = torch.randn(STEPS, 8, 2, 3, 3)
    else:
        backbone = nn.Sequential(nn.Linear(5, 12), nn.Tanh(), nn.Linear(12, 6))
        heads = [nn.Sequential(nn.Linear(6, 8), nn.Tanh(), nn.Linear(8, 1)) for _ in range(k)]
        xs = torch.randn(STEPS, 16, 5)
    ys = torch.randn(STEPS, k, xs.shape[1], 1)
    scales = torch.tensor([1.0, 10.0, 0.3, 3.0])[:k]  # tasks of very different magnitudes

    def losses(preds, y):
        return [scales[i] * (preds[i] - y[i]).pow(2).mean() for i in range(k)]

    return backbone, heads, xs, ys, losses


def backbone_regulariser(backbone):
    return 1e-2 * sum(p.pow(2).sum() for p in backbone.parameters())


def run_reference(name, backbone, heads, xs, ys, losses, *, size, options, with_backbone_loss):
    model = REFERENCE[name](backbone, list(heads), size, **options)
    model.train()
    initial = torch.stack([r.detach().clone() for r in model.rotation])
    opt_model = torch.optim.Adam(model.model_parameters(), lr=LR)
    opt_method = torch.optim.Adam(model.parameters(), lr=METHOD_LR)
    for x, y in zip(xs, ys):
        opt_model.zero_grad()
        opt_method.zero_grad()
        preds = model(x)
        extra = backbone_regulariser(backbone) if with_backbone_loss else None
        model.backward(losses(preds, y), backbone_loss=extra)
        opt_model.step()
        opt_method.step()
    rotations = [p for n, p in model.named_parameters() if n.startswith("parametrizations.rotation_")]
    weights = torch.stack([w.detach() for w in model.weight_]) if name == "rotogradnorm" else None
    return initial, torch.stack([a.detach() for a in rotations]), weights


def run_ours(name, backbone, heads, xs, ys, losses, *, size, options, initial, with_backbone_loss):
    params = [*backbone.parameters(), *(p for h in heads for p in h.parameters())]
    opt = gs.MultiTaskOptimizer(torch.optim.Adam(params, lr=LR), name, num_tasks=len(heads),
                                rep_size=size, method_lr=METHOD_LR, rotation_init=initial, **options)
    for x, y in zip(xs, ys):
        opt.zero_grad()
        views = opt.fork(backbone(x))
        extra = backbone_regulariser(backbone) if with_backbone_loss else None
        opt.backward(losses([h(v) for h, v in zip(heads, views)], y), backbone_loss=extra)
        opt.step()
    weights = opt.method.weight_logits.detach() if name == "rotogradnorm" else None
    return opt.rotations.skew_params.detach(), weights


def relative_error(a, b):
    return float((a - b).norm() / b.norm().clamp_min(1e-30))


CASES = [  # (method, options, representation, rotation size, with backbone_loss, dtypes)
    ("rotate_only", {}, "flat", 6, False, "64,32"),
    ("rotograd", {}, "flat", 6, False, "64,32"),
    ("rotogradnorm", {"alpha": 0.5}, "flat", 6, False, "64,32"),
    ("rotogradnorm", {"alpha": 2.0, "burn_in_period": 5}, "flat", 6, False, "64"),
    ("rotograd", {"burn_in_period": 5}, "flat", 6, False, "64"),
    ("rotograd", {"burn_in_period": 5, "normalize_losses": True}, "flat", 6, True, "64"),
    ("rotogradnorm", {"alpha": 1.5, "burn_in_period": 5, "normalize_losses": True}, "flat", 6, True, "64"),
    ("rotate_only", {"burn_in_period": 5, "normalize_losses": True}, "flat", 6, True, "64"),
    ("rotograd", {}, "flat", 6, True, "64"),
    ("rotograd", {"post_shape": (3, 3)}, "conv", 4, False, "64,32"),
    ("rotogradnorm", {"alpha": 1.0, "post_shape": (3, 3), "normalize_losses": True}, "conv", 4, True, "64"),
    ("rotograd", {}, "flat", 4, False, "64"),  # subspace: rotate 4 of the 6 features
    ("rotogradnorm", {"alpha": 0.5}, "flat", 3, False, "64"),
]
DTYPES = {"64": torch.float64, "32": torch.float32}
PARAMS = [pytest.param(*case[:5], DTYPES[d], id=f"{case[0]}-{case[2]}-m{case[3]}-"
                       f"{'-'.join(f'{k}={v}' for k, v in case[1].items())}{'-backbone_loss' if case[4] else ''}-f{d}")
          for case in CASES for d in case[5].split(",")]


@pytest.mark.parametrize("name, options, kind, size, with_backbone_loss, dtype", PARAMS)
def test_same_steps_as_rotograd_package(name, options, kind, size, with_backbone_loss, dtype):
    k = 3
    with default_dtype(dtype):
        backbone, heads, xs, ys, losses = build(kind, k, seed=0)
        ref_backbone, ref_heads = copy.deepcopy(backbone), copy.deepcopy(heads)
        initial, ref_rotations, ref_weights = run_reference(
            name, ref_backbone, ref_heads, xs, ys, losses, size=size, options=options,
            with_backbone_loss=with_backbone_loss)
        ours_rotations, ours_weights = run_ours(
            name, backbone, heads, xs, ys, losses, size=size, options=options, initial=initial,
            with_backbone_loss=with_backbone_loss)
    tol = 1e-8 if dtype == torch.float64 else 1e-4
    pairs = [(f"backbone.{n}", p, q) for (n, p), q in zip(backbone.named_parameters(), ref_backbone.parameters())]
    pairs += [(f"head{i}.{n}", p, q) for i, (h, g) in enumerate(zip(heads, ref_heads))
              for (n, p), q in zip(h.named_parameters(), g.parameters())]
    pairs.append(("rotations", ours_rotations, ref_rotations))
    if name == "rotogradnorm":
        pairs.append(("weights", ours_weights, ref_weights))
    assert ref_rotations.abs().amax() > 0  # the rotations did move
    for label, ours, ref in pairs:
        assert ours.dtype == dtype
        err = relative_error(ours.detach(), ref.detach())
        assert err < tol, f"{label}: relative error {err:.2e} >= {tol:g}"


# -- the compat facade -------------------------------------------------------------------
def load_migration_example():
    path = Path(__file__).resolve().parents[2] / "examples" / "rotograd_migration.py"
    spec = importlib.util.spec_from_file_location("rotograd_migration_example", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_compat_runs_the_readme_step_like_the_package():
    """examples/rotograd_migration.py runs the seed README's step; with the package and
    with gradsurgery.compat (same seed: same random rotations) the losses and every
    parameter agree."""
    import gradsurgery.compat

    migration = load_migration_example()
    ref_model, ref_history = migration.train(rotograd, steps=25)
    model, history = migration.train(gradsurgery.compat, steps=25)
    assert relative_error(history, ref_history) < 1e-4
    assert relative_error(torch.stack(model.rotation).detach(), torch.stack(ref_model.rotation).detach()) < 1e-4
    for ours, ref in zip(model.model_parameters(), ref_model.model_parameters()):
        assert relative_error(ours.detach(), ref.detach()) < 1e-4
    ours_own = torch.cat([p.detach().flatten() for p in model.parameters()])
    ref_own = torch.cat([p.detach().flatten() for p in ref_model.parameters()])
    assert relative_error(ours_own, ref_own) < 1e-4  # rotations' A, then the weights


def test_migration_example_runs(capsys):
    load_migration_example().main()
    assert "task weights" in capsys.readouterr().out


@pytest.mark.parametrize("name", ["VanillaMTL", "RotateOnly", "RotoGrad", "RotoGradNorm"])
def test_compat_interface_matches_the_package(name):
    import gradsurgery.compat

    def make(module):
        torch.manual_seed(1)
        backbone = nn.Linear(3, 4)
        heads = [nn.Linear(4, 1), nn.Linear(4, 2)]
        args = () if name == "VanillaMTL" else (4,)
        kwargs = {"alpha": 1.0} if name == "RotoGradNorm" else {}
        return getattr(module, name)(backbone, heads, *args, **kwargs), backbone, heads

    ours, backbone, heads = make(gradsurgery.compat)
    ref, _, _ = make(rotograd)
    assert len(ours) == ours.num_tasks == 2
    assert ours.backbone is backbone
    # the method's own parameters only (batched over tasks here: same numbers, fewer tensors)
    assert sum(p.numel() for p in ours.parameters()) == sum(p.numel() for p in ref.parameters())
    assert [p.shape for p in ours.model_parameters()] == [p.shape for p in ref.model_parameters()]
    x = torch.randn(5, 3)
    ours.eval(), ref.eval()
    if name != "VanillaMTL":  # (the package's VanillaMTL has neither len() nor model[i])
        assert len(ref) == 2
        for i in range(2):  # end-to-end predictors agree (same seed, same rotations)
            torch.testing.assert_close(ours[i](x), ref[i](x))
        assert ours.coop(True) is ours
    torch.testing.assert_close(ours(x), ref(x))


def test_compat_rotogradnorm_needs_alpha():
    import gradsurgery.compat

    with pytest.raises(TypeError, match="alpha"):
        gradsurgery.compat.RotoGradNorm(nn.Linear(3, 4), [nn.Linear(4, 1)], 4)
