"""Differential tests of the Gram-based methods against torchjd 0.18 aggregators on the same
matrices, closed-form two-task formulas (PCGrad, MGDA, CAGrad) and the papers' equations
written out independently here (GradVac, GradDrop)."""
import warnings

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


@pytest.mark.parametrize("k,seed", CASES)
def test_imtl_g_and_aligned_mtl_equal_torchjd(k, seed):
    g = matrices(k, seed=seed)
    scale = g.norm(dim=1).max()
    assert torch.allclose(direction("imtl_g", g), jd.IMTLG()(g), atol=1e-6 * scale, rtol=0)
    for mode in ("min", "median", "rmse"):
        ref = jd.AlignedMTL(scale_mode=mode)(g)
        assert torch.allclose(direction("aligned_mtl", g, scale_mode=mode), ref, atol=1e-6 * scale, rtol=0)


def test_imtl_g_and_aligned_mtl_rank_deficient_equal_torchjd():
    g = matrices(4, seed=5)
    g[3] = g[0] + 2 * g[2]
    scale = g.norm(dim=1).max()
    assert torch.allclose(direction("imtl_g", g), jd.IMTLG()(g), atol=1e-6 * scale, rtol=0)
    assert torch.allclose(direction("aligned_mtl", g), jd.AlignedMTL()(g), atol=1e-6 * scale, rtol=0)


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


def test_mgda_two_tasks_closed_form_and_torchjd_within_frank_wolfe_tolerance():
    for seed in range(4):
        g = matrices(2, seed=seed)
        g1, g2 = g
        gamma = ((g2 - g1) @ g2 / (g1 - g2).square().sum()).clamp(0, 1)
        assert torch.allclose(direction("mgda", g), gamma * g1 + (1 - gamma) * g2, atol=1e-10, rtol=1e-9)
    # torchjd's MGDA is a Frank-Wolfe approximation: ~1e-2 off for K >= 3, so the exact
    # point must be at least as short and close to it.
    for k in (3, 5):
        g = matrices(k, seed=k)
        ours, ref = direction("mgda", g), jd.MGDA()(g)
        assert ours.norm() <= ref.norm() * (1 + 1e-9)
        assert (ours - ref).norm() <= 5e-2 * g.norm(dim=1).max()


def cagrad_two_tasks(g, c):
    """Closed form of CAGrad's dual for K = 2: minimise ``a(w) + s sqrt(q(w))`` over
    ``g_w = g2 + w (g1 - g2)``, ``w`` in [0, 1], through the roots of its derivative."""
    g1, g2 = g
    g0 = (g1 + g2) / 2
    s = c * g0.norm()
    h = g1 - g2
    al, be, ga, de = g0 @ h, h @ h, g2 @ h, g2 @ g2
    coeffs = [s**2 * be**2 - al**2 * be, 2 * (s**2 * be * ga - al**2 * ga), s**2 * ga**2 - al**2 * de]
    cands = [torch.tensor(0.0, dtype=D), torch.tensor(1.0, dtype=D)]
    a2, a1, a0 = coeffs
    disc = a1**2 - 4 * a2 * a0
    if disc >= 0 and a2 != 0:
        for sign in (1, -1):
            w = (-a1 + sign * disc.sqrt()) / (2 * a2)
            if 0 <= w <= 1:
                cands.append(w)

    def objective(w):
        gw = g2 + w * h
        return g0 @ gw + s * gw.norm()

    w = min(cands, key=objective)
    gw = g2 + w * h
    return g0 + s / gw.norm() * gw


@pytest.mark.parametrize("c", [0.2, 0.5, 1.0])
def test_cagrad_two_tasks_closed_form(c):
    for seed in range(4):
        g = matrices(2, seed=seed)
        assert torch.allclose(direction("cagrad", g, c=c), cagrad_two_tasks(g, c), atol=1e-8, rtol=1e-7)


def cagrad_objective(g, coefs, c):
    """The dual objective at the ``w`` behind CAGrad's coefficients ``1/K + lambda w``."""
    k = g.shape[0]
    w = coefs - 1.0 / k
    w = w / w.sum()
    g0 = g.mean(0)
    gw = w @ g
    return float(gw @ g0 + c * g0.norm() * gw.norm())


@pytest.mark.parametrize("k,c", [(3, 0.5), (5, 0.5), (8, 1.0), (14, 0.5)])
def test_cagrad_objective_at_least_as_good_as_torchjd(k, c):
    pytest.importorskip("cvxpy", reason="torchjd's CAGrad needs cvxpy (torchjd[cagrad])")
    from torchjd.aggregation._cagrad import CAGradWeighting
    g = matrices(k, n=30, seed=k)
    ours = weights("cagrad", g, c=c)
    ref = CAGradWeighting(c=c, norm_eps=0.0)(g @ g.T)
    scale = float((g @ g.T).diagonal().mean())
    # torchjd's conic solver stops at its tolerance: our exact optimum is never worse, and equal
    # to that tolerance; the directions agree accordingly.
    assert cagrad_objective(g, ours, c) <= cagrad_objective(g, ref, c) + 1e-9 * scale
    assert cagrad_objective(g, ours, c) >= cagrad_objective(g, ref, c) - 1e-5 * scale
    assert (ours @ g - ref @ g).norm() <= 1e-2 * g.norm(dim=1).max()


