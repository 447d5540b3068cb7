"""Rotations in the pipeline: parametrisation, layouts, properties, cooperative mode,
inference, checkpoints and errors. (Step-for-step equality with the rotograd package is
in ``test_rotograd_reference.py``.)"""
from __future__ import annotations

import io

import geotorch
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

import gradsurgery as gs
from gradsurgery.pipeline import rotation

pytestmark = pytest.mark.usefixtures("single_thread")


def orthogonality_error(r):
    eye = torch.eye(r.shape[-1], dtype=r.dtype)
    return float((r @ r.transpose(-2, -1) - eye).detach().abs().amax())


def problem(k=3, features=5, batch=7, seed=0, dtype=torch.float64):
    g = torch.Generator().manual_seed(seed)
    torch.manual_seed(seed)
    backbone = nn.Sequential(nn.Linear(4, 6), nn.Tanh(), nn.Linear(6, features)).to(dtype)
    heads = [nn.Sequential(nn.Linear(features, 3), nn.Tanh(), nn.Linear(3, 1)).to(dtype) for _ in range(k)]
    x = torch.randn(batch, 4, generator=g, dtype=dtype)
    y = torch.randn(k, batch, 1, generator=g, dtype=dtype)
    return backbone, heads, x, y


def params_of(backbone, heads):
    return [*backbone.parameters(), *(p for h in heads for p in h.parameters())]


def task_losses(heads, views, y):
    return [(k + 1) * (h(v) - t).pow(2).mean() for k, (h, v, t) in enumerate(zip(heads, views, y))]


def train(opt, backbone, heads, x, y, steps, head_fn=None):
    for _ in range(steps):
        opt.zero_grad()
        views = opt.fork(backbone(x))
        opt.backward(task_losses(heads if head_fn is None else head_fn, views, y))
        opt.step()


# -- the parametrisation -----------------------------------------------------------------
@pytest.mark.parametrize("scale", [0.0, 1.0, 30.0])
def test_parametrisation_equals_geotorch(scale):
    """R = base @ expm(skew(A)) is what geotorch.orthogonal(triv="expm") computes, in the
    installed geotorch (CI runs the newest and 0.3.0), values and gradients (at A = 0 all
    eigenvalues coincide)."""
    k, m = 3, 5
    holder = nn.Module()
    holder.weight = nn.Parameter(torch.eye(m, dtype=torch.float64).repeat(k, 1, 1))
    geotorch.orthogonal(holder, "weight", triv="expm")
    a = holder.parametrizations.weight.original
    with torch.no_grad():
        a.copy_(scale * torch.randn(k, m, m, dtype=torch.float64))
    ours = rotation.Rotations(k, m, init=holder.parametrizations.weight[0].base, dtype=torch.float64)
    with torch.no_grad():
        ours.skew_params.copy_(a)
    torch.testing.assert_close(ours.matrices(), holder.weight, rtol=1e-12, atol=1e-12)
    probe = torch.randn(k, m, m, dtype=torch.float64)
    expected, = torch.autograd.grad((holder.weight * probe).sum(), a)
    got, = torch.autograd.grad((ours.matrices() * probe).sum(), ours.skew_params)
    torch.testing.assert_close(got, expected, rtol=1e-10, atol=1e-12)


def test_rotations_ignore_autocast():
    """Under bfloat16 autocast the rotations are still computed in their own float32 (the
    exponential's products would otherwise run in bfloat16, off orthogonal by ~4e-3)."""
    rot = rotation.Rotations(3, 64, init="random")
    with torch.no_grad():
        rot.skew_params.copy_(0.05 * torch.randn(3, 64, 64))
    expected = rot.matrices()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        got, single = rot.matrices(), rot.matrix(1)
    assert got.dtype == single.dtype == torch.float32
    assert torch.equal(got, expected)
    torch.testing.assert_close(single[0], expected[1], rtol=0, atol=1e-6)


