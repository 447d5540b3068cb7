"""Non-conflict: ``<g_k, d> >= 0`` for every task, for the methods whose papers promise it
(UPGrad, DualProj and MGDA for any K; PCGrad for two tasks), on hypothesis-drawn
degenerate gradients. The tolerance is on the compared inner products' own scale:
``<g_k, d> = sum_j c_j <g_k, g_j>`` is rounded on the order of ``eps ||g_k|| sum_j |c_j| ||g_j||``."""
from __future__ import annotations

import pytest
import torch
from gradient_strategies import gradient_matrices
from hypothesis import given, settings

from gradsurgery import testing

SETTINGS = settings(max_examples=15, deadline=None)
#: method -> the largest K for which its paper promises a non-conflicting update
NON_CONFLICTING = {"upgrad": None, "dualproj": None, "mgda": None, "pcgrad": 2}


def _assert_non_conflicting(name, grads):
    d, scale = testing.update(testing.factory_for(name)(grads.shape[0], 0), grads,
                              torch.ones(grads.shape[0], dtype=grads.dtype))
    products = grads @ d
    tolerance = 1e-9 * grads.norm(dim=1) * scale
    assert (products >= -tolerance).all(), (products.tolist(), tolerance.tolist())


@pytest.mark.parametrize("name", sorted(NON_CONFLICTING))
@SETTINGS
@given(grads=gradient_matrices())
def test_non_conflicting(name, grads):
    limit = NON_CONFLICTING[name]
    if limit is not None:
        grads = grads[:limit]
    _assert_non_conflicting(name, grads)


def test_the_check_sees_a_conflicting_update():
    """``mean`` of two opposed-ish gradients of different norms conflicts with the smaller."""
    grads = torch.tensor([[1.0, 0.0], [-3.0, 0.1]], dtype=torch.float64)
    with pytest.raises(AssertionError):
        _assert_non_conflicting("mean", grads)
