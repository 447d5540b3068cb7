"""Uncertainty weighting (Kendall, Gal & Cipolla, "Multi-Task Learning Using Uncertainty
to Weigh Losses for Scene Geometry and Semantics", CVPR 2018).

Each task has a learnable log-variance ``s_k = log sigma_k^2`` (a method parameter, trained
by the wrapped optimizer in its own group with ``method_lr``; start ``init``, default -0.5,
LibMTL's ``UW.init_param`` and MTAN's ``logsigma``: weights ``e^{0.5} / 2 = 0.82`` at the start):

.. math::  \\mathcal L = \\sum_k \\tfrac12 e^{-s_k} L_k + \\tfrac12 s_k

(the regression form, also LibMTL's). The task losses are weighted by
``w_k = exp(-s_k) / 2`` — heads and backbone alike, since the method only weights losses
(no Gram is computed) — and ``s`` receives the exact gradient
``dL/ds_k = (1 - exp(-s_k) L_k) / 2`` in its ``.grad`` during :meth:`update`, which runs
after the step was validated. Level: loss weighting, the same at either level.
"""
from __future__ import annotations

from typing import Any

import torch
from torch import Tensor, nn

from ..numerics.grads import accumulate_grad
from .base import LossWeighting, check_option
from .registry import register


@register("uw")
class UncertaintyWeighting(LossWeighting):
    """Learnable homoscedastic-uncertainty loss weights ``exp(-s_k) / 2``."""

    state_names = ("log_vars",)
    subset_safe = True  # absent tasks: their terms drop out; their log-variances keep no gradient

    def __init__(self, init: float = -0.5):
        self.init = check_option("init", init, float, what="the initial log-variance")

    def bind(self, num_tasks, *, device, dtype, generator):
        super().bind(num_tasks, device=device, dtype=dtype, generator=generator)
        #: ``s_k``, one scalar parameter per task: an absent task's gets no gradient, so the
        #: wrapped optimizer leaves it and its moments alone (as any parameter without one).
        self.scalars = [nn.Parameter(torch.full((), self.init, device=device, dtype=dtype)) for _ in range(num_tasks)]

    @property
    def log_vars(self) -> Tensor:
        """``s`` as one ``K``-vector (a detached copy; the state saved as ``log_vars``)."""
        return torch.stack([p.detach() for p in self.scalars])

    @log_vars.setter
    def log_vars(self, value: Tensor) -> None:
        with torch.no_grad():
            for p, v in zip(self.scalars, value.unbind()):
                p.copy_(v)

    def parameters(self) -> list[nn.Parameter]:
        return list(self.scalars)

    def legacy_optimizer_state(self, saved: dict[str, Any]) -> dict[str, Any]:
        """A wrapped-optimizer ``state_dict`` written when ``s`` was one ``K``-vector
        parameter (0.1.0, and before 0.2.0), with that parameter's state split into the
        ``K`` scalars' (the method group: the last, where ``s`` was its only parameter);
        ``saved`` itself is not changed. Element-wise optimizers (SGD, Adam, ...) then
        continue bit for bit. Today's ``state_dict`` is returned as it is."""
        groups, k = saved.get("param_groups"), self.num_tasks
        if not isinstance(groups, list) or not groups or not isinstance(groups[-1], dict) \
                or groups[-1].get("name") != "method" or len(groups[-1].get("params", ())) != 1:
            return saved
        (old,) = groups[-1]["params"]
        vectors = [v for v in saved.get("state", {}).get(old, {}).values() if isinstance(v, Tensor) and v.dim() == 1]
        if k == 1 and not vectors:  # K = 1: today's one scalar (shape ()), unless its state is a 1-vector
            return saved
        new = [old] + [max(i for g in groups for i in g["params"]) + 1 + j for j in range(k - 1)]
        state = {i: v for i, v in saved["state"].items() if i != old}
        for j, index in enumerate(new):
            if old in saved["state"]:
                state[index] = {name: v[j].clone() if isinstance(v, Tensor) and v.shape == (k,) else
                                (v.clone() if isinstance(v, Tensor) else v) for name, v in saved["state"][old].items()}
        return {**saved, "state": state, "param_groups": [*groups[:-1], {**groups[-1], "params": new}]}

    def loss_weights(self, losses: Tensor) -> Tensor:
        s = self.log_vars.to(losses.dtype)
        index = self.present_index(s)
        return 0.5 * torch.exp(-(s if index is None else s[index]))

    def update(self, losses: Tensor) -> None:
        """``dL/ds_k = (1 - exp(-s_k) L_k) / 2`` into the present tasks' ``s_k`` (an absent
        task's term is not in the objective: its ``s_k`` gets no gradient at all)."""
        s = self.log_vars.to(losses.dtype)
        index = self.present_index(s)
        tasks = [k for k in range(self.num_tasks) if self.present is None or self.present[k]]
        present = s if index is None else s[index]
        grads = (0.5 * (1 - torch.exp(-present) * losses)).to(self.scalars[0].dtype)
        for k, grad in zip(tasks, grads.unbind()):
            accumulate_grad(self.scalars[k], grad)
