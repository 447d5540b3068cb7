"""CAGrad against the authors' update (Cranial-XIX/CAGrad) and torchjd 0.18's convention.

Cases (``gradient_cases``): K = 2..6 random task gradients, a zero row (a batch without one
task's labels), duplicate rows, exactly opposed rows, norms six orders of magnitude apart."""
import numpy as np
import pytest
import scipy.optimize
import torch
from gradient_cases import CASES, gradient_matrix

import gradsurgery as gs

D = torch.float64
C = 0.4  # the paper's runs (nyuv2/run.sh: --alpha 0.4)


def official_dual(g: torch.Tensor, c: float = C) -> tuple[torch.Tensor, float]:
    """The authors' dual weights ``w`` and ``c'``, re-derived from Cranial-XIX/CAGrad,
    ``nyuv2/utils.py``, ``cagrad(grads, alpha, rescale)``: with ``A = G G^T``,
    ``c' = c sqrt(mean(A) + 1e-8) + 1e-8`` and
    ``w = argmin_{w in simplex} w^T A 1/K + c' sqrt(w^T A w + 1e-8)`` (the authors run scipy's
    SLSQP from 1/K; here SLSQP to a tight tolerance from 1/K and from every vertex, keeping the
    best, so that the reference is the problem's minimiser rather than a loose stop)."""
    a_np = (g @ g.T).numpy()
    k = a_np.shape[0]
    b = np.ones(k) / k
    cc = c * np.sqrt(a_np.mean() + 1e-8) + 1e-8

    def objective(x):
        return x @ a_np @ b + cc * np.sqrt(x @ a_np @ x + 1e-8)

    def jac(x):
        return a_np @ b + cc * (a_np @ x) / np.sqrt(x @ a_np @ x + 1e-8)

    best = None
    for x0 in [b, *np.eye(k)]:
        res = scipy.optimize.minimize(
            objective, x0, jac=jac, method="SLSQP", bounds=[(0, 1)] * k,
            constraints={"type": "eq", "fun": lambda x: 1 - x.sum(), "jac": lambda x: -np.ones(k)},
            options={"ftol": 1e-15, "maxiter": 2000})
        if best is None or res.fun < best.fun:
            best = res
    return torch.from_numpy(best.x), float(cc)


def official_cagrad(g: torch.Tensor, c: float = C, rescale: int = 1, times_k: bool = True) -> torch.Tensor:
    """The authors' step (same file: ``cagrad`` then ``overwrite_grad``, which multiplies by
    the number of tasks "to match the sum loss"; the copies in AvivNavon/nash-mtl and LibMTL
    omit that factor: ``times_k=False``): ``g = mean_k g_k + c' / (||G^T w|| + 1e-8) G^T w``,
    divided by ``1 + c^2`` (rescale 1), ``1 + c`` (rescale 2) or 1 (rescale 0), then times K."""
    w, cc = official_dual(g, c)
    gw = w @ g
    out = g.mean(0) + cc / (gw.norm() + 1e-8) * gw
    out = out / {0: 1.0, 1: 1 + c**2, 2: 1 + c}[rescale]
    return out * g.shape[0] if times_k else out


def dual_objective(g: torch.Tensor, w: torch.Tensor | None, c: float = C) -> float:
    """``<g_w, g_0> + c ||g_0|| ||g_w||`` (unregularised; ``w=None``: ``g_w = 0``)."""
    if w is None:
        return 0.0
    g0, gw = g.mean(0), w @ g
    return float(gw @ g0 + c * g0.norm() * gw.norm())


def dual_weights_of(coefs: torch.Tensor, scale: float) -> torch.Tensor | None:
    """The ``w`` behind coefficients ``scale (1/K + lambda w)`` (``None`` when ``lambda w = 0``)."""
    rest = coefs / scale - 1.0 / len(coefs)
    return None if float(rest.abs().max()) < 1e-12 else rest / rest.sum()


