"""The interface every method implements, as three kinds (as torchjd's weightings).

A method decides how the ``K`` per-task gradients ``G`` (a ``K x N`` matrix, one row per
task) are combined into the one gradient ``g`` that goes back through the shared backbone.
Its kind says what it decides from, and so which pipeline path runs:

* :class:`LossWeighting` -- from the losses alone: ``g = sum_k w_k g_k`` with
  ``w = loss_weights(L)``. The pipeline never forms ``G`` (the heads' gradients are added up
  as in plain ``sum(L).backward()``) nor a Gram. ``sum``, ``mean``, UW, DWA, RLW, FAMO.
* :class:`GramWeighting` -- from the ``K x K`` Gram ``M = G G^T`` and the losses:
  ``g = c^T G`` with ``c = weights(M, L)``. PCGrad, MGDA, CAGrad, Nash-MTL, UPGrad, ...
* :class:`ElementWise` -- from the raw elements: ``g = combine(G, L, z)`` (the shared
  representation's values ``z`` too). GradDrop, DB-MTL.

Any kind may learn parameters (:meth:`Method.parameters`: UW's log-variances, GradNorm's
weights); they join the wrapped optimizer in a param group named ``"method"``.

Lifecycle, driven by :class:`gradsurgery.MultiTaskOptimizer`:

1. ``bind(num_tasks, device=..., dtype=..., generator=...)`` once: creates parameters.
2. every ``backward``, after the input was validated: ``loss_weights(losses)`` (pure: it
   must not change any state, it runs before validation ends), ``prepare()`` (the step's
   random draws), then the kind's decision: ``update`` / ``weights`` / ``combine`` (may
   update state: counters, initial losses, gradients of the method's own parameters).
3. ``after_step()`` after the wrapped optimizer stepped (e.g. renormalise weights).
4. ``observe(losses)`` when the user passes the losses measured after the step (FAMO),
   ``end_epoch()`` when the user marks the end of an epoch (DWA).

At ``level="params"`` the same ``weights`` receive the Gram of the task gradients w.r.t.
the shared parameters, and ``combine`` the flat ``K x P`` Jacobian (with ``rep=None``).
A learnable weighting needs no autograd hook: it writes the exact gradient of its
parameters' objective into their ``.grad`` (see ``uw.py`` and ``gradnorm.py``).
"""
from __future__ import annotations

from typing import Any, Callable, ClassVar

import torch
from torch import Tensor, nn


