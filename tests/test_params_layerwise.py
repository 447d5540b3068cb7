"""The layer-wise Gram of ``level="params"`` (``pipeline/params_level.py``): a linear
layer's Gram entries and combined gradient from its inputs and per-task output gradients
equal those of the Jacobian block, checked against per-task autograd on models mixing
linear layers (2-D and sequence inputs, with and without bias, reused), convolutions,
norms and embeddings; and every method at the parameter level gives the same step with
and without it."""
from __future__ import annotations

from contextlib import contextmanager

import pytest
import torch
from core_helpers import make, wrapped_step
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

import gradsurgery as gs
from gradsurgery.pipeline import params_level

D = torch.float64


@contextmanager
def layerwise(on: bool):
    """``on``: every recognised linear layer layer-wise, whatever the multiply-add count
    says; off: Jacobian blocks only."""
    with pytest.MonkeyPatch.context() as mp:
        if on:
            mp.setattr(params_level, "layerwise_cheaper", lambda *args: True)
        else:
            mp.setattr(params_level, "LAYERWISE", False)
        yield


@pytest.fixture
def every_layer():
    with layerwise(True):
        yield


class Mixed(nn.Module):
    """Embedding -> LayerNorm -> Linear (3-D input) -> tanh -> Linear (no bias) -> the same
    Linear again (reused: a Jacobian block), plus Conv2d -> Linear, summed."""

    def __init__(self):
        super().__init__()
        self.emb, self.norm = nn.Embedding(10, 6), nn.LayerNorm(6)
        self.up, self.down = nn.Linear(6, 9), nn.Linear(9, 6, bias=False)
        self.conv, self.mix = nn.Conv2d(2, 3, 3, padding=1), nn.Linear(48, 6)

    def forward(self, idx, img):
        h = self.down(torch.tanh(self.up(self.norm(self.emb(idx)))))  # B x T x 6
        h = self.down(torch.tanh(h @ torch.ones(6, 9, dtype=h.dtype)))   # down read twice
        return h.sum(1) + self.mix(self.conv(img).flatten(1))


def mixed_model():
    torch.manual_seed(0)
    model = Mixed().to(D)
    gen = torch.Generator().manual_seed(1)
    return model, (torch.randint(0, 10, (4, 3), generator=gen), torch.randn(4, 2, 4, 4, generator=gen, dtype=D))


def mlp_model():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(5, 8), nn.ReLU(), nn.Linear(8, 8, bias=False), nn.Tanh(), nn.Linear(8, 4)).to(D)
    return model, (torch.randn(6, 5, generator=torch.Generator().manual_seed(1), dtype=D),)


def reference_jacobian(model, inputs, grads):
    """``K x P`` by one plain backward per task: row ``k`` is the gradient of ``<G_k, z>``."""
    params = list(model.parameters())
    rows = []
    for g in grads:
        out = torch.autograd.grad((model(*inputs) * g).sum(), params, allow_unused=True)
        rows.append(torch.cat([(torch.zeros_like(p) if d is None else d).flatten() for p, d in zip(params, out)]))
    return torch.stack(rows)


@pytest.mark.parametrize("build,layers", [(mlp_model, 3), (mixed_model, 2)])
def test_gram_flat_and_combination_equal_per_task_autograd(every_layer, build, layers):
    model, inputs = build()
    k = 3
    z = model(*inputs)
    grads = torch.randn(k, *z.shape, generator=torch.Generator().manual_seed(2), dtype=D)
    jac = params_level.jacobian([z], list(model.parameters()), [grads], retain_graph=False)
    # the reused `down` is not layer-wise (its blocks come from autograd); `up`, `mix` (and the MLP's) are
    assert len(jac.layers) == layers
    ref = reference_jacobian(model, inputs, grads)
    gram = ref @ ref.T
    assert torch.allclose(jac.gram(), gram, rtol=1e-10, atol=1e-10 * gram.diagonal().max())
    assert torch.allclose(jac.flat(), ref, rtol=1e-10, atol=1e-12 * ref.abs().max())
    c = torch.tensor([0.5, -1.0, 2.0], dtype=D)
    jac.accumulate(coefficients=c)
    got = torch.cat([p.grad.flatten() for p in model.parameters()])
    assert torch.allclose(got, c @ ref, rtol=1e-10, atol=1e-12 * ref.abs().max())


@settings(max_examples=25, deadline=None)
@given(rows=st.integers(1, 9), d_in=st.integers(1, 7), d_out=st.integers(1, 7), k=st.integers(1, 5),
       bias=st.booleans(), seed=st.integers(0, 2**16))
