"""MoDo (Chen, Fernando et al., NeurIPS 2023 / JMLR 2024): differential tests against the
authors' update (Trade-Off-MOL) and LibMTL's three-sample variant, re-derived here, and
against torchjd 0.18's ``MoDoWeighting``; the two-batch design (halves of one batch)."""
from __future__ import annotations

import pytest
import torch
from core_helpers import head_grads_plain, make, wrapped_step
from gradient_cases import CASES, PROPERTY, gradient_matrix, gradient_sequences
from hypothesis import given
from hypothesis import strategies as st

import gradsurgery as gs

D = torch.float64


def project_simplex_reference(y: torch.Tensor) -> torch.Tensor:
    """Euclidean projection onto the simplex, the loop of heshandevaka/Trade-Off-MOL
    ``LibMTL/LibMTL/weighting/MoDo.py``, ``MoDo._projection2simplex`` (same in LibMTL)."""
    m = len(y)
    s = torch.sort(y, descending=True)[0]
    tmpsum = 0.0
    tmax_f = (torch.sum(y) - 1.0) / m
    for i in range(m - 1):
        tmpsum += s[i]
        tmax = (tmpsum - 1) / (i + 1.0)
        if tmax > s[i + 1]:
            tmax_f = tmax
            break
    return torch.clamp(y - tmax_f, min=0)


def reference_modo(batches_seq, gamma=0.1, rho=0.1, samples=2):
    """``(shared gradient, lambda)`` after each step, re-derived from heshandevaka/Trade-Off-MOL
    ``LibMTL/LibMTL/weighting/MoDo.py``, ``MoDo.backward`` (``samples=2``: the lambda step
    ``lambda <- proj(lambda - gamma (G1 G2^T lambda + rho lambda))`` and the shared gradient
    ``lambda^T (G1 + G2)``) and LibMTL 1.1.5 ``LibMTL/weighting/MoDo.py`` (``samples=3``: the same
    step from G1, G2 and the shared gradient ``lambda^T G3``). ``batches_seq``: per step, the
    list of the ``samples`` K x P task-gradient matrices, one per independent batch."""
    k = batches_seq[0][0].shape[0]
    lambd = torch.ones(k, dtype=D) / k
    out = []
    for g in batches_seq:
        g = [x.to(D) for x in g]
        lambd = project_simplex_reference(lambd - gamma * (g[0] @ (g[1].T @ lambd) + rho * lambd))
        update = g[0] + g[1] if samples == 2 else g[2]
        out.append((lambd @ update, lambd.clone()))
    return out


def per_sample(k, kind, seed, batch, features=4):
    """``K x batch x features`` per-sample loss gradients ``dl_i/dz_i`` (the kinds of
    gradient_cases applied to the tasks' rows)."""
    return gradient_matrix(k, kind, seed, n=batch * features).view(k, batch, features)


def run(samples_seq, rep=True, **opts):
    """Feeds ``modo`` the representation gradients of the batch's mean losses,
    ``dL_k/dz_i = dl_ki/dz_i / B``; returns the method and the combined gradients."""
    k = samples_seq[0].shape[0]
    method = gs.methods.create("modo", **opts)
    method.bind(k, device=torch.device("cpu"), dtype=D, generator=torch.Generator().manual_seed(0))
    outs = []
    for s in samples_seq:
        grads = s / s.shape[1]
        outs.append(method.combine(grads, torch.ones(k, dtype=D), torch.zeros(s.shape[1:], dtype=D) if rep else None))
    return method, outs


def batch_means(s, parts):
    """The official code's inputs: each independent batch's mean-loss gradient (w.r.t. a
    shared bias added to z, i.e. summed over the batch's samples)."""
    return [c.mean(1) for c in torch.tensor_split(s, parts, dim=1)]


@pytest.mark.parametrize("k,kind,seed", CASES)
def test_two_halves_equal_the_authors_two_batches(k, kind, seed):
    """The halves of one batch play the official code's two batches: lambda matches
    Trade-Off-MOL's step for step; the shared gradient is the mean of the two batches'
    (the official sum ``G1 + G2`` with its averaging left to the learning rate, see the card)."""
    batch = 4 + seed  # 4 and 5: even and uneven halves
    seq = [per_sample(k, kind, seed + 10 * t, batch) for t in range(4)]
    expected = reference_modo([batch_means(s, 2) for s in seq], gamma=0.3, rho=0.1)
    method, outs = run(seq, gamma=0.3, rho=0.1)
    for s, out, (d, lambd) in zip(seq, outs, expected):
        torch.testing.assert_close(out, torch.einsum("k,kbf->bf", lambd, s / batch), rtol=1e-10, atol=1e-14)
        if batch % 2 == 0:
            torch.testing.assert_close(out.sum(0), d / 2, rtol=1e-10, atol=1e-14)
    torch.testing.assert_close(method.state_dict()["lambd"], expected[-1][1], rtol=1e-10, atol=1e-14)


