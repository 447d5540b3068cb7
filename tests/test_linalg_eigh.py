"""The sync-free symmetric eigen-decomposition (cyclic Jacobi, ``gradsurgery.numerics.eigh``)
against ``torch.linalg.eigh`` (LAPACK), in float64, on Grams of every kind the methods
meet: random, rank-deficient, zero, scaled from 1e-10 to 1e10, K = 1..10 and 32."""
from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from gradsurgery.numerics import eigh

D = torch.float64
#: relative accuracy asked of the Jacobi sweeps (LAPACK reaches ~1e-15)
TOL = 1e-12


def _gram(k: int, seed: int, rank: int | None, scale: float) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    n = 3 * k + 2
    grads = torch.randn(k, n, generator=g, dtype=D)
    if rank is not None:
        grads = torch.randn(k, rank, generator=g, dtype=D) @ torch.randn(rank, n, generator=g, dtype=D)
    return scale * (grads @ grads.T)


def _check_against_lapack(m: torch.Tensor, lam: torch.Tensor | None = None, vec: torch.Tensor | None = None) -> None:
    """Eigenvalues to ``TOL ||M||``; ``V`` orthonormal, ``M V = V diag(lambda)`` to ``TOL``;
    eigenvectors of eigenvalues separated from the others by a gap ``delta`` equal LAPACK's
    up to sign to ``TOL ||M|| / delta`` (the others are not unique)."""
    k = m.shape[0]
    if lam is None:
        lam, vec = eigh.jacobi_eigh(m)
    ref_lam, ref_vec = torch.linalg.eigh(m)
    size = torch.linalg.matrix_norm(m, ord=2).clamp_min(1e-300)
    assert (lam == lam.sort().values).all()
    assert (lam - ref_lam).abs().max() <= TOL * size
    assert (vec.T @ vec - torch.eye(k, dtype=D)).abs().max() <= TOL
    assert (m @ vec - vec * lam).abs().max() <= TOL * size
    for i in range(k):
        gap = torch.cat([ref_lam[:i], ref_lam[i + 1:]]).sub(ref_lam[i]).abs().min() if k > 1 else size
        if gap > 1e-3 * size:
            align = (vec[:, i] @ ref_vec[:, i]).abs()
            assert 1 - align <= TOL * size / gap


@settings(max_examples=60, deadline=None)
@given(k=st.integers(1, 10), seed=st.integers(0, 2**31), kind=st.sampled_from(["full", "deficient", "zero"]),
       exponent=st.integers(-10, 10))
def test_jacobi_matches_lapack(k, seed, kind, exponent):
    rank = {"full": None, "deficient": max(1, k // 2), "zero": None}[kind]
    m = _gram(k, seed, rank, 0.0 if kind == "zero" else 10.0 ** exponent)
    _check_against_lapack(m)


def test_jacobi_matches_lapack_k32():
    """K = 32, full rank and rank 5, in one batched call."""
    grams = torch.stack([_gram(32, 7, None, 1.0), _gram(32, 8, 5, 1.0)])
    lam, vec = eigh.jacobi_eigh(grams)
    for i in range(2):
        _check_against_lapack(grams[i], lam[i], vec[i])


def test_zero_matrix_gives_identity():
    lam, vec = eigh.jacobi_eigh(torch.zeros(4, 4, dtype=D))
    assert torch.equal(lam, torch.zeros(4, dtype=D)) and torch.equal(vec, torch.eye(4, dtype=D))


def test_batched_equals_one_by_one():
    grams = torch.stack([_gram(5, s, None, 10.0 ** s) for s in range(3)])
    lam, vec = eigh.jacobi_eigh(grams)
    for i in range(3):
        one_lam, one_vec = eigh.jacobi_eigh(grams[i])
        torch.testing.assert_close(lam[i], one_lam, rtol=1e-14, atol=0)
        torch.testing.assert_close(vec[i].abs(), one_vec.abs(), rtol=0, atol=1e-13)


@pytest.mark.parametrize("k", [3, 8])
def test_pinv_symmetric_equals_torch_pinv(k):
    """Same cut-off rule as ``torch.linalg.pinv(hermitian=True)``, through either solver."""
    for rank in (None, 2):
        m = _gram(k, k, rank, 1e3)
        ref = torch.linalg.pinv(m, hermitian=True)
        for solver in ("torch", "jacobi"):
            ours = eigh.pinv_symmetric(m, solver)
            assert (ours - ref).abs().max() <= 1e-9 * ref.abs().max()


def test_eigvalsh_solvers_agree():
    m = _gram(9, 1, None, 1.0)
    jac = eigh.symmetric_eigvalsh(m, "jacobi")
    assert (jac - torch.linalg.eigvalsh(m)).abs().max() <= TOL * torch.linalg.matrix_norm(m, ord=2)


def test_unknown_solver_is_rejected():
    with pytest.raises(ValueError, match="solver must be one of"):
        eigh.symmetric_eigh(torch.eye(2, dtype=D), "qr")


@pytest.mark.parametrize("method", ["aligned_mtl", "imtl_g"])
def test_methods_on_the_jacobi_path_equal_lapack_path(method, monkeypatch):
    """What CUDA runs (the Jacobi sweeps), forced on the CPU, gives the CPU's weights."""
    import gradsurgery as gs

    grams = [_gram(6, 3, None, 1e-4), _gram(6, 4, 3, 1e5)]
    expected = [gs.methods.create(method).weights(m, torch.ones(6, dtype=D)) for m in grams]
    monkeypatch.setattr(eigh, "_uses_torch", lambda a, solver: False)
    for m, ref in zip(grams, expected):
        got = gs.methods.create(method).weights(m, torch.ones(6, dtype=D))
        assert (got - ref).abs().max() <= 1e-9 * ref.abs().max()


@pytest.mark.skipif(not torch.cuda.is_available(), reason="the CUDA-graph replay of the sweeps needs a CUDA device")
def test_cuda_graph_replay_equals_eager_sweeps_without_sync():
    """On CUDA the sweeps are replayed from a captured graph: same numbers as running them
    eagerly, fresh input on every call, and no synchronisation after the first call."""
    grams = [_gram(8, s, None, 10.0 ** s).cuda() for s in range(3)]
    eigh.jacobi_eigh(grams[0])  # captures
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        replayed = [eigh.jacobi_eigh(m) for m in grams]
    finally:
        torch.cuda.set_sync_debug_mode(0)
    for m, (lam, vec) in zip(grams, replayed):
        eager_lam, eager_vec = eigh.jacobi_eigh(m, sweeps=eigh.jacobi_sweeps(8))
        assert torch.equal(lam, eager_lam) and torch.equal(vec, eager_vec)
        _check_against_lapack(m.cpu(), lam.cpu(), vec.cpu())
