"""ExcessMTL (He et al., ICML 2024): differential tests against the official update,
re-derived here, and against torchjd 0.18's ``ExcessMTLWeighting``."""
from __future__ import annotations

import io

import pytest
import torch
from core_helpers import head_grads_plain, make, wrapped_step
from gradient_cases import CASES, PROPERTY, gradient_matrix, gradient_sequences
from hypothesis import given
from hypothesis import strategies as st

import gradsurgery as gs

D = torch.float64


def reference_excess_mtl(grads_seq: list[torch.Tensor], robust_step_size: float) -> list[torch.Tensor]:
    """The loss weights after each step, re-derived from yifei-he/ExcessMTL
    ``LibMTL/LibMTL/weighting/ExcessMTL.py``, ``ExcessMTL.backward`` (identical in LibMTL 1.1.5
    ``LibMTL/weighting/ExcessMTL.py``): an AdaGrad accumulator ``S += g**2``, the excess
    ``w_k = sum g_k**2 / sqrt(S_k + 1e-7)``; the first step records ``w`` as the baseline and
    keeps the weights (ones); later steps multiply the weights by ``exp(eta * w / baseline)``
    and rescale them to sum to K. Written literally (no log-space trick)."""
    k = grads_seq[0].shape[0]
    weight = torch.ones(k, dtype=D)
    acc = None
    initial = None
    out = []
    for g in grads_seq:
        g = g.to(D)
        acc = torch.zeros_like(g) if acc is None else acc
        w = torch.zeros(k, dtype=D)
        for i in range(k):
            acc[i] += g[i] ** 2
            w[i] = (g[i] * (1 / torch.sqrt(acc[i] + 1e-7))) @ g[i]
        if initial is None:
            initial = w
        else:
            weight = weight * torch.exp((w / initial) * robust_step_size)
            weight = weight / weight.sum() * k
        out.append(weight.clone())
    return out


def steps(grads_seq, rep=False, **opts):
    """Runs ``excess_mtl`` on the sequence as the pipeline does (the task gradients it receives
    are those of the losses weighted by its ``loss_weights``); returns the method and its
    combined gradients."""
    k = grads_seq[0].shape[0]
    method = gs.methods.create("excess_mtl", **opts)
    method.bind(k, device=torch.device("cpu"), dtype=D, generator=torch.Generator().manual_seed(0))
    losses = torch.ones(k, dtype=D)
    outs = []
    for g in grads_seq:
        w = method.loss_weights(losses)
        weighted = g * w.view(k, *[1] * (g.dim() - 1))
        outs.append(method.combine(weighted, losses, torch.zeros(g.shape[1:], dtype=D) if rep else None))
    return method, outs


def sequence(k, kind, seed, n_steps=4, n=11):
    """``n_steps`` gradient matrices of the same kind (rows drift from step to step)."""
    return [gradient_matrix(k, kind, seed + 10 * t, n=n) for t in range(n_steps)]


@pytest.mark.parametrize("k,kind,seed", CASES)
def test_equals_official_update(k, kind, seed):
    seq = sequence(k, kind, seed)
    if kind == "zero":  # the official code divides by a zero baseline (nan); see test_zero_baseline
        for g in seq:
            g[k - 1] += 0.1
    expected = reference_excess_mtl(seq, robust_step_size=0.5)
    method, outs = steps(seq, robust_step_size=0.5)
    for g, out, w in zip(seq, outs, expected):
        scale = float(w.abs().max() * g.abs().max())
        torch.testing.assert_close(out, w @ g, rtol=0, atol=1e-9 * scale)
    torch.testing.assert_close(method.state_dict()["weights"], expected[-1], rtol=1e-9, atol=1e-12)


def test_default_step_size_is_the_authors_published_run():
    """yifei-he/ExcessMTL ``README.md``'s command runs ``--robust_step_size 1`` (the argparse
    default in ``LibMTL/LibMTL/config.py`` is 1e-2): the official update at step size 1, with
    the method's defaults."""
    seq = sequence(3, "random", 7, n_steps=6)
    expected = reference_excess_mtl(seq, robust_step_size=1.0)
    method, outs = steps(seq)
    for g, out, w in zip(seq, outs, expected):
        torch.testing.assert_close(out, w @ g, rtol=0, atol=1e-9 * float(w.abs().max() * g.abs().max()))
    assert float((expected[-1] - 1).abs().max()) > 0.05  # the weights moved: not the 1e-2 regime


