"""``sum`` and ``mean`` equal plain ``sum(L).backward()`` / ``(sum(L) / K).backward()`` on
every parameter, for random models, K in 1..6, several dtypes and shapes of ``z``."""
import copy

import pytest
import torch
from core_helpers import make
from hypothesis import given, settings
from hypothesis import strategies as st

import gradsurgery as gs

#: Tolerance relative to the largest gradient entry: float64/float32 rounding of the
#: same sums in another order; float16/bfloat16: the wrapper adds the task gradients in
#: float32 and rounds once, autograd accumulates in the low precision (a few ulps).
TOLERANCE = {torch.float64: 1e-12, torch.float32: 2e-6, torch.float16: 4e-3, torch.bfloat16: 3e-2}


def _plain_grads(model, x, ys, method):
    model.zero_grad(set_to_none=True)
    z = model.rep(x)
    losses = model.losses([z] * len(model.heads), ys)
    total = sum(losses) if method == "sum" else sum(losses) / len(losses)
    total.backward()
    return [p.grad.clone() for p in model.parameters()]


def _wrapped_grads(model, x, ys, method):
    opt = gs.MultiTaskOptimizer(torch.optim.SGD(model.parameters(), lr=0.1), method, num_tasks=len(model.heads))
    opt.zero_grad()
    views = opt.fork(model.rep(x))
    opt.backward(model.losses(views, ys))
    return [p.grad.clone() for p in model.parameters()]


def _check(method, k, dtype, rep_shape, seed):
    model, x, ys = make(k, seed=seed, dtype=dtype, rep_shape=rep_shape, batch=3)
    expected = _plain_grads(copy.deepcopy(model), x, ys, method)
    got = _wrapped_grads(model, x, ys, method)
    scale = max(g.abs().max().item() for g in expected)
    assert scale > 0
    for e, g in zip(expected, got):
        assert g.dtype == dtype
        torch.testing.assert_close(g.double(), e.double(), rtol=0, atol=TOLERANCE[dtype] * scale)


@settings(max_examples=30, deadline=None)
@given(method=st.sampled_from(["sum", "mean"]), k=st.integers(1, 6),
       dtype=st.sampled_from([torch.float32, torch.float64]),
       rep_shape=st.sampled_from([(6,), (2, 3, 2), (1, 2, 2)]), seed=st.integers(0, 2**16))
def test_sum_mean_equal_plain_backward(method, k, dtype, rep_shape, seed):
    _check(method, k, dtype, rep_shape, seed)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("method", ["sum", "mean"])
def test_sum_mean_low_precision(method, dtype):
    try:
        torch.nn.functional.linear(torch.ones(1, 2, dtype=dtype), torch.ones(2, 2, dtype=dtype))
    except RuntimeError as err:  # pragma: no cover - depends on the CPU build
        pytest.skip(f"{dtype} matmul not supported on this CPU build: {err}")
    for k, rep_shape in [(3, (6,)), (5, (2, 3, 2))]:
        _check(method, k, dtype, rep_shape, seed=k)


def test_mean_weights_in_stats_are_loss_weights():
    model, x, ys = make(4, seed=1)
    opt = gs.MultiTaskOptimizer(torch.optim.SGD(model.parameters(), lr=0.1), "mean", num_tasks=4)
    views = opt.fork(model.rep(x))
    losses = model.losses(views, ys)
    opt.backward(losses)
    torch.testing.assert_close(opt.stats["losses"], torch.stack(losses).detach())
    torch.testing.assert_close(opt.stats["weights"], torch.full((4,), 0.25, dtype=torch.float64))
