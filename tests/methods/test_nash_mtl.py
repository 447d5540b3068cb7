"""Nash-MTL against the authors' update (AvivNavon/nash-mtl) and torchjd 0.18.

Cases: K = 2..6 random task gradients (the bargaining problem has a solution), duplicate
rows (it has one too), several steps with ``update_weights_every``; zero and exactly opposed
rows have none (the authors' solver then keeps its last weights; ours raises, or warns with
``on_failure="warn"``)."""
import warnings

import numpy as np
import pytest
import torch
from gradient_cases import gradient_matrix

import gradsurgery as gs

cp = pytest.importorskip("cvxpy", reason="the reference runs the authors' convex programs (cvxpy + ecos)")
pytest.importorskip("ecos", reason="the authors' code solves with ECOS")

D = torch.float64


def official_alpha(gtg: np.ndarray, previous: np.ndarray, optim_niter: int = 20) -> np.ndarray:
    """The authors' weights, re-derived from AvivNavon/nash-mtl ``methods/weight_methods.py``,
    ``NashMTL.solve_optimization`` / ``_init_optim_problem`` / ``_stop_criteria``.

    ``nf = ||G G^T||_F``, ``M = G G^T / nf``. From the previous weights (ones at the first
    step), up to ``optim_niter`` convex programs (ECOS): minimise
    ``sum(M a) + phi(a) / nf`` with ``phi`` the linearisation of ``sum log``-terms at the
    current point, ``phi(a) = (1/a_t + (1/(M a_t))^T M) (a - a_t)``, subject to
    ``log(a_i nf) + log((M a)_i) >= 0`` and ``a >= 0``; stop when no solution came back, when
    ``||M a_t - 1/(a_t + 1e-10)|| < 1e-3`` or when the weights moved less than 1e-6 (then the
    point before the last solve is kept). A failed solve keeps the previous point.
    """
    with np.errstate(all="ignore"):  # their linearisation divides by ~0 on degenerate Grams
        return _cccp(gtg, previous, optim_niter)


def _cccp(gtg: np.ndarray, previous: np.ndarray, optim_niter: int) -> np.ndarray:
    k = gtg.shape[0]
    nf = np.linalg.norm(gtg)
    m = gtg / nf
    alpha_t = previous
    for _ in range(optim_niter):
        a = cp.Variable(k, nonneg=True)
        ma = m @ a
        phi = (1 / alpha_t + (1 / (m @ alpha_t)) @ m) @ (a - alpha_t)
        constraints = [-cp.log(a[i] * nf) - cp.log(ma[i]) <= 0 for i in range(k)]
        try:  # the authors catch every exception (a bare ``except``) and keep the point
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                cp.Problem(cp.Minimize(cp.sum(ma) + phi / nf), constraints).solve(solver=cp.ECOS, max_iters=100)
            new = a.value
        except Exception:
            new = alpha_t
        if (new is None or np.linalg.norm(m @ alpha_t - 1 / (alpha_t + 1e-10)) < 1e-3
                or np.linalg.norm(new - alpha_t) < 1e-6):
            break
        alpha_t = new
    return alpha_t


def official_step(g: torch.Tensor, alpha: np.ndarray, max_norm: float = 1.0) -> torch.Tensor:
    """``NashMTL.backward``: ``sum_i alpha_i L_i`` backpropagated, then
    ``clip_grad_norm_(shared, max_norm)`` (factor ``max_norm / (||d|| + 1e-6)``, capped at 1)."""
    d = torch.from_numpy(alpha) @ g
    if max_norm > 0:
        d = d * min(1.0, max_norm / (float(d.norm()) + 1e-6))
    return d


def create(k: int, **options):
    method = gs.methods.create("nash_mtl", **options)
    method.bind(k, device=torch.device("cpu"), dtype=D, generator=torch.Generator().manual_seed(0))
    return method


def converged(gtg: np.ndarray, alpha: np.ndarray) -> bool:
    return float(np.abs(alpha * (gtg @ alpha) - 1).max()) < 1e-6


