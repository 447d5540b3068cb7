"""``MultiTaskOptimizer``: wraps any ``torch.optim`` optimizer and drives the pipeline."""
from __future__ import annotations

from collections import OrderedDict
from typing import Any, Callable, Iterable, Sequence

import torch
from torch import Tensor

from . import checkpoint
from .methods import Method, create, kind_of
from .methods.smoothed import Smoothed
from .numerics.gram import compute_dtype
from .pipeline import checks, graph, paths, presence, stages
from .pipeline import rotation as rot
from .scale import amp, distributed
from .stats import StepRecord, step_stats


class MultiTaskOptimizer(torch.optim.Optimizer):
    """Wraps ``optimizer`` so that task gradients are combined by ``method``.

    The training step::

        opt = gs.MultiTaskOptimizer(torch.optim.Adam(params), "pcgrad", num_tasks=2)
        opt.zero_grad()
        z = backbone(x)
        z1, z2 = opt.fork(z)                 # one view of z per task
        opt.backward([loss1(head1(z1)), loss2(head2(z2))])
        opt.step()

    Args:
        optimizer: the wrapped optimizer, holding the backbone's and the heads'
            parameters. Its ``param_groups`` and ``state`` are this object's.
        method: a registered method name (see :func:`gradsurgery.methods.available`) or a
            :class:`~gradsurgery.methods.Method` instance.
        num_tasks: ``K``, the number of losses ``backward`` takes.
        rep_size: size of the shared representation (needed by rotation methods).
        rotation: learn one rotation ``R_k`` of the representation per task (RotoGrad; see
            :mod:`gradsurgery.pipeline.rotation`); ``None``: the method's default (on for
            ``rotate_only``, ``rotograd``, ``rotogradnorm``). ``True`` composes rotations
            with any method, ``False`` drops them.
        rotation_shape: the rotated part of ``z``'s features (int or shape; same as
            ``rep_size``); smaller than the features, the leading ones are rotated.
        post_shape: trailing dims of ``z`` kept as they are (e.g. ``(H, W)`` to rotate the
            channels of a feature map at every position).
        rotation_init: ``"random"`` (Haar, torch's generator, as rotograd/geotorch),
            ``"identity"`` or a ``(K, m, m)`` tensor of orthogonal matrices.
        rotation_param: ``R_k = B_k f(skew(A_k))`` with ``f`` = ``"expm"`` (default: the
            exponential, geotorch's and rotograd's), ``"cayley"`` (``(I - X/2)^{-1} (I + X/2)``:
            one inverse per rotation, whatever the size of ``A``; see docs/benchmarks.md for
            when it is faster) or a function of the skew-symmetric ``K x m x m`` stack; or
            ``"riemannian"``: ``R_k`` held directly and moved by a retraction after each
            :meth:`step` (no matrix function differentiated; docs/rotograd.md).
        coop: RotoGrad's cooperative mode from the start (see :meth:`coop`).
        method_lr: learning rate of the method's own parameters (their own param group);
            default: the first group's lr. Accepted, and ignored, for methods without
            parameters, so a loop over method names can pass the same keywords.
        check_finite: check once per ``backward`` (one host read) that every loss and
            gradient is finite, raising before anything changes. ``False`` removes the
            read for sync-free training.
        distributed_exact: under ``torch.distributed`` (initialised before this optimizer
            is built, or ``process_group`` given), decide from the global batch: one
            all-reduce of the ``K x K`` Gram and the ``K`` losses per step gives every rank
            the coefficients of single-process training on the global batch (see
            :mod:`gradsurgery.scale.distributed`). ``False``: per-rank surgery, each rank
            deciding from its own slice (the only choice for element-wise ``combine``
            methods). The heads' gradients are averaged across ranks in both modes.
        process_group: the group to synchronise over (default: the whole world when
            ``torch.distributed`` is initialised).
        level: ``None`` (default): the method's default level (``"rep"`` for all but a
            few, see their cards). ``"rep"``: the methods decide from the task gradients w.r.t. the
            shared representation ``z``. ``"params"``: from the task gradients w.r.t. the
            shared parameters (the papers' setting; see :mod:`gradsurgery.pipeline.params_level`),
            the combined gradient written to their ``.grad``. Not with rotations or
            ``torch.distributed``.
        shared_params: the shared parameters for ``level="params"``; default: the wrapped
            optimizer's parameters that ``z`` depends on, found at every ``fork``.
        weight_ema: smooth the method's weights over steps (CR-MOGM, Zhou et al. 2022):
            ``lambda_t = a lambda_{t-1} + (1 - a) lambdahat_t``, ``lambda_1 = lambdahat_1``,
            for any Gram-weighting or loss-weighting method (``a`` in ``[0, 1)``; ``None``:
            off). ``stats["weights"]`` shows the smoothed weights; ``state_dict`` holds them.
        **method_options: options of the method (e.g. ``alpha`` for ``gradnorm``).

    Attributes:
        method: the :class:`~gradsurgery.methods.Method` in use.
        decider: what decides each step: :attr:`method`, or with ``weight_ema`` the method
            wrapped in :class:`gradsurgery.methods.smoothed.Smoothed` (its running weights).
        rotations: the :class:`gradsurgery.pipeline.rotation.Rotations` (``None`` without).
        stats: what the last ``backward`` saw and decided (detached tensors):
            the same keys for every method: ``losses``, ``weights`` (each unweighted task
            gradient's coefficient in what the backbone received: the method's ``c`` times
            its loss weights, so ``1/K`` for ``mean``; ``None`` for element-wise methods:
            NaN), ``grad_norms`` and ``cosines`` (NaN for loss-weighting methods, which never
            form the task gradients), ``present`` (which tasks had a loss); with rotations,
            ``rotation_losses`` (the alignment losses). Absent tasks read NaN. Under
            gradient accumulation (several ``backward`` per ``step``) every entry is the
            mean over the step's micro-batches, and ``micro_batches`` counts them.
        distributed: the :class:`gradsurgery.scale.distributed.Sync` in use (``None`` when
            single-process); its ``bytes_last_step`` counts what the last step all-reduced.
    """

    def __init__(self, optimizer: torch.optim.Optimizer, method: str | Method = "mean", *,
                 num_tasks: int, rep_size: int | None = None, method_lr: float | None = None,
                 check_finite: bool = True, distributed_exact: bool = True, process_group=None,
                 rotation: bool | None = None, rotation_shape: int | Sequence[int] | None = None,
                 post_shape: int | Sequence[int] = (), rotation_init: str | Tensor = "random",
                 rotation_param: str | Callable[[Tensor], Tensor] = "expm",
                 coop: bool = False, level: str | None = None, shared_params: Iterable[Tensor] | None = None,
                 weight_ema: float | None = None, **method_options: Any):
        if not isinstance(optimizer, torch.optim.Optimizer):
            raise TypeError(f"optimizer must be a torch.optim.Optimizer, got {type(optimizer).__name__}")
        if isinstance(optimizer, MultiTaskOptimizer):
            raise TypeError("optimizer is already a MultiTaskOptimizer; wrap the plain optimizer once")
        if isinstance(num_tasks, bool) or not isinstance(num_tasks, int) or num_tasks < 1:
            raise ValueError(f"num_tasks must be an integer >= 1, got {num_tasks!r}")
        if method_lr is not None and not method_lr >= 0:
            raise ValueError(f"method_lr must be >= 0, got {method_lr!r}")
        if level not in (None, "rep", "params"):
            raise ValueError(f"level must be 'rep' or 'params' (None: the method's default), got {level!r}")
        self.shared_params = None if shared_params is None else list(shared_params)
        if self.shared_params is not None and not self.shared_params:
            raise ValueError("shared_params is empty; pass the backbone's parameters, or None to find them")
        self.optimizer = optimizer
        self.num_tasks = num_tasks
        self.rep_size = rep_size
        self.check_finite = bool(check_finite)
        self.method = create(method, **method_options)
        kind_of(self.method)  # a TypeError for a bare Method, before anything is built
        self.level = self.method.levels[0] if level is None else level
        if self.level not in self.method.levels:
            raise ValueError(f"{self.method!r} decides at level(s) {list(self.method.levels)} only (see its card); "
                             f"pass level={self.method.levels[0]!r} or drop level=")
        if shared_params is not None and self.level != "params":
            raise ValueError("shared_params only applies with level='params' (the representation level "
                             "trains the backbone through z); pass level='params' or drop shared_params")
        #: What decides each step: the method, or the method with its weights smoothed.
        self.decider: Method | Smoothed = self.method if weight_ema is None else Smoothed(self.method, weight_ema)
        self.weight_ema = self.decider.alpha if isinstance(self.decider, Smoothed) else None
        self.distributed_exact = bool(distributed_exact)
        group = distributed.active_group(process_group)
        if group is not None and self.distributed_exact and not distributed.is_exact(self.method):
            raise ValueError(f"{self.method!r} combines the task gradients element-wise, so it cannot "
                             "decide from the global batch under torch.distributed; pass "
                             "distributed_exact=False for per-rank surgery")
        self.distributed = distributed.NoSync() if group is None else distributed.Sync(group, self.distributed_exact)
        if group is not None and self.level == "params":
            raise ValueError("level='params' does not run under torch.distributed yet (the parameter-level "
                             "Gram of the global batch needs the whole K x P Jacobian all-reduced); use "
                             "level='rep', whose surgery is exact across ranks")

        first = next(p for g in optimizer.param_groups for p in g["params"])
        dtype = first.dtype if first.is_floating_point() else torch.get_default_dtype()
        self.rotations = rot.build(
            self.method, num_tasks, rotation=rotation, rep_size=rep_size, rotation_shape=rotation_shape,
            post_shape=post_shape, init=rotation_init, coop=coop, level=self.level,
            dtype=dtype, device=first.device, param=rotation_param)
        self.generator = torch.Generator()
        self.generator.manual_seed(int(torch.randint(0, 2**62, ())))
        self.method.bind(num_tasks, device=first.device, dtype=dtype, generator=self.generator)
        own = self._own_params()
        if own:
            method_group: dict[str, Any] = {"params": own, "name": "method", "lr": optimizer.param_groups[0]["lr"]
                                            if method_lr is None else method_lr}
            if "weight_decay" in optimizer.defaults:
                method_group["weight_decay"] = 0.0  # never decay rotations or task weights
            optimizer.add_param_group(method_group)
        self._method_params = {id(p) for p in own}

        self._path: paths.Path | None = None
        self._head_tasks: dict[int, int] = {}  # id(head parameter) -> its task, from that walk
        self.presence = presence.Presence(self.method, num_tasks, rotations=self.rotations is not None,
                                          weight_ema=self.weight_ema is not None, check_finite=self.check_finite)
        self._prepared = False  # prepare() ran for this optimizer step
        self._records: list[StepRecord] = []  # what each backward of this optimizer step saw (see stats)
        self._step_done = True  # the next backward starts a new step's records
        self._stats: dict[str, Tensor] | None = {}
        self._init_hooks()

    def _init_hooks(self) -> None:
        """The hook registries ``torch.optim.Optimizer.__init__`` creates (its ``__init__``
        is not called: it would reset the wrapped optimizer's ``param_groups`` and ``state``,
        which this object exposes). Step hooks fire through ``_patch_step_function``, the
        state-dict hooks through :mod:`gradsurgery.checkpoint`'s wrappers of ``state_dict``
        and ``load_state_dict``."""
        for name in ("_optimizer_step_pre_hooks", "_optimizer_step_post_hooks",
                     "_optimizer_state_dict_pre_hooks", "_optimizer_state_dict_post_hooks",
                     "_optimizer_load_state_dict_pre_hooks", "_optimizer_load_state_dict_post_hooks"):
            setattr(self, name, OrderedDict())
        self._patch_step_function()

    # -- torch.optim.Optimizer surface: the wrapped optimizer's groups and state --------
    @property
    def param_groups(self) -> list[dict[str, Any]]:  # type: ignore[override]
        return self.optimizer.param_groups

    @param_groups.setter
    def param_groups(self, value):
        self.optimizer.param_groups = value

    @property
    def state(self):  # type: ignore[override]
        return self.optimizer.state

    @state.setter
    def state(self, value):
        self.optimizer.state = value

    @property
    def defaults(self):  # type: ignore[override]
        return self.optimizer.defaults

    @defaults.setter
    def defaults(self, value):
        self.optimizer.defaults = value

    # -- the training step --------------------------------------------------------------
    def fork(self, z: Tensor | Sequence[Tensor]) -> list:
        """Returns ``num_tasks`` views of the shared representation ``z`` (leading batch
        dimension, any float dtype), one for each task's head.

        ``z`` may be a tuple or list of shared tensors (skip connections, several scales):
        then each task gets a tuple of views, and the surgery sees one task gradient over
        all of them (the Gram is the sum of the per-tensor Grams). Rotations act on the
        first tensor.

        Under ``torch.no_grad()`` the views are returned without recording anything (for
        evaluation); otherwise the next call must be :meth:`backward`.
        """
        single = isinstance(z, Tensor)
        shared: list[Tensor] | None = ([z] if isinstance(z, Tensor)
                                       else list(z) if isinstance(z, (tuple, list)) else None)
        if not shared or not all(isinstance(t, Tensor) and t.is_floating_point() and t.dim() >= 1 for t in shared):
            raise TypeError("fork(z) takes the backbone's output: a floating-point tensor with a leading batch "
                            f"dimension, or a tuple/list of such tensors; got {_describe(z)}")
        if not torch.is_grad_enabled():
            if self.rotations is None:
                return [z if single else tuple(shared)] * self.num_tasks
            rotated = rot.views(self.rotations, shared[0], self.num_tasks)
            return rotated if single else [(r, *shared[1:]) for r in rotated]
        if self._path is not None:
            raise RuntimeError("fork() was called twice without backward(); call "
                               "backward(losses) for the previous fork, or zero_grad() to discard it")
        if not all(t.requires_grad for t in shared):
            raise ValueError("fork(z): z does not require grad, so the backbone cannot be trained "
                             "through it; pass the backbone's output (or wrap evaluation in torch.no_grad())")
        rescaled_rows = self.distributed.world_size > 1 and not self._decides_from_losses(self.distributed)
        self._path = paths.new_path(self.method, shared, self.num_tasks, single, rotations=self.rotations,
                                    level=self.level, shared_params=self.shared_params, candidates=self._head_params,
                                    rescaled_rows=rescaled_rows)
        return self._path.views

    def backward(self, losses: Sequence[Tensor | None], *, backbone_loss: Tensor | None = None,
                 scaler: torch.amp.GradScaler | None = None) -> None:
        """Backpropagates the task ``losses`` (``num_tasks`` scalars, task ``k``'s loss
        computed from the ``k``-th view of :meth:`fork`; ``None`` for a task absent from
        this batch) with the method's surgery on the shared representation, then once
        through the backbone.

        ``backbone_loss`` (e.g. a regulariser of the shared parameters) adds its gradient
        to the shared parameters unchanged, in the same backbone pass.

        Bad input raises before anything (gradients, method state) has changed.

        ``scaler`` (a ``torch.amp.GradScaler``): the backward passes run on the scaled
        losses, the method decides from the unscaled gradients (float32 or wider; the
        scale never changes a decision) and its parameters get their gradients at the
        scaled size, like the rest (see :mod:`gradsurgery.scale.amp`). A non-finite value
        then means overflow: the method is not consulted (its state stays untouched) and
        NaN gradients reach the parameters, so ``scaler.step(opt)`` skips the step.
        Loop: ``opt.backward(losses, scaler=scaler); scaler.step(opt); scaler.update()``.

        Under ``torch.distributed`` the step needs one all-reduce (see
        :mod:`gradsurgery.scale.distributed`), so every rank must call ``backward`` every step.
        """
        path = self._pending_path()
        loss_vector, present = self._validate(losses, backbone_loss)  # the present losses, still in the graph
        scaling = amp.Scaling.of(scaler, path.shared[0].device)
        sync = self._sync_for_step()
        task_losses = loss_vector.detach().to(compute_dtype(loss_vector.dtype))
        if self._decides_from_losses(sync):
            task_losses = sync.losses(task_losses)
        loss_vector, task_losses, present = self.presence.apply_counts(sync, path, loss_vector, task_losses, present)
        loss_weights = self.decider.step_loss_weights(task_losses)  # pure
        # task gradients -> Gram -> the one all-reduce -> the one host read (finite check)
        head_params = self._head_params()
        objective = (loss_vector if loss_weights is None else loss_vector * loss_weights.to(loss_vector.dtype)).sum()
        head_grads = path.task_gradients(scaling.scaled(objective), head_params)
        gram = scaling.unscale_gram(path.gram(needed=self.method.uses_gram,
                                              retain_graph=backbone_loss is not None or scaling.active))
        checked = self.check_finite or scaling.active
        flag, gram, task_losses, head_grads = checks.reduce(
            sync, path, gram, task_losses, head_grads, backbone_loss, check=checked,
            reduce_losses=not self._decides_from_losses(sync))
        _, task_losses, present = self.presence.apply_counts(sync, path, loss_vector, task_losses, present)
        if checked and not self.presence.read(flag, gram, task_losses, present):  # the one host read
            if not scaling.active:
                checks.raise_nonfinite(task_losses, loss_weights, path, backbone_loss, self.method,
                                       self.distributed.world_size)
            return self._skip_overflow(path, head_params, head_grads, scaling.scaled(backbone_loss), task_losses)
        # -- accepted: from here on the step changes state: decide -> combine -> shared backward
        self._path = None
        with scaling.method_grads(self._own_params()):
            self._prepare_step()
            index = None if present is None else torch.tensor(present).nonzero().flatten().to(task_losses.device)
            coefficients, combined = self.decider.decide(path, gram, task_losses, index, loss_weights, scaling)
            backbone_loss = scaling.scaled(self._weighted_backbone_loss(backbone_loss))
            alignment = path.align(gram, scaling.scale, sync)
            path.shared_backward(combined, backbone_loss)
        stages.accumulate(head_params, head_grads, self._head_scales(head_params, coefficients))
        self._record(StepRecord(task_losses, gram, None if coefficients is None else coefficients.detach(),
                                present, alignment))

    def step(self, closure: Callable[[], float] | None = None):
        """Steps the wrapped optimizer (which also holds the method's parameters)."""
        loss = self.optimizer.step(closure) if closure is not None else self.optimizer.step()
        if self.rotations is not None:
            self.rotations.after_step()  # rotation_param="riemannian": the retraction
        self.method.after_step()
        self._prepared, self._step_done = False, True
        return loss

    def end_epoch(self) -> None:
        """Marks the end of an epoch: methods whose weights follow epoch-level statistics
        (DWA's loss ratios) update them here; the others ignore it, so one loop serves all."""
        self.method.end_epoch()

    def observe(self, losses: Sequence[Tensor | float]) -> None:
        """Hands the method the ``num_tasks`` task losses measured *after* ``step()``
        (e.g. the same batch re-evaluated under ``torch.no_grad()``). FAMO learns its
        weights from them; the other methods ignore the call, so one loop serves all::

            opt.backward(losses); opt.step()
            with torch.no_grad():
                opt.observe(compute_losses(x, y))
        """
        if isinstance(losses, Tensor) or not isinstance(losses, Sequence) or len(losses) != self.num_tasks:
            raise ValueError(f"observe() takes a list of {self.num_tasks} scalar losses, got {_describe(losses)}")
        values = [torch.as_tensor(loss).detach() for loss in losses]
        if any(v.numel() != 1 for v in values):
            raise ValueError("observe(): every loss must be a scalar; reduce it first (e.g. .mean())")
        stacked = torch.stack([v.reshape(()).to(values[0].device) for v in values])
        self.method.observe(stacked.to(compute_dtype(stacked.dtype)))

    def zero_grad(self, set_to_none: bool = True) -> None:
        """Zeroes every gradient of the wrapped optimizer and discards a pending fork."""
        self.optimizer.zero_grad(set_to_none=set_to_none)
        self._path = None

    # -- rotations ----------------------------------------------------------------------
    def coop(self, value: bool = True) -> "MultiTaskOptimizer":
        """Switches RotoGrad's cooperative mode: the rotations also follow the task losses
        (see :mod:`gradsurgery.pipeline.rotation`). Usually turned on after some epochs."""
        if self.rotations is None:
            raise ValueError(f"coop mode needs rotations, but {self.method!r} runs without them; build the "
                             "optimizer with rotation=True (or a RotoGrad-family method)")
        self.rotations.coop = bool(value)
        return self

    def task_model(self, task: int, backbone: torch.nn.Module, head: torch.nn.Module) -> torch.nn.Module:
        """The end-to-end predictor of ``task``, ``head(R_task backbone(x))`` (no rotation
        without rotations), as an ``nn.Module`` for evaluation and export."""
        if isinstance(task, bool) or not isinstance(task, int) or not 0 <= task < self.num_tasks:
            raise ValueError(f"task must be an integer in [0, {self.num_tasks}), got {task!r}")
        return torch.nn.Sequential(backbone, rot.RotatedHead(head, self.rotations, task))

    # -- checkpoints (the format and its checks: gradsurgery.checkpoint) ----------------
    @checkpoint.state_dict_hooks
    def state_dict(self) -> dict[str, Any]:
        """The wrapped optimizer's state, the method's parameters and state, the random
        generator, and who wrote it (the method's name and options, ``num_tasks``, the
        format version): a resumed run continues bit for bit. ``torch.optim``'s state-dict
        hooks fire as on any optimizer."""
        return {**checkpoint.describe(self.method), "num_tasks": self.num_tasks,
                "optimizer": self.optimizer.state_dict(), "method": self.method.state_dict(),
                "generator": self.generator.get_state(), "weight_ema": self._ema,
                "rotation": None if self.rotations is None else
                {"coop": self.rotations.coop, "param": self._rotation_param_name(),
                 **{k: v.clone() for k, v in self.rotations.state_dict().items()}}}

    @checkpoint.load_state_dict_hooks
    def load_state_dict(self, state_dict: dict[str, Any], method_state: bool = True) -> None:
        """Restores a :meth:`state_dict` (also one written by gradsurgery 0.1.0). Everything
        is checked first — the method's name and options, ``num_tasks``, the method state's
        keys and shapes, the rotations, the wrapped optimizer's groups — and a mismatch
        raises a ``ValueError`` before anything is restored.

        ``method_state=False`` switches method on purpose: only the wrapped optimizer's
        state (its moments, step counts and learning rates, for the backbone's and heads'
        groups) is restored, from a checkpoint of any method; this optimizer's method,
        rotations, generator and own param group stay as built."""
        if method_state and isinstance(state_dict, dict) and isinstance(state_dict.get("optimizer"), dict):
            state_dict = {**state_dict, "optimizer": self.method.legacy_optimizer_state(state_dict["optimizer"])}
        checkpoint.validate(self, state_dict, method_state=method_state)
        self._path = None
        if not method_state:
            self.optimizer.load_state_dict(checkpoint.wrapped_state_only(self.optimizer, state_dict["optimizer"]))
            return
        self.optimizer.load_state_dict(state_dict["optimizer"])
        self.method.load_state_dict(state_dict["method"])
        self.generator.set_state(state_dict["generator"])
        if self.rotations is not None:
            saved = dict(state_dict["rotation"])
            saved.pop("param", None)
            self.rotations.coop = saved.pop("coop")
            self.rotations.load_state_dict(saved)
        self._ema = state_dict.get("weight_ema")

    def _rotation_param_name(self) -> str:
        """The rotations' parametrisation as saved in ``state_dict`` (a user function: its name)."""
        assert self.rotations is not None
        param = self.rotations.param
        return param if isinstance(param, str) else getattr(param, "__qualname__", "custom")

    def __repr__(self) -> str:
        return (f"MultiTaskOptimizer(method={self.method!r}, num_tasks={self.num_tasks},\n"
                f"  optimizer={self.optimizer!r})")

    # -- helpers ------------------------------------------------------------------------
    def _head_params(self) -> list[Tensor]:
        """Parameters the task backward may reach: the wrapped optimizer's, minus the
        method's own (those get gradients from the method's losses)."""
        return [p for g in self.param_groups for p in g["params"]
                if p.requires_grad and id(p) not in self._method_params]

    def _pending_path(self) -> paths.Path:
        if self._path is None:
            raise RuntimeError("backward() was called without fork(); call views = opt.fork(z) on the "
                               "backbone's output and compute the task losses from those views")
        return self._path

    def _validate(self, losses: Sequence[Tensor | None], backbone_loss: Tensor | None
                  ) -> tuple[Tensor, list[bool] | None]:
        """Checks the losses' count, shapes and graphs; returns the present ones stacked
        into one vector, still in the graph, and which tasks are present (``None``: all)."""
        if isinstance(losses, Tensor) or not isinstance(losses, Sequence):
            raise TypeError(f"backward(losses) takes a list of {self.num_tasks} scalar losses, got {_describe(losses)}")
        if len(losses) != self.num_tasks:
            raise ValueError(f"backward() got {len(losses)} losses but num_tasks={self.num_tasks}; "
                             "pass one scalar loss per task, in the order of fork()'s views")
        for k, loss in enumerate(losses):
            if loss is None:
                continue
            if not isinstance(loss, Tensor) or loss.numel() != 1:
                raise ValueError(f"loss of task {k} must be a scalar tensor (or None for a task absent from the "
                                 f"batch), got {_describe(loss)}; reduce it first (e.g. .mean())")
            if not loss.requires_grad:
                raise ValueError(f"loss of task {k} does not require grad: compute it from the {k}-th view "
                                 "returned by fork() (not under torch.no_grad())")
        if backbone_loss is not None and (not isinstance(backbone_loss, Tensor) or backbone_loss.numel() != 1):
            raise ValueError(f"backbone_loss must be a scalar tensor, got {_describe(backbone_loss)}")
        path, present = self._pending_path(), [loss is not None for loss in losses]
        self.presence.check(present, self.distributed)
        reached = graph.check_readers(losses, path, path.shared)  # every step
        self._head_tasks = graph.owners(reached)
        losses, self.method.present = self.presence.begin(self.distributed, losses, path, reached, self._head_params())
        given = [loss for loss in losses if loss is not None]
        loss_vector = torch.stack([loss if loss.dim() == 0 else loss.reshape(()) for loss in given])
        return loss_vector, None if all(present) else present

    def _decides_from_losses(self, sync) -> bool:
        """Whether the method's loss weights may depend on the losses, so that under exact
        distributed surgery the global losses are needed before the task backward."""
        return sync.exact and type(self.method).loss_weights is not Method.loss_weights

    @property
    def _ema(self) -> Tensor | None:
        """``weight_ema``'s running weights (the checkpoint's ``"weight_ema"``)."""
        return self.decider.running if isinstance(self.decider, Smoothed) else None

    @_ema.setter
    def _ema(self, running: Tensor | None) -> None:
        if isinstance(self.decider, Smoothed):
            self.decider.running = running

    def _prepare_step(self) -> None:
        """The optimizer step's random draws, shared by its micro-batches."""
        if not self._prepared:
            self.method.prepare()
            self._prepared = True

    def _weighted_backbone_loss(self, backbone_loss: Tensor | None) -> Tensor | None:
        if backbone_loss is None:
            return None
        weight = self.method.backbone_loss_weight(backbone_loss.detach())
        return backbone_loss if weight is None else backbone_loss * weight.to(backbone_loss.dtype)

    def _head_scales(self, params: list[Tensor], coefficients: Tensor | None) -> list[Tensor | None] | None:
        """With ``method.weight_heads``: head ``k``'s gradient times ``c_k``."""
        if not self.method.weight_heads or coefficients is None:
            return None
        if any(self._head_tasks.get(id(p)) == -1 for p in params):
            raise ValueError(f"{self.method!r} weights each head by its task's coefficient, but some parameter "
                             "is read by several tasks' losses; give each task its own head")
        factors = self.method.head_weights(coefficients)
        return [None if (t := self._head_tasks.get(id(p))) is None else factors[t] for p in params]

    def _skip_overflow(self, path: paths.Path, head_params: list[Tensor], head_grads: list[Tensor | None],
                       backbone_loss: Tensor | None, task_losses: Tensor) -> None:
        """Overflow under a GradScaler: NaN into the step (see
        :func:`gradsurgery.pipeline.checks.overflow_backward`); the stats say so."""
        self._path = None
        checks.overflow_backward(path, head_params, head_grads, backbone_loss, self._own_params())
        self._records, self._step_done = [], True
        self._stats = {"losses": task_losses, "overflow": torch.ones((), dtype=torch.bool)}

    def _record(self, record: StepRecord) -> None:
        """Keeps what an accepted ``backward`` saw; the stats are computed when read."""
        if self._step_done:
            self._records, self._step_done = [], False
        self._records.append(record)
        self._stats = None  # computed when read: nothing is spent on stats nobody reads

    def _own_params(self) -> list[Tensor]:
        """The method's parameters and the rotations' (the group stepped at ``method_lr``)."""
        return [*self.method.parameters(), *([self.rotations.skew_params] if self.rotations is not None else [])]

    def _sync_for_step(self) -> distributed.Sync | distributed.NoSync:
        """The distributed context, after the first step's check that the ranks agree."""
        sync = self.distributed
        if isinstance(sync, distributed.NoSync) and self.distributed_exact and distributed.active_group() is not None:
            raise RuntimeError("torch.distributed was initialised after this MultiTaskOptimizer was "
                               "built; build it after init_process_group (or pass process_group=)")
        sync.begin_step(self.num_tasks, self.method)
        return sync

    @property
    def stats(self) -> dict[str, Tensor]:
        """What the backward calls of the last optimizer step saw and decided (detached
        tensors; see the class docstring), computed when first read after a step."""
        if self._stats is None:
            self._stats = step_stats(self._records, self.num_tasks)
        return self._stats


def _describe(x: Any) -> str:
    if isinstance(x, Tensor):
        return f"a tensor of shape {tuple(x.shape)} and dtype {x.dtype}"
    return f"{type(x).__name__}"
