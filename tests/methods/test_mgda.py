"""MGDA: the min-norm point of the convex hull of the task gradients.

``d = sum_k l_k g_k`` with ``l`` on the simplex is *the* min-norm point exactly when the
KKT conditions hold: ``<g_k, d> >= ||d||^2`` for every k, with equality where ``l_k > 0``
(then every point ``p`` of the hull has ``<p, d> >= ||d||^2``, so ``||p|| >= ||d||``).
They are checked on random and degenerate gradients, for both solver paths, and the point
is compared with an independent exhaustive solver written here (numpy, on the vectors,
not the Gram) and with scipy's SLSQP.
"""
import itertools

import numpy as np
import pytest
import torch
from hypothesis import given, settings, strategies as st

import gradsurgery as gs
from gradsurgery.numerics import qp
from gradsurgery.numerics.gram import normalized64
from gradsurgery.methods.mgda import MGDA
from core_helpers import backbone_grads_for, make, task_grads

#: KKT residual tolerance relative to max_k ||g_k||^2 (the solvers work in float64).
KKT_TOL = 1e-9


def kkt_residuals(grads: torch.Tensor, lam: torch.Tensor) -> tuple[float, float, float]:
    """(simplex violation, worst <g_k, d> < ||d||^2 violation, worst equality violation on
    the support), all relative to max ||g_k||^2."""
    g = grads.double()
    lam = lam.double()
    scale = float(g.norm(dim=1).max() ** 2) or 1.0
    d = lam @ g
    gap = (g @ d - d @ d) / scale
    simplex = max(float(-lam.min().clamp(max=0)), abs(float(lam.sum()) - 1))
    support = lam > 1e-9
    return simplex, float((-gap).clamp_min(0).max()), float(gap[support].abs().max())


def assert_kkt(grads, lam, tol=KKT_TOL):
    simplex, dual, comp = kkt_residuals(grads, lam)
    assert simplex <= 1e-12 and dual <= tol and comp <= tol, (simplex, dual, comp)


def exhaustive_min_norm(grads: np.ndarray) -> np.ndarray:
    """Independent exact solver: for every subset S, the min-norm point of the affine hull
    of {g_i : i in S} by least squares on the vectors (d = g_0 + B t, B = g_S - g_0),
    kept when its barycentric coordinates are >= 0; the shortest such point wins."""
    k = grads.shape[0]
    best, best_norm = None, np.inf
    for size in range(1, k + 1):
        for s in itertools.combinations(range(k), size):
            g0 = grads[s[0]]
            b = (grads[list(s[1:])] - g0).T
            t = np.linalg.lstsq(b, -g0, rcond=None)[0] if size > 1 else np.zeros(0)
            coords = np.concatenate([[1 - t.sum()], t])
            if coords.min() < -1e-10:
                continue
            d = g0 + (b @ t if size > 1 else 0)
            if np.linalg.norm(d) < best_norm:
                best, best_norm = d, np.linalg.norm(d)
    return best


def slsqp_min_norm(grads: np.ndarray) -> np.ndarray:
    from scipy.optimize import minimize

    k = grads.shape[0]
    m = grads @ grads.T
    scale = np.trace(m) / k or 1.0
    res = minimize(lambda w: w @ m @ w / scale, np.full(k, 1 / k), jac=lambda w: 2 * m @ w / scale,
                   bounds=[(0, 1)] * k, constraints=[{"type": "eq", "fun": lambda w: w.sum() - 1}],
                   method="SLSQP", options={"ftol": 1e-15, "maxiter": 500})
    return res.x @ grads


def random_grads(k, n, seed, kind="random"):
    rng = np.random.default_rng(seed)
    g = rng.normal(size=(k, n))
    if kind == "correlated":
        g += 3 * rng.normal(size=(1, n))
    elif kind == "scaled":
        g *= np.logspace(-1.5, 1.5, k)[:, None]
    return torch.from_numpy(g)


def degenerate_cases():
    rng = np.random.default_rng(7)
    a, b, c = rng.normal(size=(3, 5))
    cases = {
        "K=1": [a],
        "duplicated": [a, a, b],
        "all duplicated": [a, a, a],
        "one zero": [a, np.zeros(5), b],
        "all zero": [np.zeros(5), np.zeros(5)],
        "opposite": [a, -a],
        "opposite and third": [a, -a, b],
        "scaled copies": [a, 3 * a, 0.5 * a],
        "affinely dependent": [a, b, (a + b) / 2, c],
        "collinear through origin": [a, -2 * a, b],
        "more tasks than dims": list(rng.normal(size=(9, 2))),
    }
    return {name: torch.from_numpy(np.stack(v)) for name, v in cases.items()}


#: "auto" enumerates supports up to MIN_NORM_ENUMERATION_MAX_TASKS and runs the active set
#: above; "active_set" forces the active set for every K.
SOLVERS = {
    "auto": qp.min_norm_simplex,
    "active_set": lambda m: qp._wolfe_active_set(normalized64(m), 3 * m.shape[0] + 10),
}


@pytest.mark.parametrize("solver", SOLVERS)
@pytest.mark.parametrize("name", degenerate_cases())
@pytest.mark.parametrize("scale", [1e-10, 1.0, 1e10])
def test_kkt_on_degenerate_gradients(name, scale, solver):
    grads = degenerate_cases()[name] * scale
    lam = SOLVERS[solver](grads @ grads.T)
    assert torch.isfinite(lam).all()
    assert_kkt(grads, lam)
    if grads.shape[0] <= 6:
        expected = exhaustive_min_norm(grads.numpy())
        np.testing.assert_allclose((lam @ grads).numpy(), expected, rtol=0,
                                   atol=1e-6 * float(grads.norm(dim=1).max()))


