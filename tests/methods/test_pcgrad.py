"""PCGrad against an independent per-vector implementation (Algorithm 1 of Yu et al.,
2020, written as explicit projections of flattened gradient vectors), against LibMTL's
``PCGrad.backward`` re-derived (K = 2..6 with zero, duplicate, opposed and scaled rows),
against torchjd 0.18's PCGrad, and its properties."""
import copy

import numpy as np
import pytest
import torch
from core_helpers import backbone_grads_for, head_grads_plain, make, task_grads
from gradient_cases import CASES, gradient_matrix
from hypothesis import given, settings
from hypothesis import strategies as st

import gradsurgery as gs
from gradsurgery.methods.pcgrad import PCGrad, project_conflicting, visiting_orders


def reference_pcgrad(grads: np.ndarray, orders) -> np.ndarray:
    """Algorithm 1: for each task i, g_i^PC = g_i; for j in its order (j != i), if
    <g_i^PC, g_j> < 0, g_i^PC -= <g_i^PC, g_j> / ||g_j||^2 g_j. Returns sum_i g_i^PC."""
    total = np.zeros(grads.shape[1])
    for i in range(grads.shape[0]):
        g = grads[i].copy()
        for j in orders[i]:
            if j == i:
                continue
            dot = float(g @ grads[j])
            if dot < 0:
                g = g - dot / float(grads[j] @ grads[j]) * grads[j]
        total += g
    return total


def libmtl_pcgrad(grads: torch.Tensor, orders: list[list[int]], eps: float = 0.0) -> torch.Tensor:
    """LibMTL (median-research-group/LibMTL), ``LibMTL/weighting/PCGrad.py``,
    ``PCGrad.backward``, re-derived: ``pc = G``; for each task ``i`` in its shuffled order
    of tasks ``j``: ``d = <pc_i, g_j>``; if ``d < 0``: ``pc_i -= d g_j / (||g_j||^2 + 1e-8)``;
    the update is ``sum_i pc_i``. LibMTL's order also holds ``i`` itself; the paper's
    Algorithm 1 (``j != i``, which gradsurgery follows) does not, so ``orders`` here are
    the paper's. LibMTL's ``eps`` (1e-8) only guards ``0/0``, which never occurs (a zero
    ``g_j`` gives ``d = 0``); the authors' TensorFlow code (tianheyu927/PCGrad,
    ``PCGrad_tf.py``) has none, so the reference runs with ``eps = 0`` by default."""
    pc = grads.clone()
    for i, order in enumerate(orders):
        for j in order:
            d = pc[i] @ grads[j]
            if d < 0:
                pc[i] = pc[i] - d * grads[j] / (grads[j].norm() ** 2 + eps)
    return pc.sum(0)


def paper_orders(k: int, seed: int) -> list[list[int]]:
    """The orders a generator seeded with ``seed`` gives (gradsurgery's documented draw:
    one ``K x K`` uniform draw, task ``i`` visits the others by increasing ``keys[i, j]``)."""
    keys = torch.rand(k, k, generator=torch.Generator().manual_seed(seed))
    return [sorted((j for j in range(k) if j != i), key=lambda j: float(keys[i, j])) for i in range(k)]


@pytest.mark.parametrize("k,kind,seed", CASES)
def test_equals_libmtl_update_on_degenerate_rows(k, kind, seed):
    g = gradient_matrix(k, kind, seed)
    method = PCGrad()
    method.bind(k, device=g.device, dtype=g.dtype, generator=torch.Generator().manual_seed(seed))
    ours = method.weights(g @ g.T, torch.ones(k, dtype=g.dtype)) @ g
    ref = libmtl_pcgrad(g, paper_orders(k, seed))
    assert torch.isfinite(ours).all()
    tol = 1e-9 * g.norm(dim=1).max() * k
    torch.testing.assert_close(ours, ref, rtol=0, atol=float(tol))


def _conflicting(k, n, seed):
    """Random gradients with many conflicts (a common component flipped for some tasks)."""
    rng = np.random.default_rng(seed)
    base = rng.normal(size=n)
    signs = rng.choice([-1.0, 1.0], size=k)
    return signs[:, None] * base[None] + rng.normal(size=(k, n)) * rng.uniform(0.1, 3, size=(k, 1))


@settings(max_examples=40, deadline=None)
@given(k=st.integers(1, 7), n=st.integers(1, 12), seed=st.integers(0, 2**31))
def test_weights_match_per_vector_algorithm(k, n, seed):
    grads = _conflicting(k, n, seed)
    gen = torch.Generator().manual_seed(seed)
    order = visiting_orders(k, gen, torch.device("cpu"))
    g = torch.from_numpy(grads)
    coefs = project_conflicting(g @ g.T, order)
    np.testing.assert_allclose((coefs @ g).numpy(), reference_pcgrad(grads, order.tolist()),
                               rtol=1e-10, atol=1e-10 * np.abs(grads).max() * k)


