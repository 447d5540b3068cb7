"""The registry-driven property suite: every registered method (built-in, added later, or a
user's registered in this process) is checked by the functions of
:mod:`gradsurgery.testing` on hypothesis-drawn task gradients of every degenerate kind
(``gradient_strategies``). Nothing here lists methods by hand except the documented
exceptions to permutation equivariance, each with its reason.

Tolerances come from the compared quantity (the scale of the terms an update is summed
from, :func:`gradsurgery.testing.update`), so they hold under any hypothesis seed
(``--hypothesis-seed``) and on any x86 CPU."""
from __future__ import annotations

import pytest
import torch
from gradient_strategies import D, gradient_matrices, positive_losses
from hypothesis import assume, given, settings
from hypothesis import strategies as st

import gradsurgery as gs
from gradsurgery import testing

SETTINGS = settings(max_examples=12, deadline=None)
METHODS = gs.methods.available()

#: Methods whose update is neither positively homogeneous nor scale-invariant, as their
#: authors' code is (their cards say so).
NOT_HOMOGENEOUS: dict[str, str] = {
    "fairgrad": "its weights solve M x = x^(-1/alpha), so the update scales as a^((1-alpha)/(1+alpha)) "
                "(a^(-1/3) at the default alpha=2) before the clipping to max_norm (OptMN-Lab/fairgrad)",
    "pcd": "eps = 1e-8 is added to the moving average of the squared gradient norms before its inverse "
           "square root (torchjd's PCD): homogeneous only for norms far above 1e-4",
    "db_mtl": "a constant 1e-8 is added to the gradient norms it divides by (LibMTL's DB_MTL.py)",
    "moco": "every task gradient is normalised as g / (||g|| + 1e-8) (LibMTL's MoCo.py): scale-invariant "
            "only for norms far above 1e-8",
    "modo": "its weights take a projected step of fixed size gamma along G_1 G_2^T lambda "
            "(Trade-Off-MOL's MoDo.py), whose length grows with the square of the gradients' scale",
    "sdmgrad": "a constant 1e-4 regularises its normalisation, and the update is clipped to max_norm "
               "(OptMN-Lab/sdmgrad weight_methods.py)",
}
#: Methods homogeneous only above a floor of their authors' code: method -> the floor ``f``
#: on nonzero gradient norms. Its effect on the update is ``~f / ||g||`` relative, so the scale
#: property is checked where that is 100 times below the tolerance (``||g|| >= 100 f / rtol``).
GUARDED: dict[str, float] = {
    "rotograd": 1e-15,  # rotograd 0.1.6 clamps gradient norms at 1e-15 (methods/rotograd.py EPS)
}


def above_guard(name: str, grads: torch.Tensor, factor: float, rtol: float) -> bool:
    """Whether every nonzero row of ``grads`` and ``factor * grads`` is far above ``name``'s floor."""
    norms = grads.double().norm(dim=1)
    norms = norms[norms > 0] * min(1.0, factor)
    return name not in GUARDED or bool((norms >= 100 * GUARDED[name] / rtol).all())


#: Methods that treat the tasks differently on purpose (their cards say why).
NOT_EQUIVARIANT: dict[str, str] = {
    "pcd": "task 0 is the primary objective, the others constraints (its card)",
}


def _make(name):
    return testing.factory_for(name)


RANDOM = sorted(name for name in METHODS if testing.is_random(_make(name)))
HOMOGENEOUS = [name for name in METHODS if name not in NOT_HOMOGENEOUS]
EQUIVARIANT = [name for name in METHODS if name not in RANDOM and name not in NOT_EQUIVARIANT]


def test_exemptions_name_registered_methods():
    assert set(NOT_HOMOGENEOUS) | set(NOT_EQUIVARIANT) <= set(METHODS)


@pytest.mark.parametrize("name", METHODS)
@SETTINGS
@given(grads=gradient_matrices())
def test_finite_on_degenerate_gradients(name, grads):
    testing.assert_finite(_make(name), grads)


@pytest.mark.parametrize("name", HOMOGENEOUS)
@SETTINGS
@given(grads=gradient_matrices(exponents=(-6, 6)), exponent=st.sampled_from([-6, -3, -1, 1, 3, 6]))
def test_scale_behaviour(name, grads, exponent):
    """Positively homogeneous or scale-invariant, compared on the output's own scale (a
    normalised update such as Nash-MTL's is compared with a tolerance on its norm). The
    scaled gradients stay within 1e-14..1e14, above the guards of the authors' code (e.g.
    RotoGrad's norms clamped at 1e-15, :data:`GUARDED`), which the finiteness test covers further out."""
    assume(above_guard(name, grads, 10.0 ** exponent, testing.RTOL))
    testing.assert_scale(_make(name), grads, factor=10.0 ** exponent)


@pytest.mark.parametrize("name", EQUIVARIANT)
@SETTINGS
@given(grads=gradient_matrices(min_tasks=2), data=st.data())
def test_permutation_equivariance(name, grads, data):
    k = grads.shape[0]
    perm = torch.tensor(data.draw(st.permutations(range(k))))
    losses = data.draw(positive_losses(k))
    testing.assert_permutation(_make(name), [grads, grads * 0.5], perm, losses)


@pytest.mark.parametrize("name", RANDOM)
def test_random_methods_draw_from_their_generator(name):
    """The methods exempted above as random do depend on the seed, and the same seed gives
    the same decision."""
    g = testing.conflicting_gradients(4)
    losses = torch.rand(4, generator=torch.Generator().manual_seed(1), dtype=D) + 0.1
    make = _make(name)
    a, _ = testing.update(make(4, 0), g, losses)
    b, _ = testing.update(make(4, 0), g, losses)
    c, _ = testing.update(make(4, 1), g, losses)
    assert torch.equal(a, b) and not torch.equal(a, c)


@pytest.mark.parametrize("name", METHODS)
@settings(max_examples=5, deadline=None)
@given(k=st.integers(1, 6), seed=st.integers(0, 2**31 - 1), split=st.integers(1, 3))
def test_resume_bit_exact(name, k, seed, split):
    gen = torch.Generator().manual_seed(seed)
    steps = [torch.randn(k, 7, generator=gen, dtype=D) for _ in range(5)]
    losses = [torch.rand(k, generator=gen, dtype=D) + 0.1 for _ in range(5)]
    testing.assert_resume(_make(name), steps, losses, split)


@pytest.mark.parametrize("name", METHODS)
def test_trains_and_checkpoint_round_trips(name):
    testing.assert_trains(name)
