"""``MultiTaskOptimizer``: wraps any ``torch.optim`` optimizer and drives the pipeline."""
from __future__ import annotations

from collections import OrderedDict
from typing import Any, Callable, Sequence

import torch
from torch import Tensor

from . import pipeline
from .linalg import compute_dtype, cosines, norms
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
        method_lr: learning rate of the method's own parameters (their own param group);
            default: the first group's lr. Accepted, and ignored, for methods without
            parameters, so a loop over method names can pass the same keywords.
        check_finite: check once per ``backward`` (one host read) that every loss and
            gradient is finite, raising before anything changes. ``False`` removes the
            read for sync-free training.
        **method_options: options of the method (e.g. ``alpha`` for ``gradnorm``).

    Attributes:
        method: the :class:`~gradsurgery.methods.Method` in use.
        stats: what the last ``backward`` saw and decided (detached tensors):
            ``losses``, ``weights`` (the coefficients ``c``) and, for methods that look at
            gradients, ``grad_norms`` and ``cosines``.
    """

    def __init__(self, optimizer: torch.optim.Optimizer, method: str | Method = "mean", *,
                 num_tasks: int, rep_size: int | None = None, method_lr: float | None = None,
                 check_finite: bool = True, **method_options: Any):
        if not isinstance(optimizer, torch.optim.Optimizer):
            raise TypeError(f"optimizer must be a torch.optim.Optimizer, got {type(optimizer).__name__}")
        if isinstance(optimizer, MultiTaskOptimizer):
            raise TypeError("optimizer is already a MultiTaskOptimizer; wrap the plain optimizer once")
        if isinstance(num_tasks, bool) or not isinstance(num_tasks, int) or num_tasks < 1:
            raise ValueError(f"num_tasks must be an integer >= 1, got {num_tasks!r}")
        if method_lr is not None and not method_lr >= 0:
            raise ValueError(f"method_lr must be >= 0, got {method_lr!r}")
        self.optimizer = optimizer
        self.num_tasks = num_tasks
        self.rep_size = rep_size
        self.check_finite = bool(check_finite)
        self.method = create(method, **method_options)

        first = next(p for g in optimizer.param_groups for p in g["params"])
        dtype = first.dtype if first.is_floating_point() else torch.get_default_dtype()
        self.generator = torch.Generator()
        self.generator.manual_seed(int(torch.randint(0, 2**62, ())))
        self.method.bind(num_tasks, device=first.device, dtype=dtype, generator=self.generator)
        own = self.method.parameters()
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
            return [z] * self.num_tasks
        if self._fork is not None:
            raise RuntimeError("fork() was called twice without backward(); call "
                               "backward(losses) for the previous fork, or zero_grad() to discard it")
        if not z.requires_grad:
            raise ValueError("fork(z): z does not require grad, so the backbone cannot be trained "
                             "through it; pass the backbone's output (or wrap evaluation in torch.no_grad())")
        self._fork = pipeline.fork(z, self.num_tasks)
        return self._fork.views

    def backward(self, losses: Sequence[Tensor], *, backbone_loss: Tensor | None = None) -> None:
        """Backpropagates the task ``losses`` (``num_tasks`` scalars, task ``k``'s loss
        computed from the ``k``-th view of :meth:`fork`) with the method's surgery on the
        shared representation, then once through the backbone.

        ``backbone_loss`` (e.g. a regulariser of the shared parameters) adds its gradient
        to the shared parameters unchanged, in the same backbone pass.

        Bad input raises before anything (gradients, method state) has changed.
        """
        fork = self._fork
        if fork is None:
            raise RuntimeError("backward() was called without fork(); call views = opt.fork(z) on the "
                               "backbone's output and compute the task losses from those views")
        values = self._validate(losses, backbone_loss)
        method = self.method
        scale = method.loss_weights(values)
        objective = sum(losses) if scale is None else sum(s * l for s, l in zip(scale.to(losses[0].dtype), losses))
        params = self._head_params()
        grads, param_grads = pipeline.task_gradients(objective, fork.leaf, params)
        gram = pipeline.gram(grads) if method.needs_gram else None
        if self.check_finite:
            self._check_finite(values, grads, gram, param_grads, backbone_loss)
        # -- accepted: from here on the step changes state ------------------------------
        self._fork = None
        combined = method.combine(grads, values)
        if combined is None:
            coefficients = method.weights(gram, values)
            combined = pipeline.combine(coefficients, grads)
        else:
            coefficients = None
            combined = combined.view(grads.shape[1:]).to(grads.dtype)
        pipeline.shared_backward(fork.z, combined, backbone_loss)
        pipeline.accumulate(params, param_grads)
        self._record_stats(values, gram, coefficients)

    def step(self, closure: Callable[[], float] | None = None):
        """Steps the wrapped optimizer (which also holds the method's parameters)."""
        loss = self.optimizer.step(closure) if closure is not None else self.optimizer.step()
        self.method.after_step()
        return loss

    def zero_grad(self, set_to_none: bool = True) -> None:
        """Zeroes every gradient of the wrapped optimizer and discards a pending fork."""
        self.optimizer.zero_grad(set_to_none=set_to_none)
        self._fork = None

    # -- checkpoints --------------------------------------------------------------------
    def state_dict(self) -> dict[str, Any]:
        """The wrapped optimizer's state, the method's parameters and state, and the random
        generator: a resumed run continues bit for bit."""
        return {"optimizer": self.optimizer.state_dict(), "method": self.method.state_dict(),
                "generator": self.generator.get_state(), "num_tasks": self.num_tasks}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        if state_dict.get("num_tasks") != self.num_tasks:
            raise ValueError(f"this checkpoint is for num_tasks={state_dict.get('num_tasks')}, "
                             f"the optimizer has num_tasks={self.num_tasks}")
        self.optimizer.load_state_dict(state_dict["optimizer"])
        self.method.load_state_dict(state_dict["method"])
        self.generator.set_state(state_dict["generator"])
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

    def _validate(self, losses: Sequence[Tensor], backbone_loss: Tensor | None) -> Tensor:
        """Checks the losses' count, shapes and graph; returns their detached values in the
        dtype decisions are made in (float32 or float64)."""
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
        values = torch.stack([loss.detach().reshape(()) for loss in losses])
        return values.to(compute_dtype(values.dtype))

    def _check_finite(self, values: Tensor, grads: Tensor, gram: Tensor | None,
                      param_grads: list[Tensor | None], backbone_loss: Tensor | None) -> None:
        """One host read: are the losses, the task gradients and the heads' gradients all
        finite? On failure, a second look names the culprit."""
        checks = [values]
        checks.append(gram.diagonal() if gram is not None else grads.reshape(grads.shape[0], -1).sum(1))
        present = [g for g in param_grads if g is not None]
        if present:
            checks.append(torch.stack(torch._foreach_norm(present)).to(values.dtype))
        if backbone_loss is not None:
            checks.append(backbone_loss.detach().reshape(1).to(values.dtype))
        if bool(torch.isfinite(torch.cat(checks)).all()):
            return
        bad_loss = (~torch.isfinite(values)).nonzero().flatten().tolist()
        if bad_loss:
            raise ValueError(f"non-finite loss for task(s) {bad_loss} (values {values.tolist()}); "
                             "nothing was changed: skip this batch or lower the learning rate")
        if backbone_loss is not None and not torch.isfinite(backbone_loss).all():
            raise ValueError("backbone_loss is not finite; nothing was changed")
        flat = grads.reshape(grads.shape[0], -1)
        bad_task = (~torch.isfinite(flat).all(1)).nonzero().flatten().tolist()
        where = f"task(s) {bad_task}" if bad_task else "the heads' parameters"
        raise FloatingPointError(f"non-finite gradient in {where} although the losses are finite; "
                                 "nothing was changed (use a GradScaler for mixed precision)")

    def _record_stats(self, values: Tensor, gram: Tensor | None, coefficients: Tensor | None) -> None:
        stats = {"losses": values}
        if coefficients is not None:
            stats["weights"] = coefficients.detach()
        if gram is not None:
            stats["grad_norms"] = norms(gram)
            stats["cosines"] = cosines(gram)
        self.stats = stats


def _describe(x: Any) -> str:
    if isinstance(x, Tensor):
        return f"a tensor of shape {tuple(x.shape)} and dtype {x.dtype}"
    return f"{type(x).__name__}"
