"""``gradsurgery.compat`` against the installed rotograd 0.1.6 package: a checkpoint saved
by the package loads as it is, and constructing a model draws exactly what the package
draws from torch's global generator (so "same seed, same run" holds for what follows:
data shuffling, dropout, ...). Runs with geotorch 0.3 as it is and with newer geotorch
through ``conftest.py``'s alias, as ``tests/methods/test_rotograd.py`` does."""
from __future__ import annotations

import pytest
import rotograd
import torch
from torch import nn

import gradsurgery.compat as compat

pytestmark = pytest.mark.usefixtures("single_thread")

PAIRS = {"RotateOnly": {}, "RotoGrad": {}, "RotoGradNorm": {"alpha": 0.5}}


def modules(conv: bool):
    torch.manual_seed(123)
    if conv:
        return (nn.Sequential(nn.Conv2d(2, 3, 3, padding=1), nn.Tanh()),
                [nn.Sequential(nn.Conv2d(3, 1, 1), nn.Flatten(), nn.Linear(4, 1)) for _ in range(2)])
    return nn.Sequential(nn.Linear(4, 5), nn.Tanh()), [nn.Linear(5, 1), nn.Linear(5, 2)]


def build(package, name: str, seed: int, conv: bool = False):
    backbone, heads = modules(conv)
    size, extra = (3, {"post_shape": (2, 2)}) if conv else (5, {})
    torch.manual_seed(seed)
    model = getattr(package, name)(backbone, heads, size, **PAIRS.get(name, {}), **extra)
    return model, backbone


def train_reference(model, conv: bool = False, steps: int = 4):
    """A few steps of the package's README loop (the rotations and weights move)."""
    model.train()
    opt = torch.optim.Adam(model.parameters(), lr=0.1)
    opt_model = torch.optim.SGD(model.model_parameters(), lr=0.05)
    g = torch.Generator().manual_seed(7)
    for _ in range(steps):
        x = torch.randn(8, 2, 2, 2, generator=g) if conv else torch.randn(8, 4, generator=g)
        opt.zero_grad()
        opt_model.zero_grad()
        preds = model(x)
        model.backward([(p - 1).pow(2).mean() for p in preds])
        opt.step()
        opt_model.step()


def rotations(model) -> torch.Tensor:
    return torch.stack([r.detach() for r in model.rotation])


@pytest.mark.parametrize("conv", [False, True])
@pytest.mark.parametrize("name", list(PAIRS))
def test_loads_a_package_checkpoint(name, conv):
    ref, _ = build(rotograd, name, seed=0, conv=conv)
    train_reference(ref, conv)
    state = ref.state_dict()
    ours, backbone = build(compat, name, seed=1, conv=conv)  # other random rotations
    assert not torch.allclose(rotations(ours), rotations(ref), atol=1e-3)
    ours.load_state_dict(state)
    torch.testing.assert_close(rotations(ours), rotations(ref), rtol=1e-6, atol=1e-6)
    if name == "RotoGradNorm":
        torch.testing.assert_close(torch.stack(ours.weight).detach(), torch.stack(ref.weight).detach())
        assert not torch.allclose(torch.stack(ours.weight), torch.ones(2))  # the weights did move
    ref.eval(), ours.eval()
    ours.backbone.load_state_dict(ref.backbone.state_dict())  # the model itself is the user's to save
    for h_ours, h_ref in zip(ours._heads, ref.heads):
        h_ours.load_state_dict(h_ref[1].state_dict())
    x = torch.randn(5, 2, 2, 2) if conv else torch.randn(5, 4)
    with torch.no_grad():
        for a, b in zip(ours(x), ref(x)):
            torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)


def test_own_checkpoint_still_round_trips():
    ours, _ = build(compat, "RotoGradNorm", seed=0)
    train_reference(ours)
    other, _ = build(compat, "RotoGradNorm", seed=1)
    other.load_state_dict(ours.state_dict())
    torch.testing.assert_close(rotations(other), rotations(ours))
    torch.testing.assert_close(torch.stack(other.weight), torch.stack(ours.weight))


def test_bad_package_checkpoint_changes_nothing():
    ref, _ = build(rotograd, "RotoGrad", seed=0)
    state = ref.state_dict()
    ours, _ = build(compat, "RotoGrad", seed=1)
    before = {k: v.clone() for k, v in ours.state_dict().items()}

    missing = {k: v for k, v in state.items() if not k.startswith("parametrizations.rotation_1.")}
    with pytest.raises(RuntimeError, match="rotation_1"):
        ours.load_state_dict(missing)
    wrong = {**state, "parametrizations.rotation_0.original": torch.zeros(4, 4)}
    with pytest.raises(RuntimeError, match="shape"):
        ours.load_state_dict(wrong)
    three, _ = build(rotograd, "RotoGradNorm", seed=0)  # a RotoGradNorm checkpoint has weights too
    with pytest.raises(RuntimeError, match="weight_"):
        ours.load_state_dict(three.state_dict())
    ours.rotations.param = "cayley"  # what rotation_param="cayley" builds: A means another rotation
    with pytest.raises(ValueError, match="rotation_param='expm'"):
        ours.load_state_dict(state)
    for k, v in ours.state_dict().items():
        assert torch.equal(v, before[k]), k


@pytest.mark.parametrize("conv", [False, True])
@pytest.mark.parametrize("name", ["VanillaMTL", *PAIRS])
def test_global_rng_stream_equals_the_package(name, conv):
    def after(package):
        backbone, heads = modules(conv)
        torch.manual_seed(2024)
        if name == "VanillaMTL":
            model = package.VanillaMTL(backbone, heads)
        else:
            size, extra = (3, {"post_shape": (2, 2)}) if conv else (5, {})
            model = getattr(package, name)(backbone, heads, size, **PAIRS[name], **extra)
        return model, torch.randn(16), torch.randint(0, 2**31, (4,))

    ref, *ref_draws = after(rotograd)
    ours, *our_draws = after(compat)
    for a, b in zip(our_draws, ref_draws):
        assert torch.equal(a, b)
    if name != "VanillaMTL":
        torch.testing.assert_close(rotations(ours), rotations(ref), rtol=0, atol=1e-6)
