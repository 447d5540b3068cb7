"""The property suite over precision and size: every method whose decision is a ``K x K``
problem (a :class:`~gradsurgery.methods.GramWeighting`, found in the registry) in float32
and float64, at ``K`` up to 40 (CelebA's tasks), on every degenerate family of
:mod:`gradsurgery._gradient_cases` (0 strictly inside the rows' hull, rank-deficient, rows
leaning one way, zero rows, norms spread over four orders; overall scales 1e-6..1e6).

Tolerances: two updates are compared within :func:`gradsurgery.testing.rtol_for` of the
scale of their terms (``||d|| + sum_k |c_k| ||g_k||``): ``1e-5`` in float64 (the solvers'
tolerances), ``16 K eps_32`` in float32 (the rounding of the Gram and of ``d = c^T G``).
``<g_k, d> = sum_j c_j <g_k, g_j>`` is rounded on the order of ``K eps ||g_k|| sum_j |c_j| ||g_j||``,
plus the solvers' tolerance ``1e-9`` of the same scale (as ``test_non_conflicting``)."""
from __future__ import annotations

import pytest
import torch
from gradient_strategies import gradient_matrices, positive_losses
from hypothesis import assume, given, settings
from hypothesis import strategies as st
from test_method_properties import NOT_EQUIVARIANT, NOT_HOMOGENEOUS, RANDOM, above_guard

import gradsurgery as gs
from gradsurgery import testing
from gradsurgery._gradient_cases import FAMILIES
from gradsurgery.methods import GramWeighting

DTYPES = {"float32": torch.float32, "float64": torch.float64}
GRAM = [name for name in gs.methods.available() if issubclass(gs.methods.get(name), GramWeighting)]
#: K up to 40, few examples each (a K = 40 decision of an iterative method costs ~10 ms-1 s).
SETTINGS = settings(max_examples=8, deadline=None)
LARGE = {"min_tasks": 2, "max_tasks": 40, "exponents": (-6, 6)}
#: method -> (options, gradient families) for which its card promises ``<g_k, d> >= 0`` for
#: every task: UPGrad and DualProj project onto the dual cone; MGDA's min-norm point of the
#: hull has a nonnegative product with every row; CAGrad with ``c >= 1`` has ``d = 0``
#: feasible (``||0 - g_0|| <= c ||g_0||``), so its optimum's worst case is >= 0 -- but only
#: where 0 is outside the rows' hull: there (dual optimum ``g_w = 0``) the primal optimum is
#: not unique and CAGrad follows the authors' regularised direction, which conflicts with
#: one of two opposed rows, say (docs/methods/cagrad.md, "Deviations").
NON_CONFLICTING: dict[str, tuple[dict, tuple[str, ...]]] = {
    "upgrad": ({}, FAMILIES), "dualproj": ({}, FAMILIES), "mgda": ({}, FAMILIES),
    "cagrad": ({"c": 1.0}, ("leaning one way",))}


def _cases(names):
    return [pytest.param(name, dtype, id=f"{name}-{label}") for name in names for label, dtype in DTYPES.items()]