@pytest.mark.parametrize("k", range(2, 7))
def test_representation_level_sums_the_batch(k):
    """At the representation level the AdaGrad statistics are taken on the batch-summed
    gradients (LibMTL's rep_grad convention: features persist across batches, samples do not);
    the combined gradient keeps the per-sample shape."""
    gen = torch.Generator().manual_seed(k)
    seq = [torch.randn(k, 5, 3, generator=gen, dtype=D) for _ in range(3)]
    expected = reference_excess_mtl([g.sum(1) for g in seq], robust_step_size=0.3)
    _, outs = steps(seq, rep=True, robust_step_size=0.3)
    for g, out, w in zip(seq, outs, expected):
        assert out.shape == g.shape[1:]
        torch.testing.assert_close(out, torch.einsum("k,kbf->bf", w, g), rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("k,warmup", [(2, 1), (3, 2), (5, 3), (6, 1)])
def test_equals_torchjd_with_warmup(k, warmup):
    """torchjd 0.18 ``ExcessMTLWeighting(robust_step_size, n_warmup_steps=n)`` for ``n >= 1``:
    uniform weights during ``n`` calls, then the baseline is their mean excess and every call
    multiplies by ``exp(eta w / (baseline + 1e-7))``; torchjd's weights sum to 1, ours to K."""
    jd = pytest.importorskip("torchjd.aggregation")
    gen = torch.Generator().manual_seed(k)
    seq = [10 * torch.randn(k, 9, generator=gen, dtype=D) for _ in range(warmup + 4)]
    ref = jd.ExcessMTLWeighting(robust_step_size=0.7, n_warmup_steps=warmup)
    method, outs = steps(seq, robust_step_size=0.7, n_warmup_steps=warmup)
    for g, out in zip(seq, outs):
        w = ref(g)
        torch.testing.assert_close(out, k * w @ g, rtol=1e-6, atol=1e-9 * float(g.abs().max()))


def test_zero_baseline_is_recorded_late_and_stays_finite():
    """A task whose first gradients are zero (absent from the first batches) gets its
    baseline at its first non-zero excess; until then its weight is not updated. The
    official code divides by the zero baseline (inf, then nan)."""
    gen = torch.Generator().manual_seed(3)
    seq = [torch.randn(3, 7, generator=gen, dtype=D) for _ in range(5)]
    seq[0][2] = 0
    seq[1][2] = 0
    method, outs = steps(seq, robust_step_size=0.5)
    assert all(torch.isfinite(o).all() for o in outs)
    # task 2's baseline is its excess at step 3 (index 2): afterwards it follows the official
    # update of a run that starts there, for its log-weight increments.
    acc = sum(g[2] ** 2 for g in seq[:3])
    base = float((seq[2][2] ** 2 / (acc + 1e-7).sqrt()).sum())
    state = method.state_dict()
    assert state["baseline"][2].item() == pytest.approx(base, rel=1e-12)
    assert torch.isclose(state["weights"].sum(), torch.tensor(3.0, dtype=D))


@pytest.mark.parametrize("k", [2, 4])
def test_all_zero_gradients_are_finite(k):
    seq = [torch.zeros(k, 6, dtype=D) for _ in range(3)]
    method, outs = steps(seq)
    assert all(torch.equal(o, torch.zeros(6, dtype=D)) for o in outs)
    torch.testing.assert_close(method.state_dict()["weights"], torch.ones(k, dtype=D))


def test_huge_excess_saturates_instead_of_overflowing():
    """The official ``w *= exp(eta r)`` overflows for a large ratio ``r``; the log-space form
    (the same update) saturates to one task."""
    g1 = torch.tensor([[1e-6, 0.0], [0.0, 1.0]], dtype=D)
    g2 = torch.tensor([[1e3, 0.0], [0.0, 1.0]], dtype=D)
    method, outs = steps([g1, g2, g2], robust_step_size=1.0)
    w = method.state_dict()["weights"]
    assert torch.isfinite(w).all() and w[0] == pytest.approx(2.0) and all(torch.isfinite(o).all() for o in outs)


def test_resume_is_bit_exact():
    gen = torch.Generator().manual_seed(7)
    seq = [torch.randn(3, 2, 4, generator=gen, dtype=torch.float32) for _ in range(6)]
    losses = torch.ones(3)
    a = gs.methods.create("excess_mtl", robust_step_size=0.2, n_warmup_steps=2)
    a.bind(3, device=torch.device("cpu"), dtype=torch.float32, generator=torch.Generator().manual_seed(0))
    for g in seq[:3]:
        a.combine(g, losses, torch.zeros(2, 4))
    buf = io.BytesIO()
    torch.save(a.state_dict(), buf)
    buf.seek(0)
    b = gs.methods.create("excess_mtl", robust_step_size=0.2, n_warmup_steps=2)
    b.bind(3, device=torch.device("cpu"), dtype=torch.float32, generator=torch.Generator().manual_seed(0))
    b.load_state_dict(torch.load(buf))  # default weights_only=True
    for g in seq[3:]:
        assert torch.equal(a.combine(g, losses, torch.zeros(2, 4)), b.combine(g, losses, torch.zeros(2, 4)))


@pytest.mark.parametrize("opts,match", [({"robust_step_size": 0.0}, "robust_step_size"),
                                        ({"robust_step_size": float("nan")}, "robust_step_size"),
                                        ({"n_warmup_steps": 0}, "n_warmup_steps"),
                                        ({"n_warmup_steps": 1.5}, "n_warmup_steps")])
def test_bad_options_raise(opts, match):
    with pytest.raises(ValueError, match=match):
        gs.methods.create("excess_mtl", **opts)


def test_feature_shape_change_raises():
    method, _ = steps([torch.randn(2, 4, 3, dtype=D)], rep=True)
    with pytest.raises(ValueError, match="features"):
        method.combine(torch.randn(2, 4, 5, dtype=D), torch.ones(2, dtype=D), torch.zeros(4, 5, dtype=D))


def test_end_to_end_in_the_users_loop():
    """Through ``MultiTaskOptimizer`` (representation level), three backward calls: the
    backbone's last bias (the batch-summed ``dL/dz``, LibMTL's rep_grad) gets ``sum_k w_k g_k``
    with the official weights, each head ``w_k dL_k`` with the weights one step behind."""
    model, x, ys = make(3, seed=6, batch=5)
    batches = [(x, ys), (x.flip(0), 0.3 * ys.flip(1)), (x, 2 * ys)]
    bias = model.backbone[-1].bias
    rows = []
    for xb, yb in batches:
        z = model.rep(xb)
        losses = model.losses([z] * 3, yb)
        rows.append(torch.stack([torch.autograd.grad(l, bias, retain_graph=True)[0] for l in losses]))
    expected = reference_excess_mtl(rows, robust_step_size=0.5)
    opt = gs.MultiTaskOptimizer(torch.optim.SGD(model.parameters(), lr=0.1), "excess_mtl", num_tasks=3,
                                robust_step_size=0.5)
    previous = torch.ones(3, dtype=D)
    for g, w, (xb, yb) in zip(rows, expected, batches):
        wrapped_step(model, opt, xb, yb, step=False)
        torch.testing.assert_close(bias.grad, w @ g, rtol=1e-10, atol=1e-14)
        want = head_grads_plain(model, xb, yb, weights=list(previous))
        for got, ref in zip([p.grad for p in model.heads.parameters()], want):
            torch.testing.assert_close(got, ref, rtol=1e-10, atol=1e-14)
        previous = w




@PROPERTY
@given(seq=gradient_sequences((3, 2)), seed=st.integers(0, 1000))
def test_finite_weights_sum_to_k_and_permutation_equivariant(seq, seed):
    """Finite on degenerate and extreme inputs, weights positive summing to K; permuting the
    tasks permutes the weights (the update itself is permutation-invariant)."""
    k = seq[0].shape[0]
    method, outs = steps(seq, rep=True, robust_step_size=0.5)
    w = method.state_dict()["weights"]
    assert all(torch.isfinite(o).all() for o in outs) and (w >= 0).all()
    assert abs(float(w.sum()) - k) <= 1e-12 * k
    perm = torch.randperm(k, generator=torch.Generator().manual_seed(seed))
    method_p, outs_p = steps([g[perm] for g in seq], rep=True, robust_step_size=0.5)
    torch.testing.assert_close(method_p.state_dict()["weights"], w[perm], rtol=1e-9, atol=1e-12 * k)
    size = max(float(g.abs().max()) for g in seq) * k
    torch.testing.assert_close(outs_p[-1], outs[-1], rtol=0, atol=1e-9 * size + 1e-300)
