"""Aligned-MTL against the authors' update (SamsungLabs/MTL, LibMTL) and torchjd 0.18.

Cases (``gradient_cases``): K = 2..6 random task gradients, a zero row, duplicate rows
(rank-deficient Grams), exactly opposed rows, norms six orders apart; three scale modes."""
import pytest
import torch
from gradient_cases import CASES, gradient_matrix

import gradsurgery as gs

D = torch.float64


def official_aligned(g: torch.Tensor, scale_mode: str = "min") -> torch.Tensor:
    """The authors' update, re-derived from SamsungLabs/MTL ``code/optim/aligned/solver.py``
    (``ProcrustesSolver.apply``) and ``aligned/balancer.py`` (``AlignedMTLBalancer.step``;
    LibMTL ``weighting/Aligned_MTL.py`` is the same): eigen-decomposition of ``M = G G^T``;
    keep eigenvalues above ``max(lambda) * K * eps`` with ``eps`` the *default* dtype's
    (``torch.finfo()``: float32's); ``B = sqrt(lambda_s) V diag(lambda)^{-1/2} V^T`` with
    ``lambda_s`` the smallest kept eigenvalue ("min"), their median or their mean ("rmse");
    the update is the **sum** of the aligned gradients, ``G^T B 1``."""
    m = g @ g.T
    lam, vec = torch.linalg.eigh(m)
    order = lam.argsort(descending=True)
    lam, vec = lam[order], vec[:, order]
    rank = int((lam > lam.max() * m.shape[0] * torch.finfo(torch.float32).eps).sum())
    lam, vec = lam[:rank], vec[:, :rank]
    scale = {"min": lam[-1], "median": lam.median(), "rmse": lam.mean()}[scale_mode]
    b = scale.sqrt() * (vec / lam.sqrt()) @ vec.T
    return (b @ g).sum(0)


def ours(g: torch.Tensor, **options) -> torch.Tensor:
    method = gs.methods.create("aligned_mtl", **options)
    method.bind(g.shape[0], device=g.device, dtype=g.dtype, generator=torch.Generator().manual_seed(0))
    return method.weights(g @ g.T, torch.ones(g.shape[0], dtype=g.dtype)) @ g


@pytest.mark.parametrize("k,case,seed", CASES)
def test_defaults_and_scale_modes_equal_the_authors_update(k, case, seed):
    g = gradient_matrix(k, case, seed)
    for scale_mode in ("min", "median", "rmse"):
        options = {} if scale_mode == "min" else {"scale_mode": scale_mode}
        ref = official_aligned(g, scale_mode)
        # B is O(sqrt(lambda_s / lambda)) <= 1 in size: the update is on the gradients' scale
        torch.testing.assert_close(ours(g, **options), ref, atol=1e-9 * float(g.norm(dim=1).max()), rtol=0)


def test_rank_cut_is_the_authors_float32_one_also_for_float64_gradients():
    """An eigenvalue 1e-9 of the largest is dropped (below ``K * 1.2e-7``), as in the authors'
    code, although float64 resolves it."""
    g = torch.zeros(2, 3, dtype=D)
    g[0, 0], g[1, 1] = 1.0, 1e-4  # eigenvalues 1 and 1e-8
    assert 0 < (g[1] @ g[1]) < 2 * torch.finfo(torch.float32).eps
    torch.testing.assert_close(ours(g), official_aligned(g), atol=1e-12, rtol=0)
    torch.testing.assert_close(ours(g), g[0], atol=1e-12, rtol=0)


def test_the_update_is_the_sum_of_the_aligned_gradients_k_times_the_mean():
    g = gradient_matrix(4, "random", 3)
    torch.testing.assert_close(ours(g), 4 * ours(g, pref_vector=torch.full((4,), 0.25, dtype=D)))


@pytest.mark.parametrize("k,seed", [(k, s) for k in (2, 3, 5, 8) for s in (0, 1)])
def test_torchjd_convention_through_pref_vector_equals_torchjd(k, seed):
    """torchjd 0.18's ``AlignedMTL`` averages (its default preference vector is ``1/K``)."""
    from torchjd import aggregation as jd
    g = gradient_matrix(k, "random", seed)
    mean = torch.full((k,), 1.0 / k, dtype=D)
    for mode in ("min", "median", "rmse"):
        torch.testing.assert_close(ours(g, scale_mode=mode, pref_vector=mean), jd.AlignedMTL(scale_mode=mode)(g),
                                   atol=1e-6 * float(g.norm(dim=1).max()), rtol=0)
    pref = torch.arange(1.0, k + 1, dtype=D)
    torch.testing.assert_close(ours(g, pref_vector=pref), jd.AlignedMTL(pref_vector=pref)(g),
                               atol=1e-6 * float(g.norm(dim=1).max()), rtol=0)


def test_zero_gram_gives_zero_and_no_nan():
    assert torch.equal(ours(torch.zeros(3, 4, dtype=D)), torch.zeros(4, dtype=D))


def test_bad_options_raise():
    with pytest.raises(ValueError, match="scale_mode"):
        gs.methods.create("aligned_mtl", scale_mode="max")
    with pytest.raises(ValueError, match="pref_vector"):
        gs.methods.create("aligned_mtl", pref_vector=torch.ones(2, 2))
    method = gs.methods.create("aligned_mtl", pref_vector=torch.ones(3))
    with pytest.raises(ValueError, match="pref_vector"):
        method.bind(2, device=torch.device("cpu"), dtype=D, generator=torch.Generator())


def test_params_level_end_to_end_is_the_authors_step():
    """At ``level="params"`` (the authors' ``amtl`` balancer): the shared parameters get the
    sum of the aligned gradients, the heads their own loss gradients
    (``scale_decoder_grad=False``)."""
    import copy

    from core_helpers import make
    k = 3
    model, x, ys = make(k, seed=8, batch=6)
    reference = copy.deepcopy(model)
    opt = gs.MultiTaskOptimizer(torch.optim.SGD(model.parameters(), lr=0.1), "aligned_mtl", num_tasks=k,
                                level="params")
    opt.zero_grad()
    opt.backward(model.losses(opt.fork(model.rep(x)), ys))
    backbone = list(reference.backbone.parameters())
    losses = reference.losses([reference.rep(x)] * k, ys)
    jac = torch.stack([torch.cat([g.flatten() for g in torch.autograd.grad(l, backbone, retain_graph=True)])
                       for l in losses])
    got = torch.cat([p.grad.flatten() for p in model.backbone.parameters()])
    torch.testing.assert_close(got, official_aligned(jac), atol=1e-9 * float(jac.norm(dim=1).max()), rtol=0)
    reference.zero_grad()
    sum(losses).backward()
    for p, q in zip(model.heads.parameters(), reference.heads.parameters()):
        torch.testing.assert_close(p.grad, q.grad, atol=1e-12, rtol=1e-10)