def test_orders_are_uniform_permutations_of_the_others():
    k, draws = 4, 3000
    gen = torch.Generator().manual_seed(0)
    counts: dict[tuple, int] = {}
    for _ in range(draws):
        order = visiting_orders(k, gen, torch.device("cpu"))
        assert order.shape == (k, k - 1)
        for i, row in enumerate(order.tolist()):
            assert sorted(row) == [j for j in range(k) if j != i]
        key = tuple(order[0].tolist())
        counts[key] = counts.get(key, 0) + 1
    assert len(counts) == 6  # all 3! orders of task 0's others appear, about equally often
    assert all(abs(c / draws - 1 / 6) < 0.03 for c in counts.values())


@settings(max_examples=12, deadline=None)
@given(k=st.integers(2, 6), seed=st.integers(0, 2**16))
def test_end_to_end_matches_reference(k, seed):
    """Through the optimizer: the backbone receives the reference PCGrad direction of
    the independently computed task gradients, with the method's own draws (a generator
    with the same state), and each head its own unweighted loss gradient."""
    model, x, ys = make(k, seed=seed, rep_shape=(2, 3), batch=3)
    opt = gs.MultiTaskOptimizer(torch.optim.SGD(model.parameters(), lr=0.1), "pcgrad", num_tasks=k)
    twin = torch.Generator()
    twin.set_state(opt.generator.get_state())
    ref_model = copy.deepcopy(model)
    grads = task_grads(ref_model, x, ys)
    opt.zero_grad()
    opt.backward(model.losses(opt.fork(model.rep(x)), ys))
    order = visiting_orders(k, twin, torch.device("cpu")).tolist()
    direction = torch.from_numpy(reference_pcgrad(grads.numpy(), order))
    for p, e in zip(model.backbone.parameters(), backbone_grads_for(ref_model, x, direction)):
        torch.testing.assert_close(p.grad, e, rtol=1e-9, atol=1e-12)
    for p, e in zip(model.heads.parameters(), head_grads_plain(ref_model, x, ys)):
        torch.testing.assert_close(p.grad, e, rtol=1e-12, atol=1e-14)


@settings(max_examples=25, deadline=None)
@given(n=st.integers(1, 10), seed=st.integers(0, 2**31))
def test_two_tasks_match_torchjd(n, seed):
    from torchjd.aggregation import PCGrad as TorchjdPCGrad

    grads = torch.from_numpy(_conflicting(2, n, seed))
    method = PCGrad()
    method.bind(2, device=grads.device, dtype=grads.dtype, generator=torch.Generator().manual_seed(seed))
    ours = method.weights(grads @ grads.T, torch.ones(2, dtype=grads.dtype)) @ grads
    torch.testing.assert_close(ours, TorchjdPCGrad()(grads), rtol=1e-9, atol=1e-12)


@settings(max_examples=30, deadline=None)
@given(k=st.integers(1, 7), n=st.integers(1, 8), seed=st.integers(0, 2**31))
def test_no_conflict_equals_sum(k, n, seed):
    grads = torch.from_numpy(np.abs(np.random.default_rng(seed).normal(size=(k, n))))  # all <g_i, g_j> >= 0
    method = PCGrad()
    method.bind(k, device=grads.device, dtype=grads.dtype, generator=torch.Generator().manual_seed(seed))
    ones = torch.ones(k, dtype=grads.dtype)
    assert torch.equal(method.weights(grads @ grads.T, ones), ones)


@settings(max_examples=40, deadline=None)
@given(n=st.integers(1, 10), seed=st.integers(0, 2**31))
def test_two_tasks_result_does_not_conflict(n, seed):
    grads = torch.from_numpy(_conflicting(2, n, seed))
    method = PCGrad()
    method.bind(2, device=grads.device, dtype=grads.dtype, generator=torch.Generator().manual_seed(seed))
    d = method.weights(grads @ grads.T, torch.ones(2, dtype=grads.dtype)) @ grads
    scale = grads.norm(dim=1).max() ** 2
    assert (grads @ d >= -1e-12 * scale).all()


def test_zero_gradient_is_skipped_not_nan():
    grads = torch.tensor([[1.0, 0.0], [0.0, 0.0], [-1.0, 1.0]], dtype=torch.float64)
    coefs = project_conflicting(grads @ grads.T, torch.tensor([[1, 2], [0, 2], [1, 0]]))
    assert torch.isfinite(coefs).all()
    expected = reference_pcgrad(grads.numpy()[[0, 2]], [[1], [0]])
    np.testing.assert_allclose((coefs @ grads).numpy(), expected, atol=1e-15)


def test_seed_fixes_the_run_and_draws_differ_between_steps():
    def run(seed):
        torch.manual_seed(seed)
        model, x, ys = make(4, seed=3)
        torch.manual_seed(seed)
        opt = gs.MultiTaskOptimizer(torch.optim.SGD(model.parameters(), lr=0.1), "pcgrad", num_tasks=4)
        out = []
        for _ in range(3):
            opt.zero_grad()
            opt.backward(model.losses(opt.fork(model.rep(x)), ys))
            out.append(opt.generator.get_state().clone())
            opt.step()
        return out, [p.detach().clone() for p in model.parameters()]

    a_states, a_params = run(0)
    b_states, b_params = run(0)
    assert all(torch.equal(s, t) for s, t in zip(a_states, b_states))
    assert all(torch.equal(p, q) for p, q in zip(a_params, b_params))
    assert not torch.equal(a_states[0], a_states[1])  # each step draws new orders
    c_states, _ = run(1)
    assert not torch.equal(a_states[0], c_states[0])
