"""Structural guards of the cost model: counted, not timed, so they hold on a noisy machine.

Per training step, for every registered method (the loop picks up new ones by itself):

- exactly one autograd pass goes through the backbone (a hook on the first layer's
  output counts the passes);
- at the representation level, every backbone parameter receives exactly one gradient,
  of its own shape and not batched over the tasks: no per-task gradient of the shared
  parameters is ever computed (hooks on the parameters see every gradient autograd
  produces for them, from ``backward``, ``autograd.grad`` or a vmapped ``autograd.grad``);
- every rotation's matrix exponential is evaluated at most once (``matrix_exp`` calls and
  the eigendecompositions an exponential can be computed from are counted matrix by
  matrix).

The first tests check that the instruments do catch what they guard against.
"""
from __future__ import annotations

import pytest
import torch
from torch import nn
from torch._C._functorch import is_batchedtensor, is_legacy_batchedtensor

import gradsurgery as gs
from gradsurgery.pipeline import rotation

K, D, BATCH, STEPS = 3, 6, 5, 3


def _model(d: int = D, k: int = K):
    torch.manual_seed(0)
    backbone = nn.Sequential(nn.Linear(4, 8), nn.Tanh(), nn.Linear(8, d))
    heads = nn.ModuleList([nn.Sequential(nn.Linear(d, 5), nn.Tanh(), nn.Linear(5, 1)) for _ in range(k)])
    x = torch.randn(BATCH, 4)
    targets = torch.randn(k, BATCH, 1)
    return backbone, heads, x, targets


def _batched(grad: torch.Tensor) -> bool:
    """Whether ``grad`` carries a batch dimension hidden by vmap (``torch.func.vmap`` or
    ``autograd.grad(..., is_grads_batched=True)``)."""
    return is_batchedtensor(grad) or is_legacy_batchedtensor(grad)


class Probe:
    """Counts, per step, the autograd passes through ``backbone`` (gradients reaching its
    first layer's output) and the gradients each backbone parameter receives."""

    def __init__(self, backbone: nn.Module):
        self.params = list(backbone.parameters())
        self.reset()
        first = next(m for m in backbone.modules() if list(m.parameters(recurse=False)))
        first.register_forward_hook(self._on_forward)
        for i, p in enumerate(self.params):
            p.register_hook(lambda g, i=i: self._on_param_grad(i, g))

    def reset(self):
        self.passes = 0
        self.batched_passes = 0
        self.param_grads = [[] for _ in self.params]

    def _on_forward(self, module, inputs, output):
        if output.requires_grad:
            output.register_hook(self._on_pass)

    def _on_pass(self, grad):
        self.passes += 1
        self.batched_passes += int(_batched(grad))

    def _on_param_grad(self, i, grad):
        self.param_grads[i].append((tuple(grad.shape), _batched(grad)))


class ExpmCounter:
    """Counts the matrix exponentials evaluated, matrix by matrix and by size (a
    ``K x m x m`` batch counts ``K``): calls of ``torch.matrix_exp``/``torch.linalg.matrix_exp``,
    of :func:`gradsurgery.pipeline.rotation.expm` (the rotations' own Taylor exponential) and of
    the eigendecompositions (``torch.linalg.eigh``/``eig``) an exponential can be
    evaluated from (``exp(X) = U e^L U^H``), whichever the rotations use."""

    def __init__(self, monkeypatch):
        self.counts: dict[int, int] = {}
        for owner, name in [(torch.linalg, "matrix_exp"), (torch, "matrix_exp"), (torch.Tensor, "matrix_exp"),
                            (torch.linalg, "eigh"), (torch.linalg, "eig"), (rotation, "expm")]:
            monkeypatch.setattr(owner, name, self._counting(getattr(owner, name)))

    def _counting(self, original):
        def counting(a, *args, **kwargs):
            n = a.shape[-1]
            self.counts[n] = self.counts.get(n, 0) + a.numel() // (n * n)
            return original(a, *args, **kwargs)
        return counting

    def reset(self):
        self.counts = {}


