"""Task-gradient matrices for the differential tests of tests/methods/: random rows and the
degenerate cases every method must handle (a zero row, duplicate rows, opposed rows, norms
six orders of magnitude apart)."""
from __future__ import annotations

import torch
from hypothesis import settings, strategies as st

KINDS = ("random", "zero", "duplicate", "opposed", "scaled")
#: ``(k, kind, seed)`` for ``K = 2..6`` and every kind.
CASES = [(k, kind, seed) for k in range(2, 7) for kind in KINDS for seed in (0, 1)]


def gradient_matrix(k: int, kind: str, seed: int, n: int = 11, dtype=torch.float64) -> torch.Tensor:
    """A ``K x n`` matrix of task gradients with conflicts (row 1 leans against row 0)."""
    gen = torch.Generator().manual_seed(seed)
    g = torch.randn(k, n, generator=gen, dtype=dtype)
    g[1] = -0.6 * g[0] + 0.4 * g[1]
    if kind == "zero":
        g[k - 1] = 0
    elif kind == "duplicate":
        g[k - 1] = g[0]
    elif kind == "opposed":
        g[k - 1] = -g[0]
    elif kind == "scaled":
        g *= torch.logspace(-3, 3, k, dtype=dtype)[:, None]
    return g


def losses_for(k: int, seed: int, dtype=torch.float64) -> torch.Tensor:
    """Positive losses spread over two orders of magnitude."""
    gen = torch.Generator().manual_seed(1000 + seed)
    return torch.rand(k, generator=gen, dtype=dtype) * 5 + 0.05


#: Hypothesis settings of the stateful methods' property tests (small: each example runs steps).
@st.composite
def gradient_sequences(draw, shape_tail, steps=3, max_tasks=8):
    """``steps`` task-gradient tensors ``K x *shape_tail`` of one sampled kind: normal,
    rank-deficient across tasks, or with zero rows; scaled by ``10^[-10, 10]``."""
    k = draw(st.integers(1, max_tasks))
    kind = draw(st.sampled_from(["normal", "rank_deficient", "zero_rows"]))
    gen = torch.Generator().manual_seed(draw(st.integers(0, 2**31 - 1)))
    scale = 10.0 ** draw(st.integers(-10, 10))
    seq = []
    for _ in range(steps):
        g = torch.randn(k, *shape_tail, generator=gen, dtype=torch.float64)
        if kind == "rank_deficient" and k > 1:
            g = torch.einsum("kr,r...->k...", torch.randn(k, 1, generator=gen, dtype=torch.float64), g[:1])
        elif kind == "zero_rows":
            g[torch.rand(k, generator=gen) < 0.4] = 0
        seq.append(g * scale)
    return seq


PROPERTY = settings(max_examples=12, deadline=None)
