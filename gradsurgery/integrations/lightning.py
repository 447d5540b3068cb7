"""PyTorch Lightning: a ``LightningModule`` that trains with a
:class:`~gradsurgery.MultiTaskOptimizer` under manual optimisation.

Install with ``pip install gradsurgery[lightning]``. Example::

    import lightning as L, torch, gradsurgery as gs
    from gradsurgery.integrations.lightning import MultiTaskModule

    module = MultiTaskModule(backbone, heads, [torch.nn.functional.mse_loss] * 2, method="mgda",
                             optimizer=lambda params: torch.optim.Adam(params, lr=1e-3))
    L.Trainer(max_epochs=1).fit(module, loader)   # batches: (x, y_1, ..., y_K)

A fit equals the documented plain loop (what :func:`gradsurgery.compare` runs):

- ``training_step``: ``zero_grad -> backbone -> fork -> heads -> backward -> step``, then,
  for a method that ``observes_losses`` (FAMO), ``observe`` of the same batch's losses
  re-evaluated after the step under ``torch.no_grad()``;
- ``on_train_epoch_end``: ``end_epoch()`` (DWA's and STCH's epoch statistics).

The Lightning optimizer's ``step`` goes through the precision plugin: with
``precision="16-mixed"`` the plugin's ``GradScaler`` is handed to ``backward`` and then steps
the optimizer (the skip-on-overflow contract of :mod:`gradsurgery.scale.amp`); under
``"bf16-mixed"`` the rotations run in float32 (:mod:`gradsurgery.numerics.expm`).

**State.** The module owns what its predictions need: the rotations (RotoGrad family) are
the submodule :attr:`MultiTaskModule.rotations`, built in ``__init__``; the optimizer built
by ``configure_optimizers`` trains those very tensors. So ``state_dict`` holds them, a
fresh module that loads it predicts the same, and ``predict``/``validate``/``test`` run in
a fresh ``Trainer`` (``forward`` never needs the optimizer).

**Several devices.** ``Trainer(strategy="ddp", devices=N)``: the surgery is that of one
process on the global batch. The optimizer, built after the process group exists,
all-reduces the ``K x K`` Gram, the losses, the heads' and the rotations' gradients
(:mod:`gradsurgery.scale.distributed`); the module averages the backbone's gradients
after ``backward`` (Lightning's DDP wrapper does not reduce under manual optimisation), and
rank 0's generator state is broadcast so that random methods draw alike. Other multi-process
strategies (FSDP, DeepSpeed) are refused. Override :meth:`MultiTaskModule.task_losses` for
batches of another shape.
"""
from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import torch
from torch import Tensor, nn

try:
    import lightning as L
    from lightning.pytorch.strategies import DDPStrategy, SingleDeviceStrategy
except ImportError as e:  # pragma: no cover - exercised only without the extra
    raise ImportError("gradsurgery.integrations.lightning needs Lightning: "
                      "pip install 'gradsurgery[lightning]' (or pip install lightning)") from e

from ..methods import get as method_class
from ..numerics.gram import compute_dtype
from ..optimizer import MultiTaskOptimizer
from ..pipeline import rotation as rot
from ..scale.distributed import Sync, average_gradients

#: MultiTaskOptimizer options that shape the rotations (the module builds them from these).
_ROTATION_OPTIONS = ("rotation", "rep_size", "rotation_shape", "post_shape", "rotation_init", "coop", "level",
                     "rotation_param")