@pytest.mark.parametrize("k", range(2, 7))
@pytest.mark.parametrize("case", ["random", "duplicate", "scaled"])
def test_defaults_equal_the_authors_step(k, case):
    """Default ``max_norm=1.0``: the step is the bargaining solution clipped to norm 1 (here
    always clipped: ``||d|| = sqrt(K)`` before). The authors' solver runs cold (from ones)
    and, where that fails, warm (from our weights perturbed by 5%, as their previous step's
    weights would be). Where it still does not meet its own condition (its first linearised
    program unbounded, ECOS failing on singular or badly scaled Grams: norms six orders
    apart never converge), their code silently keeps that point; ours solves the condition."""
    compared = 0
    for seed in range(3):
        for scale in (1e-3, 1.0, 30.0):
            g = scale * gradient_matrix(k, case, seed)
            gtg = (g @ g.T).numpy()
            d = create(k).weights(g @ g.T, torch.ones(k, dtype=D)) @ g
            weights = create(k, max_norm=None).weights(g @ g.T, torch.ones(k, dtype=D))
            torch.testing.assert_close(weights * (g @ g.T @ weights), torch.ones(k, dtype=D), atol=1e-6, rtol=0)
            torch.testing.assert_close(d.norm(), torch.tensor(1.0, dtype=D))
            if scale != 1.0 or case == "scaled":  # their solver rarely meets its condition there
                continue
            alpha = official_alpha(gtg, np.ones(k))
            if not converged(gtg, alpha):
                noise = np.random.default_rng(seed).uniform(-0.05, 0.05, k)
                alpha = official_alpha(gtg, weights.numpy() * (1 + noise))
            if converged(gtg, alpha):
                compared += 1
                torch.testing.assert_close(d, official_step(g, alpha), atol=1e-6, rtol=0)
    assert compared >= (0 if case == "scaled" else 1)  # never for "scaled" (measured: 0 of 45)


def test_without_clipping_equals_the_authors_bargaining_solution():
    for k in range(2, 7):
        g = gradient_matrix(k, "random", seed=7)
        alpha = official_alpha((g @ g.T).numpy(), np.ones(k))
        assert converged((g @ g.T).numpy(), alpha)
        d = create(k, max_norm=None).weights(g @ g.T, torch.ones(k, dtype=D)) @ g
        ref = official_step(g, alpha, max_norm=0.0)
        torch.testing.assert_close(d, ref, atol=1e-7 * float(ref.norm()), rtol=0)


def test_several_steps_with_update_weights_every_equal_the_authors():
    """The authors solve on steps ``0, every, 2 every, ...`` (warm-started from the last
    weights) and reuse the last weights in between; the clipping uses the current step's
    gradients."""
    k, every = 3, 2
    method = create(k, update_weights_every=every)
    previous = np.ones(k)
    gen = torch.Generator().manual_seed(5)
    base = torch.randn(k, 8, generator=gen, dtype=D)
    for step in range(6):
        g = base + 0.3 * torch.randn(k, 8, generator=gen, dtype=D)
        g = g * (0.05 if step % 3 == 2 else 1.0)  # some steps below max_norm: no clipping
        if step % every == 0:
            previous = official_alpha((g @ g.T).numpy(), previous)
            assert converged((g @ g.T).numpy(), previous)
        d = method.weights(g @ g.T, torch.ones(k, dtype=D)) @ g
        torch.testing.assert_close(d, official_step(g, previous), atol=1e-6 * max(1.0, float(d.norm())), rtol=0)


def test_max_norm_clips_and_none_keeps_norm_sqrt_k():
    g = gradient_matrix(3, "random", seed=2)
    m, losses = g @ g.T, torch.ones(3, dtype=D)
    assert torch.isclose(create(3).weights(m, losses) @ g @ g.T @ create(3).weights(m, losses),
                         torch.tensor(1.0, dtype=D), rtol=1e-5)
    assert torch.isclose((create(3, max_norm=0.5).weights(m, losses) @ g).norm(), torch.tensor(0.5, dtype=D),
                         rtol=1e-5)
    free = create(3, max_norm=None).weights(m, losses)
    assert torch.isclose(free @ m @ free, torch.tensor(3.0, dtype=D))  # ||d||^2 = K


def test_weight_heads_option_sets_the_attribute_of_the_same_name():
    """The authors backpropagate ``sum_i alpha_i L_i``: each head receives ``alpha_i dL_i``.
    The option asks the pipeline for that; the default keeps heads unweighted."""
    assert create(2).weight_heads is False
    assert create(2, weight_heads=True).weight_heads is True
    with pytest.raises(ValueError, match="weight_heads"):
        gs.methods.create("nash_mtl", weight_heads="yes")


@pytest.mark.parametrize("k", [2, 3, 5])
def test_matches_torchjd(k):
    g = torch.randn(k, 20, generator=torch.Generator().manual_seed(10 + k), dtype=D)
    alpha = create(k, max_norm=None).weights(g @ g.T, torch.ones(k, dtype=D))
    torch.testing.assert_close(alpha * (g @ g.T @ alpha), torch.ones(k, dtype=D), atol=1e-7, rtol=0)
    from torchjd import aggregation as jd
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        ref = jd.NashMTL(n_tasks=k, max_norm=0.0)(g)
    # torchjd stops its sequential convex solver at ||M a - 1/a|| < 1e-3 (normalised M)
    assert (alpha @ g - ref).norm() <= 1e-3 * ref.norm()


