"""The interface every method implements.

A method decides how the ``K`` per-task gradients ``G`` (a ``K x N`` matrix, one row per
task) are combined into the one gradient that goes back through the shared backbone:

.. math::  g = c^\\top G,\\qquad c = \\texttt{weights}(G G^\\top, L)

Most methods only need the ``K x K`` Gram matrix ``M = G G^T`` and the losses ``L``; they
override :meth:`Method.weights`. A method that needs the raw elements (e.g. GradDrop)
overrides :meth:`Method.combine` instead. Methods that only weight the losses (``sum``,
``mean``, uncertainty weighting, ...) set ``needs_gram = False`` and return their loss
weights from :meth:`Method.loss_weights`; the pipeline then skips the Gram entirely (and,
with ``loss_only = True``, the ``K x N`` matrix ``G`` too).

Lifecycle, driven by :class:`gradsurgery.MultiTaskOptimizer`:

1. ``bind(num_tasks, device=..., dtype=..., generator=...)`` once: creates parameters.
2. every step, after the input was validated:
   ``loss_weights(losses)`` (pure: must not change any state), then
   ``weights(gram, losses)`` or ``combine(grads, losses)`` (may update state: counters,
   initial losses, RNG draws, gradients of the method's own parameters),
3. ``after_step()`` after the wrapped optimizer stepped (e.g. renormalise weights),
4. ``observe(losses)`` when the user passes the losses measured after the step
   (:meth:`gradsurgery.MultiTaskOptimizer.observe`; FAMO learns from them).

At ``level="params"`` the same ``weights`` receive the Gram of the task gradients w.r.t.
the shared parameters, and ``combine`` the flat ``K x P`` Jacobian. A learnable loss
weighting needs no autograd hook: ``weights`` writes the exact gradient of its parameters'
objective into their ``.grad`` (see ``uw.py`` and ``gradnorm.py``).
"""
from __future__ import annotations

from typing import Any, ClassVar

import torch
from torch import Tensor, nn


class Method:
    """Base class of a gradient-combination method.

    Subclasses set the class attributes that describe them and implement
    :meth:`weights` (or :meth:`combine`). Options are keyword arguments of ``__init__``
    and are validated there (a ``ValueError`` names the bad value).

    Attributes:
        needs_gram: ``False`` for methods that only weight losses; the pipeline then
            computes no Gram and ``weights`` receives ``gram=None``.
        loss_only: ``True`` for methods that only weight losses *and* whose ``weights``
            always returns ones (it is still called, for its side effects), so that
            ``g = sum_k g_k`` of the loss-weighted task gradients. The pipeline then adds
            the heads' gradients up as plain ``sum(L).backward()`` does (bit for bit) and
            never forms the ``K x N`` matrix ``G``.
            Implies ``needs_gram = False``; a subclass returning other coefficients sets
            it back to ``False``.
        rotation: whether the method learns per-task rotations of the representation by
            default (the RotoGrad family). Any method can be composed with rotations
            through ``MultiTaskOptimizer(..., rotation=True)``.
        num_tasks: set by :meth:`bind`.
        generator: the method's own random generator, set by :meth:`bind`; draw every
            random number from it so that runs are reproducible and resumable.
    """

    needs_gram: ClassVar[bool] = True
    loss_only: ClassVar[bool] = False
    rotation: ClassVar[bool] = False

    num_tasks: int
    generator: torch.Generator | None = None

    def bind(self, num_tasks: int, *, device: torch.device, dtype: torch.dtype,
             generator: torch.Generator) -> None:
        """Fixes the number of tasks and where the method's parameters live."""
        self.num_tasks = num_tasks
        self.generator = generator

    # -- per-step decisions -------------------------------------------------------------
    def loss_weights(self, losses: Tensor) -> Tensor | None:
        """Per-task weights the heads' losses are multiplied by (``None``: all ones).

        Must be pure: it is called before the step is validated, so it may read the
        method's state but must not change it.
        """
        return None

    def prepare(self) -> None:
        """Called once per accepted step, just before :meth:`weights` (or :meth:`combine`):
        draw the step's random numbers here, from :attr:`generator`, so that ``weights``
        stays a tensor program ``torch.compile`` traces whole (Dynamo cannot trace a
        ``torch.Generator``). ``weights`` called without it must still work (PCGrad then
        draws in ``weights``)."""

    def weights(self, gram: Tensor | None, losses: Tensor) -> Tensor:
        """Returns the ``K`` coefficients ``c`` of the combined gradient ``g = c^T G``.

        Args:
            gram: the ``K x K`` Gram matrix ``G G^T`` of the (loss-weighted) task
                gradients, in float32 or wider; ``None`` when ``needs_gram`` is False.
            losses: the ``K`` detached task losses (unweighted), same dtype as ``gram``.
        """
        raise NotImplementedError(f"{type(self).__name__} implements neither weights() nor combine()")

    def combine(self, grads: Tensor, losses: Tensor) -> Tensor | None:
        """Escape hatch for element-wise methods: returns the combined gradient (``N``)
        from the ``K x N`` task gradients, or ``None`` to use ``weights`` (the default)."""
        return None

    def backbone_loss_weight(self, value: Tensor) -> Tensor | None:
        """Weight of ``backward``'s ``backbone_loss`` (``None``: 1), given its detached
        ``value``. Called once per accepted step that has a backbone loss, after
        :meth:`weights`; may update state (e.g. record an initial value)."""
        return None

    def after_step(self) -> None:
        """Called after the wrapped optimizer's ``step`` (e.g. to renormalise weights)."""

    def observe(self, losses: Tensor) -> None:
        """Receives the ``K`` detached task losses measured *after* a step, through
        :meth:`gradsurgery.MultiTaskOptimizer.observe` (FAMO learns from them). Methods
        that do not need them ignore the call, so a loop over methods stays uniform."""

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
