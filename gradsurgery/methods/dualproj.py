"""DualProj: the preference-weighted mean gradient projected onto the dual cone of the task
gradients (Quinton & Rey, "Jacobian Descent for Multi-Objective Optimization", 2024; the
authors' code is torchjd, ``aggregation/_dualproj.py``, ``DualProjWeighting``; the
projection is Eq. 11 of Lopez-Paz & Ranzato, "Gradient Episodic Memory", NeurIPS 2017).

.. math::  g = \\pi_C\\Big(\\sum_k u_k g_k\\Big) = G^\\top v,\\qquad
           v = \\arg\\min_{v \\ge u} v^\\top M v

where ``C = {y : <g_k, y> >= 0 for all k}`` and ``u`` is ``pref_vector`` (default ``1/K``:
the projection of the mean, torchjd's scale). Options as :class:`~gradsurgery.methods.upgrad.UPGrad`:
exact projection by default, ``norm_eps=1e-4, reg_eps=1e-4`` for torchjd's regularised one.

Level: representation level by default, ``level="params"`` for the shared parameters.
"""
from __future__ import annotations

from torch import Tensor

from .registry import register
from .upgrad import UPGrad


@register("dualproj")
class DualProj(UPGrad):
    """Projection of the preference-weighted mean gradient onto the dual cone."""

    def weights(self, gram: Tensor, losses: Tensor) -> Tensor:
        return self.project(gram, self.preferences(gram)[None])[0]
