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
   random draws), then :meth:`Method.decide`, which each kind implements over its own hook:
   ``update`` / ``weights`` / ``combine`` (may update state: counters, initial losses,
   gradients of the method's own parameters). ``weight_ema`` wraps the method in
   :class:`gradsurgery.methods.smoothed.Smoothed`.
3. ``after_step()`` after the wrapped optimizer stepped (e.g. renormalise weights).
4. ``observe(losses)`` when the user passes the losses measured after the step (FAMO),
   ``end_epoch()`` when the user marks the end of an epoch (DWA).

At ``level="params"`` the same ``weights`` receive the Gram of the task gradients w.r.t.
the shared parameters, and ``combine`` the flat ``K x P`` Jacobian (with ``rep=None``).
A learnable weighting needs no autograd hook: it writes the exact gradient of its
parameters' objective into their ``.grad`` (see ``uw.py`` and ``gradnorm.py``).
"""
from __future__ import annotations

import inspect
from typing import TYPE_CHECKING, Any, Callable, ClassVar, NamedTuple, Protocol

import torch
from torch import Tensor, nn

if TYPE_CHECKING:
    from ..scale.amp import Scaling


class Decision(NamedTuple):
    """What a method decided in one ``backward``."""

    #: Each unweighted task gradient's coefficient in ``g`` (the method's ``c`` times its
    #: loss weights; ``None`` for an element-wise method without weights).
    coefficients: Tensor | None
    #: ``g`` for each shared tensor (``None``: already written to the parameters' ``.grad``).
    combined: list[Tensor] | None


class TaskGradients(Protocol):
    """The task gradients a method combines (a pipeline path, or a plain ``K x N`` matrix
    in :mod:`gradsurgery.testing`)."""

    def combine(self, coefficients: Tensor) -> list[Tensor] | None:
        """``g = c^T G`` (``c``: ``K`` coefficients, absent tasks 0)."""
        ...

    def combine_elements(self, method: ElementWise, losses: Tensor, present: Tensor | None,
                         scaling: Scaling) -> list[Tensor] | None:
        """``g = method.combine(G, L, z)`` over the ``present`` tasks' rows."""
        ...


class Smoothing(Protocol):
    """``weight_ema``'s running weights (see :class:`gradsurgery.methods.smoothed.Smoothed`)."""

    def smooth(self, weights: Tensor) -> Tensor:
        """``a lambda_{t-1} + (1 - a) weights`` (pure)."""
        ...

    def commit(self, weights: Tensor) -> Tensor:
        """Keeps ``weights`` as the running weights; returns them."""
        ...


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
        weight_heads: the heads receive ``c_k dL_k`` (the method's coefficient times
            their loss gradient) instead of ``dL_k``, as the official code of some
            methods does (an option of those methods); ``False`` by default.
        state_names: the attributes that make up the method's state between steps (tensors,
            numbers, ``None``, lists of tensors, or an object with its own ``state_dict``
            such as an inner ``torch.optim`` optimizer): :meth:`state_dict` saves them under
            their names and :meth:`load_state_dict` restores them (a tensor that requires
            grad in place, so that the optimizer holding it keeps it). A method declares them and writes no
            ``state_dict`` of its own, as ``torch.optim`` keeps ``state`` in the base class.
        num_tasks: set by :meth:`bind`.
        generator: the method's own random generator, set by :meth:`bind`; draw every
            random number from it so that runs are reproducible and resumable.
    """

    #: The name the class is registered under (set by :func:`~gradsurgery.methods.register`).
    name: ClassVar[str]
    rotation: ClassVar[bool] = False
    # not ClassVars: a method whose options tie it to all K tasks (a pref_vector) sets them per instance
    subset_safe: bool = False
    subset_refusal: str | None = None
    present: list[bool] | None = None
    levels: ClassVar[tuple[str, ...]] = ("rep", "params")
    loss_domain: ClassVar[str | None] = None
    observes_losses: ClassVar[bool] = False
    uses_gram: ClassVar[bool] = True  # the decision reads the Gram (not a LossWeighting's)
    state_names: ClassVar[tuple[str, ...]] = ()
    #: Keys under which gradsurgery 0.1.0 saved some of :attr:`state_names` (old key -> name).
    legacy_state_names: ClassVar[dict[str, str]] = {}
    #: States that gradsurgery 0.1.0 saved as an empty tensor when they were ``None``.
    legacy_empty_is_none: ClassVar[tuple[str, ...]] = ()
    #: States that gradsurgery 0.1.0 did not save, with the value a 0.1.0 checkpoint restores.
    legacy_missing: ClassVar[dict[str, Any]] = {}
    weight_heads: bool = False

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
        """With :attr:`weight_heads`: the ``K`` factors of the heads' loss gradients, given
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

    def options(self) -> dict[str, Any]:
        """The options the method was built with: ``__init__``'s keyword arguments, read
        back from the attributes of the same names (what ``repr`` shows and a checkpoint
        records)."""
        signature = inspect.signature(type(self).__init__)
        return {name: getattr(self, name) for name, p in signature.parameters.items()
                if name != "self" and p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY)}

    def state_dict(self) -> dict[str, Any]:
        """The declared state (:attr:`state_names`), detached copies: tensors, numbers,
        ``None``, lists, and dicts (an inner optimizer's ``state_dict``) only."""
        return {name: _saved(getattr(self, name)) for name in self.state_names}

    def check_state_dict(self, state: dict[str, Any]) -> None:
        """Raises a ``ValueError`` unless ``state`` is a :meth:`state_dict` of this method
        (the same keys, tensors of the same shapes); changes nothing."""
        state = self._renamed(state)
        if set(state) != set(self.state_names):
            raise ValueError(f"the method state has keys {sorted(state)}, but {self!r} keeps "
                             f"{sorted(self.state_names)}; it was saved by another method")
        for name in self.state_names:
            current, saved = getattr(self, name), state[name]
            if isinstance(current, Tensor) and current.numel() and (  # an empty state is not set yet
                    not isinstance(saved, Tensor) or current.shape != saved.shape):
                got = f"shape {tuple(saved.shape)}" if isinstance(saved, Tensor) else type(saved).__name__
                raise ValueError(f"the method state {name!r} is a {got}, but {self!r} keeps a tensor of "
                                 f"shape {tuple(current.shape)}")

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restores what :meth:`state_dict` returned (checked first: see
        :meth:`check_state_dict`); a tensor takes the dtype and device of the one it replaces."""
        self.check_state_dict(state)
        for name, saved in self._renamed(state).items():
            current = getattr(self, name)
            if isinstance(current, Tensor) and current.requires_grad:
                with torch.no_grad():
                    current.copy_(saved)
            elif hasattr(current, "load_state_dict"):
                current.load_state_dict(saved)
            else:
                setattr(self, name, _copy(saved, like=current if isinstance(current, Tensor) else None))

    def legacy_optimizer_state(self, saved: dict[str, Any]) -> dict[str, Any]:
        """The wrapped optimizer's saved ``state_dict`` as today's method parameters expect
        it (a method whose parameters changed since a saved version converts it; pure)."""
        return saved

    def _renamed(self, state: dict[str, Any]) -> dict[str, Any]:
        """``state`` with 0.1.0's keys (:attr:`legacy_state_names`) under today's names, the
        states it did not save (:attr:`legacy_missing`) at their values, and 0.1.0's empty
        tensors for ``None`` (:attr:`legacy_empty_is_none`) as ``None``."""
        renamed = {**self.legacy_missing,
                   **{self.legacy_state_names.get(key, key): value for key, value in state.items()}}
        return {key: None if key in self.legacy_empty_is_none and isinstance(value, Tensor) and value.numel() == 0
                else value for key, value in renamed.items()}

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.extra_repr()})"

    def extra_repr(self) -> str:
        """The options, ``name=value`` (see :meth:`options`)."""
        return ", ".join(f"{name}={value!r}" for name, value in self.options().items())

    # -- the decision, by kind ----------------------------------------------------------
    def step_loss_weights(self, losses: Tensor, smoothing: Smoothing | None = None) -> Tensor | None:
        """The weights the pipeline multiplies the losses by this step: :meth:`loss_weights`
        (a :class:`LossWeighting` smooths them with ``weight_ema``). Pure."""
        return self.loss_weights(losses)

    def decide(self, grads: TaskGradients, gram: Tensor | None, losses: Tensor, present: Tensor | None,
               loss_weights: Tensor | None, scaling: Scaling, smoothing: Smoothing | None = None) -> Decision:
        """The step's decision (each kind implements it; may update the method's state).

        Args:
            grads: the task gradients of the loss-weighted losses (``loss_weights``).
            gram: their ``K x K`` Gram (float32 or wider, unscaled); ``None`` when not formed.
            losses: the present tasks' detached losses (unweighted, float32 or wider).
            present: the indices of the present tasks (``None``: all are).
            loss_weights: what the losses were multiplied by (``None``: ones).
            scaling: the loss scale of a ``GradScaler`` step (element-wise methods decide on
                the unscaled gradients).
            smoothing: ``weight_ema``'s running weights, when it is on.
        """
        raise TypeError(f"{type(self).__name__} subclasses Method directly; subclass one of its kinds: "
                        "gradsurgery.methods.GramWeighting (weights(gram, losses)), LossWeighting "
                        "(loss_weights(losses)) or ElementWise (combine(grads, losses, rep))")

    def _weighted_decision(self, grads: TaskGradients, c: Tensor, present: Tensor | None,
                           loss_weights: Tensor | None) -> Decision:
        """``g = c^T G`` with ``c`` spread over the ``K`` tasks (absent: 0); the coefficients
        of the unweighted gradients are ``c`` times the loss weights."""
        full = c if present is None else c.new_zeros(self.num_tasks).index_copy(0, present, c)
        combined = grads.combine(full)
        if loss_weights is not None:
            scale = loss_weights.to(c.dtype)
            full = full * (scale if present is None else scale.new_ones(self.num_tasks).index_copy(0, present, scale))
        return Decision(full, combined)


def _saved(value: Any) -> Any:
    """What :meth:`Method.state_dict` saves of one state value."""
    return _copy(value.state_dict() if hasattr(value, "state_dict") else value)


def _copy(value: Any, like: Tensor | None = None) -> Any:
    """A detached copy of a state value (tensors cloned, lists and dicts copied element-wise); a
    tensor moved to ``like``'s dtype and device when given."""
    if isinstance(value, Tensor):
        value = value.detach()
        return value.to(like, copy=True) if like is not None else value.clone()
    if isinstance(value, (list, tuple)):
        return type(value)(_copy(v) for v in value)
    if isinstance(value, dict):
        return {k: _copy(v) for k, v in value.items()}
    return value