def ours(g: torch.Tensor, losses: torch.Tensor | None = None, **options) -> torch.Tensor:
    method = gs.methods.create("cagrad", **options)
    method.bind(g.shape[0], device=g.device, dtype=g.dtype, generator=torch.Generator().manual_seed(0))
    losses = torch.ones(g.shape[0], dtype=g.dtype) if losses is None else losses
    return method.weights(g @ g.T, losses) @ g


@pytest.mark.parametrize("k,case,seed", CASES)
def test_defaults_equal_the_authors_update(k, case, seed):
    """The steps agree (to the reference solver's accuracy). Where the dual optimum is
    ``g_w = 0`` (0 in the hull: a zero or opposed row) the authors' 1e-8 regularisers select
    the direction (issue #19 item 3), which ours reproduces; their ``+ 1e-8`` in
    ``lambda = c' / (||g_w|| + 1e-8)`` with ``||g_w|| ~ 1e-4`` there is a 1e-4 relative
    difference. Where SLSQP stalls (norms six orders apart) ours must reach at least as low an
    objective."""
    g = gradient_matrix(k, case, seed)
    scale = float(g.norm(dim=1).max())
    method = gs.methods.create("cagrad")
    method.bind(k, device=g.device, dtype=D, generator=torch.Generator())
    coefs = method.weights(g @ g.T, torch.ones(k, dtype=D))
    w_ref, _ = official_dual(g)
    w_ours = dual_weights_of(coefs, k / (1 + C**2))
    f_ours, f_ref = dual_objective(g, w_ours), dual_objective(g, w_ref)
    tol = 1e-9 * abs(f_ref) + 1e-15 * scale**2  # on the objective's own scale
    if case in ("zero", "opposed") and float((w_ref @ g).norm()) < 1e-3 * scale:  # g_w = 0: both
        # regularised solves, the same limit direction (the authors' 1e-8 is absolute, ours
        # relative to the mean squared norm)
        torch.testing.assert_close(coefs @ g, official_cagrad(g), atol=1e-3 * scale, rtol=0)
        return
    assert f_ours <= f_ref + tol
    if f_ref - f_ours <= tol:  # the reference found the optimum: same step
        torch.testing.assert_close(coefs @ g, official_cagrad(g), atol=1e-6 * scale, rtol=0)


def test_zero_task_gradient_with_a_conflict_is_the_authors_direction():
    """Issue #19 item 3: a zero row (a batch without task 3's labels) while tasks 1 and 2
    conflict. The dual optimum is ``w = e_3`` (``g_w = 0``); the authors' regularised solve
    (``sqrt(w^T A w + 1e-8)``, ``c' / (||g_w|| + 1e-8)``) moves to ``g_0 + c' u``, ``u`` the unit
    direction of the cone of the other gradients most against ``g_0``, conflict-free
    (``<g_k, d> = 0.056, 0.046, 0``). The mean gradient (the old answer) conflicts with task 2."""
    g = torch.tensor([[1.0, 0.0], [-0.8, 0.3], [0.0, 0.0]], dtype=D)
    expected = official_cagrad(g)
    for dtype in (D, torch.float32):
        got = ours(g.to(dtype)).double()
        torch.testing.assert_close(got, expected, atol=1e-3 * float(expected.norm()), rtol=0)
        assert (g @ got >= 0).all()


def _leaning(k: int, rank: int, lean: float, seed: int) -> torch.Tensor:
    """``K x 10`` rows of rank ``rank`` plus ``lean`` times their mean norm along one direction
    of their row space (0 outside the hull for most draws)."""
    gen = torch.Generator().manual_seed(seed)
    g = torch.randn(k, rank, generator=gen, dtype=D) @ torch.randn(rank, 10, generator=gen, dtype=D) / rank**0.5
    direction = torch.randn(rank, generator=gen, dtype=D) @ torch.randn(rank, 10, generator=gen, dtype=D)
    return g + lean * direction / direction.norm() * g.norm(dim=1, keepdim=True).mean()


