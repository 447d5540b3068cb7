"""Hypothesis strategies of the property suite: task-gradient matrices ``K x N`` of every
degenerate family of :mod:`gradsurgery._gradient_cases` (the one generator the public
:func:`gradsurgery.testing.check_method` uses too), in float64 or float32, and the losses
that go with them."""
from __future__ import annotations

import torch
from hypothesis import strategies as st

from gradsurgery._gradient_cases import FAMILIES, degenerate_matrix

D = torch.float64


@st.composite
def gradient_matrices(draw, min_tasks: int = 1, max_tasks: int = 8, exponents: tuple[int, int] = (-12, 12),
                      dtype: torch.dtype = D, families: tuple[str, ...] = FAMILIES) -> torch.Tensor:
    """``K x N`` task gradients of one of ``families``, scaled by ``10^e``, ``e`` in
    ``exponents``, drawn in float64 and rounded to ``dtype``."""
    k = draw(st.integers(min_tasks, max_tasks))
    family = draw(st.sampled_from(families))
    n = draw(st.integers(1, 12))
    g = degenerate_matrix(family, k, n, draw(st.integers(0, 2**31 - 1)))
    return (g * 10.0 ** draw(st.integers(*exponents))).to(dtype)


@st.composite
def positive_losses(draw, k: int, dtype: torch.dtype = D) -> torch.Tensor:
    """``K`` losses in [1e-3, 1e3]."""
    gen = torch.Generator().manual_seed(draw(st.integers(0, 2**31 - 1)))
    return (10.0 ** (6 * torch.rand(k, generator=gen, dtype=D) - 3)).to(dtype)
