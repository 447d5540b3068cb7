"""Property checks every method must pass: :func:`check_method` runs them on a method,
registered or not, and the project's own tests run them over every registered method.

A method's *update* is what the backbone receives for ``K`` task gradients ``G`` (a
``K x N`` matrix) and losses ``L``, computed as the pipeline computes it: the rows of ``G``
weighted by ``w = loss_weights(L)`` (when not ``None``), then the method's own
:meth:`~gradsurgery.methods.Method.decide`:

* :class:`~gradsurgery.methods.GramWeighting`: ``d = c^T G_w`` with ``c = weights(G_w G_w^T, L)``;
* :class:`~gradsurgery.methods.LossWeighting`: ``d = w^T G``, then ``update(L)``;
* :class:`~gradsurgery.methods.ElementWise`: ``d = combine(G_w, L, z)``.

The properties (each an ``assert_*`` function raising ``AssertionError``):

* :func:`assert_finite` -- the update is finite on degenerate gradients (zero, duplicated,
  opposed, rank-deficient, scaled from 1e-12 to 1e12), over several steps, or the method
  raises a deliberate error (``ValueError``, ``FloatingPointError``, also when it is bound to
  too few tasks: then the other properties do not apply to that ``K`` either);
* :func:`assert_scale` -- scaling ``G`` by ``a`` scales the update by ``a`` (positively
  homogeneous) or leaves it unchanged (a normalised update);
* :func:`assert_permutation` -- permuting the tasks does not change the update (methods
  that draw random numbers are exempt: :func:`is_random`);
* :func:`assert_resume` -- a method restored from its ``state_dict`` (through ``torch.save``
  and ``torch.load(weights_only=True)``) takes bit-identical decisions afterwards;
* :func:`assert_trains` -- a few steps of a small model through
  :class:`~gradsurgery.MultiTaskOptimizer` stay finite, and the optimizer resumes bit for bit
  from its checkpoint.

Tolerances are derived from the compared quantity: two updates are compared within
``RTOL * (||d|| + sum_k |c_k| ||g_k||)``, the size of the terms the update is summed from
(which bounds the rounding of the sum; ``RTOL = 1e-5`` also leaves room for the solvers'
own tolerances, ~1e-6), never from ``||G||`` alone: a normalised update is compared on its
own scale.
"""
from __future__ import annotations

import io
from dataclasses import dataclass, field
from functools import partial
from typing import Any, Callable, Iterator

import torch
from torch import Tensor, nn

from ._gradient_cases import FAMILIES, degenerate_matrix
from .methods import ElementWise, Method, registry
from .scale.amp import Scaling

__all__ = ["check_method", "Report", "factory_for", "degenerate_cases", "conflicting_gradients", "update",
           "assert_finite", "assert_scale", "assert_permutation", "assert_resume", "assert_trains", "is_random",
           "rtol_for", "FAMILIES", "degenerate_matrix"]

#: Errors a method may raise on purpose on a degenerate input (documented refusals).
DELIBERATE = (ValueError, FloatingPointError)
#: Relative tolerance of the comparisons of two float64 updates (on the scale of their terms).
RTOL = 1e-5
D = torch.float64
#: ``c`` of the float32 tolerance ``c K eps_32`` (:func:`rtol_for`).
ROUNDING_FACTOR = 16


def rtol_for(dtype: torch.dtype, num_tasks: int) -> float:
    """The relative tolerance of two updates of ``num_tasks`` tasks computed in ``dtype``:
    :data:`RTOL` in float64 (the solvers' own tolerances, ~1e-6, dominate its rounding);
    ``c K eps`` with ``c =`` :data:`ROUNDING_FACTOR` in lower precisions, the rounding of
    a sum of ``K`` terms (``d = c^T G``) and of the ``K x K`` Gram the weights are solved
    from, whichever is larger."""
    rounding = ROUNDING_FACTOR * num_tasks * torch.finfo(dtype).eps
    return max(RTOL, rounding) if dtype == torch.float64 else rounding

