"""A drop-in for the ``rotograd`` package: change ``import rotograd`` to
``import gradsurgery.compat as rotograd`` (or ``from gradsurgery.compat import RotoGrad``)
and the rest of the code stays as it is::

    model = RotoGradNorm(backbone, [head1, head2], size_z, alpha=1.0)
    optim_model = torch.optim.Adam([{"params": m.parameters()} for m in [backbone, head1, head2]], lr=1e-3)
    optim_rotograd = torch.optim.Adam(model.parameters(), lr=1e-4)

    model.train()
    optim_model.zero_grad(); optim_rotograd.zero_grad()
    with rotograd.cached():
        pred1, pred2 = model(x)
        model.backward([loss_task1(pred1, y1), loss_task2(pred2, y2)])
    optim_model.step(); optim_rotograd.step()

The classes keep the package's constructor signatures (``rotation_shape``, ``alpha``,
``post_shape``, ``normalize_losses``, ``burn_in_period``; plus ``rotation_init``) and
attributes (``backbone``, ``heads``, ``num_tasks``, ``model[i]``, ``len(model)``,
``backward(losses, backbone_loss=None)``, ``coop()``, ``mtl_parameters()``,
``model_parameters()``). As in the package, ``parameters()`` are only the method's own
(rotations, RotoGradNorm's weights), trained by their own optimizer, and
``model_parameters()`` the backbone's and heads'. Everything runs on the
:class:`gradsurgery.MultiTaskOptimizer` pipeline (methods ``sum``, ``rotate_only``,
``rotograd``, ``rotogradnorm``); with the same seed, the default random rotations are the
ones the package draws, so a run is the package's run.
"""
from __future__ import annotations

from contextlib import contextmanager
from typing import Any, Iterator, Sequence

import torch
from torch import Tensor, nn

from .optimizer import MultiTaskOptimizer
from .pipeline.rotation import RotatedHead

__all__ = ["VanillaMTL", "RotateOnly", "RotoGrad", "RotoGradNorm", "cached"]


@contextmanager
def cached() -> Iterator[None]:
    """Kept for compatibility: gradsurgery evaluates the rotations once per step anyway,
    so this context changes nothing."""
    yield


class VanillaMTL(nn.Module):
    """Plain multi-task training: ``sum(losses)`` with one backward through the backbone."""

    _method = "sum"

    def __init__(self, backbone: nn.Module, heads: Sequence[nn.Module]):
        super().__init__()
        self._setup(backbone, heads, rotation_shape=None, options={})

    def _setup(self, backbone: nn.Module, heads: Sequence[nn.Module], *, rotation_shape, options: dict[str, Any],
               post_shape=(), rotation_init: str | Tensor = "random") -> None:
        heads = list(heads)
        params = [*backbone.parameters(), *(p for h in heads for p in h.parameters())]
        # holds the model's parameters for the pipeline; never stepped (the user's optimizers step)
        holder = torch.optim.SGD(params, lr=0.0)
        rotation = {} if rotation_shape is None else {
            "rotation_shape": rotation_shape, "post_shape": post_shape, "rotation_init": rotation_init}
        self._optimizer = MultiTaskOptimizer(holder, self._method, num_tasks=len(heads), method_lr=0.0,
                                             **rotation, **options)
        self._backbone = [backbone]  # not a submodule: parameters() are the method's only
        self._heads = heads
        self.heads = [RotatedHead(h, self._optimizer.rotations, k) for k, h in enumerate(heads)]
        self.num_tasks = len(heads)
        self.rotations = self._optimizer.rotations
        self.method_parameters = nn.ParameterList(self._optimizer.method.parameters())
        self.rep: Tensor | None = None

    @property
    def backbone(self) -> nn.Module:
        return self._backbone[0]

    @property
    def optimizer(self) -> MultiTaskOptimizer:
        """The pipeline this model runs on (its ``stats`` describe the last step)."""
        return self._optimizer

    def train(self, mode: bool = True) -> "VanillaMTL":
        super().train(mode)
        self.backbone.train(mode)
        for head in self._heads:
            head.train(mode)
        return self

    def to(self, *args, **kwargs) -> "VanillaMTL":
        self.backbone.to(*args, **kwargs)
        for head in self._heads:
            head.to(*args, **kwargs)
        return super().to(*args, **kwargs)

    def __len__(self) -> int:
        return self.num_tasks

    def __getitem__(self, item: int) -> nn.Module:
        """The end-to-end model of task ``item``: ``nn.Sequential(backbone, heads[item])``."""
        return nn.Sequential(self.backbone, self.heads[item])

    def forward(self, x: Any):
        """Backbone, then every head on its (rotated) view; returns the predictions (and,
        when the backbone or heads return tuples, their extra outputs, as the package)."""
        out = self.backbone(x)
        rep, extra = (out[0], list(out[1:])) if isinstance(out, (list, tuple)) else (out, [])
        if self.training and torch.is_grad_enabled():
            self.rep = rep
            self._optimizer._fork = None  # a new forward replaces an unfinished one, as in the package
            outs = [h(v) for h, v in zip(self._heads, self._optimizer.fork(rep))]
        else:  # evaluation: rotated views, no gradient to the rotations, nothing recorded
            outs = [h(rep) for h in self.heads]
        preds = []
        for out in outs:
            if isinstance(out, (list, tuple)):
                preds.append(out[0])
                extra.append(out[1:])
            else:
                preds.append(out)
        return (preds, extra) if extra else preds

    def backward(self, losses: Sequence[Tensor], backbone_loss: Tensor | None = None, **kwargs) -> None:
        """Gradients of the whole model (shared and task-specific) and of the method's own
        parameters for the task ``losses`` (computed from the last training forward)."""
        if kwargs:
            raise TypeError(f"backward() does not take {sorted(kwargs)}: the pipeline runs its own "
                            "backward passes (retain_graph etc. are not needed)")
        if not self.training:
            raise RuntimeError("backward() runs in training mode; call model.train() before the forward")
        self._optimizer.backward(list(losses), backbone_loss=backbone_loss)

    def mtl_parameters(self, recurse: bool = True) -> Iterator[nn.Parameter]:
        return self.parameters(recurse=recurse)

    def model_parameters(self, recurse: bool = True) -> Iterator[nn.Parameter]:
        yield from self.backbone.parameters(recurse=recurse)
        for head in self._heads:
            yield from head.parameters(recurse=recurse)