def check_option(name: str, value: Any, kind: type, allowed: str = "", what: str = "") -> Any:
    """The one option validator of the methods: ``value`` must be a ``kind`` (``bool``,
    ``int`` or ``float``; a bool is not a number, an int is a float) in the interval
    ``allowed`` (e.g. ``"[0, 1)"``, ``"(0, inf)"``; empty: any), and finite when a float.
    Returns it (a float as ``float``); otherwise raises a ``ValueError`` that names the
    option, the value and the allowed range (``what`` adds what the option means)."""
    numbers = (int, float) if kind is float else (kind,)
    valid = isinstance(value, numbers) and (kind is bool or not isinstance(value, bool))
    if valid and kind is float:
        valid = abs(value) < float("inf")  # also refuses NaN
    if valid and allowed:
        low, high = (float(end) for end in allowed[1:-1].split(","))
        valid = (value > low if allowed[0] == "(" else value >= low) and \
            (value < high if allowed[-1] == ")" else value <= high)
    if not valid:
        kinds = {bool: "True or False", int: "an integer", float: "a finite number"}[kind]
        raise ValueError(f"{name} must be {kinds}{f' in {allowed}' if allowed else ''}"
                         f"{f' ({what})' if what else ''}, got {value!r}")
    return float(value) if kind is float else value


