"""GradDrop against the authors' algorithm (paper Alg. 1, LibMTL ``GradDrop.py``) and torchjd.

Cases: K = 2..6 task gradients of a batched representation with activations of both signs
(and exact zeros, as after a ReLU), zero rows, duplicate and opposed rows; the draws ``U``
are either the method's own (same seed) or left free (then the test checks what holds for
every draw, and the frequency of each choice)."""
import pytest
import torch

import gradsurgery as gs

D = torch.float64


def official_graddrop(grads: torch.Tensor, rep: torch.Tensor | None, u: torch.Tensor,
                      leak: float = 0.0) -> torch.Tensor:
    """The authors' update, re-derived from LibMTL ``LibMTL/weighting/GradDrop.py``
    (``GradDrop.backward``; paper Alg. 1): with the per-task gradients ``grads`` (``K x B x
    ...``) of the representation ``rep`` (``B x ...``),
    ``S_k = sum_batch(grads_k * sgn(rep))``, ``P = (1 + sum_k S_k / (sum_k |S_k| + 1e-7)) / 2``,
    ``M_k = [P > U][S_k > 0] + [P < U][S_k < 0]`` broadcast over the batch and the update is
    ``sum_k grads_k (leak + (1 - leak) M_k)``. ``rep=None`` (a K x P matrix, no activation):
    ``S = grads`` element by element, as in Cranial-XIX/CAGrad's parameter-level ``graddrop``."""
    if rep is None:
        s = grads
    else:
        s = (grads * rep.sign()).sum(1)
    p = 0.5 * (1 + s.sum(0) / (s.abs().sum(0) + 1e-7))
    mask = ((p > u) & (s > 0)) | ((p < u) & (s < 0))
    if rep is not None:
        mask = mask.unsqueeze(1)
    return (grads * (leak + (1 - leak) * mask.to(grads.dtype))).sum(0)


def create(k: int, seed: int = 7, **options):
    method = gs.methods.create("graddrop", **options)
    method.bind(k, device=torch.device("cpu"), dtype=D, generator=torch.Generator().manual_seed(seed))
    return method


def batch(k: int, seed: int, case: str = "random", b: int = 4, f: int = 5):
    gen = torch.Generator().manual_seed(seed)
    grads = torch.randn(k, b, f, generator=gen, dtype=D)
    rep = torch.randn(b, f, generator=gen, dtype=D)
    rep[torch.rand(b, f, generator=gen) < 0.3] = 0  # ReLU zeros: sgn = 0
    if case == "zero":
        grads[seed % k] = 0
    elif case == "duplicate":
        grads[1] = grads[0]
    elif case == "opposed":
        grads[1] = -grads[0]
    return grads, rep


@pytest.mark.parametrize("k", range(2, 7))
@pytest.mark.parametrize("case", ["random", "zero", "duplicate", "opposed"])
@pytest.mark.parametrize("leak", [0.0, 0.3])
def test_equals_the_authors_update_with_the_same_draws(k, case, leak):
    """``U`` is one uniform per element of ``P`` (per feature), drawn from the method's
    generator in the gradients' dtype."""
    for seed in (0, 1):
        grads, rep = batch(k, seed, case)
        method = create(k, **({} if leak == 0 else {"leak": leak}))
        got = method.combine(grads, torch.ones(k, dtype=D), rep)
        u = torch.rand(grads.shape[2:], generator=torch.Generator().manual_seed(7), dtype=D)
        torch.testing.assert_close(got, official_graddrop(grads, rep, u, leak), atol=1e-12, rtol=0)


@pytest.mark.parametrize("k", range(2, 7))
def test_leak_zero_keeps_every_gradient_whose_signed_batch_sum_agrees_across_tasks(k):
    """For any draw: where every ``S_k = sum_batch(g_k sgn(A))`` has one sign, the update is the
    plain sum over tasks; elsewhere it is the sum over the tasks of one sign of ``S_k``."""
    grads, rep = batch(k, seed=k, b=3, f=64)
    rep[:, :20] = torch.where(rep[:, :20] == 0, 1.0, rep[:, :20])
    grads[:, :, :20] = grads[:, :, :20].abs() * rep[:, :20].sign()  # S_k > 0 for all k there
    s = (grads * rep.sign()).sum(1)
    agree = (s > 0).all(0) | (s < 0).all(0)
    assert agree[:20].all() and not agree.all()
    for seed in range(5):
        got = create(k, seed=seed).combine(grads, torch.ones(k, dtype=D), rep)
        torch.testing.assert_close(got[:, agree], grads.sum(0)[:, agree], atol=1e-12, rtol=0)
        positive = (grads * (s > 0).unsqueeze(1)).sum(0)
        negative = (grads * (s < 0).unsqueeze(1)).sum(0)
        chose_positive = (got - positive).abs().amax(0) < 1e-12
        chose_negative = (got - negative).abs().amax(0) < 1e-12
        assert (chose_positive | chose_negative).all()