class Method:
    """Base class of every method: the lifecycle, parameters and state. Subclass one of
    the kinds (:class:`LossWeighting`, :class:`GramWeighting`, :class:`ElementWise`).
    Options are keyword arguments of ``__init__``, validated there (a ``ValueError``
    names the bad value).

    Attributes:
        rotation: whether the method learns per-task rotations of the representation by
            default (the RotoGrad family). Any method can be composed with rotations
            through ``MultiTaskOptimizer(..., rotation=True)``.
        levels: where the method can decide, its default first: ``"rep"`` (the task
            gradients w.r.t. the shared representation) and/or ``"params"`` (w.r.t. the
            shared parameters).
        observes_losses: the method learns from the losses measured after each step
            (:meth:`observe`; FAMO), so a training loop that runs many methods (the compare
            tool) re-evaluates the batch for it.
        loss_domain: the losses the method's weights are defined for (e.g. "positive
            losses"), named in the error when its loss weights come out non-finite.
        subset_safe: the method can decide over any subset of the tasks (it keeps no
            per-task state), so ``backward`` accepts ``None`` for a task absent from the
            batch: the method then sees the present tasks only, as if only they existed.
        subset_refusal: when not ``subset_safe``, why (the error for an absent task says it).
        present: which tasks this ``backward`` has (``None``: all), set by the optimizer
            before the method is consulted: a ``subset_safe`` method with per-task
            constants or draws picks the present tasks' with :meth:`present_index`.
        weights_heads: the heads receive ``c_k dL_k`` (the method's coefficient times
            their loss gradient) instead of ``dL_k``, as the official code of some
            methods does (an option of those methods); ``False`` by default.
        num_tasks: set by :meth:`bind`.
        generator: the method's own random generator, set by :meth:`bind`; draw every
            random number from it so that runs are reproducible and resumable.
    """

    rotation: ClassVar[bool] = False
    subset_safe: ClassVar[bool] = False
    subset_refusal: ClassVar[str | None] = None
    present: list[bool] | None = None
    levels: ClassVar[tuple[str, ...]] = ("rep", "params")
    loss_domain: ClassVar[str | None] = None
    observes_losses: ClassVar[bool] = False
    weights_heads: bool = False

    num_tasks: int
    generator: torch.Generator | None = None

    def bind(self, num_tasks: int, *, device: torch.device, dtype: torch.dtype,
             generator: torch.Generator) -> None:
        """Fixes the number of tasks and where the method's parameters live."""
        self.num_tasks = num_tasks
        self.generator = generator

    def present_index(self, like: Tensor) -> Tensor | None:
        """The indices of the present tasks (see :attr:`present`) on ``like``'s device, or
        ``None`` when every task is present."""
        return None if self.present is None else torch.tensor(self.present).nonzero().flatten().to(like.device)

    # -- per-step hooks -----------------------------------------------------------------
    def loss_weights(self, losses: Tensor) -> Tensor | None:
        """Per-task weights the losses are multiplied by (``None``: all ones): what the
        heads receive and, for a :class:`LossWeighting`, what ``g`` is made of.

        Must be pure: it is called before the step is validated, so it may read the
        method's state but must not change it.
        """
        return None

    def prepare(self) -> None:
        """Called once per accepted step, just before the decision: draw the step's random
        numbers here, from :attr:`generator`, so that ``weights`` stays a tensor program
        ``torch.compile`` traces whole (Dynamo cannot trace a ``torch.Generator``)."""

    def head_weights(self, coefficients: Tensor) -> Tensor:
        """With :attr:`weights_heads`: the ``K`` factors of the heads' loss gradients, given
        this step's coefficients (default: the coefficients themselves; Nash-MTL's heads get
        its unclipped ``alpha``, as in the authors' code)."""
        return coefficients

    def backbone_loss_weight(self, value: Tensor) -> Tensor | None:
        """Weight of ``backward``'s ``backbone_loss`` (``None``: 1), given its detached
        ``value``. Called once per accepted step that has a backbone loss, after the
        decision; may update state (e.g. record an initial value)."""
        return None

    def after_step(self) -> None:
        """Called after the wrapped optimizer's ``step`` (e.g. to renormalise weights)."""

    def observe(self, losses: Tensor) -> None:
        """Receives the ``K`` detached task losses measured *after* a step, through
        :meth:`gradsurgery.MultiTaskOptimizer.observe` (FAMO learns from them). Methods
        that do not need them ignore the call, so a loop over methods stays uniform."""

    def end_epoch(self) -> None:
        """Called by :meth:`gradsurgery.MultiTaskOptimizer.end_epoch` when the user marks
        the end of an epoch (DWA's loss ratios are per epoch); ignored by default."""

    # -- parameters and state -----------------------------------------------------------
    def parameters(self) -> list[nn.Parameter]:
        """Parameters the method learns; they join the wrapped optimizer as one group."""
        return []

    def state_dict(self) -> dict[str, Any]:
        """Everything needed to resume: tensors, numbers, strings, lists and dicts only."""
        return {}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restores what :meth:`state_dict` returned."""

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.extra_repr()})"

    def extra_repr(self) -> str:
        return ""


class LossWeighting(Method):
    """A method that only weights the losses: ``g = sum_k w_k g_k``, ``w`` from
    :meth:`~Method.loss_weights` (``None``: ones). The heads get ``w_k dL_k`` too, so the
    step equals ``sum_k w_k L_k`` backpropagated plainly; no ``K x N`` matrix is formed."""

    def update(self, losses: Tensor) -> None:
        """Commits the step's state (history, counters, the gradient of learnable
        weights), once per accepted ``backward``; ``losses`` are the ``K`` detached
        values (unweighted)."""


class GramWeighting(Method):
    """A method that decides from the Gram: ``g = c^T G`` with ``c = weights(M, L)``."""

    def weights(self, gram: Tensor, losses: Tensor) -> Tensor:
        """Returns the ``K`` coefficients ``c`` of the combined gradient ``g = c^T G``.

        Args:
            gram: the ``K x K`` Gram matrix ``G G^T`` of the (loss-weighted) task
                gradients, in float32 or wider.
            losses: the ``K`` detached task losses (unweighted), same dtype as ``gram``.
        """
        raise NotImplementedError(f"{type(self).__name__} must implement weights(gram, losses)")


class ElementWise(Method):
    """A method that needs the task gradients' elements: ``g = combine(G, L, z)``. It
    cannot decide from the global batch under ``torch.distributed`` (per-rank surgery).

    Element-wise methods that combine with task weights (MoDo's, SDMGrad's ``lambda``) set
    ``has_weights = True`` and pass those weights through :meth:`use_weights`, so that the
    optimizer's ``weight_ema`` smooths them and ``opt.stats["weights"]`` reports them.
    """

    has_weights: ClassVar[bool] = False
    #: Set by the optimizer for ``weight_ema``: smooths the weights of :meth:`use_weights`.
    smoothing: Callable[[Tensor], Tensor] | None = None
    #: The weights of the last combination (``None`` for a method without weights).
    last_weights: Tensor | None = None

    def use_weights(self, weights: Tensor) -> Tensor:
        """The ``K`` weights to combine with this step: ``weights`` smoothed by the
        optimizer's ``weight_ema`` when it is on; kept in :attr:`last_weights`."""
        if self.smoothing is not None:
            weights = self.smoothing(weights)
        self.last_weights = weights.detach()
        return weights

    def combine(self, grads: Tensor, losses: Tensor, rep: Tensor | None) -> Tensor:
        """Returns the combined gradient, shaped like one task's gradient.

        Args:
            grads: the ``K x ...`` task gradients (``K x z.shape`` at the representation
                level, the flat ``K x P`` Jacobian at the parameter level).
            losses: the ``K`` detached task losses (float32 or wider).
            rep: the shared representation's detached values ``z`` (shaped like
                ``grads[k]``); ``None`` at the parameter level.
        """
        raise NotImplementedError(f"{type(self).__name__} must implement combine(grads, losses, rep)")


#: The kinds, in the order :func:`kind_of` checks them.
KINDS = (LossWeighting, GramWeighting, ElementWise)


def kind_of(method: Method) -> type[Method]:
    """The kind ``method`` is (one of :data:`KINDS`); a ``TypeError`` for a bare :class:`Method`."""
    for kind in KINDS:
        if isinstance(method, kind):
            return kind
    raise TypeError(f"{type(method).__name__} subclasses Method directly; subclass one of its kinds: "
                    "gradsurgery.methods.GramWeighting (weights(gram, losses)), LossWeighting "
                    "(loss_weights(losses)) or ElementWise (combine(grads, losses, rep))")
