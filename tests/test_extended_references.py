"""Differential tests of the Gram-based methods against torchjd 0.18 aggregators on the same
matrices, closed-form two-task formulas (PCGrad) and the papers' equations written out
independently here (GradVac). CAGrad, Nash-MTL, Aligned-MTL, IMTL-G, MGDA and GradDrop moved
to tests/methods/test_<name>.py (differential tests against their authors' code)."""

import pytest
import torch

import gradsurgery as gs

torchjd = pytest.importorskip("torchjd", reason="torchjd 0.18 is a test-only dependency (pip install -e .[test])")
from torchjd import aggregation as jd  # noqa: E402

D = torch.float64


def weights(name, g, **opts):
    """The method's coefficients for the task-gradient matrix ``g`` (K x N)."""
    method = gs.methods.create(name, **opts)
    gen = torch.Generator().manual_seed(0)
    method.bind(g.shape[0], device=g.device, dtype=g.dtype, generator=gen)
    return method.weights(g @ g.T, torch.ones(g.shape[0], dtype=g.dtype))


def direction(name, g, **opts):
    return weights(name, g, **opts) @ g


def matrices(k, n=12, seed=0, conflict=True):
    gen = torch.Generator().manual_seed(seed)
    g = torch.randn(k, n, generator=gen, dtype=D)
    if conflict and k >= 2:
        g[1] = -0.7 * g[0] + 0.3 * g[1]
    return g


def exact_projector():
    from torchjd._linalg import QuadprogProjector
    return QuadprogProjector(norm_eps=0.0, reg_eps=0.0)


CASES = [(k, seed) for k in (2, 3, 5, 8) for seed in (0, 1)]


@pytest.mark.parametrize("k,seed", CASES)
def test_upgrad_and_dualproj_equal_torchjd_exact_projection(k, seed):
    pytest.importorskip("quadprog", reason="torchjd's projector needs quadprog (torchjd[quadprog-projector])")
    g = matrices(k, seed=seed)
    ref_up = jd.UPGrad(projector=exact_projector())(g)
    ref_dp = jd.DualProj(projector=exact_projector())(g)
    scale = g.norm(dim=1).max()
    assert torch.allclose(direction("upgrad", g), ref_up, atol=1e-6 * scale, rtol=0)
    assert torch.allclose(direction("dualproj", g), ref_dp, atol=1e-6 * scale, rtol=0)


def test_upgrad_above_enumeration_limit_equals_torchjd():
    pytest.importorskip("quadprog", reason="torchjd's projector needs quadprog (torchjd[quadprog-projector])")
    g = matrices(12, n=30, seed=3)
    ref = jd.UPGrad(projector=exact_projector())(g)
    assert torch.allclose(direction("upgrad", g), ref, atol=1e-6 * g.norm(dim=1).max(), rtol=0)


def test_pcgrad_two_tasks_equals_torchjd_and_closed_form():
    for seed in range(4):
        g = matrices(2, seed=seed)
        g1, g2 = g
        dot = g1 @ g2
        p1 = g1 - min(dot, 0) / (g2 @ g2) * g2
        p2 = g2 - min(dot, 0) / (g1 @ g1) * g1
        ours = direction("pcgrad", g)
        assert torch.allclose(ours, p1 + p2, atol=1e-10, rtol=1e-9)
        assert torch.allclose(ours, jd.PCGrad()(g), atol=1e-10, rtol=1e-9)


def gradvac_reference(g, beta, steps):
    """GradVac for two tasks written from the paper's Eq. (the visiting order is forced)."""
    target = torch.zeros(2, 2, dtype=D)
    out = []
    for gk in steps:
        rows = []
        for i, j in ((0, 1), (1, 0)):
            gi, gj = gk[i].clone(), gk[j]
            phi = gi @ gj / (gi.norm() * gj.norm())
            t = target[i, j]
            if phi < t:
                gi = gi + gi.norm() * (t * (1 - phi**2).sqrt() - phi * (1 - t**2).sqrt()) \
                    / (gj.norm() * (1 - t**2).sqrt()) * gj
            target[i, j] = (1 - beta) * t + beta * phi
            rows.append(gi)
        out.append(rows[0] + rows[1])
    return out


def test_gradvac_two_tasks_equals_paper_and_torchjd_over_steps():
    gen = torch.Generator().manual_seed(4)
    steps = [torch.randn(2, 9, generator=gen, dtype=D) for _ in range(5)]
    for s in steps[::2]:
        s[1] -= 1.5 * s[0]
    ref = gradvac_reference(None, 0.3, steps)
    method = gs.methods.create("gradvac", beta=0.3)
    method.bind(2, device=torch.device("cpu"), dtype=D, generator=torch.Generator().manual_seed(0))
    agg = jd.GradVac(beta=0.3, eps=0.0)
    for gk, r in zip(steps, ref):
        ours = method.weights(gk @ gk.T, torch.ones(2, dtype=D)) @ gk
        assert torch.allclose(ours, r, atol=1e-10, rtol=1e-9)
        assert torch.allclose(ours, agg(gk), atol=1e-10, rtol=1e-9)
