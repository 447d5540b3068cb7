"""Property tests (hypothesis) of the Gram-based methods over sampled task-gradient matrices:
normal, rank-deficient, with zero rows, scaled from 1e-10 to 1e10, K = 1..10."""
import pytest
import torch
from hypothesis import given, settings, strategies as st

import gradsurgery as gs

D = torch.float64
GRAM_METHODS = ["cagrad", "imtl_g", "nash_mtl", "aligned_mtl", "upgrad", "dualproj", "gradvac", "db_mtl",
                "mgda", "pcgrad"]
#: the combined direction does not depend on the order of the tasks
EQUIVARIANT = ["cagrad", "imtl_g", "nash_mtl", "aligned_mtl", "upgrad", "dualproj", "db_mtl", "mgda"]
#: <g_k, d> >= 0 for every task (PCGrad only promises it for two tasks)
NON_CONFLICTING = ["upgrad", "dualproj", "mgda"]

SETTINGS = settings(max_examples=15, deadline=None, derandomize=True)


@st.composite
def task_gradients(draw, min_tasks=1, max_tasks=10):
    k = draw(st.integers(min_tasks, max_tasks))
    n = draw(st.integers(1, 12))
    kind = draw(st.sampled_from(["normal", "rank_deficient", "zero_rows"]))
    gen = torch.Generator().manual_seed(draw(st.integers(0, 2**31 - 1)))
    g = torch.randn(k, n, generator=gen, dtype=D)
    if kind == "rank_deficient" and k > 1:
        r = draw(st.integers(1, k - 1))
        g = torch.randn(k, r, generator=gen, dtype=D) @ torch.randn(r, n, generator=gen, dtype=D)
    elif kind == "zero_rows":
        g[torch.rand(k, generator=gen) < 0.4] = 0
    scale = 10.0 ** draw(st.integers(-10, 10))
    return g * scale


def direction(name, g, perm=None):
    """``(d, w)``: the combined direction and the coefficients; ``None`` where Nash-MTL
    (as documented) raises because no bargaining solution exists."""
    method = gs.methods.create(name)
    method.bind(g.shape[0], device=g.device, dtype=D, generator=torch.Generator().manual_seed(0))
    try:
        w = method.weights(g @ g.T, torch.ones(g.shape[0], dtype=D))
    except FloatingPointError:
        assert name == "nash_mtl"
        return None, None
    return w @ g, w


@pytest.mark.parametrize("name", GRAM_METHODS)
@SETTINGS
@given(g=task_gradients())
def test_finite_and_scale_behaviour(name, g):
    d, w = direction(name, g)
    if d is None:
        return
    assert torch.isfinite(w).all()
    factor = 1e3
    d_scaled, _ = direction(name, g * factor)
    tol = 1e-6 * float(g.norm(dim=1).max()) + 1e-300
    if name == "nash_mtl":  # ||d||^2 = K whatever the scale
        assert torch.isclose(d.norm(), torch.tensor(g.shape[0], dtype=D).sqrt(), rtol=1e-6)
        assert torch.allclose(d_scaled, d, atol=1e-6 * d.norm(), rtol=0)
    else:  # positively homogeneous: scaling the gradients scales the update
        assert torch.allclose(d_scaled / factor, d, atol=tol, rtol=0)


@pytest.mark.parametrize("name", EQUIVARIANT)
@SETTINGS
@given(g=task_gradients(min_tasks=2), seed=st.integers(0, 1000))
def test_permutation_equivariance(name, g, seed):
    perm = torch.randperm(g.shape[0], generator=torch.Generator().manual_seed(seed))
    d, w = direction(name, g)
    d_perm, w_perm = direction(name, g[perm])
    if d is None:
        assert d_perm is None
        return
    assert torch.allclose(d_perm, d, atol=1e-6 * float(g.norm(dim=1).max()), rtol=0)


@pytest.mark.parametrize("name", NON_CONFLICTING)
@SETTINGS
@given(g=task_gradients())
def test_non_conflicting(name, g):
    d, _ = direction(name, g)
    assert (g @ d >= -1e-8 * float(g.norm(dim=1).max()) ** 2).all()


@SETTINGS
@given(g=task_gradients(min_tasks=2, max_tasks=2))
def test_pcgrad_two_tasks_non_conflicting(g):
    d, _ = direction("pcgrad", g)
    assert (g @ d >= -1e-8 * float(g.norm(dim=1).max()) ** 2).all()