def projected_gradient_dual(g: torch.Tensor, c: float, iterations: int = 2500) -> float:
    """An independent solver of CAGrad's dual ``min_{w in simplex} <g_w, g_0> + c ||g_0|| ||g_w||``:
    accelerated projected gradient (FISTA, simplex projection by sorting) in numpy float64,
    step ``||g_w|| / (s lambda_max)``; returns the objective it reaches (an upper bound of the
    minimum)."""
    a_np = (g @ g.T).numpy()
    k = a_np.shape[0]
    a, s = a_np.mean(1), c * np.sqrt(a_np.mean())
    lipschitz = np.linalg.eigvalsh(a_np)[-1]

    def project(v):
        u = np.sort(v)[::-1]
        css = np.cumsum(u) - 1
        ind = np.arange(1, k + 1)
        last = ind[u - css / ind > 0][-1]
        return np.maximum(v - css[last - 1] / last, 0)

    w = y = np.ones(k) / k
    t = 1.0
    for _ in range(iterations):
        n = np.sqrt(max(y @ a_np @ y, 1e-300))
        nxt = project(y - n / (s * lipschitz) * (a + s * a_np @ y / n))
        t_next = (1 + np.sqrt(1 + 4 * t * t)) / 2
        y, w, t = nxt + (t - 1) / t_next * (nxt - w), nxt, t_next
    return float(w @ a + s * np.sqrt(max(w @ a_np @ w, 0)))


@pytest.mark.parametrize("dtype,lean,seed", [(D, 0.1, 1), (torch.float32, 0.3, 9), (torch.float32, 0.3, 14),
                                             (D, 0.3, 2)])
def test_exact_above_the_enumeration_limit(dtype, lean, seed):
    """Issue #19 item 2: K = 20 > 12 (the active-set path), rank-5 rows leaning one way, c = 1:
    the objective is at most the independent solver's (to 1e-6 of it: float32 inputs, the
    Gram's rounding), and the update conflicts with no task (with c >= 1 the optimum never
    does). The old support guess ended 2-30% above it here, in conflict."""
    g = _leaning(20, 5, lean, seed)
    method = gs.methods.create("cagrad", c=1.0, rescale=0, reduction="mean")
    method.bind(20, device=g.device, dtype=dtype, generator=torch.Generator())
    coefs = method.weights((g @ g.T).to(dtype), torch.ones(20, dtype=dtype)).double()
    w = (coefs - 1 / 20) / (coefs - 1 / 20).sum()
    reference = projected_gradient_dual(g, 1.0)
    assert dual_objective(g, w, 1.0) <= reference + 1e-6 * abs(reference)
    d = coefs @ g
    assert float((g @ d).min()) >= -1e-5 * float(g.norm(dim=1).max() * d.norm())


def test_exact_at_forty_tasks():
    """K = 40 (CelebA's task count), float32 and float64, against the independent solver."""
    g = _leaning(40, 8, 0.2, 0)
    reference = projected_gradient_dual(g, 0.4)
    for dtype in (D, torch.float32):
        method = gs.methods.create("cagrad", c=0.4, rescale=0, reduction="mean")
        method.bind(40, device=g.device, dtype=dtype, generator=torch.Generator())
        coefs = method.weights((g @ g.T).to(dtype), torch.ones(40, dtype=dtype)).double()
        w = (coefs - 1 / 40) / (coefs - 1 / 40).sum()
        assert dual_objective(g, w, 0.4) <= reference + 1e-6 * abs(reference)


@pytest.mark.parametrize("rescale", [0, 1, 2])
@pytest.mark.parametrize("reduction", ["sum", "mean"])
def test_rescale_and_reduction_options_equal_the_authors_variants(rescale, reduction):
    for k in (2, 3, 5):
        g = gradient_matrix(k, "random", seed=10 + k)
        ref = official_cagrad(g, c=0.6, rescale=rescale, times_k=reduction == "sum")
        torch.testing.assert_close(ours(g, c=0.6, rescale=rescale, reduction=reduction), ref,
                                   atol=1e-6 * float(g.norm(dim=1).max()), rtol=0)