def _configs():
    """(method, level, rotation) for every registered method: its defaults at each level
    (rotation methods only at the representation level, where rotations apply), and every
    method composed with rotations (``rotation=True``) at the representation level."""
    out = []
    for name in gs.methods.available():
        rotation = bool(getattr(gs.methods.get(name), "rotation", False))
        levels = gs.methods.get(name).levels
        for level in levels:
            out.append(pytest.param(name, level, None, id=f"{name}-{level}"))
        if not rotation and "rep" in levels:
            out.append(pytest.param(name, "rep", True, id=f"{name}-rep-rotation"))
    return out


def _optimizer(name, level, rotation, backbone, heads):
    opts = {"num_tasks": K, "rep_size": D, "method_lr": 1e-3}
    opts["level"] = level
    if rotation is not None:
        opts["rotation"] = rotation
    base = torch.optim.Adam([*backbone.parameters(), *heads.parameters()], lr=1e-3)
    return gs.MultiTaskOptimizer(base, name, **opts)


@pytest.mark.parametrize("name,level,rotation", _configs())
def test_one_backbone_pass_and_at_most_one_exponential_per_rotation(name, level, rotation, monkeypatch):
    backbone, heads, x, targets = _model()
    probe = Probe(backbone)
    expm = ExpmCounter(monkeypatch)
    opt = _optimizer(name, level, rotation, backbone, heads)
    rotates = getattr(opt, "rotations", None) is not None
    for step in range(STEPS):
        probe.reset()
        expm.reset()
        opt.zero_grad()
        views = opt.fork(backbone(x))
        opt.backward([nn.functional.mse_loss(h(v), t) for h, v, t in zip(heads, views, targets)])
        opt.step()
        assert probe.passes == 1, f"step {step}: {probe.passes} autograd passes through the backbone"
        # at most one exponential of each task's m x m rotation, whatever computes it
        assert expm.counts.get(D, 0) <= (K if rotates else 0), f"step {step}: {expm.counts}"
        if rotates:
            assert expm.counts.get(D, 0) == K, f"step {step}: rotations not evaluated: {expm.counts}"
        if level == "rep":
            assert probe.batched_passes == 0
            for p, grads in zip(probe.params, probe.param_grads):
                # one gradient per parameter, of its own shape, never batched over the tasks
                assert grads == [(tuple(p.shape), False)], f"step {step}: {grads}"
        else:
            assert all(len(g) <= 1 for g in probe.param_grads), f"step {step}: {probe.param_grads}"


# -- the instruments catch what they guard against ----------------------------------------
def test_probe_counts_per_task_backward_passes():
    backbone, heads, x, targets = _model()
    probe = Probe(backbone)
    z = backbone(x)
    losses = [nn.functional.mse_loss(h(z), t) for h, t in zip(heads, targets)]
    for k, loss in enumerate(losses):  # the naive way: one pass per task
        torch.autograd.grad(loss, list(backbone.parameters()), retain_graph=k < K - 1)
    assert probe.passes == K
    assert all(len(g) == K for g in probe.param_grads)


def test_probe_sees_task_batched_gradients():
    backbone, heads, x, targets = _model()
    probe = Probe(backbone)
    z = backbone(x)
    seeds = torch.randn(K, *z.shape)
    torch.autograd.grad(z, list(backbone.parameters()), seeds, is_grads_batched=True)
    assert probe.passes == 1 and probe.batched_passes == 1
    assert all(g == [(tuple(p.shape), True)] for p, g in zip(probe.params, probe.param_grads))


def test_expm_counter_counts_matrices(monkeypatch):
    expm = ExpmCounter(monkeypatch)
    a = torch.randn(K, D, D)
    torch.linalg.matrix_exp(a)
    torch.matrix_exp(a[0])
    a[1].matrix_exp()
    torch.linalg.eigh(a[0] @ a[0].T)
    torch.linalg.eig(a[:2])
    rotation.expm(rotation.skew(a[:2]))  # the name the rotations call
    assert expm.counts == {D: K + 7}


def test_expm_counter_sees_rotation_evaluations(monkeypatch):
    """A rotation method that evaluated its rotations twice per step would be caught."""
    backbone, heads, x, targets = _model()
    expm = ExpmCounter(monkeypatch)
    opt = _optimizer("rotograd", "rep", None, backbone, heads)
    opt.rotations.matrices()
    opt.rotations.matrices()
    assert expm.counts == {D: 2 * K}
