"""Task-gradient matrices for the differential tests of tests/methods/: random rows and the
degenerate cases every method must handle (a zero row, duplicate rows, opposed rows, norms
six orders of magnitude apart), built by the one generator of degenerate gradients,
:mod:`gradsurgery._gradient_cases`."""
from __future__ import annotations

import torch
from hypothesis import settings
from hypothesis import strategies as st

from gradsurgery._gradient_cases import degenerate_matrix, duplicated_row, opposed_row, spread_norms, zero_row

KINDS = ("random", "zero", "duplicate", "opposed", "scaled")
#: ``(k, kind, seed)`` for ``K = 2..6`` and every kind.
CASES = [(k, kind, seed) for k in range(2, 7) for kind in KINDS for seed in (0, 1)]


def gradient_matrix(k: int, kind: str, seed: int, n: int = 11, dtype=torch.float64) -> torch.Tensor:
    """A ``K x n`` matrix of task gradients with conflicts (row 1 leans against row 0)."""
    gen = torch.Generator().manual_seed(seed)
    g = torch.randn(k, n, generator=gen, dtype=dtype)
    g[1] = -0.6 * g[0] + 0.4 * g[1]
    if kind == "zero":
        g = zero_row(g, k - 1)
    elif kind == "duplicate":
        g = duplicated_row(g, k - 1)
    elif kind == "opposed":
        g = opposed_row(g, k - 1)
    elif kind == "scaled":
        g = spread_norms(g, -3, 3)
    return g


def losses_for(k: int, seed: int, dtype=torch.float64) -> torch.Tensor:
    """Positive losses spread over two orders of magnitude."""
    gen = torch.Generator().manual_seed(1000 + seed)
    return torch.rand(k, generator=gen, dtype=dtype) * 5 + 0.05


@st.composite
def gradient_sequences(draw, shape_tail, steps=3, max_tasks=8):
    """``steps`` task-gradient tensors ``K x *shape_tail`` of one sampled family of
    :func:`degenerate_matrix` (normal, rank-deficient across tasks, or with zero rows), each
    step drawn afresh; scaled by ``10^[-10, 10]``."""
    k = draw(st.integers(1, max_tasks))
    family = draw(st.sampled_from(["normal", "rank deficient", "zero rows"]))
    seed = draw(st.integers(0, 2**31 - 1 - steps))
    scale = 10.0 ** draw(st.integers(-10, 10))
    size = int(torch.Size(shape_tail).numel())
    return [degenerate_matrix(family, k, size, seed + step).reshape(k, *shape_tail) * scale for step in range(steps)]


#: Hypothesis settings of the stateful methods' property tests (small: each example runs steps).
PROPERTY = settings(max_examples=12, deadline=None)