class MultiTaskModule(L.LightningModule):
    """Backbone, ``K`` heads and ``K`` loss functions trained with gradient surgery.

    Args:
        backbone: the shared module, ``z = backbone(x)``.
        heads: the ``K`` task heads (``nn.ModuleList`` or a sequence of modules).
        loss_fns: ``K`` callables ``loss_k(prediction_k, target_k) -> scalar``.
        method: a registered method name or a method instance.
        optimizer: builds the wrapped optimizer from the parameters (default: Adam, lr 1e-3).
        **options: further :class:`~gradsurgery.MultiTaskOptimizer` options
            (``method_lr``, ``rep_size``, method options, ...).

    Attributes:
        rotations: the :class:`~gradsurgery.pipeline.rotation.Rotations` the optimizer trains
            (``None`` without rotations), drawn here as the optimizer would draw them (torch's
            global generator), so a module built after ``torch.manual_seed(s)`` starts where
            ``MultiTaskOptimizer`` built after the same seed starts.
    """

    def __init__(self, backbone: nn.Module, heads: Sequence[nn.Module], loss_fns: Sequence[Callable[..., Tensor]],
                 method: Any = "mean", *,
                 optimizer: Callable[[list[nn.Parameter]], torch.optim.Optimizer] | None = None,
                 **options: Any):
        super().__init__()
        if len(heads) != len(loss_fns):
            raise ValueError(f"got {len(heads)} heads but {len(loss_fns)} loss functions; pass one loss per head")
        self.backbone = backbone
        self.heads = nn.ModuleList(heads)
        self.loss_fns = list(loss_fns)
        self.method = method
        self.optimizer_factory = optimizer or (lambda params: torch.optim.Adam(params, lr=1e-3))
        self.options = options
        self.automatic_optimization = False
        self.rotations = self._build_rotations()

    def _build_rotations(self) -> rot.Rotations | None:
        """The rotations ``MultiTaskOptimizer(..., **options)`` would build (same checks, same draws)."""
        given = {k: self.options[k] for k in _ROTATION_OPTIONS if k in self.options}
        use = given.pop("rotation", None)
        if use is None:  # the method's default, read from its class (its options are the optimizer's to check)
            use = (method_class(self.method) if isinstance(self.method, str) else type(self.method)).rotation
        first = next((p for p in [*self.backbone.parameters(), *self.heads.parameters()]), None)
        dtype = first.dtype if first is not None and first.is_floating_point() else torch.get_default_dtype()
        return rot.build(self.method, len(self.heads), rotation=use, rep_size=given.get("rep_size"),
                         rotation_shape=given.get("rotation_shape"), post_shape=given.get("post_shape", ()),
                         init=given.get("rotation_init", "random"), coop=given.get("coop", False),
                         level=given.get("level") or "rep", dtype=compute_dtype(dtype),
                         device=torch.device("cpu") if first is None else first.device,
                         param=given.get("rotation_param", "expm"))

    # -- predictions --------------------------------------------------------------------
    def forward(self, x: Any) -> list[Tensor]:
        """Every task's prediction, ``head_k(R_k backbone(x))`` (``R_k``: this module's
        rotations, the identity without; no gradient reaches them). Needs no optimizer."""
        z = self.backbone(x)
        k = len(self.heads)
        if self.rotations is None:
            views: list = [z] * k
        else:
            first = z if isinstance(z, Tensor) else z[0]
            rotated = rot.views(self.rotations, first, k)
            views = rotated if isinstance(z, Tensor) else [(r, *z[1:]) for r in rotated]
        return [head(v) for head, v in zip(self.heads, views)]

    def task_losses(self, views: Sequence[Tensor], batch: Any) -> list[Tensor]:
        """The ``K`` losses from the forked views; ``batch`` is ``(x, y_1, ..., y_K)``
        (what a ``DataLoader`` over a ``TensorDataset(x, y_1, ..., y_K)`` yields)."""
        targets = batch[1:]
        return [fn(head(v), t) for fn, head, v, t in zip(self.loss_fns, self.heads, views, targets)]

    def _evaluate(self, batch: Any, stage: str) -> Tensor:
        """The task losses of ``forward``'s predictions, logged as ``{stage}_loss_k``."""
        z = self.backbone(batch[0])
        k = len(self.heads)
        views = [z] * k if self.rotations is None else rot.views(self.rotations, z, k)
        values = torch.stack([loss.detach().reshape(()) for loss in self.task_losses(views, batch)])
        self.log_dict({f"{stage}_loss_{i}": v for i, v in enumerate(values)})
        return values.sum()

    def validation_step(self, batch: Any, batch_idx: int) -> Tensor:
        return self._evaluate(batch, "val")

    def test_step(self, batch: Any, batch_idx: int) -> Tensor:
        return self._evaluate(batch, "test")

    def predict_step(self, batch: Any, batch_idx: int) -> list[Tensor]:
        """``forward`` of the inputs: the batch itself, or its first item (``(x, ...)``)."""
        return self(batch[0] if isinstance(batch, (tuple, list)) else batch)

    # -- training -----------------------------------------------------------------------
    def _optimizer(self) -> tuple[Any, MultiTaskOptimizer]:
        """Lightning's wrapper of the optimizer (whose ``step`` runs the precision plugin), and ours."""
        lightning_opt = self.optimizers()
        assert not isinstance(lightning_opt, list) and isinstance(lightning_opt.optimizer, MultiTaskOptimizer)
        return lightning_opt, lightning_opt.optimizer

    def training_step(self, batch: Any, batch_idx: int) -> Tensor:
        lightning_opt, opt = self._optimizer()
        opt.zero_grad()
        x = batch[0]
        losses = self.task_losses(opt.fork(self.backbone(x)), batch)
        opt.backward(losses, scaler=getattr(self.trainer.precision_plugin, "scaler", None))
        if isinstance(opt.distributed, Sync):  # Lightning's DDP wrapper does not reduce under manual optimisation
            average_gradients(self.backbone.parameters(), opt.distributed.group)
        lightning_opt.step()
        if opt.method.observes_losses:  # FAMO learns from the same batch's losses after the step
            with torch.no_grad():
                opt.observe(self.task_losses(opt.fork(self.backbone(x)), batch))
        values = torch.stack([loss.detach() for loss in losses])
        self.log_dict({f"loss_{k}": v for k, v in enumerate(values)}, on_step=True, prog_bar=False)
        return values.sum()

    def on_train_epoch_end(self) -> None:
        self._optimizer()[1].end_epoch()  # DWA's and STCH's epoch-level statistics

    def configure_optimizers(self) -> MultiTaskOptimizer:
        """The :class:`~gradsurgery.MultiTaskOptimizer`, training this module's rotations
        (its rotations' tensors share their storage); under several processes, ``"ddp"``
        only, with rank 0's generator state."""
        strategy = self.trainer.strategy if self._trainer is not None else None
        if strategy is not None and self.trainer.world_size > 1 and not isinstance(strategy, DDPStrategy):
            raise ValueError(f"MultiTaskModule runs on several devices under strategy='ddp' only (the surgery of the "
                             f"global batch needs the backbone's gradients averaged after backward), not "
                             f"{type(strategy).__name__}; pass strategy='ddp'")
        base = self.optimizer_factory([*self.backbone.parameters(), *self.heads.parameters()])
        options = dict(self.options)
        if self.rotations is not None:
            options["rotation_init"] = self.rotations.base  # nothing drawn: the module's rotations are used
        opt = MultiTaskOptimizer(base, self.method, num_tasks=len(self.heads), **options)
        if self.rotations is not None:
            assert opt.rotations is not None
            opt.rotations.skew_params.data = self.rotations.skew_params.data  # the optimizer trains the module's
            opt.rotations.base = self.rotations.base
        if strategy is not None and not isinstance(strategy, SingleDeviceStrategy) and self.trainer.world_size > 1:
            opt.generator.set_state(strategy.broadcast(opt.generator.get_state()))
        return opt