Factory = Callable[[int, int], Method]


def factory_for(method: str | type[Method], *, dtype: torch.dtype = D, **options: Any) -> Factory:
    """``make(num_tasks, seed)``: a fresh method bound to ``num_tasks`` tasks (``dtype``,
    float64 by default; CPU) with its own generator seeded by ``seed``."""
    if isinstance(method, str):
        registry.get(method)  # a clear error for an unknown name

    def make(num_tasks: int, seed: int = 0) -> Method:
        instance = registry.create(method, **options) if isinstance(method, str) else method(**options)
        instance.bind(num_tasks, device=torch.device("cpu"), dtype=dtype,
                      generator=torch.Generator().manual_seed(seed))
        return instance

    return make


class _Rows:
    """The task gradients as a plain ``K x N`` matrix, combined as the pipeline combines
    them (:class:`gradsurgery.methods.base.TaskGradients`)."""

    def __init__(self, grads: Tensor, rep: Tensor | None):
        self.grads, self.rep = grads, rep

    def combine(self, coefficients: Tensor) -> list[Tensor]:
        return [coefficients.to(self.grads.dtype) @ self.grads]

    def combine_elements(self, method: ElementWise, losses: Tensor, present: Tensor | None,
                         scaling: Scaling) -> list[Tensor]:
        grads, rep = self.grads, self.rep
        if rep is None and "params" in method.levels:
            return [method.combine(grads, losses, None)]
        rep = torch.ones_like(grads[0]) if rep is None else rep  # N samples of one feature each
        return [method.combine(grads.unsqueeze(-1), losses, rep.reshape(-1, 1)).squeeze(-1)]


def update(method: Method, grads: Tensor, losses: Tensor, rep: Tensor | None = None) -> tuple[Tensor, Tensor]:
    """One optimizer step's decision of ``method`` (``prepare``, :meth:`Method.decide`,
    ``after_step``): ``(d, scale)`` where ``d`` is the update for the task gradients ``grads``
    (``K x N``) and ``losses``, and ``scale`` the size of the terms ``d`` is summed from
    (``||d|| + sum_k |c_k| ||g_k||``; ``||d|| + sum_k ||g_k||`` for an element-wise method),
    the scale comparisons of ``d`` are made on. ``grads`` are weighted by the method's loss
    weights first, as the pipeline's task backward weights them. An
    element-wise method that decides at the parameter level (``"params" in levels``)
    receives ``grads`` as the flat ``K x P`` matrix and ``rep=None``; one that decides at the
    representation level only receives ``grads`` as ``N`` samples of one feature and
    ``rep`` (ones by default)."""
    for p in method.parameters():
        p.grad = None
    method.prepare()
    loss_weights = method.loss_weights(losses)
    weighted = grads if loss_weights is None else loss_weights.to(grads.dtype)[:, None] * grads
    # (in float64, then rounded: the Gram of the tasks permuted is then exactly the Gram
    # permuted, whatever order a BLAS kernel sums in; ill-conditioned solves amplify such
    # eps-sized differences by their condition number)
    gram = (weighted.double() @ weighted.double().T).to(weighted.dtype) if method.uses_gram else None
    coefficients, combined = method.decide(_Rows(weighted, rep), gram, losses, None, loss_weights, Scaling(None))
    assert combined is not None
    d = combined[0]
    norms = grads.norm(dim=1)
    terms = norms.sum() if coefficients is None else (coefficients.abs().to(norms.dtype) * norms).sum()
    method.after_step()
    return d, d.norm() + terms


def _close(a: Tensor, b: Tensor, scale: Tensor | float, rtol: float = RTOL) -> tuple[bool, float, float]:
    """Whether ``a`` and ``b`` agree within ``rtol * scale``; also the gap and the tolerance."""
    gap = float((a - b).norm())
    tol = rtol * float(scale)
    return gap <= tol, gap, tol


