"""The differential tests UPGrad and DualProj share (both project onto the dual cone of the
task gradients; torchjd 0.18 is the authors' code for both, TorchJD/torchjd
``aggregation/_upgrad.py`` ``UPGradWeighting.forward`` and ``aggregation/_dualproj.py``
``DualProjWeighting.forward``): with torchjd's default projector (Gram normalised by its
trace, ``+ 1e-4 I``) through ``norm_eps``/``reg_eps``, and with the exact projection
(gradsurgery's default) on well-conditioned matrices; K = 2..6 with zero, duplicate, opposed
and scaled rows. ``test_upgrad.py`` and ``test_dualproj.py`` import them with their own
``case`` fixture, ``(method name, torchjd aggregator)``."""
from __future__ import annotations

import pytest
import torch
from gradient_cases import CASES, gradient_matrix

import gradsurgery as gs

D = torch.float64


def ours(name: str, g: torch.Tensor, **options) -> torch.Tensor:
    method = gs.methods.create(name, **options)
    method.bind(g.shape[0], device=g.device, dtype=D, generator=torch.Generator().manual_seed(0))
    return method.weights(g @ g.T, torch.ones(g.shape[0], dtype=D)) @ g


def exact_projector():
    from torchjd._linalg import QuadprogProjector
    return QuadprogProjector(norm_eps=0.0, reg_eps=0.0)


@pytest.mark.parametrize("k,kind,seed", CASES)
def test_equals_torchjd_default_projector(case, k, kind, seed):
    """torchjd's defaults (``norm_eps = reg_eps = 1e-4``) reproduced by the options,
    including the singular Grams of zero, duplicate and opposed rows."""
    name, reference = case
    g = gradient_matrix(k, kind, seed)
    torch.testing.assert_close(ours(name, g, norm_eps=1e-4, reg_eps=1e-4), reference()(g),
                               rtol=0, atol=float(1e-7 * g.norm(dim=1).max()))


@pytest.mark.parametrize("k,seed", [(k, s) for k in range(2, 7) for s in (0, 1, 2)])
def test_default_is_the_exact_projection(case, k, seed):
    name, reference = case
    g = gradient_matrix(k, "random", seed)
    torch.testing.assert_close(ours(name, g), reference(projector=exact_projector())(g),
                               rtol=0, atol=float(1e-7 * g.norm(dim=1).max()))


@pytest.mark.parametrize("k,kind,seed", CASES)
def test_exact_default_never_conflicts(case, k, kind, seed):
    """The exact projection (no regulariser) leaves no task in conflict with the update,
    also for singular Grams and norms six orders of magnitude apart: ``<g_k, d>`` is
    nonnegative up to the rounding of ``d = w^T G``, ``1e-12 ||g_k|| sum_i |w_i| ||g_i||``."""
    name, reference = case
    g = gradient_matrix(k, kind, seed)
    method = gs.methods.create(name)
    method.bind(k, device=g.device, dtype=D, generator=torch.Generator().manual_seed(0))
    w = method.weights(g @ g.T, torch.ones(k, dtype=D))
    n = g.norm(dim=1)
    assert ((g @ (w @ g)) >= -1e-12 * n * (w.abs() @ n)).all()


@pytest.mark.parametrize("k,kind,seed", [c for c in CASES if c[1] != "scaled"])
def test_exact_default_near_torchjd_default(case, k, kind, seed):
    """The deviation measured: the exact answer is within ``2e-3 K`` (relative to the
    largest gradient) of torchjd's regularised one, except for norms far apart, where
    torchjd's ``1e-4 I`` on the trace-normalised Gram swamps the small tasks."""
    name, reference = case
    g = gradient_matrix(k, kind, seed)
    assert (ours(name, g) - reference()(g)).norm() <= 2e-3 * k * g.norm(dim=1).max()


def test_pref_vector_matches_torchjd(case):
    name, reference = case
    g = gradient_matrix(4, "random", 3)
    pref = torch.tensor([0.1, 0.2, 0.3, 0.4], dtype=D)
    torch.testing.assert_close(ours(name, g, pref_vector=pref, norm_eps=1e-4, reg_eps=1e-4),
                               reference(pref_vector=pref)(g), rtol=0, atol=1e-7 * float(g.norm(dim=1).max()))


@pytest.mark.parametrize("bad", [{"reg_eps": -1.0}, {"norm_eps": float("nan")}, {"pref_vector": [1.0, -1.0]}])
def test_bad_options_raise(case, bad):
    name, reference = case
    with pytest.raises(ValueError):
        method = gs.methods.create(name, **bad)
        method.bind(2, device=torch.device("cpu"), dtype=D, generator=torch.Generator())