class LossWeighting(Method):
    """A method that only weights the losses: ``g = sum_k w_k g_k``, ``w`` from
    :meth:`~Method.loss_weights` (``None``: ones). The heads get ``w_k dL_k`` too, so the
    step equals ``sum_k w_k L_k`` backpropagated plainly; no ``K x N`` matrix is formed."""

    uses_gram: ClassVar[bool] = False

    def update(self, losses: Tensor) -> None:
        """Commits the step's state (history, counters, the gradient of learnable
        weights), once per accepted ``backward``; ``losses`` are the ``K`` detached
        values (unweighted)."""

    def step_loss_weights(self, losses: Tensor, smoothing: Smoothing | None = None) -> Tensor | None:
        weights = self.loss_weights(losses)
        if smoothing is None:
            return weights
        return smoothing.smooth(torch.ones_like(losses) if weights is None else weights)

    def decide(self, grads: TaskGradients, gram: Tensor | None, losses: Tensor, present: Tensor | None,
               loss_weights: Tensor | None, scaling: Scaling, smoothing: Smoothing | None = None) -> Decision:
        """``g = sum_k w_k g_k``: the task gradients, already loss-weighted, added up."""
        self.update(losses)
        if smoothing is not None and loss_weights is not None:
            smoothing.commit(loss_weights)  # smoothed by step_loss_weights
        return self._weighted_decision(grads, torch.ones_like(losses), present, loss_weights)


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

    def decide(self, grads: TaskGradients, gram: Tensor | None, losses: Tensor, present: Tensor | None,
               loss_weights: Tensor | None, scaling: Scaling, smoothing: Smoothing | None = None) -> Decision:
        """``g = c^T G``, ``c = weights(M, L)`` over the present tasks' Gram."""
        if gram is None:
            raise ValueError(f"{self!r} decides from the Gram, but none was formed")
        c = self.weights(gram if present is None else gram[present][:, present], losses)
        if smoothing is not None:
            c = smoothing.commit(smoothing.smooth(c))
        return self._weighted_decision(grads, c, present, loss_weights)


