"""Mixed precision: bf16 autocast tracks float32, a GradScaler's scale never changes a
decision, and an overflow skips the step without touching anything."""
from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

import gradsurgery as gs

K = 3
FEATURES = 16
METHODS = gs.methods.available()
GRAM_METHODS = [m for m in METHODS if issubclass(gs.methods.get(m), gs.methods.GramWeighting)]


def _model(seed: int = 0):
    torch.manual_seed(seed)
    backbone = nn.Sequential(nn.Linear(8, FEATURES), nn.ReLU(), nn.Linear(FEATURES, FEATURES))
    heads = nn.ModuleList([nn.Linear(FEATURES, 1) for _ in range(K)])
    return backbone, heads


def _batches(n: int, seed: int = 1):
    g = torch.Generator().manual_seed(seed)
    return [(torch.randn(32, 8, generator=g), torch.randn(K, 32, 1, generator=g)) for _ in range(n)]


def _optimizer(method: str, backbone, heads, lr: float = 0.01):
    base = torch.optim.Adam([*backbone.parameters(), *heads.parameters()], lr=lr)
    return gs.MultiTaskOptimizer(base, method, num_tasks=K, rep_size=FEATURES, method_lr=lr)


def _step(opt, backbone, heads, x, y, *, scaler=None, autocast=False, blow_up=1.0):
    opt.zero_grad()
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
        views = opt.fork(backbone(x))
        losses = [(h(v).float() - t).pow(2).mean() for h, v, t in zip(heads, views, y)]
    losses[-1] = losses[-1] * blow_up
    if scaler is None:
        opt.backward(losses)
        opt.step()
    else:
        opt.backward(losses, scaler=scaler)
        scaler.step(opt)
        scaler.update()


def _params(opt) -> list[torch.Tensor]:
    return [p.detach().clone() for g in opt.param_groups for p in g["params"]]


def _run(method: str, batches, **kw):
    backbone, heads = _model()
    opt = _optimizer(method, backbone, heads)
    weights = []
    for x, y in batches:
        _step(opt, backbone, heads, x, y, **kw)
        weights.append(opt.stats.get("weights"))
    return opt, weights


@pytest.mark.parametrize("method", ["pcgrad", "mgda", "gradnorm", "rotograd"])
def test_bf16_autocast_tracks_float32(method):
    """10 Adam steps under bf16 autocast stay within 3e-2 (relative, whole parameter
    vector) of the float32 run: bf16 has 8 significand bits (unit roundoff 2^-9 ~ 2e-3),
    and 10 steps of lr 1e-2 move the parameters by ~10%, so the rounding of the forward
    and of the task gradients accounts for a few percent at most. The decisions are taken
    in float32 whatever the autocast dtype."""
    if method not in METHODS:
        pytest.skip(f"{method} is not registered in this build")
    batches = _batches(10)
    ref, _ = _run(method, batches)
    amp, weights = _run(method, batches, autocast=True)
    assert all(w.dtype == torch.float32 for w in weights if w is not None)
    a, b = torch.cat([p.flatten() for p in _params(amp)]), torch.cat([p.flatten() for p in _params(ref)])
    start = torch.cat([p.detach().flatten() for m in _model() for p in m.parameters()])
    assert (a - b).norm() / b.norm() < 3e-2
    # and the run did move: the tolerance is small against the distance travelled
    assert (a[:start.numel()] - b[:start.numel()]).norm() < 0.3 * (b[:start.numel()] - start).norm()


@pytest.mark.parametrize("method", METHODS)
def test_loss_scale_never_changes_a_decision(method):
    """With power-of-two scales the unscaled Gram is exact: the coefficients and the
    parameters (backbone, heads, the method's own) equal the unscaled run's bit for bit."""
    batches = _batches(3)
    ref_opt, ref_w = _run(method, batches)
    opt, w = _run(method, batches, scaler=torch.amp.GradScaler("cpu", init_scale=2.0 ** 20))
    for a, b in zip(w, ref_w):
        torch.testing.assert_close(a, b, rtol=0, atol=0, equal_nan=True)  # NaN: element-wise, no weights
    for a, b in zip(_params(opt), _params(ref_opt)):
        torch.testing.assert_close(a, b, rtol=0, atol=0)


@pytest.mark.parametrize("method,blow_up", [(m, float("inf")) for m in METHODS]
                         + [(m, 1e36) for m in ("pcgrad", "mgda", "gradnorm", "rotograd") if m in METHODS])
def test_overflow_skips_the_step_and_changes_nothing(method, blow_up):
    """A batch that overflows: an infinite loss, or (``1e36``) a finite loss whose scaled
    gradient exceeds float32 (``1e36 * 2^16``; not for log-loss weightings such as
    DB-MTL's, which cancel the factor). GradScaler skips the step and halves its scale, and nothing else
    changes (parameters, the wrapped optimizer's state, the method's state and
    generator): the next step equals that of a run that never saw the batch."""
    bad, good = _batches(2, seed=7)
    backbone, heads = _model()
    opt = _optimizer(method, backbone, heads)
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0 ** 16)
    _step(opt, backbone, heads, *good, scaler=scaler)  # a normal step first: state exists
    before = copy.deepcopy(opt.state_dict())
    params = _params(opt)
    _step(opt, backbone, heads, *bad, scaler=scaler, blow_up=blow_up)
    assert scaler.get_scale() == 2.0 ** 15
    assert bool(opt.stats["overflow"])
    for a, b in zip(_params(opt), params):
        assert torch.equal(a, b)
    after = opt.state_dict()
    assert after["optimizer"].pop("param_groups") == before["optimizer"].pop("param_groups")  # hyper-parameters, names
    if after["rotation"] is not None:  # the rotations' parametrisation, by name
        assert after["rotation"].pop("param") == before["rotation"].pop("param")
    for key in ("format_version", "method_name", "method_options"):  # who wrote it (strings, numbers)
        assert repr(after.pop(key)) == repr(before.pop(key))
    torch.testing.assert_close(after, before, rtol=0, atol=0, equal_nan=True)
    _step(opt, backbone, heads, *good, scaler=scaler)

    # the same run without the bad batch, its scaler at the halved scale
    backbone2, heads2 = _model()
    opt2 = _optimizer(method, backbone2, heads2)
    scaler2 = torch.amp.GradScaler("cpu", init_scale=2.0 ** 16)
    _step(opt2, backbone2, heads2, *good, scaler=scaler2)
    scaler2.update(2.0 ** 15)
    _step(opt2, backbone2, heads2, *good, scaler=scaler2)
    for a, b in zip(_params(opt), _params(opt2)):
        assert torch.equal(a, b)


def test_scaler_must_be_a_grad_scaler():
    backbone, heads = _model()
    opt = _optimizer("mgda", backbone, heads)
    x, y = _batches(1)[0]
    views = opt.fork(backbone(x))
    with pytest.raises(TypeError, match="GradScaler"):
        opt.backward([(h(v) - t).pow(2).mean() for h, v, t in zip(heads, views, y)], scaler=2.0)
