"""ConFIG: conflict-free updates (Liu, Chu & Thuerey, "ConFIG: Towards Conflict-free
Training of Physics Informed Neural Networks", ICLR 2025, Eq. 2; official code
tum-pbs/ConFIG, ``conflictfree.grad_operator.ConFIG_update``; torchjd's ``ConFIG``).

The direction has the same cosine -- or cosines in the ratio of the preference vector ``w``
-- with every task gradient: with the unit gradients ``u_k = g_k / ||g_k||`` (rows ``U``),

.. math::  d = U^+ w,\\qquad \\hat d = d / \\|d\\|,\\qquad
           g = \\Big(\\sum_k \\langle g_k, \\hat d\\rangle\\Big)\\, \\hat d

(``U^+`` the pseudo-inverse: the least-norm solution of ``U d = w``; the length is the sum of
the gradients' projections, the official ``ProjectionLength``). Read off the Gram: with the
cosine matrix ``C = U U^T``, ``d = U^T a`` for ``a = C^+ w``, i.e. ``d = sum_k c_k g_k`` with
``c_k = a_k / ||g_k||``, ``||d||^2 = c^T M c`` and ``sum_k <g_k, d> = 1^T M c``, so

.. math::  g = \\frac{1^\\top M c}{c^\\top M c}\\, c^\\top G .

``C^+`` comes from the eigendecomposition of ``C`` (float64); eigenvalues below
``100 K eps max(lambda)`` (``eps`` of the Gram's dtype, the precision ``C`` is known to)
count as zero, so duplicate or dependent gradients give the least-norm answer and not
rounding noise. A zero gradient has a zero unit row (the official ``nan_to_num``); when
``d`` vanishes (every gradient zero, or ``w`` orthogonal to the span of ``C``, e.g. two
opposed gradients) the update is zero, as the official ``unit_vector`` makes it.

``pref_vector`` (``K`` finite numbers; default ``None``: all ones, the official
``EqualWeight``) is checked against the number of tasks when the method is bound.
Differences from the official code: for ``K = 2`` it switches by default to
``ConFIG_update_double`` (orthogonal components, no inverse), which gives the same direction
for independent gradients and NaN for parallel ones; here the one formula serves every
``K`` (finite for parallel gradients). Scale-invariant in direction; the length scales with
the gradients. Level: the paper works on the parameters' gradients; by default here on the
representation's, ``level="params"`` for the paper's setting.
"""
from __future__ import annotations

from typing import Sequence

import torch
from torch import Tensor

from ..numerics.eigh import symmetric_eigh
from ..numerics.gram import cosines, norms
from .base import GramWeighting
from .registry import register

#: Eigenvalues of the cosine matrix below this many ``K eps max(lambda)`` count as zero.
CUTOFF = 100.0


@register("config")
class ConFIG(GramWeighting):
    """The direction of equal (or ``pref_vector``-proportional) cosines with every task,
    with the summed projections as its length."""

    subset_safe = True

    def __init__(self, pref_vector: Sequence[float] | Tensor | None = None):
        if pref_vector is not None:
            try:
                values = torch.as_tensor(pref_vector, dtype=torch.float64).detach().cpu().clone()
            except (TypeError, ValueError, RuntimeError):
                raise ValueError("pref_vector must be a sequence or 1-D tensor of numbers, "
                                 f"got {pref_vector!r}") from None
            if values.dim() != 1 or values.numel() == 0:
                raise ValueError(f"pref_vector must be 1-D with one value per task, got shape {tuple(values.shape)}")
            if not bool(values.isfinite().all()):
                raise ValueError(f"pref_vector must be finite, got {values.tolist()}")
            pref_vector = values
            self.subset_safe = False  # one preference per task: the tasks must all be there
            self.subset_refusal = "pref_vector gives one preference per task, so all K tasks must be there"
        self.pref_vector = pref_vector

    def bind(self, num_tasks: int, *, device: torch.device, dtype: torch.dtype,
             generator: torch.Generator) -> None:
        if self.pref_vector is not None and self.pref_vector.numel() != num_tasks:
            raise ValueError(f"pref_vector has {self.pref_vector.numel()} values but there are {num_tasks} "
                             "tasks; give one value per task")
        super().bind(num_tasks, device=device, dtype=dtype, generator=generator)
        self._pref = None if self.pref_vector is None else self.pref_vector.to(device)

    def weights(self, gram: Tensor, losses: Tensor) -> Tensor:
        k = gram.shape[0]
        m = gram.to(torch.float64)
        n = norms(m)
        lam, vec = symmetric_eigh(cosines(m))
        rel = CUTOFF * k * torch.finfo(gram.dtype).eps
        top = lam.abs().amax()
        kept = lam.abs() > rel * top
        inverse = torch.where(kept, 1 / torch.where(kept, lam, 1), 0)
        # ones for however many tasks are present (the method is subset-safe without pref_vector)
        w = torch.ones(k, dtype=m.dtype, device=m.device) if self._pref is None else self._pref.to(m.device)
        a = vec @ (inverse * (vec.T @ w))
        c = torch.where(n > 0, a / torch.where(n > 0, n, 1), 0)
        mc = m @ c
        sq_norm = c @ mc  # ||d||^2 = w^T C^+ w: at least ||w||^2 / max(lambda) unless d = 0
        nonzero = sq_norm > rel * (w @ w) / torch.where(top > 0, top, 1)
        scale = torch.where(nonzero, mc.sum() / torch.where(nonzero, sq_norm, 1), 0)
        return (scale * c).to(gram.dtype)