def test_random_init_draws_what_geotorch_draws():
    """Under the same seed, "random" gives the rotations geotorch (hence rotograd) samples."""
    k, m = 3, 4
    torch.manual_seed(5)
    holder = nn.Module()
    for i in range(k):
        holder.register_parameter(f"r{i}", nn.Parameter(torch.eye(m)))
        geotorch.orthogonal(holder, f"r{i}", triv="expm")
    expected = torch.stack([getattr(holder, f"r{i}").detach() for i in range(k)])
    torch.manual_seed(5)
    ours = rotation.Rotations(k, m, init="random")
    torch.testing.assert_close(ours.matrices().detach(), expected, rtol=0, atol=1e-6)
    assert (torch.linalg.det(ours.base) > 0).all()


@settings(max_examples=25, deadline=None)
@given(st.integers(1, 4), st.integers(1, 8), st.floats(0.0, 50.0), st.integers(0, 2**31 - 1))
def test_rotations_are_orthogonal(k, m, scale, seed):
    g = torch.Generator().manual_seed(seed)
    rot = rotation.Rotations(k, m, init="random")
    with torch.no_grad():
        rot.skew_params.copy_(scale * torch.randn(k, m, m, generator=g))
    # float32 scaling and squaring (up to ~8 squarings at scale 50): measured worst 1.9e-5 over
    # 800 draws, where torch.linalg.matrix_exp (geotorch's, hence rotograd's) reaches 9.7e-5
    assert orthogonality_error(rot.matrices()) < 4e-5


def test_orthogonal_after_2000_large_steps():
    """2,000 Adam steps with a large rate on the alignment of random targets (float32)."""
    torch.manual_seed(0)
    rot = rotation.Rotations(2, 3, init="random")
    opt = torch.optim.Adam(rot.parameters(), lr=1.0)
    for _ in range(2000):
        opt.zero_grad()
        r = rot.matrices()
        target = torch.randn(2, 3, 3)
        ((r - target) ** 2).sum().backward()
        opt.step()
    assert float(rot.skew_params.detach().abs().amax()) > 10  # the parameters went far
    assert orthogonality_error(rot.matrices().detach()) < 1e-5


def test_orthogonal_through_the_pipeline_with_large_method_lr():
    backbone, heads, x, y = problem(dtype=torch.float32)
    opt = gs.MultiTaskOptimizer(torch.optim.Adam(params_of(backbone, heads), lr=1e-2), "rotograd",
                                num_tasks=3, rep_size=5, method_lr=1.0)
    train(opt, backbone, heads, x, y, 100)
    assert orthogonality_error(opt.rotations.matrices().detach()) < 1e-5


# -- layouts -------------------------------------------------------------------------------
@pytest.mark.parametrize("shape, rotation_shape, post_shape", [
    ((7, 5), 5, ()), ((7, 5), 3, ()), ((7, 4, 3, 2), 4, (3, 2)), ((2, 7, 6), (2, 3), ()), ((7, 6, 2), 4, (2,)),
])
def test_fork_rotates_the_leading_features(shape, rotation_shape, post_shape):
    k = 2
    rot = rotation.Rotations(k, rotation_shape, post_shape=post_shape, init="random", dtype=torch.float64)
    z = torch.randn(*shape, dtype=torch.float64)
    views = rotation.views(rot, z, k)
    n_post, n_rot = len(post_shape), len(rot.rotation_shape)
    lead = shape[:len(shape) - n_post - n_rot]
    flat = z.reshape(*lead, -1, max(1, int(torch.tensor(post_shape).prod())) if post_shape else 1)
    m = rot.size
    for i, v in enumerate(views):
        expected = flat.clone()
        expected[..., :m, :] = torch.einsum("ij,...jp->...ip", rot.matrices()[i].detach(), flat[..., :m, :])
        torch.testing.assert_close(v, expected.reshape(shape))


# -- properties against sum ------------------------------------------------------------------
class FixedRotation(nn.Module):
    def __init__(self, head, r):
        super().__init__()
        self.head, self.r = head, r

    def forward(self, z):
        return self.head(z @ self.r.T)