@pytest.mark.parametrize("k", [2, 3, 5])
def test_nash_mtl_solves_bargaining_condition_and_matches_torchjd(k):
    pytest.importorskip("cvxpy", reason="torchjd's NashMTL needs cvxpy and ecos (torchjd[nash_mtl])")
    pytest.importorskip("ecos", reason="torchjd's NashMTL needs ecos (torchjd[nash_mtl])")
    g = matrices(k, n=20, seed=10 + k, conflict=False)
    alpha = weights("nash_mtl", g)
    m = g @ g.T
    assert torch.allclose(alpha * (m @ alpha), torch.ones(k, dtype=D), atol=1e-7)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        ref = jd.NashMTL(n_tasks=k, max_norm=0.0)(g)
    # torchjd stops its sequential convex solver at ||M a - 1/a|| < 1e-3 (normalised M)
    assert (alpha @ g - ref).norm() <= 1e-3 * ref.norm()


def test_nash_mtl_max_norm_and_update_every():
    g = matrices(3, seed=2, conflict=False)
    m, losses = g @ g.T, torch.ones(3, dtype=D)
    clipped = weights("nash_mtl", g, max_norm=0.5)
    assert torch.isclose((clipped @ g).norm(), torch.tensor(0.5, dtype=D))
    method = gs.methods.create("nash_mtl", update_weights_every=2)
    method.bind(3, device=g.device, dtype=D, generator=torch.Generator())
    first = method.weights(m, losses)
    assert torch.isclose(first @ m @ first, torch.tensor(3.0, dtype=D))  # ||d||^2 = K
    second = method.weights(4 * m, losses)  # reused: not a solve step
    assert torch.equal(first, second)
    third = method.weights(4 * m, losses)   # solved again on the new Gram
    assert torch.isclose(third @ (4 * m) @ third, torch.tensor(3.0, dtype=D))
    assert torch.allclose(third, first / 2)


def test_nash_mtl_raises_when_no_bargaining_solution():
    g = matrices(2, seed=0, conflict=False)
    g[1] = -g[0]
    with pytest.raises(FloatingPointError, match="did not converge"):
        weights("nash_mtl", g)


def test_nash_mtl_on_failure_warn_keeps_the_last_solution():
    """Opt-in fallback: a failed solve warns and reuses the last converged weights (the start
    ``1 / ||g_k||`` before any); the default raises (above)."""
    g = matrices(2, seed=0, conflict=False)
    method = gs.methods.create("nash_mtl", on_failure="warn")
    method.bind(2, device=g.device, dtype=D, generator=torch.Generator())
    opposed = g.clone()
    opposed[1] = -opposed[0]
    with pytest.warns(RuntimeWarning, match="keeping the last solution"):
        start = method.weights(opposed @ opposed.T, torch.ones(2, dtype=D))
    torch.testing.assert_close(start, 1 / opposed.norm(dim=1))
    solved = method.weights(g @ g.T, torch.ones(2, dtype=D))
    with pytest.warns(RuntimeWarning, match="keeping the last solution"):
        kept = method.weights(opposed @ opposed.T, torch.ones(2, dtype=D))
    assert torch.equal(kept, solved)
    with pytest.raises(ValueError, match="on_failure"):
        gs.methods.create("nash_mtl", on_failure="ignore")


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


def test_graddrop_equals_paper_algorithm():
    gen = torch.Generator().manual_seed(1)
    grads = torch.randn(3, 4, 5, generator=gen)  # K x batch x features
    method = gs.methods.create("graddrop", leak=0.25)
    method.bind(3, device=torch.device("cpu"), dtype=torch.float32, generator=torch.Generator().manual_seed(7))
    ours = method.combine(grads, torch.ones(3))
    # Algorithm 1 of the paper, written out: batch-summed signals, purity, one uniform per element
    signal = grads.sum(1)
    purity = 0.5 * (1 + signal.sum(0) / signal.abs().sum(0))
    u = torch.rand(purity.shape, generator=torch.Generator().manual_seed(7))
    ref = torch.zeros(4, 5)
    for k in range(3):
        keep = ((purity > u) & (signal[k] > 0)) | ((purity < u) & (signal[k] < 0))
        ref += (0.25 + 0.75 * keep.float()) * grads[k]
    assert torch.allclose(ours, ref, atol=1e-6)
