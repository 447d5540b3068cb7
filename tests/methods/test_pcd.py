"""PCD against torchjd 0.18's PCD (the reference implementation, stateful) on the same
sequences of matrices, its quadratic program's KKT conditions checked on the vectors,
bit-exact resume, and end to end."""
import io

import pytest
import torch
from core_helpers import backbone_grads_for, head_grads_plain, make, task_grads, wrapped_step
from gradient_cases import CASES, gradient_matrix, losses_for

import gradsurgery as gs

jd = pytest.importorskip("torchjd.aggregation")


def bound(k, **opts):
    method = gs.methods.create("pcd", **opts)
    method.bind(k, device=torch.device("cpu"), dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    return method


def steps_for(k, kind, seed, n=4):
    """A sequence of matrices of one kind, each row's scale drifting between steps (the
    moving average then matters)."""
    out = []
    for step in range(n):
        g = gradient_matrix(k, kind, seed + 17 * step)
        out.append(g * (1 + 0.5 * step) ** torch.linspace(-1, 1, k, dtype=g.dtype)[:, None])
    return out


@pytest.mark.parametrize("k,kind,seed", CASES)
@pytest.mark.parametrize("opts", [{}, dict(tau=0.3, beta=0.9), dict(tau=0.0, beta=0.0, eps=0.0)])
def test_equals_torchjd_pcd_over_steps(k, kind, seed, opts):
    ref, ours = jd.PCD(**opts), bound(k, **opts)
    for step, g in enumerate(steps_for(k, kind, seed)):
        expected = ref(g)
        got = ours.weights(g @ g.T, losses_for(k, seed)) @ g
        scale = float(g.norm(dim=1).max())
        assert torch.allclose(got, expected, rtol=0, atol=1e-9 * scale), (step, got, expected)


@pytest.mark.parametrize("k,kind,seed", [(k, kind, s) for k in (14, 17) for kind in ("random", "duplicate", "opposed")
                                         for s in range(2)])
def test_many_tasks_dual_active_set_equals_torchjd(k, kind, seed):
    """Above 13 tasks the dual is solved by the active-set method, not by enumeration."""
    opts = dict(tau=0.2, beta=0.5)
    ref, ours = jd.PCD(**opts), bound(k, **opts)
    for g in steps_for(k, kind, seed, n=2):
        g = torch.cat([g, gradient_matrix(k, "random", seed + 99, n=25 - g.shape[1])], 1)  # 25 dims
        if kind == "opposed":
            g[2], g[3] = g[1], -g[1]  # two opposed secondaries: infeasible, g_0 itself
        assert torch.allclose(ours.weights(g @ g.T, torch.ones(k, dtype=g.dtype)) @ g, ref(g), rtol=0,
                              atol=1e-9 * float(g.norm(dim=1).max()))


@pytest.mark.parametrize("k,seed", [(k, s) for k in range(3, 7) for s in range(2)])
def test_per_task_tau_equals_torchjd(k, seed):
    tau = torch.linspace(0.0, 0.6, k - 1, dtype=torch.float64)
    ref, ours = jd.PCD(tau=tau), bound(k, tau=tau.tolist())
    for g in steps_for(k, "random", seed):
        assert torch.allclose(ours.weights(g @ g.T, torch.ones(k, dtype=g.dtype)) @ g, ref(g), rtol=0,
                              atol=1e-9 * float(g.norm(dim=1).max()))


@pytest.mark.parametrize("k,seed", [(k, s) for k in range(2, 7) for s in range(3)])
def test_kkt_conditions_on_the_vectors(k, seed):
    """One step (bias-corrected average = ||g_i||^2, so ~g_i = g_i / sqrt(||g_i||^2 + eps)):
    d~ = ~g_0 + sum mu_j ~g_j with mu >= 0, <~g_j, d~> >= tau ||~g_j||^2 and equality where
    mu_j > 0; the update is d~ rescaled to ||g_0||."""
    tau = 0.4
    g = gradient_matrix(k, "random", seed)
    c = bound(k, tau=tau, eps=0.0).weights(g @ g.T, torch.ones(k, dtype=g.dtype))
    norms = g.norm(dim=1)
    gt = g / norms[:, None]
    w = c * norms  # coefficients on the normalised gradients, up to the final rescaling
    d = w @ gt / w[0]
    mu = w[1:] / w[0]
    slack = gt[1:] @ d - tau
    assert bool((mu >= -1e-12).all()) and bool((slack >= -1e-9).all())
    assert torch.allclose(mu * slack, torch.zeros_like(mu), atol=1e-9)
    assert torch.allclose((c @ g).norm(), norms[0], rtol=1e-10)


def test_special_cases():
    g = gradient_matrix(4, "random", 0)
    g0 = g.clone()
    g0[0] = 0  # primary gradient zero: no update
    assert torch.equal(bound(4).weights(g0 @ g0.T, torch.ones(4, dtype=g.dtype)), torch.zeros(4, dtype=g.dtype))
    inf = g.clone()
    inf[2], inf[3] = g[1], -g[1]  # two opposed secondaries with tau > 0: infeasible, g_0 itself
    c = bound(4, tau=0.5).weights(inf @ inf.T, torch.ones(4, dtype=g.dtype))
    assert torch.allclose(c @ inf, inf[0], rtol=0, atol=1e-12)
    one = bound(1)  # a single task: its own gradient
    assert torch.allclose(one.weights(g[:1] @ g[:1].T, torch.ones(1, dtype=g.dtype)), torch.ones(1, dtype=g.dtype))


def test_resume_is_bit_exact():
    steps = steps_for(5, "random", 3, n=6)
    straight = bound(5)
    expected = [straight.weights(g @ g.T, torch.ones(5, dtype=g.dtype)) for g in steps]
    first = bound(5)
    for g in steps[:3]:
        first.weights(g @ g.T, torch.ones(5, dtype=g.dtype))
    buf = io.BytesIO()
    torch.save(first.state_dict(), buf)
    buf.seek(0)
    resumed = bound(5)
    resumed.load_state_dict(torch.load(buf, weights_only=True))
    for g, e in zip(steps[3:], expected[3:]):
        assert torch.equal(resumed.weights(g @ g.T, torch.ones(5, dtype=g.dtype)), e)


def test_bad_options_raise():
    for opts, word in ((dict(tau=1.5), "tau"), (dict(tau=[0.1, -0.1]), "tau"), (dict(tau=[[0.1]]), "tau"),
                       (dict(beta=1.0), "beta"), (dict(beta=-0.1), "beta"), (dict(eps=-1.0), "eps"),
                       (dict(tau="x"), "tau")):
        with pytest.raises(ValueError, match=word):
            gs.methods.create("pcd", **opts)
    with pytest.raises(ValueError, match="3 secondary tasks"):
        bound(4, tau=[0.1, 0.2])


def test_end_to_end_with_defaults_equals_torchjd():
    model, x, ys = make(3, seed=8)
    opt = gs.MultiTaskOptimizer(torch.optim.SGD(model.parameters(), lr=0.1), "pcd", num_tasks=3)
    ref = jd.PCD()
    for _ in range(3):
        g = task_grads(model, x, ys)
        expected = ref(g)
        snapshot = [p.detach().clone() for p in model.parameters()]
        wrapped_step(model, opt, x, ys, step=False)
        for p, e in zip(model.backbone.parameters(), backbone_grads_for(model, x, expected)):
            assert torch.allclose(p.grad, e, rtol=0, atol=1e-9 * float(e.abs().max()) + 1e-14)
        for p, e in zip(model.heads.parameters(), head_grads_plain(model, x, ys)):  # heads: unweighted
            assert torch.allclose(p.grad, e, rtol=1e-10, atol=1e-12)
        opt.step()
        assert any(not torch.equal(p, s) for p, s in zip(model.parameters(), snapshot))


@pytest.mark.parametrize("k,kind,seed", [c for c in CASES if c[0] >= 3])
def test_enumeration_and_active_set_agree(k, kind, seed):
    """The two solvers of the dual (enumeration up to 13 tasks, the active-set method above)
    give the same multipliers on the same normalised Gram."""
    from gradsurgery.methods.pcd import dual_active_set
    g = gradient_matrix(k, kind, seed)
    g = g / g.norm(dim=1, keepdim=True).clamp_min(1e-300)
    mn = g @ g.T
    method = bound(k, tau=0.3)
    mu_enum = method._dual(mn)
    ms = mn[1:, 1:]
    b = 0.3 * ms.diagonal() - mn[1:, 0]
    mu_set = dual_active_set(ms, b, 1e-9 * float(ms.diagonal().max()))
    d_enum, d_set = g[0] + mu_enum @ g[1:], g[0] + mu_set @ g[1:]  # the primal point is unique
    assert torch.allclose(d_enum, d_set, rtol=0, atol=1e-8)
