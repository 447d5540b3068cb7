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
``post_shape``, ``normalize_losses``, ``burn_in_period``; plus ``rotation_init`` and
``rotation_param``) and
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

import math
from contextlib import contextmanager
from typing import Any, Iterator, Mapping, Sequence

import torch
from torch import Tensor, nn
from torch.nn.modules.module import _IncompatibleKeys

from .methods.rotograd import RotoGradNorm as RotoGradNormMethod
from .optimizer import MultiTaskOptimizer
from .pipeline.rotation import RiemannianRotations, RotatedHead, Rotations, haar

__all__ = ["VanillaMTL", "RotateOnly", "RotoGrad", "RotoGradNorm", "cached"]

#: Key prefixes of a ``state_dict`` saved by the rotograd 0.1.6 package.
_PACKAGE_KEYS = ("parametrizations.rotation_", "weight_.")


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

    def _setup(self, backbone: nn.Module, heads: Sequence[nn.Module], *, rotation_shape: int | Sequence[int] | None,
               options: dict[str, Any], post_shape: Sequence[int] = (), rotation_init: str | Tensor = "random",
               rotation_param: str = "expm") -> None:
        heads = list(heads)
        params = [*backbone.parameters(), *(p for h in heads for p in h.parameters())]
        # holds the model's parameters for the pipeline; never stepped (the user's optimizers step)
        holder = torch.optim.SGD(params, lr=0.0)
        if rotation_shape is not None and isinstance(rotation_init, str) and rotation_init == "random":
            # the package's draws: geotorch samples each R_k on the CPU in the default dtype
            size = math.prod((rotation_shape,) if isinstance(rotation_shape, int) else rotation_shape)
            rotation_init = haar(len(heads), size, dtype=torch.get_default_dtype())
        rotation: dict[str, Any] = {} if rotation_shape is None else {
            "rotation_shape": rotation_shape, "post_shape": post_shape, "rotation_init": rotation_init,
            "rotation_param": rotation_param}
        # the pipeline seeds its own generator from torch's; the package draws nothing more,
        # so neither do we: the global stream after construction is the package's
        with torch.random.fork_rng(devices=[]):
            self._optimizer = MultiTaskOptimizer(holder, self._method, num_tasks=len(heads), method_lr=0.0,
                                                 **rotation, **options)
        self._backbone = [backbone]  # not a submodule: parameters() are the method's only
        self._heads = heads
        self.heads = [RotatedHead(h, self._optimizer.rotations, k, live=True) for k, h in enumerate(heads)]
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

    def to(self, *args: Any, **kwargs: Any) -> "VanillaMTL":
        self.backbone.to(*args, **kwargs)
        for head in self._heads:
            head.to(*args, **kwargs)
        return super().to(*args, **kwargs)

    def __len__(self) -> int:
        return self.num_tasks

    def __getitem__(self, item: int) -> nn.Module:
        """The end-to-end model of task ``item``: ``nn.Sequential(backbone, heads[item])``."""
        return nn.Sequential(self.backbone, self.heads[item])

    def forward(self, x: Any) -> list[Any] | tuple[list[Any], list[Any]]:
        """Backbone, then every head on its (rotated) view; returns the predictions (and,
        when the backbone or heads return tuples, their extra outputs, as the package)."""
        self._retract()
        out = self.backbone(x)
        rep, extra = (out[0], list(out[1:])) if isinstance(out, (list, tuple)) else (out, [])
        if self.training and torch.is_grad_enabled():
            self.rep = rep
            self._optimizer._path = None  # a new forward replaces an unfinished one, as in the package
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

    def _retract(self) -> None:
        """``rotation_param="riemannian"``: the user's optimizer has moved the generators
        (``MultiTaskOptimizer.step``, which retracts, is not called here); applies that
        step to the held rotations before they are read."""
        if isinstance(self.rotations, RiemannianRotations) and bool(self.rotations.skew_params.detach().any()):
            self.rotations.after_step()

    def backward(self, losses: Sequence[Tensor], backbone_loss: Tensor | None = None, **kwargs: Any) -> None:
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

    def load_state_dict(self, state_dict: Mapping[str, Any], strict: bool = True,
                        assign: bool = False) -> _IncompatibleKeys:
        """Loads this class's own ``state_dict`` or, as it is, one saved by the ``rotograd``
        0.1.6 package (keys ``parametrizations.rotation_{k}.original`` and ``.0.base``,
        RotoGradNorm's ``weight_.{k}``), mapped onto the same rotations and weights. With
        ``strict`` (the default) every key and shape is checked first, so a checkpoint that
        does not fit raises and changes nothing."""
        if any(key.startswith(_PACKAGE_KEYS) for key in state_dict):
            state_dict = self._from_package(state_dict, strict)
        if strict:
            _check_fits(self, state_dict)
        return super().load_state_dict(state_dict, strict, assign)

    def _from_package(self, state: Mapping[str, Any], strict: bool) -> dict[str, Any]:
        """The package's keys mapped onto this model's (checked when ``strict``)."""
        param = getattr(self.rotations, "param", "expm")
        if self.rotations is not None and param != "expm":
            raise ValueError(f"a rotograd 0.1.6 checkpoint holds rotations base @ expm(skew(A)) (geotorch's "
                             f"triv='expm'), but this model uses rotation_param={param!r}; build it with "
                             "rotation_param='expm' (the default) to load the checkpoint")
        own = self.state_dict()
        k = self.num_tasks
        mapped: dict[str, Any] = {}
        if self.rotations is not None:
            for ours, theirs in (("rotations.skew_params", "parametrizations.rotation_{}.original"),
                                 ("rotations.base", "parametrizations.rotation_{}.0.base")):
                names = [theirs.format(i) for i in range(k)]
                if all(n in state for n in names):
                    mapped[ours] = _stacked([state[n] for n in names], own[ours], names)
        if self._method == "rotogradnorm" and all(f"weight_.{i}" in state for i in range(k)):
            mapped["method_parameters.0"] = _stacked([state[f"weight_.{i}"] for i in range(k)],
                                                     own["method_parameters.0"], [f"weight_.{i}" for i in range(k)])
        known = _package_keys(self)
        unexpected = sorted(key for key in state if key not in known)
        missing = sorted(key for key in known if key not in state)
        if strict and (unexpected or missing):
            raise RuntimeError(f"Error(s) in loading a rotograd 0.1.6 state_dict into {type(self).__name__} "
                               f"({k} tasks): missing keys {missing}, unexpected keys {unexpected}; save the "
                               "checkpoint from the same rotograd class with the same number of tasks")
        return {**{key: value for key, value in state.items() if not key.startswith(_PACKAGE_KEYS)}, **mapped}

    def model_parameters(self, recurse: bool = True) -> Iterator[nn.Parameter]:
        yield from self.backbone.parameters(recurse=recurse)
        for head in self._heads:
            yield from head.parameters(recurse=recurse)


