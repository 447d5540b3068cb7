"""The rotations' exponential (:mod:`gradsurgery.numerics.expm`): value and derivative
against ``torch.linalg.matrix_exp``, the hand-written backward against finite differences
(``gradcheck``: the exact derivative of the evaluated approximant), the plans' costs, and
the sync-free plan. (Moved here from ``test_rotation.py``; the Cayley map is in
``test_cayley.py``.)"""
from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch.utils._python_dispatch import TorchDispatchMode

from gradsurgery.numerics import expm as numerics_expm

pytestmark = pytest.mark.usefixtures("single_thread")


@settings(max_examples=30, deadline=None)
@given(st.integers(1, 3), st.integers(1, 12), st.sampled_from([0.0, 1e-6, 1e-3, 0.05, 0.3, 1.0, 5.0, 40.0]),
       st.booleans(), st.integers(0, 2**31 - 1))
def test_expm_and_its_derivative_equal_matrix_exp(k, m, scale, sync_free, seed):
    """Both plans of :func:`numerics_expm.expm` (host-chosen degree, and the sync-free fixed
    plan), float64: the value against the spectral formula ``exp(X) = U e^{-i mu} U^H``
    (``iX = U mu U^H``, exact to rounding; ``torch.linalg.matrix_exp`` itself is off by up
    to ~1e-10 relative on small angles), the derivative against ``matrix_exp``'s autograd."""
    g = torch.Generator().manual_seed(seed)
    a = (scale * torch.randn(k, m, m, generator=g, dtype=torch.float64)).requires_grad_()
    probe = torch.randn(k, m, m, generator=g, dtype=torch.float64)
    ours = numerics_expm.expm(numerics_expm.skew(a), sync_free=sync_free)
    mu, u = torch.linalg.eigh(numerics_expm.skew(a.detach()) * 1j)
    exact = ((u * torch.exp(-1j * mu).unsqueeze(-2)) @ u.mH).real
    torch.testing.assert_close(ours, exact, rtol=0, atol=1e-13 * max(1.0, scale * m))
    got, = torch.autograd.grad((ours * probe).sum(), a)
    want, = torch.autograd.grad((torch.linalg.matrix_exp(numerics_expm.skew(a)) * probe).sum(), a)
    torch.testing.assert_close(got, want, rtol=1e-8, atol=1e-10)


def test_expm_sync_free_plan_reads_nothing_and_flags_out_of_range(monkeypatch):
    """The sync-free plan calls none of the host-read entry points, and a generator beyond
    its :data:`numerics_expm.MAX_SQUARINGS` range gives NaN instead of a wrong rotation."""
    x = numerics_expm.skew(torch.randn(2, 6, 6, dtype=torch.float64)).requires_grad_()
    reads = []
    for name in ("item", "tolist", "__bool__", "__float__", "__int__", "__index__"):
        original = getattr(torch.Tensor, name)
        monkeypatch.setattr(torch.Tensor, name, lambda self, *a, _n=name, _o=original, **kw:
                            (reads.append(_n), _o(self, *a, **kw))[1])
    out = numerics_expm.expm(x, sync_free=True)
    out.sum().backward()
    huge = numerics_expm.expm(x.detach() * 1e4, sync_free=True)
    monkeypatch.undo()
    assert reads == []
    assert torch.isfinite(out).all() and torch.isnan(huge).all()
    assert torch.isfinite(numerics_expm.expm(x.detach() * 1e4)).all()  # the host plan squares as needed


@pytest.mark.parametrize("sync_free", [False, True])
@pytest.mark.parametrize("scale", [1e-7, 1e-3, 0.05, 0.4, 3.0])
def test_backward_is_the_exact_derivative_of_the_approximant(scale, sync_free):
    """``gradcheck`` (finite differences of the forward itself, float64) holds at every
    plan the scales reach: degree 2 to 16, with and without squarings."""
    g = torch.Generator().manual_seed(3)
    a = (scale * torch.randn(2, 5, 5, generator=g, dtype=torch.float64)).requires_grad_()
    assert torch.autograd.gradcheck(lambda b: numerics_expm.expm(numerics_expm.skew(b), sync_free=sync_free), (a,))