@pytest.mark.parametrize("k,kind,seed", [c for c in CASES if c[2] == 0])
def test_three_parts_equal_libmtl(k, kind, seed):
    """``samples=3``: LibMTL 1.1.5's MoDo: lambda from parts 1 and 2, the shared gradient
    ``lambda^T G3`` from part 3 alone (the other samples' rows are zero)."""
    seq = [per_sample(k, kind, seed + 10 * t, 7) for t in range(3)]
    expected = reference_modo([batch_means(s, 3) for s in seq], gamma=1e-3, rho=0.1, samples=3)
    _, outs = run(seq, gamma=1e-3, rho=0.1, samples=3)
    for out, (d, _) in zip(outs, expected):
        torch.testing.assert_close(out.sum(0), d, rtol=1e-10, atol=1e-14)
        assert torch.equal(out[:5], torch.zeros_like(out[:5]))  # tensor_split(7, 3): sizes 3, 2, 2


@pytest.mark.parametrize("k", range(2, 7))
def test_equals_torchjd_modo_weighting(k):
    jd = pytest.importorskip("torchjd.aggregation")
    seq = [per_sample(k, "random", t, 6) for t in range(5)]
    ref = jd.MoDoWeighting(gamma=0.2, rho=0.05)
    method, _ = run(seq, gamma=0.2, rho=0.05)
    for s in seq:
        g1, g2 = batch_means(s, 2)
        lambd = ref(g1 @ g2.T)
    torch.testing.assert_close(method.state_dict()["lambd"], lambd, rtol=1e-10, atol=1e-14)


def test_defaults_are_the_authors_runs():
    """``gamma = 1e-3``: heshandevaka/Trade-Off-MOL ``LibMTL/examples/office/run_office.sh``
    (``gamma="1e-3"``, passed as ``--gamma_modo``) and ``LibMTL/examples/nyu/run_nyu.sh``; the
    argparse default of ``LibMTL/LibMTL/config.py`` (and the README command, which sets no
    hyper-parameter) is 0.1. ``rho = 0.1`` (``--rho_modo``, no run overrides it). The update
    at the defaults is Trade-Off-MOL's at ``gamma = 1e-3``, not at 0.1."""
    m = gs.methods.create("modo")
    assert (m.gamma, m.rho, m.samples) == (1e-3, 0.1, 2)
    seq = [per_sample(3, "random", 10 * t, 4) for t in range(4)]
    expected = reference_modo([batch_means(s, 2) for s in seq], gamma=1e-3, rho=0.1)
    method, _ = run(seq)
    torch.testing.assert_close(method.state_dict()["lambd"], expected[-1][1], rtol=1e-10, atol=1e-14)


@pytest.mark.parametrize("v", [torch.tensor([0.2, 0.3, 0.5]), torch.tensor([3.0, -1.0, 0.5, 0.5]),
                               torch.tensor([0.25, 0.25, 0.25, 0.25]), torch.tensor([-2.0, -2.0]),
                               torch.tensor([1e6, 1e6, -1e6])])
def test_simplex_projection_equals_the_official_loop(v):
    from gradsurgery.methods.modo import project_simplex
    v = v.to(D)
    torch.testing.assert_close(project_simplex(v), project_simplex_reference(v), rtol=0, atol=1e-12)


def test_parameter_level_is_refused_with_the_fix():
    method = gs.methods.create("modo")
    method.bind(2, device=torch.device("cpu"), dtype=D, generator=torch.Generator().manual_seed(0))
    with pytest.raises(ValueError, match="level='rep'"):
        method.combine(torch.randn(2, 8, dtype=D), torch.ones(2, dtype=D), None)