# -- inputs -------------------------------------------------------------------------------
def degenerate_cases(num_tasks: int, seed: int = 0, size: int = 5,
                     dtype: torch.dtype = D) -> Iterator[tuple[str, Tensor]]:
    """Named ``K x size`` task-gradient matrices in ``dtype``, one per family of
    :data:`FAMILIES` (:func:`degenerate_matrix`: zero, zero rows, duplicated and opposed
    rows, rank-deficient, more tasks than dimensions, 0 inside the rows' hull, rows leaning
    one way, norms 1e-2..1e2 apart) and each but ``zero`` scaled by 1e-12 and 1e12."""
    families = FAMILIES if num_tasks > 1 else ("normal", "zero", "leaning one way", "norms spread")
    for index, family in enumerate(families):
        grads = degenerate_matrix(family, num_tasks, size, seed * 101 + index, dtype=D)
        yield family, grads.to(dtype)
        if family != "zero":
            for exponent in (-12, 12):
                yield f"{family} x 1e{exponent}", (grads * 10.0 ** exponent).to(dtype)


def _losses(num_tasks: int, seed: int, dtype: torch.dtype = D) -> Tensor:
    gen = torch.Generator().manual_seed(seed + 7919)
    return (torch.rand(num_tasks, generator=gen, dtype=D) + 0.1).to(dtype)


# -- properties ---------------------------------------------------------------------------
def assert_finite(make: Factory, grads: Tensor, losses: Tensor | None = None, steps: int = 3) -> None:
    """``steps`` decisions of a fresh method on ``grads`` are finite, or the method raises a
    deliberate error (``ValueError``, ``FloatingPointError``)."""
    k = grads.shape[0]
    losses = _losses(k, 0, grads.dtype) if losses is None else losses
    method: Method | None = None
    for step in range(steps):
        try:
            method = make(k, 0) if method is None else method
            d, _ = update(method, grads, losses)
        except DELIBERATE:
            return
        assert torch.isfinite(d).all(), f"step {step}: non-finite update {d.tolist()}"
        for p in method.parameters():
            assert p.grad is None or torch.isfinite(p.grad).all(), f"step {step}: non-finite gradient of a parameter"


def assert_scale(make: Factory, grads: Tensor, losses: Tensor | None = None, factor: float = 1e3) -> None:
    """On a fresh method, ``d(factor G) = factor d(G)`` (positively homogeneous) or
    ``d(factor G) = d(G)`` (normalised), within :func:`rtol_for` of the compared update's scale."""
    k = grads.shape[0]
    losses = _losses(k, 0, grads.dtype) if losses is None else losses
    try:
        d, scale = update(make(k, 0), grads, losses)
        d_scaled, scale_scaled = update(make(k, 0), grads * factor, losses)
    except DELIBERATE:
        return
    rtol = rtol_for(grads.dtype, k)
    homogeneous = _close(d_scaled / factor, d, max(float(scale), float(scale_scaled) / factor), rtol)
    invariant = _close(d_scaled, d, max(float(scale), float(scale_scaled)), rtol)
    assert homogeneous[0] or invariant[0], (
        f"scaling the gradients by {factor:g} neither scaled the update by {factor:g} (gap {homogeneous[1]:.3g}, "
        f"tolerance {homogeneous[2]:.3g}) nor left it unchanged (gap {invariant[1]:.3g}, tolerance {invariant[2]:.3g})")


def conflicting_gradients(num_tasks: int, size: int = 6) -> Tensor:
    """``K x size`` gradients (``size >= K``) that conflict pairwise (every inner product is
    negative) with different norms: a decision that depends on the order the tasks are
    visited in (PCGrad's) shows it here."""
    k = num_tasks
    gen = torch.Generator().manual_seed(0)
    base = torch.eye(k, size, dtype=D) - torch.eye(k, size, dtype=D).sum(0) / k
    return base * torch.arange(1, k + 1, dtype=D)[:, None] + 0.1 * torch.randn(k, size, generator=gen, dtype=D)


