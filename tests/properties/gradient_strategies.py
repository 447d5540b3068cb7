"""Hypothesis strategies of the property suite: task-gradient matrices ``K x N`` (float64)
of every degenerate kind, and the losses that go with them."""
from __future__ import annotations

import torch
from hypothesis import strategies as st

D = torch.float64
KINDS = ("normal", "zero", "zero rows", "duplicated rows", "opposed rows", "rank deficient",
         "more tasks than dimensions", "norms 1e-2..1e2 apart")


@st.composite
def gradient_matrices(draw, min_tasks: int = 1, max_tasks: int = 8, exponents: tuple[int, int] = (-12, 12)
                      ) -> torch.Tensor:
    """``K x N`` task gradients of one of :data:`KINDS`, scaled by ``10^e``, ``e`` in ``exponents``."""
    k = draw(st.integers(min_tasks, max_tasks))
    kind = draw(st.sampled_from(KINDS))
    n = draw(st.integers(1, max(1, k - 1))) if kind == "more tasks than dimensions" else draw(st.integers(1, 12))
    gen = torch.Generator().manual_seed(draw(st.integers(0, 2**31 - 1)))
    g = torch.randn(k, n, generator=gen, dtype=D)
    if kind == "zero":
        g.zero_()
    elif kind == "zero rows":
        g[torch.rand(k, generator=gen) < 0.4] = 0
    elif kind == "duplicated rows" and k > 1:
        g[draw(st.integers(1, k - 1))] = g[0]
    elif kind == "opposed rows" and k > 1:
        g[1] = -g[0]
    elif kind == "rank deficient" and k > 1:
        r = draw(st.integers(1, k - 1))
        g = torch.randn(k, r, generator=gen, dtype=D) @ torch.randn(r, n, generator=gen, dtype=D)
    elif kind == "norms 1e-2..1e2 apart":
        # further apart, the Gram's condition number exceeds what float64 resolves
        g = g * 10.0 ** (4 * torch.rand(k, 1, generator=gen, dtype=D) - 2)
    return g * 10.0 ** draw(st.integers(*exponents))


@st.composite
def positive_losses(draw, k: int) -> torch.Tensor:
    """``K`` losses in [1e-3, 1e3]."""
    gen = torch.Generator().manual_seed(draw(st.integers(0, 2**31 - 1)))
    return 10.0 ** (6 * torch.rand(k, generator=gen, dtype=D) - 3)