def test_update_every_reuses_the_weights():
    g = gradient_matrix(3, "random", seed=2)
    m, losses = g @ g.T, torch.ones(3, dtype=D)
    method = create(3, update_weights_every=2, max_norm=None)
    first = method.weights(m, losses)
    assert torch.isclose(first @ m @ first, torch.tensor(3.0, dtype=D))
    assert torch.equal(method.weights(4 * m, losses), first)  # not a solve step
    third = method.weights(4 * m, losses)  # solved again on the new Gram
    torch.testing.assert_close(third, first / 2)


@pytest.mark.parametrize("case", ["zero", "opposed"])
def test_no_bargaining_solution_raises(case):
    g = gradient_matrix(2, case, seed=0)
    with pytest.raises(FloatingPointError, match="did not converge"):
        create(2).weights(g @ g.T, torch.ones(2, dtype=D))


def test_on_failure_warn_keeps_the_last_solution():
    """Opt-in, closest to the authors (who keep their last weights silently): a failed
    solve warns and reuses the last converged weights (the start ``1 / ||g_k||`` before any)."""
    g = gradient_matrix(2, "random", seed=0)
    method = create(2, on_failure="warn", max_norm=None)
    opposed = g.clone()
    opposed[1] = -opposed[0]
    with pytest.warns(RuntimeWarning, match="keeping the last solution"):
        start = method.weights(opposed @ opposed.T, torch.ones(2, dtype=D))
    torch.testing.assert_close(start, 1 / opposed.norm(dim=1))
    solved = method.weights(g @ g.T, torch.ones(2, dtype=D))
    with pytest.warns(RuntimeWarning, match="keeping the last solution"):
        kept = method.weights(opposed @ opposed.T, torch.ones(2, dtype=D))
    assert torch.equal(kept, solved)


def test_bad_options_raise():
    for bad in ({"max_norm": 0.0}, {"update_weights_every": 0}, {"on_failure": "ignore"}, {"tol": 0}):
        with pytest.raises(ValueError, match=next(iter(bad))):
            gs.methods.create("nash_mtl", **bad)


def flat(params) -> torch.Tensor:
    return torch.cat([p.grad.flatten() for p in params])


@pytest.mark.parametrize("max_norm", [None, 1.0])
def test_params_level_weight_heads_end_to_end_is_the_authors_backward(max_norm):
    """At ``level="params"`` with ``weight_heads=True``: the authors' ``NashMTL.backward`` is
    ``sum_k alpha_k L_k`` backpropagated (heads ``alpha_k dL_k``, backbone ``sum_k alpha_k g_k``)
    then ``clip_grad_norm_(shared, max_norm)``, with ``alpha`` their bargaining weights of the
    parameter Jacobian: the heads keep the unclipped ``alpha_k`` (the authors clip the shared
    parameters only)."""
    import copy

    from core_helpers import make
    k = 3
    model, x, ys = make(k, seed=2, batch=6)
    reference = copy.deepcopy(model)
    method = gs.methods.create("nash_mtl", weight_heads=True, max_norm=max_norm)
    opt = gs.MultiTaskOptimizer(torch.optim.SGD(model.parameters(), lr=0.1), method, num_tasks=k, level="params")
    opt.zero_grad()
    opt.backward(model.losses(opt.fork(model.rep(x)), ys))

    backbone = list(reference.backbone.parameters())
    losses = reference.losses([reference.rep(x)] * k, ys)
    jac = torch.stack([torch.cat([g.flatten() for g in torch.autograd.grad(l, backbone, retain_graph=True)])
                       for l in losses])
    gtg = (jac @ jac.T).numpy()
    alpha = official_alpha(gtg, np.ones(k))
    assert converged(gtg, alpha)
    shared = official_step(jac, alpha, max_norm=0.0 if max_norm is None else max_norm)
    factor = float(shared.norm() / (torch.from_numpy(alpha) @ jac).norm())
    assert (factor < 0.9) == (max_norm is not None)  # the clipping is active in that case (1 / sqrt(K))
    reference.zero_grad()
    sum(float(a) * l for a, l in zip(alpha, losses)).backward()
    torch.testing.assert_close(flat(model.backbone.parameters()), shared, atol=1e-6 * float(shared.norm()), rtol=0)
    torch.testing.assert_close(flat(model.heads.parameters()), flat(reference.heads.parameters()),
                               atol=1e-6 * float(flat(reference.heads.parameters()).norm()), rtol=0)
