"""Trimmed mean against the definition of Yin et al. (2018) computed coordinate by
coordinate in plain Python, against torchjd 0.18's TrimmedMean, and end to end."""
import pytest
import torch
from core_helpers import backbone_grads_for, head_grads_plain, make, task_grads, wrapped_step
from gradient_cases import CASES, gradient_matrix, losses_for

import gradsurgery as gs


def reference_trimmed_mean(grads: torch.Tensor, t: int) -> torch.Tensor:
    """Yin et al., ICML 2018, Definition 2 (coordinate-wise trimmed mean): for each
    coordinate, drop the ``t`` smallest and ``t`` largest of the ``K`` values, average the rest."""
    flat = grads.reshape(grads.shape[0], -1)
    out = []
    for column in flat.T.tolist():
        kept = sorted(column)[t:len(column) - t]
        out.append(sum(kept) / len(kept))
    return torch.tensor(out, dtype=grads.dtype).view(grads.shape[1:])


def bound(k, **opts):
    method = gs.methods.create("trimmed_mean", **opts)
    method.bind(k, device=torch.device("cpu"), dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    return method


@pytest.mark.parametrize("k,kind,seed", CASES)
def test_equals_definition_and_torchjd(k, kind, seed):
    jd = pytest.importorskip("torchjd.aggregation")
    g = gradient_matrix(k, kind, seed)
    for t in range((k - 1) // 2 + 1):
        ours = bound(k, trim_number=t).combine(g, losses_for(k, seed), None)
        scale = float(g.abs().max())
        assert torch.allclose(ours, reference_trimmed_mean(g, t), rtol=0, atol=1e-14 * scale)
        assert torch.allclose(ours, jd.TrimmedMean(trim_number=t)(g), rtol=0, atol=1e-14 * scale)


def test_representation_shaped_gradients_and_float32():
    """K x batch x features at the representation level: every element is trimmed alone;
    float32 gradients come back float32."""
    g = torch.randn(5, 3, 4, generator=torch.Generator().manual_seed(0))
    out = bound(5, trim_number=2).combine(g, torch.ones(5), g[0])
    assert out.shape == (3, 4) and out.dtype == torch.float32
    assert torch.equal(out, g.median(0).values)  # K = 5, t = 2: the median
    assert torch.allclose(out, reference_trimmed_mean(g.double(), 2).float(), rtol=0, atol=1e-7)


def test_trimming_ignores_an_outlier_task():
    g = torch.tensor([[1.0, 2.0], [1.2, 1.8], [0.8, 2.2], [1e6, -1e6]], dtype=torch.float64)
    out = bound(4, trim_number=1).combine(g, torch.ones(4, dtype=g.dtype), None)
    assert torch.allclose(out, torch.tensor([1.1, 1.9], dtype=torch.float64), rtol=0, atol=1e-12)


def test_too_few_tasks_and_bad_options_raise():
    with pytest.raises(ValueError, match="at least 3 tasks"):
        bound(2)
    with pytest.raises(ValueError, match="at least 5 tasks"):
        bound(4, trim_number=2)
    method = bound(3)
    g = torch.randn(2, 4, dtype=torch.float64)
    with pytest.raises(ValueError, match="at least 3 tasks"):  # a step where one task is absent
        method.combine(g, torch.ones(2, dtype=g.dtype), None)
    for bad in (-1, 1.5, True, "1"):
        with pytest.raises(ValueError, match="trim_number"):
            gs.methods.create("trimmed_mean", trim_number=bad)


def test_end_to_end_with_defaults():
    model, x, ys = make(3, seed=4, rep_shape=(2, 3))
    opt = gs.MultiTaskOptimizer(torch.optim.SGD(model.parameters(), lr=0.1), "trimmed_mean", num_tasks=3)
    wrapped_step(model, opt, x, ys, step=False)
    g = task_grads(model, x, ys)  # K x (batch * features): trimming is element-wise either way
    expected = reference_trimmed_mean(g, 1)
    for p, e in zip(model.backbone.parameters(), backbone_grads_for(model, x, expected)):
        assert torch.allclose(p.grad, e, rtol=0, atol=1e-12 * float(e.abs().max()) + 1e-15)
    for p, e in zip(model.heads.parameters(), head_grads_plain(model, x, ys)):  # heads: unweighted
        assert torch.allclose(p.grad, e, rtol=1e-10, atol=1e-12)
