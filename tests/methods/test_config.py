"""ConFIG against the official update (tum-pbs/ConFIG, ``conflictfree``) re-derived on the
gradient vectors -- the general least-squares path and the two-gradient path -- against
torchjd 0.18's ConFIG on the same matrices, and end to end with its defaults."""
import pytest
import torch
from core_helpers import backbone_grads_for, head_grads_plain, make, task_grads, wrapped_step
from gradient_cases import CASES, gradient_matrix, losses_for

import gradsurgery as gs


def official_config(grads: torch.Tensor, weights: torch.Tensor | None = None) -> torch.Tensor:
    """tum-pbs/ConFIG, ``conflictfree/grad_operator.py``, ``ConFIG_update`` with its defaults
    (``EqualWeight``, ``ProjectionLength``, ``use_least_square=True``), re-derived:
    ``u_k = nan_to_num(g_k / ||g_k||)``; ``d = lstsq(U, w)`` (the least-norm solution, here
    through the SVD of ``U`` with torch.linalg.pinv's cut-off); ``unit = d / ||d||`` (0 if
    ``d = 0``, ``utils.unit_vector``; here also when ``d`` is 0 up to rounding, where the exact
test would normalise rounding noise); ``g = (sum_k <g_k, unit>) unit``."""
    w = torch.ones(grads.shape[0], dtype=grads.dtype) if weights is None else weights
    units = torch.nan_to_num(grads / grads.norm(dim=1, keepdim=True), 0.0)
    d = torch.linalg.lstsq(units, w[:, None], driver="gelsd").solution[:, 0]
    if float(d.norm()) <= 1e-10 * float(w.norm()):
        return torch.zeros_like(d)
    unit = d / d.norm()
    return (grads @ unit).sum() * unit


def official_config_double(g1: torch.Tensor, g2: torch.Tensor, w=(1.0, 1.0)) -> torch.Tensor:
    """``ConFIG_update_double`` (the official default for two gradients), re-derived:
    ``o_1 = g_2 - ||g_2|| cos u_1``, ``o_2 = g_1 - ||g_1|| cos u_2`` (each gradient's part
    orthogonal to the other); ``c_1 = <o2^, u_1> / ((w_1 / w_2) <o1^, u_2>)``, ``c_2 = 1``
    (``utils.transfer_coef_double``); ``d = c_1 o1^ + c_2 o2^``; then ``ProjectionLength``."""
    u1, u2 = g1 / g1.norm(), g2 / g2.norm()
    cos = u1 @ u2
    o1, o2 = g2 - g2.norm() * cos * u1, g1 - g1.norm() * cos * u2
    o1, o2 = o1 / o1.norm(), o2 / o2.norm()
    d = (o2 @ u1) / (w[0] / w[1] * (o1 @ u2)) * o1 + o2
    unit = d / d.norm()
    return (g1 @ unit + g2 @ unit) * unit


