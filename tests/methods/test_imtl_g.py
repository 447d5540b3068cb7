"""IMTL-G against the authors' closed form (the gradient half of IMTL; LibMTL ``IMTL.py``,
AvivNavon/nash-mtl ``IMTLG``) and torchjd 0.18's ``IMTLG`` (its pseudo-inverse form, which
extends the closed form to linearly dependent gradients).

Cases (``gradient_cases``): K = 2..6 random rows and norms six orders apart (closed form);
duplicate and opposed rows (rank-deficient: torchjd's form) and a zero row."""
import pytest
import torch
from gradient_cases import CASES, gradient_matrix

import gradsurgery as gs

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