@settings(max_examples=30, deadline=None)
@given(k=st.integers(1, 12), n=st.integers(1, 40), seed=st.integers(0, 2**31),
       kind=st.sampled_from(["random", "correlated", "scaled"]), solver=st.sampled_from(["auto", "active_set"]),
       scale=st.sampled_from([1e-10, 1e-3, 1.0, 1e5, 1e10]))
def test_kkt_random(k, n, seed, kind, solver, scale):
    grads = random_grads(k, n, seed, kind) * scale
    lam = SOLVERS[solver](grads @ grads.T)
    assert_kkt(grads, lam)


@settings(max_examples=25, deadline=None)
@given(k=st.integers(2, 6), n=st.integers(1, 8), seed=st.integers(0, 2**31),
       kind=st.sampled_from(["random", "correlated", "scaled"]))
def test_point_matches_exhaustive_solver(k, n, seed, kind):
    grads = random_grads(k, n, seed, kind)
    d = qp.min_norm_simplex(grads @ grads.T) @ grads
    expected = exhaustive_min_norm(grads.numpy())
    np.testing.assert_allclose(d.numpy(), expected, rtol=0, atol=1e-6 * float(grads.norm(dim=1).max()))


@pytest.mark.parametrize("k", [8, 12])
def test_point_matches_slsqp(k):
    for seed in range(3):
        grads = random_grads(k, 6 + seed * 10, seed, "correlated")
        d = qp.min_norm_simplex(grads @ grads.T) @ grads
        ref = slsqp_min_norm(grads.numpy())
        # SLSQP is the approximate one: ours is never longer, and close to it
        assert float(d @ d) <= float(ref @ ref) * (1 + 1e-9) + 1e-15
        np.testing.assert_allclose(d.numpy(), ref, rtol=0, atol=1e-4 * float(grads.norm(dim=1).max()))


@pytest.mark.parametrize("k", [16, 32])
def test_iterative_path_is_exact(k):
    worst = 0.0
    for seed, (n, kind) in enumerate(itertools.product([3, 20, 200], ["correlated", "scaled"])):
        grads = random_grads(k, n, seed, kind)
        lam = qp.min_norm_simplex(grads @ grads.T)
        simplex, dual, comp = kkt_residuals(grads, lam)
        worst = max(worst, dual, comp)
        assert simplex <= 1e-12
    assert worst <= 1e-11, worst


def test_solvers_agree_on_small_k():
    for seed in range(10):
        k = 2 + seed % 7
        grads = random_grads(k, 1 + seed % 5 * 7, seed, ["random", "correlated", "scaled"][seed % 3])
        m = grads @ grads.T
        d1 = qp.min_norm_simplex(m) @ grads
        d2 = SOLVERS["active_set"](m) @ grads
        torch.testing.assert_close(d1, d2, rtol=0, atol=1e-9 * float(grads.norm(dim=1).max()))


def test_float32_gram_is_solved_in_float64_and_returned_as_float32():
    grads = random_grads(5, 7, 1, "correlated")
    lam = qp.min_norm_simplex((grads @ grads.T).float())
    assert lam.dtype == torch.float32
    assert_kkt(grads, lam, tol=1e-6)


@pytest.mark.parametrize("normalization", ["none", "l2", "loss", "loss+"])
def test_normalizations(normalization):
    """The weights are the min-norm weights of g_k / n_k (n_k = 1, ||g_k||, L_k,
    L_k ||g_k||), and they combine the raw gradients."""
    grads = random_grads(4, 6, 3, "scaled")
    losses = torch.tensor([0.5, 2.0, 1.5, 3.0], dtype=torch.float64)
    n = {"none": torch.ones(4, dtype=torch.float64), "l2": grads.norm(dim=1), "loss": losses,
         "loss+": losses * grads.norm(dim=1)}[normalization]
    method = MGDA(normalization=normalization)
    method.bind(4, device=grads.device, dtype=grads.dtype, generator=torch.Generator())
    lam = method.weights(grads @ grads.T, losses)
    assert_kkt(grads / n[:, None], lam)
    if normalization != "none":  # the normalisation changes the answer on these gradients
        assert not torch.allclose(lam, qp.min_norm_simplex(grads @ grads.T), atol=1e-3)


def test_unknown_normalization_raises():
    with pytest.raises(ValueError, match="normalization"):
        gs.methods.create("mgda", normalization="l1")


def test_end_to_end_backbone_gets_min_norm_point():
    model, x, ys = make(3, seed=5, rep_shape=(4,), batch=5)
    opt = gs.MultiTaskOptimizer(torch.optim.SGD(model.parameters(), lr=0.1), "mgda", num_tasks=3)
    grads = task_grads(model, x, ys)
    opt.zero_grad()
    opt.backward(model.losses(opt.fork(model.rep(x)), ys))
    direction = torch.from_numpy(exhaustive_min_norm(grads.numpy()))
    for p, e in zip(model.backbone.parameters(), backbone_grads_for(model, x, direction)):
        torch.testing.assert_close(p.grad, e, rtol=1e-6, atol=1e-9)
    torch.testing.assert_close(opt.stats["weights"].sum(), torch.tensor(1.0, dtype=torch.float64))
