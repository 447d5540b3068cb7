"""MGDA: the min-norm point of the convex hull of the task gradients.

``d = sum_k l_k g_k`` with ``l`` on the simplex is *the* min-norm point exactly when the
KKT conditions hold: ``<g_k, d> >= ||d||^2`` for every k, with equality where ``l_k > 0``
(then every point ``p`` of the hull has ``<p, d> >= ||d||^2``, so ``||p|| >= ||d||``).
They are checked on random and degenerate gradients, for both solver paths, and the point
is compared with an independent exhaustive solver written here (numpy, on the vectors,
not the Gram), with scipy's SLSQP, with the authors' Frank-Wolfe solver re-derived
(isl-org/MultiObjectiveOptimization) and with torchjd 0.18's MGDA.
"""
import itertools

import numpy as np
import pytest
import torch
from core_helpers import backbone_grads_for, make, task_grads
from gradient_cases import CASES, gradient_matrix, losses_for
from hypothesis import given, settings
from hypothesis import strategies as st

import gradsurgery as gs
from gradsurgery.methods.mgda import MGDA
from gradsurgery.numerics import qp
from gradsurgery.numerics.gram import normalized64

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


# -- the authors' code -------------------------------------------------------------------

def sener_min_norm_weights(m: np.ndarray) -> np.ndarray:
    """The authors' solver, re-derived from isl-org/MultiObjectiveOptimization
    ``multi_task/min_norm_solvers.py``, ``MinNormSolver.find_min_norm_element`` (on the Gram
    ``m``): the best pair by the two-point rule (whose ``gamma`` is clipped to 0.999 / 0.001 when
    one point dominates), then Frank-Wolfe steps towards the projected-gradient point on the
    simplex, each followed by the two-point line search, stopping when the weights move less
    than 1e-5 (L1). (Their loop never increments its counter; the cap of 250 steps is
    LibMTL's copy's.)"""
    def two_points(v11, v12, v22):
        if v12 >= v11:
            return 0.999, v11
        if v12 >= v22:
            return 0.001, v22
        gamma = -(v12 - v22) / (v11 + v22 - 2 * v12)
        return gamma, v22 + gamma * (v12 - v22)

    def project_simplex(y):
        k = len(y)
        sorted_y = np.sort(y)[::-1]
        tmax = (y.sum() - 1.0) / k
        total = 0.0
        for i in range(k - 1):
            total += sorted_y[i]
            candidate = (total - 1) / (i + 1.0)
            if candidate > sorted_y[i + 1]:
                tmax = candidate
                break
        return np.maximum(y - tmax, 0)

    def next_point(current, grad):
        k = len(current)
        proj = grad - grad.sum() / k
        tm1 = -current[proj < 0] / proj[proj < 0]
        tm2 = (1.0 - current[proj > 0]) / proj[proj > 0]
        t = 1.0
        if (tm1 > 1e-7).any():
            t = tm1[tm1 > 1e-7].min()
        if (tm2 > 1e-7).any():
            t = min(t, tm2[tm2 > 1e-7].min())
        return project_simplex(proj * t + current)

    k = m.shape[0]
    best = None
    for i in range(k):
        for j in range(i + 1, k):
            c, d = two_points(m[i, i], m[i, j], m[j, j])
            if best is None or d < best[2]:
                best = (i, j, c, d)
    sol = np.zeros(k)
    sol[best[0]], sol[best[1]] = best[2], 1 - best[2]
    if k < 3:
        return sol
    for _ in range(250):
        new = next_point(sol, -m @ sol)
        c, _ = two_points(sol @ m @ sol, sol @ m @ new, new @ m @ new)
        new_sol = c * sol + (1 - c) * new
        if np.abs(new_sol - sol).sum() < 1e-5:
            return sol
        sol = new_sol
    return sol


@pytest.mark.parametrize("k,kind,seed", [c for c in CASES if c[1] != "zero" or c[0] > 2])
def test_the_authors_frank_wolfe_point_is_never_shorter_and_close(k, kind, seed):
    """The authors' answer is their projected-gradient solver's (stopped at 1e-5, with the
    0.999 clip, it stalls up to ~7% of the largest gradient away here): ours, the exact
    min-norm point (the design's reference), is never longer, and within that distance."""
    g = gradient_matrix(k, kind, seed)
    ours = MGDA().weights(g @ g.T, torch.ones(k, dtype=torch.float64)) @ g
    theirs = torch.from_numpy(sener_min_norm_weights((g @ g.T).numpy())) @ g
    scale = float(g.norm(dim=1).max())
    assert float(ours @ ours) <= float(theirs @ theirs) + 1e-12 * scale**2
    assert float((ours - theirs).norm()) <= 0.1 * scale
    assert_kkt(g, MGDA().weights(g @ g.T, torch.ones(k, dtype=torch.float64)))