def test_zero_generator_gives_the_identity_and_passes_the_gradient():
    """``exp(0) = I`` and ``d exp(X)|_0 [E] = E``: the gradient of ``A`` is
    ``tril(G - G^T, -1)``, exactly."""
    a = torch.zeros(3, 4, 4, dtype=torch.float64, requires_grad=True)
    probe = torch.randn(3, 4, 4, dtype=torch.float64)
    out = numerics_expm.expm(numerics_expm.skew(a))
    assert torch.equal(out, torch.eye(4, dtype=torch.float64).expand(3, 4, 4))
    grad, = torch.autograd.grad((out * probe).sum(), a)
    assert torch.equal(grad, (probe - probe.mT).tril(-1))


class _CountProducts(TorchDispatchMode):
    """Counts matrix products (``bmm``, ``baddbmm``, ``mm``, ``addmm``, in place or not) dispatched."""

    OPS = {torch.ops.aten.bmm.default, torch.ops.aten.baddbmm.default, torch.ops.aten.baddbmm_.default,
           torch.ops.aten.mm.default, torch.ops.aten.addmm.default, torch.ops.aten.addmm_.default}

    def __init__(self):
        super().__init__()
        self.count = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.count += func in self.OPS
        return func(*args, **(kwargs or {}))


@pytest.mark.parametrize("scale", [1e-4, 3e-3, 0.03, 0.3, 3.0])
def test_backward_products_are_those_of_the_plan(scale, monkeypatch):
    """The backward takes the products the plan is costed at: 2 per squaring and
    ``_products(d, backward=True) - _products(d, backward=False)`` for ``T_d`` (0, 1, 3,
    5, 7, 9, 10 for d = 1, 2, 4, 6, 9, 12, 16), fewer than autograd through the same
    evaluation (twice the forward's)."""
    plans = []
    original = numerics_expm._plan
    monkeypatch.setattr(numerics_expm, "_plan", lambda *a: plans.append(original(*a)) or plans[-1])
    g = torch.Generator().manual_seed(0)
    a = (scale * torch.randn(4, 32, 32, generator=g)).requires_grad_()
    out = numerics_expm.expm(numerics_expm.skew(a))
    degree, squarings = plans[-1]
    counter = _CountProducts()
    with counter:
        out.backward(torch.randn(4, 32, 32, generator=g))
    expected = numerics_expm._products(degree, True) - numerics_expm._products(degree, False) + 2 * squarings
    assert counter.count == expected, (degree, squarings)
    forward_products = numerics_expm._products(degree, False) + squarings
    assert counter.count <= 2 * forward_products


def test_float32_value_and_derivative_match_float64():
    """Trained-size generators (``||X||_2 ~ 1``, K = 4, m = 64) in float32: the value to
    a few units of float32 roundoff times the squarings, the derivative likewise."""
    g = torch.Generator().manual_seed(1)
    a64 = (0.06 * torch.randn(4, 64, 64, generator=g, dtype=torch.float64)).requires_grad_()
    probe = torch.randn(4, 64, 64, generator=g, dtype=torch.float64)
    a32 = a64.detach().float().requires_grad_()
    want = torch.linalg.matrix_exp(numerics_expm.skew(a64))
    got = numerics_expm.expm(numerics_expm.skew(a32))
    assert (got.double() - want).abs().max().item() < 1e-5  # ||exp(X)||_2 = 1
    dw, = torch.autograd.grad((want * probe).sum(), a64)
    dg, = torch.autograd.grad((got * probe.float()).sum(), a32)
    assert ((dg.double() - dw).norm() / dw.norm()).item() < 1e-5