class ElementWise(Method):
    """A method that needs the task gradients' elements: ``g = combine(G, L, z)``. It
    cannot decide from the global batch under ``torch.distributed`` (per-rank surgery).

    Element-wise methods that combine with task weights (MoDo's, SDMGrad's ``lambda``) set
    ``has_weights = True`` and pass those weights through :meth:`use_weights`, so that the
    optimizer's ``weight_ema`` smooths them and ``opt.stats["weights"]`` reports them.
    """

    has_weights: ClassVar[bool] = False
    #: ``weight_ema``'s smoothing of the weights of :meth:`use_weights`, set by :meth:`decide`
    #: for the duration of the combination.
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

    def decide(self, grads: TaskGradients, gram: Tensor | None, losses: Tensor, present: Tensor | None,
               loss_weights: Tensor | None, scaling: Scaling, smoothing: Smoothing | None = None) -> Decision:
        """``g = combine(G, L, z)``; the coefficients are the weights it combined with."""
        if smoothing is None:
            combined = grads.combine_elements(self, losses, present, scaling)
        else:
            self.smoothing = lambda weights: smoothing.commit(smoothing.smooth(weights))
            try:
                combined = grads.combine_elements(self, losses, present, scaling)
            finally:
                del self.smoothing
        weights = self.last_weights
        return Decision(weights.to(losses.dtype) if self.has_weights and weights is not None else None, combined)


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