@pytest.mark.parametrize("k", range(2, 7))
def test_zero_row_gives_the_mean_gradient_at_the_authors_scale(k):
    """A task without labels in the batch (zero gradient) while the others agree: 0 is a
    vertex of the hull and the dual optimum, so the authors' step is the mean gradient,
    times K / (1 + c^2) = the sum over tasks / (1 + c^2) — never zero."""
    gen = torch.Generator().manual_seed(k)
    base = torch.randn(12, generator=gen, dtype=D)
    g = base + 0.3 * torch.randn(k, 12, generator=gen, dtype=D)
    g[k - 1] = 0
    expected = g.sum(0) / (1 + C**2)
    torch.testing.assert_close(ours(g), expected, atol=1e-9 * float(g.norm(dim=1).max()), rtol=0)
    assert ours(g).norm() > 0.5 * expected.norm()


def test_all_but_one_task_without_labels_still_moves():
    g = torch.zeros(3, 5, dtype=D)
    g[0] = torch.arange(1.0, 6.0, dtype=D)
    torch.testing.assert_close(ours(g), g[0] / (1 + C**2), atol=1e-12, rtol=0)


def cagrad_two_tasks(g, c):
    """Closed form of CAGrad's dual for K = 2 (unscaled: mean-based, no rescale):
    minimise ``<g_w, g_0> + c ||g_0|| ||g_w||`` over ``g_w = g2 + w (g1 - g2)``, ``w`` in
    [0, 1], through the roots of its derivative."""
    g1, g2 = g
    g0 = (g1 + g2) / 2
    s = c * g0.norm()
    h = g1 - g2
    al, be, ga, de = g0 @ h, h @ h, g2 @ h, g2 @ g2
    a2, a1, a0 = s**2 * be**2 - al**2 * be, 2 * (s**2 * be * ga - al**2 * ga), s**2 * ga**2 - al**2 * de
    cands = [torch.tensor(0.0, dtype=D), torch.tensor(1.0, dtype=D)]
    disc = a1**2 - 4 * a2 * a0
    if disc >= 0 and a2 != 0:
        for sign in (1, -1):
            w = (-a1 + sign * disc.sqrt()) / (2 * a2)
            if 0 <= w <= 1:
                cands.append(w)
    w = min(cands, key=lambda w: float(g0 @ (g2 + w * h) + s * (g2 + w * h).norm()))
    gw = g2 + w * h
    return g0 + s / gw.norm() * gw


@pytest.mark.parametrize("c", [0.2, 0.5, 1.0])
def test_two_tasks_closed_form(c):
    for seed in range(4):
        g = gradient_matrix(2, "random", seed)
        torch.testing.assert_close(ours(g, c=c, rescale=0, reduction="mean"), cagrad_two_tasks(g, c),
                                   atol=1e-8, rtol=1e-7)


def torchjd_objective(g, coefs, c):
    """The dual objective at the ``w`` behind unscaled coefficients ``1/K + lambda w``."""
    k = g.shape[0]
    w = coefs - 1.0 / k
    w = w / w.sum()
    g0 = g.mean(0)
    gw = w @ g
    return float(gw @ g0 + c * g0.norm() * gw.norm())


@pytest.mark.parametrize("k,c", [(3, 0.5), (5, 0.5), (8, 1.0), (14, 0.5)])
def test_torchjd_convention_objective_at_least_as_good_as_torchjd(k, c):
    """torchjd 0.18's CAGrad is ``rescale=0, reduction="mean"`` (its conic solver stops at its
    tolerance: our exact optimum is never worse, and within that tolerance)."""
    pytest.importorskip("cvxpy", reason="torchjd's CAGrad needs cvxpy (torchjd[cagrad])")
    from torchjd.aggregation._cagrad import CAGradWeighting
    g = torch.randn(k, 30, generator=torch.Generator().manual_seed(k), dtype=D)
    g[1] = -0.7 * g[0] + 0.3 * g[1]
    method = gs.methods.create("cagrad", c=c, rescale=0, reduction="mean")
    method.bind(k, device=g.device, dtype=D, generator=torch.Generator())
    coefs = method.weights(g @ g.T, torch.ones(k, dtype=D))
    ref = CAGradWeighting(c=c, norm_eps=0.0)(g @ g.T)
    scale = float((g @ g.T).diagonal().mean())
    assert torchjd_objective(g, coefs, c) <= torchjd_objective(g, ref, c) + 1e-9 * scale
    assert torchjd_objective(g, coefs, c) >= torchjd_objective(g, ref, c) - 1e-5 * scale
    assert (coefs @ g - ref @ g).norm() <= 1e-2 * g.norm(dim=1).max()


