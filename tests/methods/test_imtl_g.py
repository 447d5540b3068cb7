"""IMTL-G against the authors' closed form (the gradient half of IMTL; LibMTL ``IMTL.py``,
AvivNavon/nash-mtl ``IMTLG``) and torchjd 0.18's ``IMTLG`` (its pseudo-inverse form, which
extends the closed form to linearly dependent gradients).

Cases (``gradient_cases``): K = 2..6 random rows and norms six orders apart (closed form);
duplicate and opposed rows (rank-deficient: torchjd's form) and a zero row."""
import pytest
import torch
from gradient_cases import CASES, gradient_matrix

import gradsurgery as gs
from gradsurgery.methods.imtl_g import equal_projection_weights

D = torch.float64


def official_imtl_g(g: torch.Tensor) -> torch.Tensor:
    """The authors' weights, re-derived from LibMTL ``LibMTL/weighting/IMTL.py``
    (``IMTL.backward``, after the loss scaling) and nash-mtl ``methods/weight_methods.py``
    (``IMTLG.get_weighted_loss``): ``u_k = g_k / ||g_k||``, ``D = g_1 - g_{2..K}``,
    ``U = u_1 - u_{2..K}``, ``a_{2..K} = g_1 U^T (D U^T)^{-1}``, ``a_1 = 1 - sum a_{2..K}``."""
    u = g / g.norm(dim=1, keepdim=True)
    d, uu = g[0] - g[1:], u[0] - u[1:]
    rest = g[0] @ uu.T @ torch.linalg.inv(d @ uu.T)
    return torch.cat([(1 - rest.sum()).reshape(1), rest])


def ours(g: torch.Tensor) -> torch.Tensor:
    method = gs.methods.create("imtl_g")
    method.bind(g.shape[0], device=g.device, dtype=g.dtype, generator=torch.Generator())
    return method.weights(g @ g.T, torch.ones(g.shape[0], dtype=g.dtype))


@pytest.mark.parametrize("k,kind,seed", [c for c in CASES if c[1] in ("random", "scaled", "opposed")])
def test_equals_the_authors_closed_form(k, kind, seed):
    """Where the closed form exists (random, scaled and opposed rows: its ``D U^T`` is
    invertible); for opposed rows only ``lambda = 0`` solves the condition: ``g = 0``."""
    g = gradient_matrix(k, kind, seed)
    ref = official_imtl_g(g)
    # weights of order 1/||g_k||-ratios: compare the directions on the gradients' scale
    torch.testing.assert_close(ours(g) @ g, ref @ g, atol=1e-8 * float(g.norm(dim=1).max()), rtol=0)
    if kind == "opposed":
        assert float((ref @ g).norm()) < 1e-12 * float(g.norm(dim=1).max())
    else:
        torch.testing.assert_close(ours(g).sum(), torch.tensor(1.0, dtype=D))


@pytest.mark.parametrize("k,kind,seed", [c for c in CASES if c[1] != "opposed"])
def test_equals_torchjd(k, kind, seed):
    """torchjd's pseudo-inverse form where ``n`` is in the range of ``M``, duplicate and zero
    rows included (the authors' inverse is singular for duplicates and NaN for a zero row)."""
    from torchjd import aggregation as jd
    g = gradient_matrix(k, kind, seed)
    torch.testing.assert_close(ours(g) @ g, jd.IMTLG()(g), atol=1e-6 * float(g.norm(dim=1).max()), rtol=0)


def test_equal_projections_on_the_unit_gradients():
    g = gradient_matrix(5, "scaled", 3)
    d = ours(g) @ g
    projections = g @ d / g.norm(dim=1)
    torch.testing.assert_close(projections, projections.mean().expand(5), atol=1e-6 * float(projections.abs().max()),
                               rtol=0)


@pytest.mark.parametrize("factor", [1e-6, 1e6])
def test_float32_rank_deficient_gram_decides_as_float64(factor):
    """Three tasks in one dimension (a rank-1 Gram): in float32 the rounded Gram kept
    eigenvalues of rounding size that the pseudo-inverse inverted, so the update moved with
    the gradients' scale (0.61 at 1, 0.81 at 1e-6 against float64's 0.66; found by the
    float32 property suite). Cleaned at float32's precision it is float64's answer."""
    g64 = torch.tensor([[0.7813], [0.4882], [0.6529]], dtype=torch.float64)
    expected = equal_projection_weights(g64 @ g64.T) @ g64
    g32 = (g64 * factor).float()
    got = (equal_projection_weights(g32 @ g32.T) @ g32).double() / factor
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=0)