@pytest.mark.parametrize("samples,batch", [(2, 1), (3, 2)])
def test_too_small_batch_is_refused_with_the_fix(samples, batch):
    method = gs.methods.create("modo", samples=samples)
    method.bind(2, device=torch.device("cpu"), dtype=D, generator=torch.Generator().manual_seed(0))
    with pytest.raises(ValueError, match="drop_last"):
        method.combine(torch.randn(2, batch, 3, dtype=D), torch.ones(2, dtype=D), torch.zeros(batch, 3, dtype=D))
    assert torch.equal(method.state_dict()["lambd"], torch.full((2,), 0.5, dtype=D))


def test_representation_without_batch_dimension_is_refused():
    method = gs.methods.create("modo")
    method.bind(2, device=torch.device("cpu"), dtype=D, generator=torch.Generator().manual_seed(0))
    with pytest.raises(ValueError, match="batch"):
        method.combine(torch.randn(2, dtype=D), torch.ones(2, dtype=D), torch.zeros((), dtype=D))


def test_zero_gradients_are_finite():
    _, outs = run([torch.zeros(3, 4, 2, dtype=D)] * 3)
    assert all(torch.equal(o, torch.zeros(4, 2, dtype=D)) for o in outs)



@pytest.mark.parametrize("opts,match", [({"gamma": 0.0}, "gamma"), ({"rho": -0.1}, "rho"),
                                        ({"samples": 4}, "samples"), ({"samples": 1}, "samples")])
def test_bad_options_raise(opts, match):
    with pytest.raises(ValueError, match=match):
        gs.methods.create("modo", **opts)


def half_batch_bias_grads(model, x, ys, parts):
    """The official code's inputs, by plain autograd: per independent batch (a part of the
    batch), each task's mean-loss gradient w.r.t. the shared parameters, here the backbone's
    last bias (the parameter a per-sample ``dL/dz`` sums into)."""
    bias = model.backbone[-1].bias
    out = []
    for idx in torch.tensor_split(torch.arange(x.shape[0]), parts):
        z = model.rep(x[idx])
        losses = model.losses([z] * len(model.heads), ys[:, idx])
        out.append(torch.stack([torch.autograd.grad(l, bias, retain_graph=True)[0] for l in losses]))
    return out


@pytest.mark.parametrize("samples", [2, 3])
def test_end_to_end_in_the_users_loop(samples):
    """Through ``MultiTaskOptimizer``: the last bias of the backbone gets the official update
    computed on the parts as separate batches (halved for ``samples=2``: the mean, see the
    card), and each head its own unweighted full-batch loss gradient, over two steps."""
    model, x, ys = make(3, seed=2, batch=6)
    opt = gs.MultiTaskOptimizer(torch.optim.SGD(model.parameters(), lr=0.1), "modo", num_tasks=3,
                                gamma=0.5, samples=samples)
    expected = reference_modo([half_batch_bias_grads(model, x, ys, samples),
                               half_batch_bias_grads(model, x.flip(0), ys.flip(1), samples)],
                              gamma=0.5, samples=samples)
    for (update, _), (xb, yb) in zip(expected, [(x, ys), (x.flip(0), ys.flip(1))]):
        wrapped_step(model, opt, xb, yb, step=False)
        torch.testing.assert_close(model.backbone[-1].bias.grad, update / 2 if samples == 2 else update,
                                   rtol=1e-10, atol=1e-14)
        for got, want in zip([p.grad for p in model.heads.parameters()], head_grads_plain(model, xb, yb)):
            torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-14)




@PROPERTY
@given(seq=gradient_sequences((5, 2)), seed=st.integers(0, 1000), samples=st.sampled_from([2, 3]))
def test_finite_on_the_simplex_and_permutation_equivariant(seq, seed, samples):
    k = seq[0].shape[0]
    method, outs = run(seq, gamma=0.5, samples=samples)
    lambd = method.state_dict()["lambd"]
    assert all(torch.isfinite(o).all() for o in outs) and (lambd >= 0).all()
    assert abs(float(lambd.sum()) - 1) <= 1e-12
    perm = torch.randperm(k, generator=torch.Generator().manual_seed(seed))
    method_p, outs_p = run([g[perm] for g in seq], gamma=0.5, samples=samples)
    # lambda moves by gamma * |G1 G2^T lambda|; compare on the scale of that step
    step = 0.5 * max(float(g.abs().max()) ** 2 for g in seq) * 10 * k + 1e-300
    torch.testing.assert_close(method_p.state_dict()["lambd"], lambd[perm], rtol=0, atol=1e-12 * max(step, 1))