class RotateOnly(VanillaMTL):
    """Rotations alone (rotograd's ``RotateOnly``; gradsurgery method ``rotate_only``)."""

    _method = "rotate_only"
    rotations: Rotations  # always built: the RotoGrad family learns rotations

    def __init__(self, backbone: nn.Module, heads: Sequence[nn.Module], rotation_shape: int | Sequence[int],
                 *args: Any, post_shape: Sequence[int] = (), normalize_losses: bool = False,
                 burn_in_period: int = 20, rotation_init: str | Tensor = "random", rotation_param: str = "expm"):
        if args:
            raise TypeError(f"{type(self).__name__} takes 3 positional arguments (backbone, heads, rotation_shape); "
                            f"pass the others by keyword, got extra {args!r}")
        nn.Module.__init__(self)
        self._setup(backbone, heads, rotation_shape=rotation_shape, post_shape=post_shape,
                    rotation_init=rotation_init, rotation_param=rotation_param,
                    options=self._options(normalize_losses, burn_in_period))

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
                 *args: Any, alpha: float | None = None, post_shape: Sequence[int] = (),
                 normalize_losses: bool = False, burn_in_period: int = 20, rotation_init: str | Tensor = "random",
                 rotation_param: str = "expm"):
        if alpha is None:
            raise TypeError("RotoGradNorm needs alpha, GradNorm's asymmetry (e.g. alpha=1.0), as in rotograd")
        self._alpha = alpha
        super().__init__(backbone, heads, rotation_shape, *args, post_shape=post_shape,
                         normalize_losses=normalize_losses, burn_in_period=burn_in_period,
                         rotation_init=rotation_init, rotation_param=rotation_param)

    def _options(self, normalize_losses: bool, burn_in_period: int) -> dict[str, Any]:
        return {**super()._options(normalize_losses, burn_in_period), "alpha": self._alpha}

    @property
    def alpha(self) -> float:
        return self._alpha

    @property
    def weight(self) -> list[Tensor]:
        """The task weights ``w_k`` (positive, summing to ``K``)."""
        method = self._optimizer.method
        assert isinstance(method, RotoGradNormMethod)  # built from _method = "rotogradnorm"
        return list(method.task_weights().unbind(0))


def _package_keys(model: VanillaMTL) -> list[str]:
    """The keys of the package's ``state_dict`` for a model like ``model``."""
    keys = []
    if model.rotations is not None:
        keys += [f"parametrizations.rotation_{i}.{part}" for i in range(model.num_tasks)
                 for part in ("original", "0.base")]
    if model._method == "rotogradnorm":
        keys += [f"weight_.{i}" for i in range(model.num_tasks)]
    return keys


def _stacked(values: Sequence[Tensor], like: Tensor, names: Sequence[str]) -> Tensor:
    """The package's per-task tensors stacked into ours (checked against ``like``'s shape)."""
    bad = [f"{n} {tuple(v.shape)}" for n, v in zip(names, values) if tuple(v.shape) != tuple(like.shape[1:])]
    if bad:
        raise RuntimeError(f"size mismatch loading a rotograd 0.1.6 state_dict: {', '.join(bad)}, expected shape "
                           f"{tuple(like.shape[1:])} each; build the model with the checkpoint's rotation_shape")
    return torch.stack([v.to(like.dtype) for v in values])


def _check_fits(model: nn.Module, state: Mapping[str, Any]) -> None:
    """Raises, before anything is copied, when ``state`` lacks a key of ``model``, has one
    more, or a tensor of another shape (``nn.Module.load_state_dict`` copies what fits
    before it raises)."""
    own = model.state_dict()
    missing = sorted(set(own) - set(state))
    unexpected = sorted(set(state) - set(own))
    shapes = [f"{k}: checkpoint {tuple(state[k].shape)}, model {tuple(v.shape)}" for k, v in own.items()
              if k in state and isinstance(state[k], Tensor) and state[k].shape != v.shape]
    if missing or unexpected or shapes:
        raise RuntimeError(f"Error(s) in loading state_dict for {type(model).__name__}: missing keys {missing}, "
                           f"unexpected keys {unexpected}, shape mismatches {shapes}; nothing was loaded")
