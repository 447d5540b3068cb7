"""``MultiTaskOptimizer``: wraps any ``torch.optim`` optimizer and drives the pipeline."""
from __future__ import annotations

from collections import OrderedDict
from typing import Any, Callable, Iterable, Sequence

import torch
from torch import Tensor

from .pipeline import params_level
from .pipeline import rotation as rot
from .pipeline import stages as pipeline
from .scale import amp, distributed
from .numerics.gram import compute_dtype, cosines, norms
from .methods import Method, create


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
            when it is faster) or a function of the skew-symmetric ``K x m x m`` stack.
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
        level: ``"rep"`` (default): the methods decide from the task gradients w.r.t. the
            shared representation ``z``. ``"params"``: from the task gradients w.r.t. the
            shared parameters (the papers' setting; see :mod:`gradsurgery.pipeline.params_level`),
            the combined gradient written to their ``.grad``. Not with rotations or
            ``torch.distributed``.
        shared_params: the shared parameters for ``level="params"``; default: the wrapped
            optimizer's parameters that ``z`` depends on, found at every ``fork``.
        **method_options: options of the method (e.g. ``alpha`` for ``gradnorm``).

    Attributes:
        method: the :class:`~gradsurgery.methods.Method` in use.
        rotations: the :class:`gradsurgery.pipeline.rotation.Rotations` (``None`` without).
        stats: what the last ``backward`` saw and decided (detached tensors):
            ``losses``, ``weights`` (each unweighted task gradient's coefficient in what
            the backbone received: the method's ``c`` times its loss weights, so ``1/K``
            for ``mean``) and, for methods that look at gradients, ``grad_norms`` and
            ``cosines``; with rotations, ``rotation_losses`` (the alignment losses).
        distributed: the :class:`gradsurgery.scale.distributed.Sync` in use (``None`` when
            single-process); its ``bytes_last_step`` counts what the last step all-reduced.
    """

    def __init__(self, optimizer: torch.optim.Optimizer, method: str | Method = "mean", *,
                 num_tasks: int, rep_size: int | None = None, method_lr: float | None = None,
                 check_finite: bool = True, distributed_exact: bool = True, process_group=None,
                 rotation: bool | None = None, rotation_shape: int | Sequence[int] | None = None,
                 post_shape: int | Sequence[int] = (), rotation_init: str | Tensor = "random",
                 rotation_param: str | Callable[[Tensor], Tensor] = "expm",
                 coop: bool = False, level: str = "rep", shared_params: Iterable[Tensor] | None = None,
                 **method_options: Any):
        if not isinstance(optimizer, torch.optim.Optimizer):
            raise TypeError(f"optimizer must be a torch.optim.Optimizer, got {type(optimizer).__name__}")
        if isinstance(optimizer, MultiTaskOptimizer):
            raise TypeError("optimizer is already a MultiTaskOptimizer; wrap the plain optimizer once")
        if isinstance(num_tasks, bool) or not isinstance(num_tasks, int) or num_tasks < 1:
            raise ValueError(f"num_tasks must be an integer >= 1, got {num_tasks!r}")
        if method_lr is not None and not method_lr >= 0:
            raise ValueError(f"method_lr must be >= 0, got {method_lr!r}")
        if level not in ("rep", "params"):
            raise ValueError(f"level must be 'rep' or 'params', got {level!r}")
        if shared_params is not None and level != "params":
            raise ValueError("shared_params only applies with level='params' (the representation level "
                             "trains the backbone through z); pass level='params' or drop shared_params")
        self.level = level
        self.shared_params = None if shared_params is None else list(shared_params)
        if self.shared_params is not None and not self.shared_params:
            raise ValueError("shared_params is empty; pass the backbone's parameters, or None to find them")
        self.optimizer = optimizer
        self.num_tasks = num_tasks
        self.rep_size = rep_size
        self.check_finite = bool(check_finite)
        self.method = create(method, **method_options)
        self.distributed_exact = bool(distributed_exact)
        group = distributed.active_group(process_group)
        if group is not None and self.distributed_exact and not distributed.is_exact(self.method):
            raise ValueError(f"{self.method!r} combines the task gradients element-wise, so it cannot "
                             "decide from the global batch under torch.distributed; pass "
                             "distributed_exact=False for per-rank surgery")
        self.distributed = None if group is None else distributed.Sync(group, self.distributed_exact)
        if group is not None and level == "params":
            raise ValueError("level='params' does not run under torch.distributed yet (the parameter-level "
                             "Gram of the global batch needs the whole K x P Jacobian all-reduced); use "
                             "level='rep', whose surgery is exact across ranks")

        first = next(p for g in optimizer.param_groups for p in g["params"])
        dtype = first.dtype if first.is_floating_point() else torch.get_default_dtype()
        self.rotations = rot.build(
            self.method, num_tasks, rotation=rotation, rep_size=rep_size, rotation_shape=rotation_shape,
            post_shape=post_shape, init=rotation_init, coop=coop, level=level,
            dtype=dtype, device=first.device, param=rotation_param)
        self.generator = torch.Generator()
        self.generator.manual_seed(int(torch.randint(0, 2**62, ())))
        self.method.bind(num_tasks, device=first.device, dtype=dtype, generator=self.generator)
        own = self._own_params()
        if own:
            group: dict[str, Any] = {"params": own, "lr": optimizer.param_groups[0]["lr"]
                                     if method_lr is None else method_lr}
            if "weight_decay" in optimizer.defaults:
                group["weight_decay"] = 0.0  # never decay rotations or task weights
            optimizer.add_param_group(group)
        self._method_params = {id(p) for p in own}

        self._fork: pipeline.Fork | None = None
        self.stats: dict[str, Tensor] = {}
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
    def fork(self, z: Tensor) -> list[Tensor]:
        """Returns ``num_tasks`` views of the shared representation ``z`` (leading batch
        dimension, any float dtype), one for each task's head.

        Under ``torch.no_grad()`` the views are returned without recording anything (for
        evaluation); otherwise the next call must be :meth:`backward`.
        """
        if not isinstance(z, Tensor) or not z.is_floating_point() or z.dim() < 1:
            raise TypeError("fork(z) takes the backbone's output: a floating-point tensor with a "
                            f"leading batch dimension, got {_describe(z)}")
        if not torch.is_grad_enabled():
            return [z] * self.num_tasks if self.rotations is None else rot.views(self.rotations, z, self.num_tasks)
        if self._fork is not None:
            raise RuntimeError("fork() was called twice without backward(); call "
                               "backward(losses) for the previous fork, or zero_grad() to discard it")
        if not z.requires_grad:
            raise ValueError("fork(z): z does not require grad, so the backbone cannot be trained "
                             "through it; pass the backbone's output (or wrap evaluation in torch.no_grad())")
        self._shared = self._shared_for(z) if self.level == "params" else []
        # a loss-only method in float32/64 gets g = sum_k g_k added up as in plain backward (no K x N G)
        summed = self.method.loss_only and not self.method.needs_gram and z.dtype == compute_dtype(z.dtype)
        self._fork = (pipeline.fork(z, self.num_tasks, summed) if self.rotations is None
                      else rot.fork(self.rotations, z, self.num_tasks))
        return self._fork.views

    def backward(self, losses: Sequence[Tensor], *, backbone_loss: Tensor | None = None,
                 scaler: torch.amp.GradScaler | None = None) -> None:
        """Backpropagates the task ``losses`` (``num_tasks`` scalars, task ``k``'s loss
        computed from the ``k``-th view of :meth:`fork`) with the method's surgery on the
        shared representation, then once through the backbone.

        ``backbone_loss`` (e.g. a regulariser of the shared parameters) adds its gradient
        to the shared parameters unchanged, in the same backbone pass.

        Bad input raises before anything (gradients, method state) has changed.

        ``scaler`` (a ``torch.amp.GradScaler``): the backward passes run on the scaled
        losses, the method decides from the unscaled gradients (float32 or wider; the
        scale never changes a decision) and its parameters get their gradients at the
        scaled size, like the rest (see :mod:`gradsurgery.scale.amp`). A non-finite value then
        means overflow: the method is not consulted (its state stays untouched) and NaN
        gradients reach the parameters, so ``scaler.step(opt)`` skips the step. This
        needs the one host read whatever ``check_finite`` (``scaler.step`` reads anyway).
        Loop: ``opt.backward(losses, scaler=scaler); scaler.step(opt); scaler.update()``.

        Under ``torch.distributed`` the step needs one all-reduce (see
        :mod:`gradsurgery.scale.distributed`), so every rank must call ``backward`` every step.
        """
        fork = self._fork
        if fork is None:
            raise RuntimeError("backward() was called without fork(); call views = opt.fork(z) on the "
                               "backbone's output and compute the task losses from those views")
        stacked = self._validate(losses, backbone_loss)
        values = stacked.detach().to(compute_dtype(stacked.dtype))
        method = self.method
        sync = self._sync_for_step()
        exact = sync is not None and sync.exact
        # methods that may weight the losses by their values see the global ones
        early = exact and type(method).loss_weights is not Method.loss_weights
        if early:
            values = sync.losses(values)
        loss_scale = amp.loss_scale(scaler, fork.z.device)
        scale = method.loss_weights(values)
        # one expression whatever K; each loss's gradient is exactly its weight, as in sum(w_k L_k)
        objective = stacked.sum() if scale is None else (stacked * scale.to(losses[0].dtype)).sum()
        if loss_scale is not None:
            objective = objective * loss_scale
            backbone_loss = None if backbone_loss is None else backbone_loss * loss_scale
        params = self._head_params()
        grads, param_grads = pipeline.task_gradients(objective, fork, params)
        rotated_grads = None
        if self.rotations is not None:  # the heads read R_k z: bring the gradients back to z's space
            rotated_grads, grads = grads, rot.unrotate(self.rotations, fork, grads)
        jac = None
        if self.level == "params" and params_level.needs_jacobian(method):  # J = G dz/dtheta, batched
            jac = params_level.jacobian(fork.z, self._shared, grads,
                                        retain_graph=backbone_loss is not None or loss_scale is not None)
            gram = jac.gram() if method.needs_gram else None
        else:
            gram = pipeline.gram(grads) if method.needs_gram or rotated_grads is not None else None
        if gram is not None and loss_scale is not None:
            gram = amp.unscale_gram(gram, loss_scale)
        checked = self.check_finite or loss_scale is not None
        flag = (self._finite_flag(values, grads, gram, param_grads, backbone_loss) if checked
                else values.new_zeros(()))
        if sync is not None:
            total, reduced, flag, param_grads = sync.reduce(
                gram if exact else None, values if exact and not early else None, flag, param_grads)
            gram = gram if total is None else total
            values = values if reduced is None else reduced
        if checked and not bool(torch.isfinite(flag)):  # the one host read
            if loss_scale is None:
                self._raise_nonfinite(values, pipeline.task_rows(fork, grads), backbone_loss)
            self._skip_overflow(fork, params, param_grads, backbone_loss, values)
            return
        # -- accepted: from here on the step changes state ------------------------------
        self._fork = None
        fork.task_grads.clear()  # kept only to name a non-finite task
        with amp.method_grads_scaled(self._own_params(), loss_scale):
            method.prepare()  # the step's random draws, outside weights (which compiles whole)
            combined = method.combine(grads, values) if jac is None and not fork.summed else None
            if jac is not None:  # parameter level: c^T J goes straight into the shared .grad
                coefficients = params_level.apply(method, jac, gram, values)
            elif fork.summed:  # loss_only: c is ones (weights runs for its state), g = grads
                coefficients, combined = method.weights(gram, values), grads
            elif combined is None:
                coefficients = method.weights(gram, values)
                combined = pipeline.combine(coefficients, grads)
            else:
                coefficients = None
                combined = combined.view(grads.shape[1:]).to(grads.dtype)
            if backbone_loss is not None:
                raw = backbone_loss.detach() if loss_scale is None else backbone_loss.detach() / loss_scale
                weight = method.backbone_loss_weight(raw)
                backbone_loss = backbone_loss if weight is None else backbone_loss * weight.to(backbone_loss.dtype)
            # the rotations first: their exponential's graph and the K task gradients are
            # freed before the backbone's backward (lower peak memory)
            alignment = (None if rotated_grads is None else
                         rot.align(self.rotations, fork, grads, rotated_grads, gram, loss_scale, sync))
            del grads, rotated_grads
            if jac is None:
                pipeline.shared_backward(fork.z, combined, backbone_loss)
            elif backbone_loss is not None:
                torch.autograd.backward(backbone_loss)
        pipeline.accumulate(params, param_grads)
        if coefficients is not None and scale is not None:  # weights of the unweighted task gradients
            coefficients = coefficients * scale.to(coefficients.dtype)
        self._record_stats(values, gram, coefficients)
        if alignment is not None:
            self.stats["rotation_losses"] = alignment

    def step(self, closure: Callable[[], float] | None = None):
        """Steps the wrapped optimizer (which also holds the method's parameters)."""
        loss = self.optimizer.step(closure) if closure is not None else self.optimizer.step()
        self.method.after_step()
        return loss

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
        self._fork = None

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

    # -- checkpoints --------------------------------------------------------------------
    def state_dict(self) -> dict[str, Any]:
        """The wrapped optimizer's state, the method's parameters and state, and the random
        generator: a resumed run continues bit for bit."""
        return {"optimizer": self.optimizer.state_dict(), "method": self.method.state_dict(),
                "generator": self.generator.get_state(), "num_tasks": self.num_tasks,
                "rotation": None if self.rotations is None else
                {"coop": self.rotations.coop, **{k: v.clone() for k, v in self.rotations.state_dict().items()}}}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        if state_dict.get("num_tasks") != self.num_tasks:
            raise ValueError(f"this checkpoint is for num_tasks={state_dict.get('num_tasks')}, "
                             f"the optimizer has num_tasks={self.num_tasks}")
        if (state_dict.get("rotation") is None) != (self.rotations is None):
            raise ValueError("this checkpoint and this optimizer disagree on rotations (one has them, the "
                             "other not); build the optimizer with the same method and rotation= option")
        self.optimizer.load_state_dict(state_dict["optimizer"])
        self.method.load_state_dict(state_dict["method"])
        self.generator.set_state(state_dict["generator"])
        if self.rotations is not None:
            saved = dict(state_dict["rotation"])
            self.rotations.coop = saved.pop("coop")
            self.rotations.load_state_dict(saved)
        self._fork = None

    def __repr__(self) -> str:
        return (f"MultiTaskOptimizer(method={self.method!r}, num_tasks={self.num_tasks},\n"
                f"  optimizer={self.optimizer!r})")

    # -- helpers ------------------------------------------------------------------------
    def _head_params(self) -> list[Tensor]:
        """Parameters the task backward may reach: the wrapped optimizer's, minus the
        method's own (those get gradients from the method's losses)."""
        return [p for g in self.param_groups for p in g["params"]
                if p.requires_grad and id(p) not in self._method_params]

    def _shared_for(self, z: Tensor) -> list[Tensor]:
        """The shared parameters of ``level="params"``: ``shared_params``, or the wrapped
        optimizer's parameters that ``z`` depends on."""
        if self.shared_params is not None:
            return self.shared_params
        found = params_level.shared_parameters(z, self._head_params())
        if not found:
            raise ValueError("level='params' found no shared parameter: z depends on none of the wrapped "
                             "optimizer's parameters. Put the backbone's parameters in the optimizer, or "
                             "pass shared_params=backbone.parameters()")
        return found

    def _validate(self, losses: Sequence[Tensor], backbone_loss: Tensor | None) -> Tensor:
        """Checks the losses' count, shapes and graph; returns them stacked into one
        ``K``-vector, still in the graph."""
        if isinstance(losses, Tensor) or not isinstance(losses, Sequence):
            raise TypeError(f"backward(losses) takes a list of {self.num_tasks} scalar losses, got {_describe(losses)}")
        if len(losses) != self.num_tasks:
            raise ValueError(f"backward() got {len(losses)} losses but num_tasks={self.num_tasks}; "
                             "pass one scalar loss per task, in the order of fork()'s views")
        for k, loss in enumerate(losses):
            if not isinstance(loss, Tensor) or loss.numel() != 1:
                raise ValueError(f"loss of task {k} must be a scalar tensor, got {_describe(loss)}; "
                                 "reduce it first (e.g. .mean())")
            if not loss.requires_grad:
                raise ValueError(f"loss of task {k} does not require grad: compute it from the {k}-th view "
                                 "returned by fork() (not under torch.no_grad())")
        if backbone_loss is not None and (not isinstance(backbone_loss, Tensor) or backbone_loss.numel() != 1):
            raise ValueError(f"backbone_loss must be a scalar tensor, got {_describe(backbone_loss)}")
        return torch.stack(losses if all(loss.dim() == 0 for loss in losses)
                           else [loss.reshape(()) for loss in losses])

    def _finite_flag(self, values: Tensor, grads: Tensor, gram: Tensor | None,
                     param_grads: list[Tensor | None], backbone_loss: Tensor | None) -> Tensor:
        """A 0-d tensor: 0 when the losses, the task gradients, the heads' gradients and
        ``backbone_loss`` are all finite, NaN otherwise (no host read; under
        ``torch.distributed`` it is summed across ranks with the Gram)."""
        checks = [values]
        checks.append(gram.diagonal() if gram is not None else grads.reshape(grads.shape[0], -1).sum(1))
        present = [g for g in param_grads if g is not None]
        if present:
            checks.append(torch.stack(torch._foreach_norm(present)).to(values.dtype))
        if backbone_loss is not None:
            checks.append(backbone_loss.detach().reshape(1).to(values.dtype))
        return (torch.cat(checks) * 0).sum()

    def _raise_nonfinite(self, values: Tensor, grads: Tensor, backbone_loss: Tensor | None) -> None:
        """Names what was not finite (a second look, after the one read said so)."""
        bad_loss = (~torch.isfinite(values)).nonzero().flatten().tolist()
        if bad_loss:
            raise ValueError(f"non-finite loss for task(s) {bad_loss} (values {values.tolist()}); "
                             "nothing was changed: skip this batch or lower the learning rate")
        if backbone_loss is not None and not torch.isfinite(backbone_loss).all():
            raise ValueError("backbone_loss is not finite; nothing was changed")
        flat = grads.reshape(grads.shape[0], -1)
        bad_task = (~torch.isfinite(flat).all(1)).nonzero().flatten().tolist()
        where = f"task(s) {bad_task}" if bad_task else "the heads' parameters"
        if self.distributed is not None and not bad_task:
            where = "the heads' parameters or on another rank"
        raise FloatingPointError(f"non-finite gradient in {where} although the losses are finite; "
                                 "nothing was changed (use a GradScaler for mixed precision)")

    def _skip_overflow(self, fork: pipeline.Fork, params: list[Tensor], param_grads: list[Tensor | None],
                       backbone_loss: Tensor | None, values: Tensor) -> None:
        """Overflow under a GradScaler: the method is not consulted, so its state (RNG,
        counters, initial losses, parameters) stays as it was; NaN goes through the
        backbone (under DDP its all-reduce runs on every rank as usual) and into the
        method's parameters' gradients, so ``scaler.step`` skips the step."""
        self._fork = None
        pipeline.shared_backward(fork.z, torch.full_like(fork.z, float("nan")), backbone_loss)
        pipeline.accumulate(params, param_grads)
        amp.mark_overflow(self._own_params())
        self.stats = {"losses": values, "overflow": torch.ones((), dtype=torch.bool)}

    def _own_params(self) -> list[Tensor]:
        """The method's parameters and the rotations' (the group stepped at ``method_lr``)."""
        return self.method.parameters() + ([self.rotations.skew_params] if self.rotations is not None else [])

    def _sync_for_step(self) -> distributed.Sync | None:
        """The distributed context, after the first step's check that the ranks agree."""
        sync = self.distributed
        if sync is None:
            if self.distributed_exact and distributed.active_group() is not None:
                raise RuntimeError("torch.distributed was initialised after this MultiTaskOptimizer was "
                                   "built; build it after init_process_group (or pass process_group=)")
            return None
        sync.begin_step(self.num_tasks, self.method)
        return sync

    def _record_stats(self, values: Tensor, gram: Tensor | None, coefficients: Tensor | None) -> None:
        stats = {"losses": values}
        if coefficients is not None:
            stats["weights"] = coefficients.detach().clone()  # never an alias of a live parameter
        if gram is not None:
            stats["grad_norms"] = norms(gram)
            stats["cosines"] = cosines(gram)
        self.stats = stats


def _describe(x: Any) -> str:
    if isinstance(x, Tensor):
        return f"a tensor of shape {tuple(x.shape)} and dtype {x.dtype}"
    return f"{type(x).__name__}"