@pytest.mark.parametrize("normalization", ["none", "l2", "loss", "loss+"])
def test_normalised_weights_combine_the_raw_gradients_as_the_authors(normalization):
    """``train_multi_task.py``: the weights solved on ``g_t / gn_t``
    (``gradient_normalizers``) scale the raw losses ``sum_t scale_t L_t``."""
    for k in range(2, 7):
        g = gradient_matrix(k, "scaled", seed=k)
        losses = losses_for(k, seed=k)
        gn = {"none": torch.ones(k, dtype=torch.float64), "l2": g.norm(dim=1), "loss": losses,
              "loss+": losses * g.norm(dim=1)}[normalization]
        normalised = g / gn[:, None]
        method = MGDA(normalization=normalization)
        lam = method.weights(g @ g.T, losses)
        theirs = torch.from_numpy(sener_min_norm_weights((normalised @ normalised.T).numpy())) @ normalised
        exact = exhaustive_min_norm(normalised.numpy())
        scale = float(normalised.norm(dim=1).max())
        torch.testing.assert_close(lam @ normalised, torch.from_numpy(exact), rtol=0, atol=1e-6 * scale)
        assert float((lam @ normalised).norm()) <= float(theirs.norm()) + 1e-9 * scale


def test_weight_heads_option():
    """The authors backpropagate ``sum_t scale_t L_t``: the heads receive ``scale_t dL_t``.
    ``weight_heads=True`` asks the pipeline for that; the default keeps them unweighted."""
    assert gs.methods.create("mgda").weight_heads is False
    assert gs.methods.create("mgda", weight_heads=True).weight_heads is True
    with pytest.raises(ValueError, match="weight_heads"):
        gs.methods.create("mgda", weight_heads=1)


def test_two_tasks_closed_form_and_torchjd_within_frank_wolfe_tolerance():
    from torchjd import aggregation as jd
    for seed in range(4):
        g = gradient_matrix(2, "random", seed)
        g1, g2 = g
        gamma = ((g2 - g1) @ g2 / (g1 - g2).square().sum()).clamp(0, 1)
        d = MGDA().weights(g @ g.T, torch.ones(2, dtype=torch.float64)) @ g
        torch.testing.assert_close(d, gamma * g1 + (1 - gamma) * g2, atol=1e-10, rtol=1e-9)
    # torchjd's MGDA is a Frank-Wolfe approximation: ~1e-2 off for K >= 3
    for k in (3, 5):
        g = gradient_matrix(k, "random", seed=k)
        ours, ref = MGDA().weights(g @ g.T, torch.ones(k, dtype=torch.float64)) @ g, jd.MGDA()(g)
        assert ours.norm() <= ref.norm() * (1 + 1e-9)
        assert (ours - ref).norm() <= 5e-2 * g.norm(dim=1).max()


def test_weight_heads_end_to_end_is_the_authors_scaled_backward():
    """``weight_heads=True`` at the representation level (MGDA-UB) is the authors' whole
    step: ``sum_t lambda_t L_t`` backpropagated plainly (heads and backbone), ``lambda`` the
    min-norm weights of the representation gradients (exhaustive solver, here unique)."""
    import copy

    from scipy.optimize import nnls
    model, x, ys = make(3, seed=5, rep_shape=(4,), batch=5)
    reference = copy.deepcopy(model)
    opt = gs.MultiTaskOptimizer(torch.optim.SGD(model.parameters(), lr=0.1),
                                gs.methods.create("mgda", weight_heads=True), num_tasks=3)
    grads = task_grads(model, x, ys)
    opt.zero_grad()
    opt.backward(model.losses(opt.fork(model.rep(x)), ys))
    point = exhaustive_min_norm(grads.numpy())
    # the weights of that point: nonnegative, summing to 1 (a bordered nonnegative least squares)
    lam, residual = nnls(np.vstack([grads.numpy().T, 1e3 * np.ones((1, 3))]), np.concatenate([point, [1e3]]))
    assert residual < 1e-8
    reference.zero_grad()
    z = reference.rep(x)
    sum(w * l for w, l in zip(lam, reference.losses([z] * 3, ys))).backward()
    for p, q in zip(model.parameters(), reference.parameters()):
        torch.testing.assert_close(p.grad, q.grad, rtol=1e-6, atol=1e-9)
