"""``MultiTaskOptimizer``: wraps any ``torch.optim`` optimizer and drives the pipeline."""
from __future__ import annotations

import functools
from collections import OrderedDict
from typing import Any, Callable, Iterable, Sequence

import torch
from torch import Tensor

from .methods import ElementWise, LossWeighting, Method, available, create, get, kind_of
from .numerics.gram import compute_dtype, cosines, norms
from .pipeline import graph, paths, presence, stages
from .pipeline import rotation as rot
from .scale import amp, distributed


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
        self.kind = kind_of(self.method)
        self.level = self.method.levels[0] if level is None else level
        if self.level not in self.method.levels:
            raise ValueError(f"{self.method!r} decides at level(s) {list(self.method.levels)} only (see its card); "
                             f"pass level={self.method.levels[0]!r} or drop level=")
        if shared_params is not None and self.level != "params":
            raise ValueError("shared_params only applies with level='params' (the representation level "
                             "trains the backbone through z); pass level='params' or drop shared_params")
        if weight_ema is not None and (isinstance(weight_ema, bool) or not isinstance(weight_ema, (int, float))
                                       or not 0 <= weight_ema < 1):
            raise ValueError(f"weight_ema must be a number in [0, 1) (the weight of the previous weights), "
                             f"got {weight_ema!r}")
        if weight_ema is not None and self.kind is ElementWise and not self.method.has_weights:
            raise ValueError(f"weight_ema smooths a method's weights, but {self.method!r} combines the task "
                             "gradients element by element and has none; drop weight_ema")
        self.weight_ema = None if weight_ema is None else float(weight_ema)
        if self.weight_ema is not None and self.kind is ElementWise:
            self.method.smoothing = self._commit_smoothed
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
            group: dict[str, Any] = {"params": own, "name": "method", "lr": optimizer.param_groups[0]["lr"]
                                     if method_lr is None else method_lr}
            if "weight_decay" in optimizer.defaults:
                group["weight_decay"] = 0.0  # never decay rotations or task weights
            optimizer.add_param_group(group)
        self._method_params = {id(p) for p in own}

        self._path: paths.StackedPath | paths.ParamsPath | None = None
        self._head_tasks: dict[int, int] = {}  # id(head parameter) -> its task, from that walk
        self._warned_zero: set[int] = set()  # tasks warned about an exactly zero gradient
        self._prepared = False  # prepare() ran for this optimizer step
        self._records: list[tuple] = []  # what each backward of this optimizer step saw (see stats)
        self._step_done = True  # the next backward starts a new step's records
        self._ema: Tensor | None = None  # weight_ema's running weights
        self._stats: dict[str, Tensor] | None = {}
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
        shared = [z] if single else list(z) if isinstance(z, (tuple, list)) else None
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
        self._path = self._new_path(shared, single)
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
        stacked, present = self._validate(losses, backbone_loss)
        values = stacked.detach().to(compute_dtype(stacked.dtype))
        scaling = amp.Scaling.of(scaler, path.shared[0].device)
        sync = self._sync_for_step()
        values = sync.losses(values) if self._decides_from_losses(sync) else values
        stacked, values, present = self._presence_across_ranks(sync, path, stacked, values, present)
        loss_weights = self._loss_weights(values)
        objective = stacked.sum() if loss_weights is None else (stacked * loss_weights.to(stacked.dtype)).sum()
        params = self._head_params()
        head_grads = path.task_gradients(scaling.apply(objective), params)
        gram = scaling.unscale_gram(self._gram(path, backbone_loss is not None or scaling.active))
        checked = self.check_finite or scaling.active
        flag = self._finite_flag(values, path, gram, head_grads, backbone_loss) if checked else values.new_zeros(())
        total, reduced, flag, head_grads = sync.reduce(  # one all-reduce (identity when single-process)
            gram if sync.exact else None, values if sync.exact and not self._decides_from_losses(sync) else None,
            flag, head_grads)
        gram, values = gram if total is None else total, values if reduced is None else reduced
        _, values, present = self._presence_across_ranks(sync, path, stacked, values, present)
        if checked and not self._read_checks(flag, gram, values, present):  # the one host read
            if not scaling.active:
                self._raise_nonfinite(values, loss_weights, path, backbone_loss)
            return self._skip_overflow(path, params, head_grads, scaling.apply(backbone_loss), values)
        # -- accepted: from here on the step changes state ------------------------------
        self._path = None
        with scaling.method_grads(self._own_params()):
            coefficients, combined = self._decide(path, gram, values, present, loss_weights, scaling)
            backbone_loss = scaling.apply(self._weighted_backbone_loss(backbone_loss))
            alignment = path.align(gram, scaling.scale, sync) if isinstance(path, paths.RotatedPath) else None
            path.shared_backward(combined, backbone_loss)
        stages.accumulate(params, head_grads, self._head_scales(params, coefficients))
        if self._step_done:
            self._records, self._step_done = [], False
        self._records.append((values, gram, None if coefficients is None else coefficients.detach(),
                              present, alignment))
        self._stats = None  # computed when read: nothing is spent on stats nobody reads

    def step(self, closure: Callable[[], float] | None = None):
        """Steps the wrapped optimizer (which also holds the method's parameters)."""
        loss = self.optimizer.step(closure) if closure is not None else self.optimizer.step()
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

    # -- checkpoints --------------------------------------------------------------------
    def state_dict(self) -> dict[str, Any]:
        """The wrapped optimizer's state, the method's parameters and state, and the random
        generator: a resumed run continues bit for bit."""
        return {"optimizer": self.optimizer.state_dict(), "method": self.method.state_dict(),
                "generator": self.generator.get_state(), "num_tasks": self.num_tasks, "weight_ema": self._ema,
                "rotation": None if self.rotations is None else
                {"coop": self.rotations.coop, "param": self._rotation_param_name(),
                 **{k: v.clone() for k, v in self.rotations.state_dict().items()}}}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        if state_dict.get("num_tasks") != self.num_tasks:
            raise ValueError(f"this checkpoint is for num_tasks={state_dict.get('num_tasks')}, "
                             f"the optimizer has num_tasks={self.num_tasks}")
        if (state_dict.get("rotation") is None) != (self.rotations is None):
            raise ValueError("this checkpoint and this optimizer disagree on rotations (one has them, the "
                             "other not); build the optimizer with the same method and rotation= option")
        saved_param = (state_dict.get("rotation") or {}).get("param", "expm")
        if self.rotations is not None and saved_param != self._rotation_param_name():
            raise ValueError(f"this checkpoint's rotations are parametrised by {saved_param!r}, this optimizer's by "
                             f"{self._rotation_param_name()!r}: the same generators give other rotations; build the "
                             f"optimizer with rotation_param={saved_param!r}")
        self.optimizer.load_state_dict(state_dict["optimizer"])
        self.method.load_state_dict(state_dict["method"])
        self.generator.set_state(state_dict["generator"])
        if self.rotations is not None:
            saved = dict(state_dict["rotation"])
            saved.pop("param", None)
            self.rotations.coop = saved.pop("coop")
            self.rotations.load_state_dict(saved)
        self._ema = state_dict.get("weight_ema")
        self._path = None

    def _rotation_param_name(self) -> str:
        """The rotations' parametrisation as saved in ``state_dict`` (a user function: its name)."""
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

    def _shared_for(self, shared: list[Tensor]) -> tuple[list[Tensor], bool]:
        """The shared parameters of ``level="params"`` (``shared_params``, or the wrapped
        optimizer's parameters the shared tensors depend on) and whether they are all of
        those (see :class:`gradsurgery.pipeline.paths.ParamsPath`)."""
        found = graph.shared_parameters(shared, self._head_params())
        if self.shared_params is None and not found:
            raise ValueError("level='params' found no shared parameter: z depends on none of the wrapped "
                             "optimizer's parameters. Put the backbone's parameters in the optimizer, or "
                             "pass shared_params=backbone.parameters()")
        if self.shared_params is None:
            return found, True
        complete = {id(p) for p in found} <= {id(p) for p in self.shared_params}
        if not complete and self.kind is ElementWise:
            raise ValueError(f"{self.method!r} combines the Jacobian of shared_params element by element, so the "
                             f"other {len(found) - len(self.shared_params)} parameter(s) of the backbone would get "
                             "no gradient; pass every backbone parameter as shared_params (or leave it None)")
        return self.shared_params, complete

    def _new_path(self, shared: list[Tensor], single: bool):
        """The path this step takes, by the method's kind (see :mod:`gradsurgery.pipeline.paths`)."""
        k = self.num_tasks
        if self.rotations is not None:
            return paths.RotatedPath(self.rotations, shared, k, single)
        if self.kind is LossWeighting:  # g = sum_k w_k g_k added up as plain backward (float32/64)
            exact_sum = all(t.dtype == compute_dtype(t.dtype) for t in shared) and (
                self.distributed.world_size == 1 or self._decides_from_losses(self.distributed))  # else rows scale
            return (paths.SummedPath if exact_sum else paths.StackedPath)(shared, k, single)
        inner = paths.StackedPath(shared, k, single)
        return paths.ParamsPath(inner, *self._shared_for(shared)) if self.level == "params" else inner

    def _pending_path(self):
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
        present = [loss is not None for loss in losses]
        # under torch.distributed, presence is all-reduced and read with the finiteness flag
        across_ranks = isinstance(self.distributed, distributed.Sync) and self.check_finite
        if not all(present) and not across_ranks:
            self._check_absent(present)
        reached = graph.check_readers(losses, self._path, self._path.shared)  # every step
        self._head_tasks = graph.owners(reached)
        # distributed-exact: the tasks absent here may be present on other ranks, so all K go on
        # (per-rank surgery decides over this rank's tasks, as one process)
        full = across_ranks and (self.distributed.exact or not any(present))
        if across_ranks:
            self._note_presence(present, reached)
        if full:
            losses = [self._zero_loss(k) if loss is None else loss for k, loss in enumerate(losses)]
        given = [loss for loss in losses if loss is not None]
        stacked = torch.stack(given if all(loss.dim() == 0 for loss in given) else [loss.reshape(()) for loss in given])
        self.method.present = None if all(present) or full else present
        return stacked, None if all(present) else present

    def _check_absent(self, present: list[bool], ranks: str = "") -> None:
        """Absent tasks need a method that can decide over any subset of the tasks
        (``ranks``: how the tasks are absent across ranks, said in the error)."""
        if not any(present):
            raise ValueError(f"backward() got None for every task{ranks}; skip the batch instead (nothing was changed)")
        reasons = []
        if not self.method.subset_safe:
            reasons.append(f"{self.method!r} cannot decide over a subset of the tasks: "
                           f"{self.method.subset_refusal or 'it keeps per-task state'} "
                           f"(methods that can: {', '.join(_subset_methods())})")
        if self.rotations is not None:
            reasons.append("rotations align every task's gradient")
        if self.weight_ema is not None:
            reasons.append("weight_ema smooths the weights of every task")
        if self.distributed.world_size > 1 and not self.check_finite:
            reasons.append("under torch.distributed the ranks learn each other's tasks from a host read, which "
                           "check_finite=False rules out (pass check_finite=True)")
        if reasons:
            raise ValueError(f"backward() got None for absent task(s) {[k for k, p in enumerate(present) if not p]}"
                             f"{ranks}, but " + "; ".join(reasons)
                             + ". Nothing was changed; skip such batches, or pick a method that supports them.")

    def _read_checks(self, flag: Tensor, gram: Tensor | None, values: Tensor, present: list[bool] | None) -> bool:
        """The step's one host read: whether everything is finite; a present task with an
        exactly zero gradient is warned about (once per task), from the same read."""
        finite, zero = presence.read_checks(flag, gram, values, present)
        if finite and zero:
            presence.warn_zero_gradients(zero, self._warned_zero)
        return finite

    # -- absent tasks under torch.distributed (see gradsurgery.scale.distributed) --------
    def _zero_loss(self, k: int) -> Tensor:
        """A stand-in for task ``k``'s ``None`` under ``torch.distributed``: 0, read from
        its view, so its row of ``G`` is exactly 0 and the losses keep all ``K`` places."""
        view = self._pending_path().views[k]
        return (view if isinstance(view, Tensor) else view[0]).reshape(-1)[0] * 0

    def _note_presence(self, present: list[bool], reached: dict[int, set[int]]) -> None:
        """Hands the step's all-reduce this rank's presence and which tasks reached which
        head parameter (the backbone's parameters, found once, are not the heads')."""
        sync, params = self.distributed, self._head_params()
        if not isinstance(sync, distributed.Sync):
            return
        if sync.backbone is None:  # the first step: the backbone's parameters, and the heads outside DDP
            backbone = {id(p) for p in graph.shared_parameters(self._pending_path().shared, params)}
            distributed.check_heads_outside_ddp(p for p in params if id(p) in reached and id(p) not in backbone)
            sync.backbone = backbone
        reach = torch.zeros(len(params), self.num_tasks, dtype=torch.float64)
        for i, p in enumerate(params):
            for task in reached.get(id(p), ()):
                reach[i, task] = 1.0
        sync.note_presence(present, params, reach, [id(p) not in sync.backbone for p in params])

    def _presence_across_ranks(self, sync, path, stacked: Tensor, values: Tensor, present: list[bool] | None
                               ) -> tuple[Tensor, Tensor, list[bool] | None]:
        """Once the all-reduced counts ``n_k`` are known (``sync.counts``): raises on every
        rank together when the step must be refused, and returns the losses and presence
        the method decides over. Distributed-exact: the tasks present on some rank, with
        ``R / n_k`` folded into the losses (``sync.folded``) or into the rows of ``G``;
        per-rank surgery: this rank's tasks. Identity when single-process or done."""
        if sync.counts is None or sync.presence_applied:
            return stacked, values, present
        sync.presence_applied = True
        counts, r = [int(c) for c in sync.counts.tolist()], sync.world_size
        missing = [k for k, c in enumerate(counts) if c < r]
        if sync.exact:
            decided = [c > 0 for c in counts]
            if not all(decided):
                self._check_absent(decided, " on every rank")
        else:
            decided = [True] * self.num_tasks if present is None else present
            if sync.empty:
                raise ValueError(f"backward() got None for every task on {sync.empty} rank(s); per-rank surgery "
                                 "(distributed_exact=False) has nothing to decide there. Nothing was changed; "
                                 "use distributed_exact=True or skip the batch on every rank")
            if missing:
                self._check_absent([c == r for c in counts], " on some ranks (per-rank surgery)")
        if self.rotations is not None and missing:
            raise ValueError(f"task(s) {missing} are absent on some ranks, but rotations align every task's "
                             "gradient on every rank. Nothing was changed; skip such batches on every rank")
        if sync.inexact:
            raise ValueError(f"a head parameter is read by several tasks, and task(s) {missing} are absent on some "
                             "ranks: its gradient of the global batch cannot be told apart from the ranks' sum. "
                             "Nothing was changed; give each task its own head, or skip such batches on every rank")
        if not sync.exact:  # this rank's tasks, already the only ones in the losses
            return stacked, values, present
        index = torch.tensor(decided).nonzero().flatten().to(values.device)
        if (factors := sync.row_factors()) is not None:
            if sync.folded:
                stacked = stacked * factors.to(stacked.device, stacked.dtype)
            else:
                for g in path.grads:
                    g.mul_(factors.to(g.device, g.dtype).view(-1, *[1] * (g.dim() - 1)))
        self.method.present = None if all(decided) else decided
        if all(decided):
            return stacked, values, None
        return stacked[index.to(stacked.device)], values[index], decided

    def _decides_from_losses(self, sync) -> bool:
        """Whether the method's loss weights may depend on the losses, so that under exact
        distributed surgery the global losses are needed before the task backward."""
        return sync.exact and type(self.method).loss_weights is not Method.loss_weights

    def _loss_weights(self, values: Tensor) -> Tensor | None:
        """The weights the losses are multiplied by (pure; ``weight_ema`` previews its
        smoothing for loss-weighting methods, committed in :meth:`_decide`)."""
        weights = self.method.loss_weights(values)
        if self.weight_ema is not None and self.kind is LossWeighting:
            weights = self._smoothed(torch.ones_like(values) if weights is None else weights)
        return weights

    def _commit_smoothed(self, weights: Tensor) -> Tensor:
        """:meth:`_smoothed`, kept as the running weights (an element-wise method's step)."""
        smoothed = self._smoothed(weights)
        self._ema = smoothed.detach().clone()
        return smoothed

    def _smoothed(self, weights: Tensor) -> Tensor:
        """``a lambda_{t-1} + (1 - a) lambdahat_t`` (``lambdahat_1`` at the first step)."""
        if self._ema is None:
            return weights
        return self.weight_ema * self._ema.to(weights) + (1 - self.weight_ema) * weights

    def _gram(self, path, retain: bool) -> Tensor | None:
        """The Gram the method decides from (and the stats report), when it needs one."""
        if isinstance(path, paths.ParamsPath):
            path.build_jacobian(retain_graph=retain)
        if self.kind is LossWeighting and not isinstance(path, paths.RotatedPath):
            return None  # the task gradients are only added up (SummedPath); rotations need the Gram
        return path.gram()

    def _decide(self, path, gram: Tensor | None, values: Tensor, present: list[bool] | None,
                loss_weights: Tensor | None, scaling: amp.Scaling) -> tuple[Tensor | None, list[Tensor] | None]:
        """The method's decision, by kind: the coefficients of the unweighted task
        gradients (``None`` for element-wise methods) and the combined gradient of each
        shared tensor (``None`` at the parameter level, written to ``.grad`` already)."""
        method, k = self.method, self.num_tasks
        if not self._prepared:  # the optimizer step's random draws, shared by its micro-batches
            method.prepare()
            self._prepared = True
        index = None if present is None else torch.tensor(present).nonzero().flatten().to(values.device)
        if self.kind is ElementWise:
            combined = path.combine_elements(method, values, index, scaling)
            return (method.last_weights.to(values.dtype) if method.has_weights else None), combined
        if self.kind is LossWeighting:
            method.update(values)
            if self.weight_ema is not None:
                self._ema = loss_weights.detach().clone()
            c = torch.ones_like(values)
        else:
            c = method.weights(gram if index is None else gram[index][:, index], values)
            if self.weight_ema is not None:
                c = self._smoothed(c)
                self._ema = c.detach().clone()
        full = c if index is None else c.new_zeros(k).index_copy(0, index, c)
        combined = path.combine(full)
        if loss_weights is not None:
            scale = loss_weights.to(c.dtype)
            full = full * (scale if index is None else scale.new_ones(k).index_copy(0, index, scale))
        return full, combined

    def _weighted_backbone_loss(self, backbone_loss: Tensor | None) -> Tensor | None:
        if backbone_loss is None:
            return None
        weight = self.method.backbone_loss_weight(backbone_loss.detach())
        return backbone_loss if weight is None else backbone_loss * weight.to(backbone_loss.dtype)

    def _head_scales(self, params: list[Tensor], coefficients: Tensor | None) -> list[Tensor | None] | None:
        """With ``method.weights_heads``: head ``k``'s gradient times ``c_k``."""
        if not self.method.weights_heads or coefficients is None:
            return None
        if any(self._head_tasks.get(id(p)) == -1 for p in params):
            raise ValueError(f"{self.method!r} weights each head by its task's coefficient, but some parameter "
                             "is read by several tasks' losses; give each task its own head")
        factors = self.method.head_weights(coefficients)
        return [None if (t := self._head_tasks.get(id(p))) is None else factors[t] for p in params]

    def _finite_flag(self, values: Tensor, path, gram: Tensor | None,
                     head_grads: list[Tensor | None], backbone_loss: Tensor | None) -> Tensor:
        """A 0-d tensor: 0 when the losses, the task gradients, the heads' gradients and
        ``backbone_loss`` are all finite, NaN otherwise (no host read; under
        ``torch.distributed`` it is summed across ranks with the Gram)."""
        checks = [values, path.probe(gram).to(values.dtype)]
        present = [g for g in head_grads if g is not None]
        if present:
            checks.append(torch.stack(torch._foreach_norm(present)).to(values.dtype))
        if backbone_loss is not None:
            checks.append(backbone_loss.detach().reshape(1).to(values.dtype))
        return (torch.cat(checks) * 0).sum()

    def _raise_nonfinite(self, values: Tensor, loss_weights: Tensor | None, path,
                         backbone_loss: Tensor | None) -> None:
        """Names what was not finite (a second look, after the one read said so)."""
        bad_loss = (~torch.isfinite(values)).nonzero().flatten().tolist()
        if bad_loss:
            raise ValueError(f"non-finite loss for task(s) {bad_loss} (values {values.tolist()}); "
                             "nothing was changed: skip this batch or lower the learning rate")
        if loss_weights is not None and not bool(torch.isfinite(loss_weights).all()):
            raise ValueError(f"the loss weights of {self.method!r} are not finite for the losses {values.tolist()}; "
                             f"it needs {self.method.loss_domain or 'other losses'}. Nothing was changed")
        if backbone_loss is not None and not torch.isfinite(backbone_loss).all():
            raise ValueError("backbone_loss is not finite; nothing was changed")
        bad_task = (~torch.isfinite(path.rows()).all(1)).nonzero().flatten().tolist()
        where = f"task(s) {bad_task}" if bad_task else "the heads' parameters"
        if self.distributed.world_size > 1 and not bad_task:
            where = "the heads' parameters or on another rank"
        raise FloatingPointError(f"non-finite gradient in {where} although the losses are finite; "
                                 "nothing was changed (use a GradScaler for mixed precision)")

    def _skip_overflow(self, path, params: list[Tensor], head_grads: list[Tensor | None],
                       backbone_loss: Tensor | None, values: Tensor) -> None:
        """Overflow under a GradScaler: the method is not consulted, so its state (RNG,
        counters, initial losses, parameters) stays as it was; NaN goes through the
        backbone (under DDP its all-reduce runs on every rank as usual) and into the
        method's parameters' gradients, so ``scaler.step`` skips the step."""
        self._path = None
        path.nan_backward(backbone_loss)
        stages.accumulate(params, head_grads)
        amp.mark_overflow(self._own_params())
        self._records, self._step_done = [], True
        self._stats = {"losses": values, "overflow": torch.ones((), dtype=torch.bool)}

    def _own_params(self) -> list[Tensor]:
        """The method's parameters and the rotations' (the group stepped at ``method_lr``)."""
        return self.method.parameters() + ([self.rotations.skew_params] if self.rotations is not None else [])

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
            records = [self._record_stats(*record) for record in self._records]
            n = len(records)
            self._stats = {key: functools.reduce(torch.logical_or, [r[key] for r in records])
                           if records[0][key].dtype == torch.bool else sum(r[key] for r in records) / n
                           for key in records[0]}
            self._stats["micro_batches"] = torch.tensor(n)
        return self._stats

    def _record_stats(self, values: Tensor, gram: Tensor | None, coefficients: Tensor | None,
                      present: list[bool] | None, alignment: Tensor | None) -> dict[str, Tensor]:
        """The stats of one ``backward``, the same keys for every method (NaN for what was
        not measured or absent)."""
        k = self.num_tasks
        nan = values.new_full((k,), float("nan"))
        mask = None if present is None else torch.tensor(present, device=values.device)
        stats = {"losses": values if mask is None else nan.masked_scatter(mask, values),
                 "weights": nan if coefficients is None else coefficients.to(values.dtype).clone(),
                 "grad_norms": nan if gram is None else norms(gram).to(values.dtype),
                 "cosines": nan[:, None].expand(k, k).clone() if gram is None else cosines(gram).to(values.dtype),
                 "present": torch.ones(k, dtype=torch.bool, device=values.device) if mask is None else mask}
        if mask is not None:
            absent = ~mask
            stats["grad_norms"] = stats["grad_norms"].masked_fill(absent, float("nan"))
            stats["cosines"] = stats["cosines"].masked_fill(absent[:, None] | absent[None, :], float("nan"))
        if alignment is not None:
            stats["rotation_losses"] = alignment
        return stats


def _subset_methods() -> list[str]:
    """Names of the registered methods that accept absent tasks."""
    return [name for name in available() if get(name).subset_safe]


def _describe(x: Any) -> str:
    if isinstance(x, Tensor):
        return f"a tensor of shape {tuple(x.shape)} and dtype {x.dtype}"
    return f"{type(x).__name__}"