def test_above_the_enumeration_limit_equals_the_authors_update():
    g = torch.randn(14, 30, generator=torch.Generator().manual_seed(3), dtype=D)
    g[1] = -0.7 * g[0] + 0.3 * g[1]
    torch.testing.assert_close(ours(g), official_cagrad(g), atol=1e-6 * float(g.norm(dim=1).max()), rtol=0)


def test_bad_options_raise():
    for bad in ({"c": -0.1}, {"rescale": 3}, {"rescale": True}, {"reduction": "max"}):
        with pytest.raises(ValueError, match=next(iter(bad))):
            gs.methods.create("cagrad", **bad)


@pytest.mark.parametrize("k,case,seed", CASES)
def test_never_a_zero_update_while_the_mean_is_not_zero(k, case, seed):
    """``g = K / (1 + c^2) (g_0 + c ||g_0|| u)`` with ``||u|| <= 1``, so
    ``<g, g_0> >= K (1 - c) / (1 + c^2) ||g_0||^2 > 0`` for ``c < 1``: zero, opposed and duplicate
    rows included."""
    g = gradient_matrix(k, case, seed)
    g0 = g.mean(0)
    bound = k * (1 - C) / (1 + C**2) * float(g0 @ g0)
    assert float(ours(g) @ g0) >= bound - 1e-9 * float(g.norm(dim=1).max()) ** 2
    # where g_0 = 0 to rounding (opposed rows, K = 2) the regularised step of the g_w = 0 case
    # turns that rounding, eps ||g||, into c eps ||g|| / 1e-8: 1e-7 ||g|| bounds it
    assert float(ours(g).norm()) <= (k * (1 + C) / (1 + C**2) * float(g0.norm()) * (1 + 1e-9)
                                     + 1e-7 * float(g.norm(dim=1).max()))


def test_params_level_end_to_end_is_the_authors_step():
    """At ``level="params"`` (the authors' setting) the whole step is theirs: every head gets
    its own loss gradient (their per-task ``backward`` calls accumulate there) and the shared
    parameters ``overwrite_grad(cagrad(grads))``, re-derived above."""
    import copy

    from core_helpers import make
    k = 3
    model, x, ys = make(k, seed=6, batch=6)
    reference = copy.deepcopy(model)
    opt = gs.MultiTaskOptimizer(torch.optim.SGD(model.parameters(), lr=0.1), "cagrad", num_tasks=k, level="params")
    opt.zero_grad()
    opt.backward(model.losses(opt.fork(model.rep(x)), ys))
    backbone = list(reference.backbone.parameters())
    losses = reference.losses([reference.rep(x)] * k, ys)
    jac = torch.stack([torch.cat([g.flatten() for g in torch.autograd.grad(l, backbone, retain_graph=True)])
                       for l in losses])
    expected = official_cagrad(jac)
    got = torch.cat([p.grad.flatten() for p in model.backbone.parameters()])
    torch.testing.assert_close(got, expected, atol=1e-6 * float(jac.norm(dim=1).max()), rtol=0)
    reference.zero_grad()
    sum(losses).backward()
    for p, q in zip(model.heads.parameters(), reference.heads.parameters()):
        torch.testing.assert_close(p.grad, q.grad, atol=1e-12, rtol=1e-10)