def test_linear_layer_gram_is_the_blocks_gram(rows, d_in, d_out, k, bias, seed):
    gen = torch.Generator().manual_seed(seed)
    weight = torch.randn(d_out, d_in, generator=gen, dtype=D)
    layer = params_level.LinearLayer(weight=weight, bias=torch.zeros(d_out, dtype=D) if bias else None,
                                     inputs=torch.randn(rows, d_in, generator=gen, dtype=D),
                                     grads=torch.randn(k, rows, d_out, generator=gen, dtype=D))
    flat = torch.cat([b.reshape(k, -1) for _, b in layer.blocks()], 1)
    # the blocks themselves, from their definition: g_k^T a and the column sums of g_k
    assert torch.allclose(flat[:, :d_out * d_in], torch.einsum("kro,ri->koi", layer.grads, layer.inputs).reshape(k, -1))
    gram = flat @ flat.T
    assert torch.allclose(layer.gram(D), gram, rtol=1e-10, atol=1e-12 * (1 + gram.abs().max()))


def test_choice_by_multiply_adds():
    # the benchmark's 1024 x 1024 layer at batch 256: K(R d_out d_in) ~ 2.1e9 vs ~0.9e9 layer-wise
    assert params_level.layerwise_cheaper(8, 256, 1024, 1024, True)
    # its 64 -> 1024 input layer: the block (K R 64 1024 ~ 1.3e8) beats K R^2 d_out (~5.4e8)
    assert not params_level.layerwise_cheaper(8, 256, 64, 1024, True)
    # many rows (a long sequence) into a narrow layer: the block
    assert not params_level.layerwise_cheaper(8, 8192, 256, 256, True)


def _grads(model):
    return [p.grad.clone() for p in model.parameters()]


def _step(name, on, **opts):
    with layerwise(on):
        return _params_step(name, **opts)


def _params_step(name, **opts):
    model, x, ys = make(3, seed=1, batch=5)
    torch.manual_seed(3)
    opt = gs.MultiTaskOptimizer(torch.optim.SGD(model.parameters(), lr=0.1), name, num_tasks=3, rep_size=6,
                                level="params", **opts)
    wrapped_step(model, opt, x, ys, step=False)
    return _grads(model)


@pytest.mark.parametrize("name", [n for n in gs.methods.available() if "params" in gs.methods.get(n).levels])
def test_every_method_same_step_with_and_without_layerwise(name):
    want, got = _step(name, False), _step(name, True)
    for a, b in zip(got, want):
        assert torch.allclose(a, b, rtol=1e-9, atol=1e-12), name


def test_subset_of_shared_params():
    """GradNorm-style: the decision from the last shared layer (layer-wise), the whole
    backbone trained with ``c^T G``."""
    results = []
    for on in (False, True):
        model, x, ys = make(3, seed=4, batch=5)
        last = list(model.backbone[2].parameters())
        opt = gs.MultiTaskOptimizer(torch.optim.SGD(model.parameters(), lr=0.1), "upgrad", num_tasks=3,
                                    level="params", shared_params=last)
        with layerwise(on):
            wrapped_step(model, opt, x, ys, step=False)
        results.append((_grads(model), opt.stats["grad_norms"].clone()))
    (a, na), (b, nb) = results
    assert torch.allclose(na, nb, rtol=1e-10)
    for u, v in zip(a, b):
        assert torch.allclose(u, v, rtol=1e-9, atol=1e-12)


def test_autocast_bfloat16():
    """Under CPU autocast the weights reach the matmuls through casts; the layer-wise Gram
    (float32 from bfloat16 factors) matches the blocks' to bfloat16 rounding."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(16, 32), nn.ReLU(), nn.Linear(32, 16))
    x = torch.randn(12, 16)
    params = list(model.parameters())
    grams = []
    for on in (False, True):
        with layerwise(on), torch.autocast("cpu", dtype=torch.bfloat16):
            z = model(x)
            grads = torch.randn(4, *z.shape, generator=torch.Generator().manual_seed(5)).to(z.dtype)
            jac = params_level.jacobian([z], params, [grads], retain_graph=False)
        assert len(jac.layers) == 2 * on
        grams.append(jac.gram())
    scale = grams[0].diagonal().max()
    assert grams[1].dtype == torch.float32
    assert torch.allclose(grams[0], grams[1], atol=3e-2 * scale)