def test_sign_of_the_activations_decides_the_purity():
    """Flipping the sign of the activations where a gradient is positive flips which sign
    is kept (without ``sgn(A)`` the choice would not change)."""
    grads = torch.tensor([[[1.0], [1.0]], [[-0.5], [-0.5]]], dtype=D)  # K=2, B=2, 1 feature
    positive = torch.ones(2, 1, dtype=D)
    for seed in range(20):  # P = 2/3 (S = (2, -1)) or 1/3 (S = (-2, 1))
        kept = create(2, seed=seed).combine(grads, torch.ones(2, dtype=D), positive)
        flipped = create(2, seed=seed).combine(grads, torch.ones(2, dtype=D), -positive)
        u = float(torch.rand(1, generator=torch.Generator().manual_seed(seed), dtype=D))
        torch.testing.assert_close(kept, grads[0] if u < 2 / 3 else grads[1])
        torch.testing.assert_close(flipped, grads[1] if u < 1 / 3 else grads[0])


def test_frequency_of_keeping_the_positive_sign_is_the_purity():
    """Over many draws, the positive side is kept with probability ``P`` (binomial bound)."""
    grads = torch.tensor([[[2.0]], [[-1.0]], [[0.5]]], dtype=D)  # S = (2, -1, 0.5): P = 0.5 (1 + 1.5 / 3.5)
    p = 0.5 * (1 + 1.5 / 3.5)
    method = create(3, seed=11)
    n = 4000
    positive = sum(float(method.combine(grads, torch.ones(3, dtype=D), torch.ones(1, 1, dtype=D))) > 0
                   for _ in range(n))
    assert abs(positive / n - p) < 5 * (p * (1 - p) / n) ** 0.5


def test_without_representation_values_it_is_element_wise_as_torchjd():
    """At ``level="params"`` (``rep=None``) every parameter element is its own unit and
    ``sgn(A) = 1``: torchjd 0.18's ``GradDrop`` with the same draws."""
    from torchjd import aggregation as jd
    for k in range(2, 7):
        g = torch.randn(k, 30, generator=torch.Generator().manual_seed(k), dtype=D)
        got = create(k, seed=k).combine(g, torch.ones(k, dtype=D), None)
        torch.manual_seed(k)
        torch.testing.assert_close(got, jd.GradDrop()(g), atol=1e-12, rtol=0)
        u = torch.rand(30, generator=torch.Generator().manual_seed(k), dtype=D)
        torch.testing.assert_close(got, official_graddrop(g, None, u), atol=1e-12, rtol=0)


def test_all_zero_gradients_give_zero():
    grads, rep = batch(3, 0)
    out = create(3).combine(torch.zeros_like(grads), torch.ones(3, dtype=D), rep)
    assert torch.equal(out, torch.zeros_like(rep))


def test_bad_options_raise():
    for bad in (-0.1, 1.5):
        with pytest.raises(ValueError, match="leak"):
            gs.methods.create("graddrop", leak=bad)


def test_through_the_optimizer_the_representation_values_decide():
    """End to end: the pipeline hands GradDrop ``z``'s values; the gradient reaching ``z`` is,
    per feature, the sum over tasks where every ``S_k = sum_b sgn(z_b) g_k,b`` has one sign,
    the sum over one sign's tasks elsewhere (checked against plain autograd), and 0 where
    ``z = 0`` on the whole batch."""
    from core_helpers import make
    model, x, ys = make(3, seed=4, rep_shape=(16,), batch=6)
    with torch.no_grad():  # activations of both signs and some exact zeros
        model.backbone[2].bias[:4] = 0
        model.backbone[2].weight[:4] = 0
    opt = gs.MultiTaskOptimizer(torch.optim.SGD(model.parameters(), lr=0.1), "graddrop", num_tasks=3)
    z_values = model.rep(x).detach()
    per_task = []
    for k in range(3):
        zk = z_values.clone().requires_grad_()
        per_task.append(torch.autograd.grad(model.losses([zk] * 3, ys)[k], zk)[0])
    grads = torch.stack(per_task)
    s = (grads * z_values.sign()).sum(1)
    agree = (s > 0).all(0) | (s < 0).all(0)
    seen = []
    opt.zero_grad()
    z = model.rep(x)
    z.register_hook(lambda g: seen.append(g.detach().clone()))
    opt.backward(model.losses(opt.fork(z), ys))
    got = seen[0]
    torch.testing.assert_close(got[:, agree], grads.sum(0)[:, agree], atol=1e-12, rtol=0)
    positive = (grads * (s > 0).unsqueeze(1)).sum(0)
    negative = (grads * (s < 0).unsqueeze(1)).sum(0)
    assert (((got - positive).abs().amax(0) < 1e-12) | ((got - negative).abs().amax(0) < 1e-12)).all()
    assert agree.any() and not agree.all()
    # features where z = 0 on the whole batch: S_k = 0, P = 1/2 and no sign is kept (as LibMTL)
    assert torch.equal(got[:, :4], torch.zeros_like(got[:, :4])) and grads[:, :, :4].abs().sum() > 0