def conflict_tolerance(grads: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """Per task, the rounding of ``<g_k, d>`` (``16 K eps``) and the solvers' ``1e-9``, on the
    scale ``||g_k|| (||d|| + sum_j |c_j| ||g_j||)``."""
    k = grads.shape[0]
    rtol = max(1e-9, testing.ROUNDING_FACTOR * k * torch.finfo(grads.dtype).eps)
    return rtol * grads.norm(dim=1) * scale


def test_gram_methods_found():
    assert {"upgrad", "mgda", "cagrad", "nash_mtl", "imtl_g"} <= set(GRAM)
    assert set(NON_CONFLICTING) <= set(GRAM)


@pytest.mark.parametrize("name,dtype", _cases(GRAM))
@SETTINGS
@given(data=st.data())
def test_finite(name, dtype, data):
    grads = data.draw(gradient_matrices(dtype=dtype, **{**LARGE, "exponents": (-12, 12)}))
    testing.assert_finite(testing.factory_for(name, dtype=dtype), grads, steps=2)


@pytest.mark.parametrize("name,dtype", _cases(n for n in GRAM if n not in RANDOM and n not in NOT_EQUIVARIANT))
@SETTINGS
@given(data=st.data())
def test_permutation_equivariance(name, dtype, data):
    grads = data.draw(gradient_matrices(dtype=dtype, **LARGE))
    k = grads.shape[0]
    perm = torch.tensor(data.draw(st.permutations(range(k))))
    losses = data.draw(positive_losses(k, dtype=dtype))
    testing.assert_permutation(testing.factory_for(name, dtype=dtype), [grads], perm, losses)


@pytest.mark.parametrize("name,dtype", _cases(n for n in GRAM if n not in NOT_HOMOGENEOUS))
@SETTINGS
@given(data=st.data(), exponent=st.sampled_from([-6, -3, 3, 6]))
def test_scale_behaviour(name, dtype, data, exponent):
    grads = data.draw(gradient_matrices(dtype=dtype, **LARGE))
    assume(above_guard(name, grads, 10.0 ** exponent, testing.rtol_for(dtype, grads.shape[0])))
    testing.assert_scale(testing.factory_for(name, dtype=dtype), grads, factor=10.0 ** exponent)


@pytest.mark.parametrize("name,dtype", _cases(sorted(NON_CONFLICTING)))
@settings(max_examples=15, deadline=None)
@given(data=st.data())
def test_non_conflicting(name, dtype, data):
    options, families = NON_CONFLICTING[name]
    grads = data.draw(gradient_matrices(dtype=dtype, families=families, **LARGE))
    k = grads.shape[0]
    method = testing.factory_for(name, dtype=dtype, **options)(k, 0)
    d, scale = testing.update(method, grads, torch.ones(k, dtype=dtype))
    products = grads @ d
    tolerance = conflict_tolerance(grads, scale)
    assert (products >= -tolerance).all(), (products.tolist(), tolerance.tolist())


@pytest.mark.parametrize("dtype", DTYPES.values(), ids=DTYPES)
def test_the_conflict_check_sees_the_mean(dtype):
    """The mean of rows with 0 inside their hull (the family's exact answer is 0) conflicts."""
    grads = testing.degenerate_matrix("0 inside the hull", 4, 3, 0, dtype=dtype)
    d, scale = testing.update(testing.factory_for("mean", dtype=dtype)(4, 0), grads, torch.ones(4, dtype=dtype))
    assert not ((grads @ d) >= -conflict_tolerance(grads, scale)).all()


@pytest.mark.parametrize("k,n", [(4, 2), (6, 3), (8, 4), (12, 5)])
def test_mgda_min_norm_point_on_spread_norms(k, n):
    """MGDA's KKT conditions ``<g_k, d> >= ||d||^2`` (hence no conflict) on rank-deficient
    rows with norms 1e-2..1e2 apart, in float64, enumeration (K <= 8) and Wolfe (K = 12).
    Before the affine minimisers were solved on the unit-diagonal Gram, about 1 in 12 such
    draws conflicted (e.g. K = 6, n = 3, seed 4: ``<g_k, d> = -1.4e-7`` where the rounding
    and solver tolerance is 7.7e-9): the ridge of the solve, absolute on the Gram
    normalised to unit mean diagonal, swamped the faces of the smallest gradients."""
    for seed in range(40):
        grads = testing.degenerate_matrix("norms spread", k, n, seed)
        d, scale = testing.update(testing.factory_for("mgda")(k, 0), grads, torch.ones(k, dtype=grads.dtype))
        kkt = grads @ d - d @ d
        assert (kkt >= -conflict_tolerance(grads, scale)).all(), (seed, kkt.tolist())