class RotateOnly(VanillaMTL):
    """Rotations alone (rotograd's ``RotateOnly``; gradsurgery method ``rotate_only``)."""

    _method = "rotate_only"

    def __init__(self, backbone: nn.Module, heads: Sequence[nn.Module], rotation_shape: int | Sequence[int],
                 *args, post_shape: Sequence[int] = (), normalize_losses: bool = False,
                 burn_in_period: int = 20, rotation_init: str | Tensor = "random"):
        if args:
            raise TypeError(f"{type(self).__name__} takes 3 positional arguments (backbone, heads, rotation_shape); "
                            f"pass the others by keyword, got extra {args!r}")
        nn.Module.__init__(self)
        self._setup(backbone, heads, rotation_shape=rotation_shape, post_shape=post_shape,
                    rotation_init=rotation_init, options=self._options(normalize_losses, burn_in_period))

    def _options(self, normalize_losses: bool, burn_in_period: int) -> dict[str, Any]:
        return {"normalize_losses": normalize_losses, "burn_in_period": burn_in_period}

    @property
    def rotation(self) -> list[Tensor]:
        """The rotation matrices ``R_k`` (differentiable w.r.t. the parameters)."""
        return list(self.rotations.matrices().unbind(0))

    def coop(self, value: bool = True) -> "RotateOnly":
        """Enables/disables the cooperative mode (see :mod:`gradsurgery.pipeline.rotation`)."""
        self._optimizer.coop(value)
        return self


class RotoGrad(RotateOnly):
    """Rotations + RotoGrad's magnitudes (rotograd's ``RotoGrad``; method ``rotograd``)."""

    _method = "rotograd"


class RotoGradNorm(RotateOnly):
    """Rotations + GradNorm magnitudes (rotograd's ``RotoGradNorm``; method
    ``rotogradnorm``). ``alpha`` is required, as in the package."""

    _method = "rotogradnorm"

    def __init__(self, backbone: nn.Module, heads: Sequence[nn.Module], rotation_shape: int | Sequence[int],
                 *args, alpha: float | None = None, post_shape: Sequence[int] = (),
                 normalize_losses: bool = False, burn_in_period: int = 20, rotation_init: str | Tensor = "random"):
        if alpha is None:
            raise TypeError("RotoGradNorm needs alpha, GradNorm's asymmetry (e.g. alpha=1.0), as in rotograd")
        self._alpha = alpha
        super().__init__(backbone, heads, rotation_shape, *args, post_shape=post_shape,
                         normalize_losses=normalize_losses, burn_in_period=burn_in_period,
                         rotation_init=rotation_init)

    def _options(self, normalize_losses: bool, burn_in_period: int) -> dict[str, Any]:
        return {**super()._options(normalize_losses, burn_in_period), "alpha": self._alpha}

    @property
    def alpha(self) -> float:
        return self._alpha

    @property
    def weight(self) -> list[Tensor]:
        """The task weights ``w_k`` (positive, summing to ``K``)."""
        return list(self._optimizer.method.task_weights().unbind(0))
