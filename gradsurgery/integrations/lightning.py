"""PyTorch Lightning: a ``LightningModule`` that trains with a
:class:`~gradsurgery.MultiTaskOptimizer` under manual optimisation.

Install with ``pip install gradsurgery[lightning]``. Example::

    import lightning as L, torch, gradsurgery as gs
    from gradsurgery.integrations.lightning import MultiTaskModule

    module = MultiTaskModule(backbone, heads, [torch.nn.functional.mse_loss] * 2, method="mgda",
                             optimizer=lambda params: torch.optim.Adam(params, lr=1e-3))
    L.Trainer(max_epochs=1).fit(module, loader)   # batches: (x, y_1, ..., y_K)

``training_step`` runs ``zero_grad -> backbone -> fork -> heads -> backward -> step``; the
Lightning optimizer's ``step`` goes through the precision plugin, so with
``precision="16-mixed"`` the plugin's ``GradScaler`` is handed to ``backward`` and then
steps the optimizer (the skip-on-overflow contract of :mod:`gradsurgery.scale.amp`). Override
:meth:`MultiTaskModule.task_losses` for batches of another shape.

Single-device only: Lightning's DDP strategy wraps the whole module in
``DistributedDataParallel``, which cannot see the heads' gradients (the pipeline computes
them with ``torch.autograd.grad``); for several GPUs use the plain ``torch.distributed``
recipe of :mod:`gradsurgery.scale.distributed`.
"""
from __future__ import annotations

from typing import Any, Callable, Sequence

import torch
from torch import Tensor, nn

try:
    import lightning as L
except ImportError as e:  # pragma: no cover - exercised only without the extra
    raise ImportError("gradsurgery.integrations.lightning needs Lightning: "
                      "pip install 'gradsurgery[lightning]' (or pip install lightning)") from e

from ..optimizer import MultiTaskOptimizer


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

    def forward(self, x: Any) -> list[Tensor]:
        """Every task's prediction, for evaluation (the views are taken without recording a
        step: rotated where the method rotates, once the optimizer exists)."""
        z = self.backbone(x)
        if self._trainer is None:
            views = [z] * len(self.heads)
        else:
            with torch.no_grad():
                views = self.optimizers().optimizer.fork(z)
        return [head(v) for head, v in zip(self.heads, views)]

    def task_losses(self, views: Sequence[Tensor], batch: Any) -> list[Tensor]:
        """The ``K`` losses from the forked views; ``batch`` is ``(x, y_1, ..., y_K)``
        (what a ``DataLoader`` over a ``TensorDataset(x, y_1, ..., y_K)`` yields)."""
        targets = batch[1:]
        return [fn(head(v), t) for fn, head, v, t in zip(self.loss_fns, self.heads, views, targets)]

    def training_step(self, batch: Any, batch_idx: int) -> Tensor:
        lightning_opt = self.optimizers()
        opt: MultiTaskOptimizer = lightning_opt.optimizer
        opt.zero_grad()
        x = batch[0]
        losses = self.task_losses(opt.fork(self.backbone(x)), batch)
        opt.backward(losses, scaler=getattr(self.trainer.precision_plugin, "scaler", None))
        lightning_opt.step()
        values = torch.stack([loss.detach() for loss in losses])
        self.log_dict({f"loss_{k}": v for k, v in enumerate(values)}, on_step=True, prog_bar=False)
        return values.sum()

    def configure_optimizers(self) -> MultiTaskOptimizer:
        base = self.optimizer_factory([*self.backbone.parameters(), *self.heads.parameters()])
        return MultiTaskOptimizer(base, self.method, num_tasks=len(self.heads), **self.options)