def bound(k, **opts):
    method = gs.methods.create("config", **opts)
    method.bind(k, device=torch.device("cpu"), dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    return method


def direction(g, losses=None, **opts):
    losses = torch.ones(g.shape[0], dtype=g.dtype) if losses is None else losses
    return bound(g.shape[0], **opts).weights(g @ g.T, losses) @ g


def preference(k, seed):
    return torch.rand(k, generator=torch.Generator().manual_seed(seed), dtype=torch.float64) + 0.2


@pytest.mark.parametrize("k,kind,seed", CASES)
@pytest.mark.parametrize("pref", [False, True])
def test_equals_official_update(k, kind, seed, pref):
    g = gradient_matrix(k, kind, seed)
    w = preference(k, seed) if pref else None
    ref = official_config(g, w)
    ours = direction(g, losses_for(k, seed), pref_vector=None if w is None else w.tolist())
    scale = float(g.norm(dim=1).max())
    assert torch.allclose(ours, ref, atol=1e-8 * scale, rtol=0)


@pytest.mark.parametrize("k,kind,seed", [c for c in CASES if c[1] in ("random", "zero", "duplicate", "scaled")])
def test_equals_torchjd_config(k, kind, seed):
    jd = pytest.importorskip("torchjd.aggregation")
    g = gradient_matrix(k, kind, seed)
    w = preference(k, seed + 7)
    scale = float(g.norm(dim=1).max())
    assert torch.allclose(direction(g), jd.ConFIG()(g), atol=1e-8 * scale, rtol=0)
    assert torch.allclose(direction(g, pref_vector=w), jd.ConFIG(pref_vector=w)(g), atol=1e-8 * scale, rtol=0)


@pytest.mark.parametrize("seed", range(6))
def test_two_tasks_equal_the_official_two_gradient_path(seed):
    g = gradient_matrix(2, "random", seed)
    w = preference(2, seed)
    scale = float(g.norm(dim=1).max())
    assert torch.allclose(direction(g), official_config_double(g[0], g[1]), atol=1e-8 * scale, rtol=0)
    assert torch.allclose(direction(g, pref_vector=w), official_config_double(g[0], g[1], w.tolist()),
                          atol=1e-8 * scale, rtol=0)


@pytest.mark.parametrize("k,seed", [(k, s) for k in range(2, 7) for s in range(2)])
def test_equal_cosines_with_every_task(k, seed):
    """The defining property (Eq. 2): cos(g, g_i) is the same for every task (in the ratio
    of pref_vector), here with independent gradients (n > K)."""
    g = torch.randn(k, 9, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)
    w = preference(k, seed)
    for pref, target in ((None, torch.ones(k, dtype=g.dtype)), (w, w)):
        out = direction(g, pref_vector=pref)
        cos = (g @ out) / (g.norm(dim=1) * out.norm())
        ratio = cos / target
        assert torch.allclose(ratio, ratio.mean().expand(k), rtol=1e-9, atol=0) and float(ratio.mean()) > 0


def test_opposed_pair_and_all_zero_give_zero():
    g = gradient_matrix(2, "opposed", 0)
    g[1] = -g[0]
    assert torch.equal(direction(g), torch.zeros_like(g[0]))
    z = torch.zeros(3, 5, dtype=torch.float64)
    assert torch.equal(direction(z), torch.zeros(5, dtype=torch.float64))


def test_two_tasks_duplicate_parallel_and_zero_rows():
    """Where the official two-gradient path (``ConFIG_update_double``) has no answer: a zero
    row gives NaN there (its ``g / ||g||``), while the one formula gives the other gradient
    (``C = diag(1, 0)``, ``C^+ 1 = e_1``); duplicate ``g, g`` and parallel ``g, 3 g`` rows have
    equal cosines along ``g`` and the sum of the projections as length: ``2 g`` and ``4 g``."""
    g = gradient_matrix(2, "random", 3)[0]
    zero = torch.zeros_like(g)
    assert torch.isnan(official_config_double(g, zero)).all()
    scale = float(g.abs().max())
    for rows, want in (((g, zero), g), ((zero, g), g), ((g, g), 2 * g), ((g, 3 * g), 4 * g)):
        out = direction(torch.stack(rows))
        assert torch.isfinite(out).all()
        torch.testing.assert_close(out, want, rtol=0, atol=1e-12 * 4 * scale)


def test_bad_options_raise():
    for bad in ([[1.0, 2.0]], [1.0, float("nan")], "ab", []):
        with pytest.raises(ValueError, match="pref_vector"):
            gs.methods.create("config", pref_vector=bad)
    with pytest.raises(ValueError, match="3 tasks"):
        bound(3, pref_vector=[1.0, 2.0])


@pytest.mark.parametrize("k", [2, 4])
def test_end_to_end_with_defaults_equals_official(k):
    model, x, ys = make(k, seed=k)
    opt = gs.MultiTaskOptimizer(torch.optim.SGD(model.parameters(), lr=0.1), "config", num_tasks=k)
    wrapped_step(model, opt, x, ys, step=False)
    expected = official_config(task_grads(model, x, ys))
    for p, e in zip(model.backbone.parameters(), backbone_grads_for(model, x, expected)):
        assert torch.allclose(p.grad, e, rtol=0, atol=1e-8 * float(e.abs().max()) + 1e-12)
    for p, e in zip(model.heads.parameters(), head_grads_plain(model, x, ys)):  # heads: unweighted
        assert torch.allclose(p.grad, e, rtol=1e-10, atol=1e-12)


def test_absent_task_without_pref_vector():
    """Subset-safe without pref_vector: a step where task 1 is absent is ConFIG on the others."""
    model, x, ys = make(4, seed=3)
    opt = gs.MultiTaskOptimizer(torch.optim.SGD(model.parameters(), lr=0.1), "config", num_tasks=4)
    opt.zero_grad()
    losses = model.losses(opt.fork(model.rep(x)), ys)
    losses[1] = None
    opt.backward(losses)
    g = task_grads(model, x, ys)[[0, 2, 3]]
    for p, e in zip(model.backbone.parameters(), backbone_grads_for(model, x, official_config(g))):
        assert torch.allclose(p.grad, e, rtol=0, atol=1e-8 * float(e.abs().max()) + 1e-12)
    assert not gs.methods.create("config", pref_vector=[1.0, 2.0, 1.0, 1.0]).subset_safe
