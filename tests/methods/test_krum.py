"""Krum / Multi-Krum against the paper's definition (Blanchard et al., 2017: squared
distances to the K - f - 2 nearest neighbours) computed on the gradient vectors, against
torchjd 0.18's Krum (unsquared distances) on the same matrices, and end to end."""
import itertools

import pytest
import torch
from core_helpers import backbone_grads_for, head_grads_plain, make, task_grads, wrapped_step
from gradient_cases import CASES, gradient_matrix, losses_for

import gradsurgery as gs


def paper_scores(grads: torch.Tensor, f: int, squared: bool = True) -> list[float]:
    """Blanchard et al., NeurIPS 2017, Section 4: ``i -> j`` for the ``K - f - 2`` vectors
    closest to ``g_i`` (``j != i``), ``s(i) = sum_{i -> j} ||g_i - g_j||^2``.
    ``squared=False``: torchjd's sum of the distances themselves."""
    k = grads.shape[0]
    scores = []
    for i in range(k):
        dist = sorted(float((grads[i] - grads[j]).norm()) ** (2 if squared else 1) for j in range(k) if j != i)
        scores.append(sum(dist[:k - f - 2]))
    return scores


def paper_krum(grads: torch.Tensor, f: int, m: int, squared: bool = True) -> torch.Tensor:
    """Krum is the vector of least score, Multi-Krum the mean of the ``m`` of least score.
    The paper picks one among tied scores (e.g. two mutual nearest neighbours when
    ``K - f - 2 = 1``); gradsurgery's documented choice is the mean over every way of
    breaking the tie, computed here by enumerating those ways."""
    scores = paper_scores(grads, f, squared)
    cut = sorted(scores)[m - 1]
    below = [i for i, s in enumerate(scores) if s < cut]
    tied = [i for i, s in enumerate(scores) if s == cut]
    picks = [below + list(rest) for rest in itertools.combinations(tied, m - len(below))]
    return torch.stack([grads[p].mean(0) for p in picks]).mean(0)


def bound(k, **opts):
    method = gs.methods.create("krum", **opts)
    method.bind(k, device=torch.device("cpu"), dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    return method


def direction(g, losses=None, **opts):
    losses = torch.ones(g.shape[0], dtype=g.dtype) if losses is None else losses
    return bound(g.shape[0], **opts).weights(g @ g.T, losses) @ g


def options_for(k):
    return [(f, m) for f in range(0, k - 2) for m in range(1, k + 1)]


@pytest.mark.parametrize("k,kind,seed", [c for c in CASES if c[0] >= 3])
@pytest.mark.parametrize("squared", [True, False])
def test_equals_paper_definition(k, kind, seed, squared):
    g = gradient_matrix(k, kind, seed)
    for f, m in options_for(k):
        ours = direction(g, losses_for(k, seed), n_byzantine=f, n_selected=m, squared=squared)
        assert torch.allclose(ours, paper_krum(g, f, m, squared), rtol=0, atol=1e-12 * float(g.norm(dim=1).max()))


@pytest.mark.parametrize("k,kind,seed", [c for c in CASES if c[0] >= 3 and c[1] in ("random", "scaled")])
def test_equals_torchjd_krum(k, kind, seed):
    jd = pytest.importorskip("torchjd.aggregation")
    g = gradient_matrix(k, kind, seed)
    for f, m in options_for(k):
        scores = sorted(paper_scores(g, f, squared=False))
        if m < k and scores[m] - scores[m - 1] <= 1e-9 * scores[-1]:
            continue  # a tie at the cut: torchjd's topk picks either
        ref = jd.Krum(n_byzantine=f, n_selected=m)(g)
        ours = direction(g, n_byzantine=f, n_selected=m, squared=False)
        assert torch.allclose(ours, ref, rtol=0, atol=1e-12 * float(g.norm(dim=1).max()))


def test_squared_and_unsquared_scores_choose_differently():
    """Here the paper's summed squares pick g_0 (scores 45 < 49) and torchjd's summed
    distances pick g_3 (10.40 < 11.00; computed by hand): the option is not a no-op."""
    g = torch.tensor([[0.0, 1.0], [-4.0, 1.0], [3.0, -3.0], [-2.0, 1.0], [4.0, -4.0]], dtype=torch.float64)
    picks = {squared: int(bound(5, squared=squared).weights(g @ g.T, torch.ones(5, dtype=g.dtype)).argmax())
             for squared in (True, False)}
    assert picks == {True: 0, False: 3}


def test_scale_invariant_and_permutation_equivariant():
    g = gradient_matrix(5, "random", 3)
    c = bound(5, n_byzantine=1, n_selected=2).weights(g @ g.T, torch.ones(5, dtype=g.dtype))
    assert torch.equal(bound(5, n_byzantine=1, n_selected=2).weights(1e6 * (g @ g.T), torch.ones(5, dtype=g.dtype)), c)
    for perm in itertools.islice(itertools.permutations(range(5)), 0, 120, 17):
        p = torch.tensor(perm)
        cp = bound(5, n_byzantine=1, n_selected=2).weights(g[p] @ g[p].T, torch.ones(5, dtype=g.dtype))
        assert torch.equal(cp, c[p])


def test_tied_closest_pair_is_averaged():
    """K = 3, defaults: each score is the distance to the nearest other gradient, so the two
    closest gradients tie; the update is their mean whatever the order of the tasks."""
    g = torch.tensor([[0.0, 0.0], [1.0, 0.0], [5.0, 5.0]], dtype=torch.float64)
    for perm in itertools.permutations(range(3)):
        p = torch.tensor(perm)
        c = bound(3).weights(g[p] @ g[p].T, torch.ones(3, dtype=g.dtype))
        assert torch.allclose(c @ g[p], torch.tensor([0.5, 0.0], dtype=torch.float64), rtol=0, atol=1e-15)


def test_too_few_tasks_and_bad_options_raise():
    with pytest.raises(ValueError, match="at least 3 tasks"):
        bound(2)
    with pytest.raises(ValueError, match="at least 5 tasks"):
        bound(4, n_byzantine=2)
    with pytest.raises(ValueError, match="n_selected=4"):
        bound(3, n_selected=4)
    method = bound(4, n_byzantine=1)
    g = gradient_matrix(3, "random", 0)
    with pytest.raises(ValueError, match="at least 4 tasks"):  # a step where one task is absent
        method.weights(g @ g.T, torch.ones(3, dtype=g.dtype))
    for opts in (dict(n_byzantine=-1), dict(n_byzantine=1.0), dict(n_selected=0), dict(squared=1)):
        with pytest.raises(ValueError, match=next(iter(opts))):
            gs.methods.create("krum", **opts)


def test_end_to_end_with_defaults_equals_paper():
    model, x, ys = make(4, seed=2)
    opt = gs.MultiTaskOptimizer(torch.optim.SGD(model.parameters(), lr=0.1), "krum", num_tasks=4)
    wrapped_step(model, opt, x, ys, step=False)
    expected = paper_krum(task_grads(model, x, ys), f=0, m=1)
    for p, e in zip(model.backbone.parameters(), backbone_grads_for(model, x, expected)):
        assert torch.allclose(p.grad, e, rtol=0, atol=1e-10 * float(e.abs().max()) + 1e-14)
    for p, e in zip(model.heads.parameters(), head_grads_plain(model, x, ys)):  # heads: unweighted
        assert torch.allclose(p.grad, e, rtol=1e-10, atol=1e-12)
