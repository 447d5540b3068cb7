"""GradVac against LibMTL's ``GradVac.backward`` re-derived (several steps, K = 2..6, zero,
duplicate, opposed and scaled rows) and against torchjd 0.18's ``GradVac``."""
from __future__ import annotations

import pytest
import torch
from gradient_cases import CASES, gradient_matrix

import gradsurgery as gs

D = torch.float64
STEPS = 4


def libmtl_gradvac(steps: list[torch.Tensor], beta: float, seed: int) -> list[torch.Tensor]:
    """LibMTL (median-research-group/LibMTL), ``LibMTL/weighting/GradVac.py``,
    ``GradVac.backward`` with ``GradVac_group_type=0`` (whole model), re-derived.

    ``rho_T`` (K x K) starts at 0. Every step, ``pc = G``; each task ``i`` visits the other
    tasks ``j`` in a random order: ``rho = <pc_i, g_j> / (||pc_i|| ||g_j||)``; if
    ``rho < rho_T[i, j]``:
    ``pc_i += g_j ||pc_i|| (T sqrt(1 - rho^2) - rho sqrt(1 - T^2)) / (||g_j|| sqrt(1 - T^2))``
    with ``T = rho_T[i, j]``; then ``rho_T[i, j] = (1 - beta) T + beta rho``. Update:
    ``sum_i pc_i``.

    Two documented departures, both gradsurgery's: LibMTL adds ``1e-8`` to both
    denominators (here 0: the paper's Eq. has none), and a pair where either gradient is
    zero has no cosine, so it is skipped (LibMTL's ``rho = 0`` would decay ``rho_T``); so is
    a ``pc_i`` cancelled to rounding (an opposed pair: ``pc_i = g_i - g_i``), i.e. with
    ``||pc_i|| <= 4 sqrt(K eps) sum_j |c_ij| ||g_j||`` for ``pc_i = sum_j c_ij g_j``.
    The orders are the ones a generator seeded with ``seed`` draws (one ``K x K`` uniform
    draw per step, task ``i`` visits the others by increasing key), as gradsurgery does.
    """
    gen = torch.Generator().manual_seed(seed)
    k = steps[0].shape[0]
    target = torch.zeros(k, k, dtype=D)
    floor = 4 * (k * torch.finfo(D).eps) ** 0.5
    out = []
    for g in steps:
        keys = torch.rand(k, k, generator=gen)
        pc, coefs, norms = g.clone(), torch.eye(k, dtype=D), g.norm(dim=1)
        for i in range(k):
            for j in sorted((j for j in range(k) if j != i), key=lambda j: float(keys[i, j])):
                ni, nj = pc[i].norm(), norms[j]
                if ni <= floor * (coefs[i].abs() @ norms) or nj == 0:
                    continue
                rho = (pc[i] @ g[j] / (ni * nj)).clamp(-1, 1)
                t = target[i, j]
                if rho < t:
                    w = ni * (t * (1 - rho**2).sqrt() - rho * (1 - t**2).sqrt()) / (nj * (1 - t**2).sqrt())
                    pc[i] = pc[i] + w * g[j]
                    coefs[i, j] += w
                target[i, j] = (1 - beta) * t + beta * rho
        out.append(pc.sum(0))
    return out


def run_ours(steps: list[torch.Tensor], beta: float, seed: int) -> list[torch.Tensor]:
    k = steps[0].shape[0]
    method = gs.methods.create("gradvac", beta=beta)
    method.bind(k, device=torch.device("cpu"), dtype=D, generator=torch.Generator().manual_seed(seed))
    out = []
    for g in steps:  # as the optimizer drives it: the draw, the decision, the step's end
        method.prepare()
        out.append(method.weights(g @ g.T, torch.ones(k, dtype=D)) @ g)
        method.after_step()
    return out


@pytest.mark.parametrize("k,kind,seed", CASES)
def test_equals_libmtl_update_over_steps(k, kind, seed):
    steps = [gradient_matrix(k, kind, seed + 10 * s) for s in range(STEPS)]
    # norms from the Gram (c^T M c) keep ~sqrt(eps) relative accuracy where g_i' nearly
    # cancels (opposed rows), and sqrt(1 - phi^2) is ill-conditioned at phi = -1: 8 sqrt(eps)
    tol = 8 * torch.finfo(D).eps ** 0.5
    for ours, ref, g in zip(run_ours(steps, 0.5, seed), libmtl_gradvac(steps, 0.5, seed), steps):
        assert torch.isfinite(ours).all()
        torch.testing.assert_close(ours, ref, rtol=0, atol=float(tol * k * g.norm(dim=1).max()))


def test_targets_move_so_a_later_step_differs_from_pcgrad_like_first_step():
    """The EMA matters: the same matrix twice gives two different updates (the targets
    moved from 0 to the observed cosines), and the reference agrees on both."""
    g = gradient_matrix(3, "random", 5)
    ours = run_ours([g, g], 0.5, 5)
    assert not torch.allclose(ours[0], ours[1], rtol=1e-3)
    for a, b in zip(ours, libmtl_gradvac([g, g], 0.5, 5)):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-12)


def test_two_tasks_equal_torchjd_over_steps():
    """torchjd 0.18 ``GradVac(beta, eps=0)``: with two tasks the order is forced."""
    jd = pytest.importorskip("torchjd.aggregation")
    gen = torch.Generator().manual_seed(4)
    steps = [torch.randn(2, 9, generator=gen, dtype=D) for _ in range(5)]
    for s in steps[::2]:
        s[1] -= 1.5 * s[0]
    agg = jd.GradVac(beta=0.3, eps=0.0)
    for ours, g in zip(run_ours(steps, 0.3, 0), steps):
        torch.testing.assert_close(ours, agg(g), rtol=1e-9, atol=1e-10)


def test_bad_beta_raises():
    with pytest.raises(ValueError, match="beta"):
        gs.methods.create("gradvac", beta=1.5)