def is_random(make: Factory, grads: Tensor | None = None, losses: Tensor | None = None) -> bool:
    """Whether the method's decision depends on its generator's seed (on ``grads``, by
    default :func:`conflicting_gradients` of 4 tasks)."""
    grads = conflicting_gradients(4) if grads is None else grads
    k = grads.shape[0]
    losses = _losses(k, 0, grads.dtype) if losses is None else losses
    try:
        a, scale = update(make(k, 0), grads, losses)
        b, _ = update(make(k, 1), grads, losses)
    except DELIBERATE:
        return False
    return not _close(a, b, scale, rtol=1e-12)[0]


def assert_permutation(make: Factory, steps: list[Tensor], perm: Tensor, losses: Tensor | None = None) -> None:
    """Fresh methods fed the same task gradients (one ``K x N`` matrix per step) with their
    tasks in the original and in the ``perm`` order take the same updates."""
    k = steps[0].shape[0]
    losses = _losses(k, 0, steps[0].dtype) if losses is None else losses
    try:
        plain, permuted = make(k, 0), make(k, 0)
    except DELIBERATE:  # e.g. too few tasks for the method
        return
    for step, grads in enumerate(steps):
        try:
            d, scale = update(plain, grads, losses)
        except DELIBERATE:
            try:
                update(permuted, grads[perm], losses[perm])
            except DELIBERATE:
                return
            raise AssertionError(f"step {step}: raised on the tasks in the original order but not in the "
                                 f"{perm.tolist()} order") from None
        try:
            d_perm, scale_perm = update(permuted, grads[perm], losses[perm])
        except DELIBERATE as err:
            raise AssertionError(f"step {step}: raised on the tasks in the {perm.tolist()} order but not in the "
                                 f"original one: {type(err).__name__}: {err}") from None
        ok, gap, tol = _close(d_perm, d, max(float(scale), float(scale_perm)), rtol_for(grads.dtype, k))
        assert ok, (f"step {step}: permuting the tasks by {perm.tolist()} changed the update by {gap:.3g} "
                    f"(tolerance {tol:.3g} on the update's scale)")


def _roundtrip(obj: Any) -> Any:
    buffer = io.BytesIO()
    torch.save(obj, buffer)
    buffer.seek(0)
    return torch.load(buffer, weights_only=True)


def _snapshot(method: Method) -> dict[str, Any]:
    assert method.generator is not None  # bound
    return {"state": method.state_dict(), "params": [p.detach().clone() for p in method.parameters()],
            "generator": method.generator.get_state()}


def _restore(method: Method, snapshot: dict[str, Any]) -> None:
    method.load_state_dict(snapshot["state"])
    with torch.no_grad():
        for p, value in zip(method.parameters(), snapshot["params"]):
            p.copy_(value)
    assert method.generator is not None  # bound
    method.generator.set_state(snapshot["generator"])


def assert_resume(make: Factory, steps: list[Tensor], losses: list[Tensor], split: int) -> None:
    """A method run over ``steps`` and one restored at ``split`` from a checkpoint (its
    ``state_dict``, parameters and generator, through ``torch.save`` and
    ``torch.load(weights_only=True)``) into a fresh, differently seeded instance take
    bit-identical decisions after ``split``."""
    k = steps[0].shape[0]
    try:
        method = make(k, 0)
    except DELIBERATE:  # e.g. too few tasks for the method
        return
    for grads, loss in zip(steps[:split], losses[:split]):
        update(method, grads, loss)
    try:
        checkpoint = _roundtrip(_snapshot(method))
    except Exception as err:  # pickling: anything but tensors, numbers, strings, lists, dicts
        raise AssertionError(f"state_dict() does not round-trip through torch.save/torch.load(weights_only=True): "
                             f"{type(err).__name__}: {err}") from None
    resumed = make(k, 1)
    _restore(resumed, checkpoint)
    for step, (grads, loss) in enumerate(zip(steps[split:], losses[split:]), start=split):
        a, _ = update(method, grads, loss)
        b, _ = update(resumed, grads, loss)
        assert torch.equal(a, b), f"step {step}: the resumed method's update differs by {float((a - b).norm()):.3g}"
        for p, q in zip(method.parameters(), resumed.parameters()):
            assert (p.grad is None) == (q.grad is None) and (
                p.grad is None or q.grad is None or torch.equal(p.grad, q.grad)), (
                f"step {step}: the resumed method's parameter gradients differ")