@pytest.mark.parametrize("k,n", [(8, 12), (12, 30)])
def test_above_the_enumeration_limit_equals_torchjd(case, k, n):
    """More tasks than the exact enumeration covers (the active-set path), full-rank rows."""
    name, reference = case
    g = torch.randn(k, n, generator=torch.Generator().manual_seed(k), dtype=D)
    g[1] = -0.7 * g[0] + 0.3 * g[1]
    torch.testing.assert_close(ours(name, g), reference(projector=exact_projector())(g),
                               rtol=0, atol=float(1e-6 * g.norm(dim=1).max()))


def _zero_inside_hull(k: int, n: int, seed: int) -> torch.Tensor:
    """``K x n`` float32 rows of rank ``n`` with 0 strictly inside their convex hull (the last
    row is minus a positive combination of the others): the dual cone is the orthogonal
    complement of the rows, so the exact projection is ``d = 0``."""
    gen = torch.Generator().manual_seed(seed)
    g = torch.randn(k, n, generator=gen, dtype=D)
    g[-1] = -(torch.rand(k - 1, 1, generator=gen, dtype=D) + 0.5).mul(g[:-1]).sum(0)
    return g.float()


def _float32_tolerance(g: torch.Tensor, w: torch.Tensor) -> float:
    """The rounding of a decision made from a float32 Gram: ``(K + n) eps_32`` relative to the
    terms ``d = w^T G`` is summed from."""
    k, n = g.shape
    return 10 * (k + n) * torch.finfo(torch.float32).eps * float(w.abs().double() @ g.norm(dim=1).double())


@pytest.mark.parametrize("seed", range(8))
def test_float32_zero_inside_the_hull_projects_to_zero(case, seed):
    """Issue #19 item 1: on a float32 Gram the exact answer ``d = 0`` is returned (it was the
    unprojected mean on about half of the draws: the rounded Gram is slightly indefinite)."""
    name, _ = case
    g = _zero_inside_hull(4, 3, seed)
    method = gs.methods.create(name)
    method.bind(4, device=g.device, dtype=g.dtype, generator=torch.Generator().manual_seed(0))
    w = method.weights(g @ g.T, torch.ones(4))
    assert float((w @ g).norm()) <= _float32_tolerance(g, w)


@pytest.mark.parametrize("rank,seed", [(3, 24), (3, 49), (5, 12), (5, 37), (8, 45)])
def test_float32_permutation_equivariant_on_singular_grams(case, rank, seed):
    """Issue #19 item 1: permuting the tasks of a float32 9 x 11 matrix of rank < 9 permutes
    the decision, to float32 rounding (torchjd's test: 1e-5; it moved by up to 10%)."""
    name, _ = case
    gen = torch.Generator().manual_seed(seed)
    g = (torch.randn(9, rank, generator=gen, dtype=D) @ torch.randn(rank, 11, generator=gen, dtype=D)).float()
    perm = torch.randperm(9, generator=gen)
    method = gs.methods.create(name)
    method.bind(9, device=g.device, dtype=g.dtype, generator=torch.Generator().manual_seed(0))
    w = method.weights(g @ g.T, torch.ones(9))
    w_perm = method.weights(g[perm] @ g[perm].T, torch.ones(9))
    assert float((w @ g - w_perm @ g[perm]).norm()) <= _float32_tolerance(g, w)


@pytest.mark.parametrize("seed", range(4))
@pytest.mark.parametrize("factor", [1e-6, 1e6])
def test_homogeneous_with_zero_rows_above_the_enumeration_limit(case, seed, factor):
    """Zero rows (tasks without gradient) among small ones, K = 19 > the enumeration limit:
    scaling the gradients scales the update. A zero row's scale was 1 whatever the others',
    so at norms of 1e-9 it dwarfed them in the solver's normalisation and its tolerances
    became absolute (5.5% off at a factor of 1e-6, float64; found by the float32 property suite)."""
    name, _ = case
    gen = torch.Generator().manual_seed(seed)
    g = 1e-3 * torch.randn(19, 4, dtype=torch.float64, generator=gen)
    g[torch.randperm(19, generator=gen)[:10]] = 0
    d = ours(name, g)
    torch.testing.assert_close(ours(name, g * factor) / factor, d, rtol=1e-9, atol=1e-9 * float(d.abs().max()))
