"""FAMO against the authors' code (Cranial-XIX/FAMO, ``methods/weight_methods.py``,
``FAMO.get_weighted_loss`` and ``FAMO.update``; the runs' ``gamma=1e-3`` from
``experiments/{nyuv2,celeba,quantum_chemistry}/run.sh``, ``w_lr=0.025`` from
``--method-params-lr``), re-derived, over several steps for K = 2..6. The authors' ``FAMO``
inherits ``WeightMethod.backward`` (``methods/weight_methods.py``), which runs
``clip_grad_norm_(shared_parameters, max_norm=1.0)`` before ``loss.backward()``; their trainers
call it right after ``optimizer.zero_grad()`` (``experiments/nyuv2/trainer.py``), so the clip
sees zeroed gradients and changes nothing: the reference reproduces that order, and our
unclipped step equals it on gradients far above norm 1."""
from __future__ import annotations

import pytest
import torch
from core_helpers import make, wrapped_step

import gradsurgery as gs

D = torch.float64


class AuthorsFAMO:
    """``w = 0``; weighted loss ``sum_k z_k log(D_k) / c``, ``z = softmax(w)``,
    ``D = L - min_losses + 1e-8``, ``c = sum_k z_k / D_k`` (detached); after the model's step
    ``delta = log D_prev - log D_new``, ``w.grad = J_softmax(w)^T delta``, Adam(w_lr, weight
    decay gamma)."""

    def __init__(self, k: int, w_lr: float = 0.025, gamma: float = 1e-3):
        self.w = torch.zeros(k, dtype=D, requires_grad=True)
        self.opt = torch.optim.Adam([self.w], lr=w_lr, weight_decay=gamma)

    def weighted_loss(self, losses: torch.Tensor) -> torch.Tensor:
        self.prev = losses.detach()
        z = torch.softmax(self.w, -1)
        d = losses + 1e-8
        c = (z / d).sum().detach()
        return (d.log() * z / c).sum()

    def update(self, new: torch.Tensor) -> None:
        delta = (self.prev + 1e-8).log() - (new + 1e-8).log()
        with torch.enable_grad():
            (grad,) = torch.autograd.grad(torch.softmax(self.w, -1), self.w, grad_outputs=delta)
        self.opt.zero_grad()
        self.w.grad = grad
        self.opt.step()


def run_both(k: int, steps: int, scale: float = 3.0, **options):
    """Our optimizer and the authors' loop side by side; returns both models, ``opt``, the
    reference and the largest shared-gradient norm the reference's step used."""
    model, x, _ = make(k, seed=k)
    ref_model, _, _ = make(k, seed=k)
    data = torch.Generator().manual_seed(k)
    batches = [scale * torch.randn(k, 4, generator=data, dtype=D) for _ in range(steps)]
    largest = 0.0
    opt = gs.MultiTaskOptimizer(torch.optim.SGD(model.parameters(), lr=0.05), "famo", num_tasks=k, **options)
    ref = AuthorsFAMO(k)
    ref_opt = torch.optim.SGD(ref_model.parameters(), lr=0.05)
    for ys in batches:
        wrapped_step(model, opt, x, ys, step=False)
        opt.step()
        ref_opt.zero_grad(set_to_none=False)  # the trainer; zeros, as in the torch of their runs
        # the reference's heads and backbone both get the gradient of the weighted loss
        loss = ref.weighted_loss(torch.stack(ref_model.losses([ref_model.rep(x)] * k, ys)))
        torch.nn.utils.clip_grad_norm_(list(ref_model.backbone.parameters()), 1.0)  # before backward
        loss.backward()
        largest = max(largest, float(torch.cat([p.grad.flatten() for p in ref_model.backbone.parameters()]).norm()))
        ref_opt.step()
        with torch.no_grad():
            opt.observe(model.losses(opt.fork(model.rep(x)), ys))
            ref.update(torch.stack(ref_model.losses([ref_model.rep(x)] * k, ys)))
    return model, ref_model, opt, ref, largest


@pytest.mark.parametrize("k", range(2, 7))
def test_equals_authors_code_over_steps_with_defaults(k):
    model, ref_model, opt, ref, _ = run_both(k, 4)
    torch.testing.assert_close(opt.method.logits.detach(), ref.w.detach(), rtol=1e-9, atol=1e-12)
    for p, q in zip(model.parameters(), ref_model.parameters()):
        torch.testing.assert_close(p, q, rtol=1e-9, atol=1e-12)


@pytest.mark.parametrize("k", [2, 4])
def test_authors_clip_changes_nothing_and_ours_does_not_clip(k):
    """Shared gradients far above the authors' ``max_norm = 1``: had their clip acted, the
    steps would differ; the parameters agree to rounding."""
    model, ref_model, _, _, largest = run_both(k, 3, scale=300.0)
    assert largest > 10.0
    for p, q in zip(model.parameters(), ref_model.parameters()):
        torch.testing.assert_close(p, q, rtol=1e-9, atol=1e-12)


def test_defaults_are_the_runs():
    method = gs.methods.create("famo")
    assert (method.w_lr, method.gamma) == (0.025, 1e-3)


def test_observe_needs_a_step_and_bad_options_raise():
    model, x, ys = make(2)
    opt = gs.MultiTaskOptimizer(torch.optim.SGD(model.parameters(), lr=0.1), "famo", num_tasks=2)
    wrapped_step(model, opt, x, ys)
    opt.observe([1.0, 1.0])
    with pytest.raises(RuntimeError, match="after a step"):
        opt.observe([1.0, 1.0])
    for bad in ({"w_lr": 0.0}, {"gamma": -1.0}):
        with pytest.raises(ValueError):
            gs.methods.create("famo", **bad)