class _Model(nn.Module):
    def __init__(self, num_tasks: int, size: int):
        super().__init__()
        self.backbone = nn.Sequential(nn.Linear(4, 8), nn.Tanh(), nn.Linear(8, size))
        self.heads = nn.ModuleList(nn.Sequential(nn.Linear(size, 5), nn.Tanh(), nn.Linear(5, 1))
                                   for _ in range(num_tasks))


def assert_trains(method: str | type[Method], num_tasks: int = 3, steps: int = 4, **options: Any) -> None:
    """At every level the method decides at (its class's ``levels``), a small float64 model
    trains ``steps`` steps through :class:`~gradsurgery.MultiTaskOptimizer` with finite
    parameters, and a run resumed from the optimizer's checkpoint (``torch.save``,
    ``torch.load(weights_only=True)``) after half of them ends bit-identical."""
    from .optimizer import MultiTaskOptimizer

    cls = registry.get(method) if isinstance(method, str) else method
    size = 6
    gen = torch.Generator().manual_seed(0)
    batches = [(torch.randn(6, 4, generator=gen, dtype=D), torch.randn(num_tasks, 6, 1, generator=gen, dtype=D))
               for _ in range(steps)]

    def build(seed: int, level: str):
        torch.manual_seed(seed)
        model = _Model(num_tasks, size).to(D)
        rotation: dict[str, Any] = {"rep_size": size} if cls.rotation else {}
        opt = MultiTaskOptimizer(torch.optim.Adam(model.parameters(), lr=1e-2), cls(**options), num_tasks=num_tasks,
                                 method_lr=1e-2, level=level, **rotation)
        return model, opt

    def train(model, opt, part):
        for x, ys in part:
            opt.zero_grad()
            views = opt.fork(model.backbone(x))
            opt.backward([nn.functional.mse_loss(h(v), y) for h, v, y in zip(model.heads, views, ys)])
            opt.step()

    half = steps // 2
    for level in cls.levels:
        model, opt = build(0, level)
        train(model, opt, batches[:half])
        checkpoint = _roundtrip({"model": model.state_dict(), "opt": opt.state_dict()})
        train(model, opt, batches[half:])
        for name, p in model.named_parameters():
            assert torch.isfinite(p).all(), f"level={level!r}: parameter {name} became non-finite during training"
        resumed, opt2 = build(1, level)
        resumed.load_state_dict(checkpoint["model"])
        opt2.load_state_dict(checkpoint["opt"])
        train(resumed, opt2, batches[half:])
        for (name, p), q in zip(model.named_parameters(), resumed.parameters()):
            assert torch.equal(p, q), (
                f"level={level!r}: resumed from the optimizer's checkpoint, parameter {name} differs")


# -- the suite ----------------------------------------------------------------------------
@dataclass
class Report:
    """What :func:`check_method` found: one line per property and case."""

    method: str
    passed: list[str] = field(default_factory=list)
    failed: list[str] = field(default_factory=list)
    skipped: list[str] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return not self.failed

    def __str__(self) -> str:
        lines = [f"check_method({self.method}): {len(self.passed)} passed, {len(self.failed)} failed, "
                 f"{len(self.skipped)} skipped"]
        lines += [f"  FAILED {line}" for line in self.failed]
        lines += [f"  skipped {line}" for line in self.skipped]
        return "\n".join(lines)