@settings(max_examples=8, deadline=None)
@given(st.integers(1, 3), st.integers(2, 5), st.integers(1, 6), st.integers(0, 2**31 - 1))
def test_rotate_only_without_rotation_updates_is_sum(k, features, batch, seed):
    """rotate_only with method_lr=0 keeps its (random) rotations: it is sum on heads
    composed with those fixed rotations."""
    backbone, heads, x, y = problem(k, features, batch, seed)
    opt = gs.MultiTaskOptimizer(torch.optim.Adam(params_of(backbone, heads), lr=1e-2), "rotate_only",
                                num_tasks=k, rep_size=features, method_lr=0.0)
    r = opt.rotations.matrices().detach()
    ref_backbone, ref_heads, _, _ = problem(k, features, batch, seed)
    ref = gs.MultiTaskOptimizer(torch.optim.Adam(params_of(ref_backbone, ref_heads), lr=1e-2), "sum", num_tasks=k)
    train(opt, backbone, heads, x, y, 4)
    train(ref, ref_backbone, ref_heads, x, y, 4, head_fn=[FixedRotation(h, r[i]) for i, h in enumerate(ref_heads)])
    for p, q in zip(params_of(backbone, heads), params_of(ref_backbone, ref_heads)):
        torch.testing.assert_close(p, q, rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(opt.rotations.matrices().detach(), r, rtol=0, atol=0)


@settings(max_examples=8, deadline=None)
@given(st.integers(2, 5), st.integers(1, 6), st.integers(0, 2**31 - 1), st.booleans())
def test_single_task_rotograd_is_sum(features, batch, seed, normalize):
    """K=1: the alignment loss is zero, the rotation stays the identity, the magnitude
    coefficient is 1: rotograd takes sum's steps (on the normalised loss if asked)."""
    backbone, heads, x, y = problem(1, features, batch, seed)
    opt = gs.MultiTaskOptimizer(torch.optim.Adam(params_of(backbone, heads), lr=1e-2), "rotograd",
                                num_tasks=1, rep_size=features, method_lr=1e-1, rotation_init="identity",
                                normalize_losses=normalize)
    ref_backbone, ref_heads, _, _ = problem(1, features, batch, seed)
    ref = gs.MultiTaskOptimizer(torch.optim.Adam(params_of(ref_backbone, ref_heads), lr=1e-2), "sum", num_tasks=1)
    if normalize:  # sum on L / L(0) (Adam is invariant to the scale, up to its epsilon)
        with torch.no_grad():
            l0 = task_losses(ref_heads, [ref_backbone(x)], y)[0]
        scaled = [lambda v, h=ref_heads[0]: h(v) / l0.sqrt()]
        train(ref, ref_backbone, ref_heads, x, y / l0.sqrt(), 5, head_fn=scaled)
    else:
        train(ref, ref_backbone, ref_heads, x, y, 5)
    train(opt, backbone, heads, x, y, 5)
    for p, q in zip(params_of(backbone, heads), params_of(ref_backbone, ref_heads)):
        torch.testing.assert_close(p, q, rtol=1e-8, atol=1e-10)
    assert float(opt.rotations.skew_params.detach().abs().amax()) == 0.0
    assert float(opt.stats["rotation_losses"].abs().amax()) == 0.0


# -- cooperative mode ----------------------------------------------------------------------
def test_coop_gradient_of_each_rotation():
    """In coop mode each R_k gets d(alignment)/dR_k and d(L_k)/dR_k, each rescaled to the
    norm of their average, summed (rotograd 0.1.2); computed here independently with
    autograd on the plain formulas."""
    k, features = 3, 4
    backbone, heads, x, y = problem(k, features)
    opt = gs.MultiTaskOptimizer(torch.optim.SGD(params_of(backbone, heads), lr=0.0), "rotograd",
                                num_tasks=k, rep_size=features, coop=True)
    with torch.no_grad():
        opt.rotations.skew_params.copy_(torch.randn(k, features, features, dtype=torch.float64))
    # independent computation
    a = opt.rotations.skew_params.detach().clone().requires_grad_()
    lower = a.tril(-1)
    r_of_a = opt.rotations.base @ torch.linalg.matrix_exp(lower - lower.transpose(-2, -1))
    r = r_of_a.detach().requires_grad_()
    z = backbone(x).detach().requires_grad_()
    rotated = [(z @ r[i].T) for i in range(k)]
    for v in rotated:
        v.retain_grad()
    losses = task_losses(heads, rotated, y)
    task_grad_r = torch.autograd.grad(sum(losses), r, retain_graph=True)[0]
    h = torch.stack([torch.autograd.grad(losses[i], rotated[i], retain_graph=True)[0] for i in range(k)])
    g = torch.stack([torch.autograd.grad(losses[i], z, retain_graph=True)[0] for i in range(k)])
    mean = g.mean(0)
    reference = sum(gi * mean.norm() / gi.norm() for gi in g) / k
    alignment = sum(((reference @ r[i].T - h[i]) ** 2).sum() for i in range(k))  # flat z: summed over the batch
    align_grad_r, = torch.autograd.grad(alignment, r)
    average = (task_grad_r + align_grad_r) / 2
    combined = torch.stack([
        task_grad_r[i] * average[i].norm() / task_grad_r[i].norm()
        + align_grad_r[i] * average[i].norm() / align_grad_r[i].norm() for i in range(k)])
    expected, = torch.autograd.grad(r_of_a, a, combined, retain_graph=True)
    # the pipeline
    opt.zero_grad()
    views = opt.fork(backbone(x))
    opt.backward(task_losses(heads, views, y))
    torch.testing.assert_close(opt.rotations.skew_params.grad, expected, rtol=1e-9, atol=1e-12)
    # and without coop, the alignment gradient alone
    opt.coop(False)
    opt.zero_grad()
    opt.backward(task_losses(heads, opt.fork(backbone(x)), y))
    expected_plain, = torch.autograd.grad(r_of_a, a, align_grad_r)
    torch.testing.assert_close(opt.rotations.skew_params.grad, expected_plain, rtol=1e-9, atol=1e-12)


# -- composition, inference, checkpoints ---------------------------------------------------
def test_rotations_compose_with_any_method_and_can_be_dropped():
    backbone, heads, x, y = problem()
    opt = gs.MultiTaskOptimizer(torch.optim.Adam(params_of(backbone, heads), lr=1e-2), "pcgrad",
                                num_tasks=3, rep_size=5, rotation=True, method_lr=1e-2)
    train(opt, backbone, heads, x, y, 3)
    assert float(opt.rotations.skew_params.detach().abs().amax()) > 0
    assert opt.param_groups[-1]["params"] == [opt.rotations.skew_params]
    assert opt.param_groups[-1]["lr"] == 1e-2 and opt.param_groups[-1]["weight_decay"] == 0
    plain = gs.MultiTaskOptimizer(torch.optim.Adam(params_of(backbone, heads)), "rotograd", num_tasks=3,
                                  rotation=False)
    assert plain.rotations is None
    train(plain, backbone, heads, x, y, 2)


def test_inference_fork_and_task_model():
    backbone, heads, x, y = problem()
    opt = gs.MultiTaskOptimizer(torch.optim.Adam(params_of(backbone, heads)), "rotograd", num_tasks=3, rep_size=5)
    with torch.no_grad():
        z = backbone(x)
        views = opt.fork(z)
        r = opt.rotations.matrices()
        for i in range(3):
            torch.testing.assert_close(views[i], z @ r[i].T)
            torch.testing.assert_close(opt.task_model(i, backbone, heads[i])(x), heads[i](z @ r[i].T))
    with pytest.raises(RuntimeError, match="without fork"):  # nothing was recorded
        opt.backward([h(v).sum() for h, v in zip(heads, views)])


def test_state_dict_round_trip():
    backbone, heads, x, y = problem()

    def make(bb, hs):
        return gs.MultiTaskOptimizer(torch.optim.Adam(params_of(bb, hs), lr=1e-2), "rotogradnorm",
                                     num_tasks=3, rep_size=5, method_lr=1e-2, burn_in_period=2, coop=True)

    opt = make(backbone, heads)
    train(opt, backbone, heads, x, y, 3)
    buffer = io.BytesIO()
    torch.save({"opt": opt.state_dict(), "model": [m.state_dict() for m in (backbone, *heads)]}, buffer)
    train(opt, backbone, heads, x, y, 3)
    buffer.seek(0)
    saved = torch.load(buffer)  # weights_only
    backbone2, heads2, _, _ = problem(seed=1)
    for m, s in zip((backbone2, *heads2), saved["model"]):
        m.load_state_dict(s)
    opt2 = make(backbone2, heads2)
    opt2.load_state_dict(saved["opt"])
    train(opt2, backbone2, heads2, x, y, 3)
    for p, q in zip(params_of(backbone, heads), params_of(backbone2, heads2)):
        torch.testing.assert_close(p, q, rtol=0, atol=0)
    torch.testing.assert_close(opt2.rotations.skew_params, opt.rotations.skew_params, rtol=0, atol=0)
    assert opt2.rotations.coop


# -- errors --------------------------------------------------------------------------------
def test_errors_before_any_state_changes():
    backbone, heads, x, y = problem()
    base = torch.optim.Adam(params_of(backbone, heads))
    groups = len(base.param_groups)
    rng = torch.get_rng_state()
    with pytest.raises(ValueError, match="rep_size"):
        gs.MultiTaskOptimizer(base, "rotograd", num_tasks=3)
    with pytest.raises(ValueError, match="coop"):
        gs.MultiTaskOptimizer(base, "pcgrad", num_tasks=3, coop=True)
    with pytest.raises(ValueError, match="rotation_init"):
        gs.MultiTaskOptimizer(base, "rotograd", num_tasks=3, rep_size=5, rotation_init=torch.ones(3, 5, 5))
    with pytest.raises(ValueError, match="rotation_init"):
        gs.MultiTaskOptimizer(base, "rotograd", num_tasks=3, rep_size=5, rotation_init=torch.eye(4).repeat(3, 1, 1))
    with pytest.raises(ValueError, match="disagree"):
        gs.MultiTaskOptimizer(base, "rotograd", num_tasks=3, rep_size=5, rotation_shape=4)
    with pytest.raises(ValueError, match="only apply with rotations"):
        gs.MultiTaskOptimizer(base, "mgda", num_tasks=3, rep_size=5, post_shape=(2,))
    with pytest.raises(ValueError, match="level"):
        gs.MultiTaskOptimizer(base, "pcgrad", num_tasks=3, rep_size=5, rotation=True, level="params")
    with pytest.raises(ValueError, match="level"):
        rotation.build(gs.methods.create("rotograd"), 3, rotation=None, rep_size=5, rotation_shape=None,
                       post_shape=(), init="random", coop=False, level="params", dtype=torch.float32, device=None)
    with pytest.raises(ValueError, match="alpha"):
        gs.MultiTaskOptimizer(base, "rotogradnorm", num_tasks=3, rep_size=5, alpha=-1)
    assert len(base.param_groups) == groups
    assert torch.equal(torch.get_rng_state(), rng)
    opt = gs.MultiTaskOptimizer(base, "rotograd", num_tasks=3, rep_size=6)
    with pytest.raises(ValueError, match=r"rotation_shape=\(6,\).*\(7, 5\)"):
        opt.fork(backbone(x))
    with pytest.raises(ValueError, match="coop"):
        gs.MultiTaskOptimizer(torch.optim.Adam(params_of(backbone, heads)), "sum", num_tasks=3).coop(True)