def check_method(method: str | type[Method], *, num_tasks: tuple[int, ...] = (1, 2, 3, 6),
                 dtype: torch.dtype = D, scale: bool = True, permutation: bool = True, **options: Any) -> Report:
    """Runs the property suite on ``method`` (a registered name or a
    :class:`~gradsurgery.methods.Method` subclass, built with ``options``) and returns the
    :class:`Report`; raises ``AssertionError`` carrying the report when a property fails.

    ``num_tasks`` are the ``K`` checked (any size, e.g. ``(2, 40)``), ``dtype`` the precision
    the method is bound to and the gradients are given in (``torch.float64`` or
    ``torch.float32``; float32 comparisons are made within ``c K eps_32``, :func:`rtol_for`).
    ``scale=False`` leaves out the scale behaviour, for a method whose update is neither
    positively homogeneous nor scale-invariant on purpose (e.g. an ``eps`` or a fixed step
    size of its authors' code), ``permutation=False`` permutation equivariance, for a method
    that treats the tasks differently on purpose; say why in the method's documentation.

    Example::

        from gradsurgery.testing import check_method
        check_method("pcgrad")
        check_method(MyMethod, alpha=0.5)
        check_method("upgrad", num_tasks=(2, 40), dtype=torch.float32)
    """
    if dtype not in (torch.float32, torch.float64):
        raise ValueError(f"check_method checks float32 or float64 methods, got dtype={dtype}")
    if not isinstance(method, str) and not (isinstance(method, type) and issubclass(method, Method)):
        raise TypeError(f"check_method takes a registered method's name or a Method subclass, got {method!r}")
    label = method if isinstance(method, str) else method.__qualname__
    # bad names and options raise here, as they would in MultiTaskOptimizer
    registry.create(method, **options) if isinstance(method, str) else method(**options)
    report = Report(label)
    make = factory_for(method, dtype=dtype, **options)

    def run(name: str, check: Callable[[], None]) -> None:
        try:
            check()
        except AssertionError as err:
            report.failed.append(f"{name}: {err}")
        except Exception as err:  # an undeliberate crash is a failure too
            report.failed.append(f"{name}: raised {type(err).__name__}: {err}")
        else:
            report.passed.append(name)

    for k in num_tasks:
        cases = list(degenerate_cases(k, dtype=dtype))
        for case, grads in cases:
            run(f"finite, K={k}, {case}", partial(assert_finite, make, grads))
            if scale:
                run(f"scale, K={k}, {case}", partial(assert_scale, make, grads))
        gen = torch.Generator().manual_seed(k)
        steps = [torch.randn(k, 5, generator=gen, dtype=D).to(dtype) for _ in range(4)]
        losses = [(torch.rand(k, generator=gen, dtype=D) + 0.1).to(dtype) for _ in range(4)]
        run(f"resume, K={k}", partial(assert_resume, make, steps, losses, split=2))
        if k >= 2 and permutation:
            perm = torch.roll(torch.arange(k), 1)
            try:
                random = is_random(make, conflicting_gradients(k, max(6, k)).to(dtype))
            except Exception as err:
                report.failed.append(f"permutation, K={k}: raised {type(err).__name__}: {err}")
                continue
            if random:
                report.skipped.append(f"permutation, K={k}: the method draws random numbers")
            else:
                for case, grads in cases:
                    run(f"permutation, K={k}, {case}", partial(assert_permutation, make, [grads, grads], perm))
                run(f"permutation, K={k}, several steps", partial(assert_permutation, make, steps, perm, losses[0]))
    run("trains and resumes through MultiTaskOptimizer", lambda: assert_trains(method, **options))
    if report.failed:
        raise AssertionError(str(report))
    return report
