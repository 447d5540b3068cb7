"""Learned per-task rotations of the shared representation (RotoGrad: Javaloy & Valera,
"RotoGrad: Gradient Homogenization in Multitask Learning", ICLR 2022).

**Parametrisation** (geotorch's orthogonal constraint with ``triv="expm"``, batched over
the ``K`` tasks)::

    R_k = B_k @ expm(skew(A_k)),        skew(A) = tril(A, -1) - tril(A, -1)^T

``B_k`` is fixed (the initial rotation: Haar-random, the identity or given), ``A_k`` starts
at zero and is what the optimizer trains. ``R_k`` is evaluated once per step, in
``fork`` (:class:`gradsurgery.pipeline.paths.RotatedPath`), and reused by the backward.
``rotation_param="cayley"`` replaces the exponential by geotorch's other trivialisation,
``R_k = B_k (I - X_k/2)^{-1} (I + X_k/2)``, ``X_k = skew(A_k)``
(:mod:`gradsurgery.numerics.cayley`): one inverse per rotation whatever ``||A_k||``, but not
the reference's parametrisation. ``rotation_param="riemannian"`` holds ``R_k`` directly
and moves it by a retraction after each step (:class:`RiemannianRotations`).

**Cost.** The exponential and its derivative are the floor of the rotations' cost:
:func:`~gradsurgery.numerics.expm.expm` (a Taylor polynomial with scaling and squaring,
its degree from a tight bound on ``||A||_2``) is differentiated exactly, far cheaper than
``torch.linalg.matrix_exp``'s backward (docs/design-notes.md has the measurements).

**Layout.** ``z`` has shape ``(*lead, *feat, *post)``: ``post = post_shape`` (kept as it
is, e.g. the ``H x W`` of a feature map), ``feat`` the ``len(rotation_shape)`` dims before
it. Viewed as ``(L, F, P)``, ``R_k`` (``m x m``, ``m = prod(rotation_shape) <= F``)
acts on the first ``m`` features at every leading index and every trailing position,
``z_k[l, :m, p] = R_k z[l, :m, p]``; the other ``F - m`` features pass through
(subspace rotation).

**Gradients.** The heads read ``z_k = R_k z``; the task backward gives the rotated-space
gradients ``H_k = dL_k/dz_k``, and the original-space ones are ``G_k = R_k^T H_k``
(``R_k`` orthogonal). The surgery combines ``G``. Each ``R_k`` is trained on the
alignment loss (rotograd 0.1.6)::

    r     = (1/K) sum_k g_k * ||gbar|| / ||g_k||,     gbar = (1/K) sum_k g_k
    l_k   = s * sum_{l,p} || R_k r[l, :, p] - H_k[l, :, p] ||^2
    dl_k/dR_k = 2 s sum_{l,p} (R_k r - H_k)[l, :m, p] r[l, :m, p]^T

with the reference's reduction ``s``: without ``post_shape`` the loss is *summed* over the
last leading dim (the batch of a flat ``z``) and averaged over the others; with
``post_shape`` it is averaged over all leading dims. ``r`` is detached; the loss reaches
the rotations only. In **cooperative mode** ``R_k`` also receives the task loss's
gradient ``dL/dR_k = sum_{l,p} H_k[l, :m, p] z[l, :m, p]^T`` (the heads see ``R_k``
undetached); as in rotograd 0.1.2, the two gradients are each rescaled to the norm of
their average and summed. One backward through the exponentials then gives ``A``'s
gradient.
"""
from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING, Any

import torch
from torch import Tensor, nn

from ..numerics import retraction
from ..numerics.cayley import cayley
from ..numerics.expm import expm, skew
from ..numerics.grads import accumulate_grad
from ..numerics.gram import compute_dtype
from . import stages

if TYPE_CHECKING:
    from ..methods.base import Method
    from ..scale.distributed import NoSync, Sync

#: Largest ``max |R R^T - I|`` accepted for a given initial rotation (geotorch's tolerance).
ORTHOGONALITY_TOLERANCE = 1e-4
#: Names of the rotations' parametrisations (``rotation_param``).
PARAMETRISATIONS = ("expm", "cayley", "riemannian")


def haar(num: int, size: int, *, dtype: torch.dtype, device: torch.device | None = None) -> Tensor:
    """``num`` rotations (orthogonal, determinant +1) drawn from the Haar measure on
    ``SO(size)`` with torch's global generator, exactly as geotorch draws them when its
    orthogonal constraint is registered on a ``size x size`` tensor (so, under the same
    seed, the rotations rotograd 0.1.6 starts from): per matrix, a Gaussian draw geotorch
    spends on its buffer, then ``Q`` of the QR factorisation of a second Gaussian matrix
    with the signs of ``diag(R)`` moved into ``Q``, its first column negated when the
    determinant is -1."""
    out = []
    for _ in range(num):
        torch.randn(size, size, dtype=dtype, device=device)  # geotorch's buffer initialisation
        q, r = torch.linalg.qr(torch.randn(size, size, dtype=dtype, device=device))
        q = q * r.diagonal().sign().unsqueeze(-2)
        q[:, 0] = q[:, 0] * torch.where(torch.linalg.det(q) < 0, -1.0, 1.0).to(dtype)
        out.append(q)
    return torch.stack(out)


def _as_shape(shape: int | Sequence[int], name: str) -> tuple[int, ...]:
    out = (shape,) if isinstance(shape, int) else tuple(shape)
    if any(isinstance(s, bool) or not isinstance(s, int) or s < 1 for s in out):
        raise ValueError(f"{name} must be a positive int or a shape of positive ints, got {shape!r}")
    return out


class Rotations(nn.Module):
    """``K`` learned rotations ``R_k = base_k @ expm(skew(A_k))`` of ``m x m``.

    Args:
        num_tasks: ``K``.
        rotation_shape: the rotated part of ``z``'s features (int or shape); ``m`` is its
            product. Smaller than the features: the leading ``m`` are rotated.
        post_shape: trailing dims of ``z`` kept as they are (default none).
        init: ``"random"`` (Haar-random, torch's global generator: what rotograd 0.1.6 and
            geotorch do), ``"identity"``, or a ``(K, m, m)`` tensor of orthogonal matrices.
        coop: cooperative mode (see the module docstring).
        param: how ``A`` maps to ``SO(m)``: ``"expm"`` (default; geotorch's ``triv="expm"``,
            what rotograd 0.1.6 uses), ``"cayley"`` (``R_k = base_k @ cayley(skew(A_k))``,
            :func:`gradsurgery.numerics.cayley.cayley`: one inverse per rotation, cheaper
            than the exponential once the generators have grown, but not the reference's
            parametrisation), or a function of the ``K x m x m`` skew-symmetric stack.

    Attributes:
        skew_params: ``A`` (``K x m x m``, starts at 0), the trained parameter; only its
            strictly lower triangle matters.
        base: ``B`` (buffer), the fixed initial rotations.
    """

    base: Tensor

    def __init__(self, num_tasks: int, rotation_shape: int | Sequence[int], *,
                 post_shape: int | Sequence[int] = (), init: str | Tensor = "random",
                 coop: bool = False, param: str | Callable[[Tensor], Tensor] = "expm",
                 dtype: torch.dtype | None = None, device: torch.device | None = None):
        super().__init__()
        if not callable(param) and param not in PARAMETRISATIONS:
            raise ValueError(f"rotation_param must be one of {PARAMETRISATIONS} or a function of the skew-symmetric "
                             f"generators, got {param!r}")
        if param == "riemannian" and not isinstance(self, RiemannianRotations):
            raise ValueError("rotation_param='riemannian' holds the rotations directly: build "
                             "RiemannianRotations (or pass the option to MultiTaskOptimizer)")
        self.param = param
        self.rotation_shape = _as_shape(rotation_shape, "rotation_shape")
        self.post_shape = _as_shape(post_shape, "post_shape")
        size = math.prod(self.rotation_shape)
        dtype = dtype or torch.get_default_dtype()
        base = self._initial(init, num_tasks, size, dtype, device)
        self.num_tasks, self.size, self.coop = num_tasks, size, bool(coop)
        self.skew_params = nn.Parameter(torch.zeros(num_tasks, *self._generator_shape(size), dtype=dtype,
                                                    device=device))
        self.register_buffer("base", base)

    @staticmethod
    def _generator_shape(size: int) -> tuple[int, ...]:
        return (size, size)

    @staticmethod
    def _initial(init: str | Tensor, k: int, m: int, dtype: torch.dtype, device: torch.device | None) -> Tensor:
        if isinstance(init, Tensor):
            if init.shape != (k, m, m):
                raise ValueError(f"rotation_init must have shape (num_tasks, m, m) = {(k, m, m)}, "
                                 f"got {tuple(init.shape)}")
            init = init.detach().to(dtype=dtype, device=device).clone()
            eye = torch.eye(m, dtype=dtype, device=device)
            error = (init @ init.transpose(-2, -1) - eye).abs().amax()
            if not bool(error <= ORTHOGONALITY_TOLERANCE):
                raise ValueError(f"rotation_init must hold orthogonal matrices; max |R R^T - I| = "
                                 f"{float(error):.3g} > {ORTHOGONALITY_TOLERANCE}")
            return init
        if init == "identity":
            return torch.eye(m, dtype=dtype, device=device).repeat(k, 1, 1)
        if init == "random":
            return haar(k, m, dtype=dtype, device=device)
        raise ValueError(f"rotation_init must be 'random', 'identity' or a (num_tasks, m, m) tensor, got {init!r}")

    def matrices(self) -> Tensor:
        """``R`` (``K x m x m``), differentiable w.r.t. :attr:`skew_params`; always in the
        parameters' dtype (autocast is off here: a half-precision exponential would not
        stay orthogonal)."""
        with torch.autocast(self.base.device.type, enabled=False):
            return self.base @ self._map(skew(self.skew_params))

    def matrix(self, task: int) -> Tensor:
        """``R_task`` alone (``1 x m x m``), like :meth:`matrices`."""
        with torch.autocast(self.base.device.type, enabled=False):
            return self.base[task:task + 1] @ self._map(skew(self.skew_params[task:task + 1]))

    def after_step(self) -> None:
        """Called after every optimizer step (nothing to do: ``A`` is the state)."""

    def _map(self, x: Tensor) -> Tensor:
        # module-level names looked up at call time (the structural tests count expm's calls)
        if isinstance(self.param, str):  # "expm" or "cayley" ("riemannian" overrides matrices/matrix)
            return expm(x) if self.param == "expm" else cayley(x)
        return self.param(x)

    # -- layout -------------------------------------------------------------------------
    def layout(self, shape: Sequence[int]) -> tuple[int, int, int, float]:
        """``(L, F, P, s)`` for a ``z`` of ``shape``: leading size, features, trailing
        size, and the alignment loss's reduction factor ``s``. Raises when the rotation
        does not fit."""
        shape = tuple(shape)
        n_rot, n_post = len(self.rotation_shape), len(self.post_shape)
        fits = len(shape) > n_rot + n_post and shape[len(shape) - n_post:] == self.post_shape
        feat = shape[len(shape) - n_post - n_rot:len(shape) - n_post] if fits else ()
        if not fits or math.prod(feat) < self.size:
            raise ValueError(f"rotation_shape={self.rotation_shape} with post_shape={self.post_shape} does not "
                             f"fit z of shape {shape}: z must be (batch, ..., *features, *post_shape) with "
                             f"prod(features) >= {self.size}; pass the shape of the backbone's output "
                             "features as rep_size/rotation_shape (and its trailing dims as post_shape)")
        lead = shape[:len(shape) - n_post - n_rot]
        averaged = lead if n_post else lead[:-1]
        return math.prod(lead), math.prod(feat), math.prod(self.post_shape), 1.0 / math.prod(averaged)

    def rotate(self, x: Tensor, r: Tensor) -> Tensor:
        """``R_k x`` on the leading ``m`` features of ``x`` (``(L, F, P)`` shared by the
        tasks, or ``(K, L, F, P)``); returns ``(K, L, F, P)``, one batched product."""
        m = self.size
        lo = x[..., :m, :]
        if x.shape[-1] == 1:
            out = (lo.squeeze(-1) @ r.transpose(-2, -1)).unsqueeze(-1)
        else:
            out = torch.einsum("kij,ljp->klip" if x.dim() == 3 else "kij,kljp->klip", r, lo)
        if m == x.shape[-2]:
            return out
        hi = x[..., m:, :].expand(r.shape[0], *x.shape[-3:-2], x.shape[-2] - m, x.shape[-1])
        return torch.cat([out, hi], dim=-2)

    def extra_repr(self) -> str:
        return (f"num_tasks={self.num_tasks}, rotation_shape={self.rotation_shape}, "
                f"post_shape={self.post_shape}, coop={self.coop}, param={self.param!r}")


class RiemannianRotations(Rotations):
    """``rotation_param="riemannian"``: ``K`` rotations held directly, trained by a
    Riemannian update on ``SO(m)`` (no matrix function is differentiated).

    ``base`` *is* ``R`` (the buffer, updated in place by :meth:`after_step`). The trained
    parameter ``skew_params`` is a packed skew generator ``Omega`` (``K x m(m-1)/2``, the
    strict lower triangles, :mod:`gradsurgery.numerics.retraction`) that is zero before
    every step: ``R_k`` is the point where the chart ``R_k P(skew(Omega_k))`` is centred.
    Its ``.grad`` is the gradient in the Lie algebra (left-trivialised),
    ``pack(W - W^T)``, ``W_k = R_k^T dl/dR_k``, exactly the gradient the ``expm``
    parametrisation gives its ``A`` at ``A = 0``. After the wrapped optimizer's step has
    moved ``Omega``, :meth:`after_step` applies ``R_k <- R_k P(skew(Omega_k))``,
    ``P(X) = I + X + X^2/2 - X^4/8`` (:func:`~gradsurgery.numerics.retraction.retract_`),
    resets ``Omega`` to 0, and runs one Newton-Schulz step on ``R`` when due (every
    :data:`~gradsurgery.numerics.retraction.REORTHOGONALISE_EVERY` steps, or sooner).

    **What the optimizer means here.** The optimizer's state for ``Omega`` (Adam's
    moments, SGD's momentum) is kept in Lie-algebra coordinates, in the frame of the
    rotation it was computed at, and reused at the next rotation without change: moving a
    tangent vector ``R Xi`` to ``R' Xi`` (left translation) is an isometry of the
    bi-invariant metric, the usual vector transport of Adam on a Lie group. Weight decay
    acts on ``Omega = 0`` and so does nothing (the optimizer sets it to 0 for this group
    anyway). Steps ``GradScaler`` skips call no ``step()``, so they do not retract.
    """

    _indices: Tensor

    def __init__(self, *args: Any, **kwargs: Any):  # Rotations' arguments
        super().__init__(*args, **kwargs)
        self.register_buffer("_indices", retraction.tril_indices(self.size, self.base.device), persistent=False)
        # steps taken and the defect bound accumulated since the last re-orthogonalisation
        # (its schedule, :mod:`gradsurgery.numerics.retraction`); saved as extra state
        self.retractions, self.defect = 0, 0.0

    @staticmethod
    def _generator_shape(size: int) -> tuple[int, ...]:
        return (size * (size - 1) // 2,)

    def matrices(self) -> Tensor:
        """``R`` (``K x m x m``): the held rotations themselves (no gradient reaches them
        through autograd; :func:`align` writes ``Omega``'s)."""
        return self.base

    def matrix(self, task: int) -> Tensor:
        return self.base[task:task + 1]

    def accumulate_grad(self, frame: Tensor) -> None:
        """Adds ``pack(W - W^T)`` to ``Omega``'s ``.grad`` (``frame``: ``W``, ``K x m x m``)."""
        w = frame.to(self.skew_params.dtype)
        accumulate_grad(self.skew_params, retraction.pack(w - w.transpose(-2, -1), self._indices))

    @torch.no_grad()
    def after_step(self) -> None:
        """``R <- R P(skew(Omega))``, ``Omega <- 0``; re-orthogonalises when due."""
        bound = retraction.retract_(self.base, retraction.unpack(self.skew_params, self._indices, self.size))
        self.skew_params.zero_()
        self.retractions += 1
        self.defect += float(bound) if self.base.device.type == "cpu" else math.inf  # no host read elsewhere
        if self.retractions % retraction.REORTHOGONALISE_EVERY == 0 or self.defect > retraction.DEFECT_TOLERANCE:
            retraction.reorthogonalise_(self.base)
            self.defect = 0.0

    def get_extra_state(self) -> Tensor:
        return torch.tensor([self.retractions, self.defect], dtype=torch.float64)

    def set_extra_state(self, state: Tensor) -> None:
        self.retractions, self.defect = int(state[0]), float(state[1])


def views(rotations: Rotations, z: Tensor, num_tasks: int) -> list[Tensor]:
    """The rotated views ``R_k z`` for evaluation: nothing is recorded for a backward and
    no gradient reaches the rotations (``z``'s graph is kept when grad is enabled)."""
    lead, feat, post, _ = rotations.layout(z.shape)
    with torch.no_grad():
        r = rotations.matrices().to(z.dtype)
    return list(rotations.rotate(z.reshape(lead, feat, post), r).view(num_tasks, *z.shape).unbind(0))


def unrotate(rotations: Rotations, rotation: Tensor, rotated_grads: Tensor) -> Tensor:
    """Original-space gradients ``G_k = R_k^T H_k`` from the rotated-space ``H``
    (``rotation``: ``R``, ``K x m x m``)."""
    k, shape = rotated_grads.shape[0], rotated_grads.shape
    r = rotation.detach().to(rotated_grads.dtype)
    flat = rotated_grads.reshape(k, *_lead_feat_post(rotations, shape[1:]))
    return rotations.rotate(flat, r.transpose(-2, -1)).view(shape)


def _lead_feat_post(rotations: Rotations, shape: Sequence[int]) -> tuple[int, int, int]:
    """The ``(lead, feat, post)`` sizes a tensor of ``shape`` is viewed as for rotating
    (see :meth:`Rotations.layout`)."""
    lead, feat, post, _ = rotations.layout(shape)
    return lead, feat, post


def align(rotations: Rotations, rotation: Tensor, scale: float, z: Tensor, grads: Tensor,
          rotated_grads: Tensor, gram: Tensor, loss_scale: Tensor | None = None,
          sync: Sync | NoSync | None = None) -> Tensor:
    """Trains the rotations: writes the gradient of every task's alignment loss (plus, in
    cooperative mode, of the task losses) to ``A``'s ``.grad`` in one backward through the
    exponentials. Returns the ``K`` alignment losses (detached).

    Args:
        rotation: ``R`` (``K x m x m``), still in the graph to the rotations' parameters.
        scale: the alignment loss's reduction factor (:meth:`Rotations.layout`).
        z: the rotated shared tensor.
        grads: ``G``, original-space task gradients (``K x z.shape``).
        rotated_grads: ``H``, rotated-space task gradients.
        gram: ``G G^T`` (float32 or wider), unscaled.
        loss_scale: the ``GradScaler`` scale ``G`` and ``H`` carry, if any: the terms are
            computed from the unscaled gradients (the optimizer scales ``A``'s gradient).
        sync: under ``torch.distributed``, the optimizer's
            :class:`gradsurgery.scale.distributed.Sync`: the terms are those of the global batch.
    """
    k = grads.shape[0]
    lead_feat_post = _lead_feat_post(rotations, grads.shape[1:])
    norms = gram.diagonal().clamp_min(0).sqrt()
    mean_norm = gram.sum().clamp_min(0).sqrt() / k
    coefficients = torch.where(norms > 0, mean_norm / (k * torch.where(norms > 0, norms, 1)), 0)
    reference = stages.combine(coefficients, grads).reshape(lead_feat_post)
    if isinstance(rotations, RiemannianRotations):
        return _align_riemannian(rotations, scale, z, grads.reshape(k, *lead_feat_post), reference, loss_scale, sync)
    h = rotated_grads.reshape(k, *lead_feat_post)
    if loss_scale is not None:  # decide on the unscaled gradients
        reference, h = reference / loss_scale.to(reference.dtype), h / loss_scale.to(h.dtype)
    r = rotation.detach().to(grads.dtype)
    diff = rotations.rotate(reference, r) - h
    losses = scale * diff.pow(2).sum(dim=(1, 2, 3))
    m = rotations.size
    grad_r = (2 * scale) * torch.einsum("klip,ljp->kij", diff[..., :m, :], reference[..., :m, :])
    task_r = None
    if rotations.coop:
        flat_z = z.detach().reshape(lead_feat_post)
        task_r = torch.einsum("klip,ljp->kij", h[..., :m, :], flat_z[..., :m, :])
    if sync is not None:
        grad_r, task_r, losses = sync.rotation_terms(grad_r, task_r, losses, _batch_averaged(rotations, z))
    if task_r is not None:
        grad_r = _cooperate(task_r, grad_r)
    torch.autograd.backward(rotation, grad_r.to(rotation.dtype))
    return losses.detach()


def _align_riemannian(rotations: RiemannianRotations, scale: float, z: Tensor, g: Tensor, reference: Tensor,
                      loss_scale: Tensor | None, sync: Sync | NoSync | None) -> Tensor:
    """:func:`align` for rotations held directly: the same losses and terms, in the frame
    of ``R`` (``g``: the original-space gradients ``G = R^T H``, ``(K, L, F, P)``).

    ``R`` is orthogonal, so ``R_k r - H_k = R_k (r - G_k)`` on the rotated features (and
    ``r - G_k`` on the others): ``l_k = s ||r - G_k||^2`` and
    ``W_k = R_k^T dl_k/dR_k = 2 s sum_{l,p} (r - G_k)[l, :m, p] r[l, :m, p]^T``, one
    product; in cooperative mode ``R_k^T dL/dR_k = sum_{l,p} G_k[l, :m, p] z[l, :m, p]^T``.
    Norms are the same in either frame, so the cooperative rescaling is unchanged."""
    m = rotations.size
    if loss_scale is not None:  # decide on the unscaled gradients
        reference, g = reference / loss_scale.to(reference.dtype), g / loss_scale.to(g.dtype)
    diff = reference - g
    losses = scale * diff.pow(2).sum(dim=(1, 2, 3))
    frame = (2 * scale) * torch.einsum("klip,ljp->kij", diff[..., :m, :], reference[..., :m, :])
    task = None
    if rotations.coop:
        task = torch.einsum("klip,ljp->kij", g[..., :m, :], z.detach().reshape(reference.shape)[..., :m, :])
    if sync is not None:
        frame, task, losses = sync.rotation_terms(frame, task, losses, _batch_averaged(rotations, z))
    rotations.accumulate_grad(frame if task is None else _cooperate(task, frame))
    return losses.detach()


def _batch_averaged(rotations: Rotations, z: Tensor) -> bool:
    """Whether the alignment loss averages over the batch dim (see :meth:`Rotations.layout`)."""
    n_rot, n_post = len(rotations.rotation_shape), len(rotations.post_shape)
    return z.dim() - n_rot - n_post > (0 if n_post else 1)


def _cooperate(a: Tensor, b: Tensor) -> Tensor:
    """``a ||c|| / ||a|| + b ||c|| / ||b||`` per task, ``c = (a + b) / 2`` (rotograd 0.1.2's
    cooperative mode); a zero gradient contributes nothing."""
    target = ((a + b) / 2).flatten(1).norm(dim=1)

    def rescaled(x: Tensor) -> Tensor:
        n = x.flatten(1).norm(dim=1)
        return x * torch.where(n > 0, target / torch.where(n > 0, n, 1), 0)[:, None, None]

    return rescaled(a) + rescaled(b)


class RotatedHead(nn.Module):
    """``head(R_task z)``: a head as its task sees the representation (the identity
    without rotations), for evaluation and export; ``nn.Sequential(backbone,
    RotatedHead(...))`` is the end-to-end predictor (``opt.task_model``).

    By default ``R_task`` is taken once, when the module is built, into the buffer
    ``rotation`` (``m x m``): it is the predictor's own state, so ``state_dict`` carries
    it, ``load_state_dict`` restores it (a predictor built without rotations refuses such
    a checkpoint under strict loading), and ``forward`` is a fixed tensor program that
    ``torch.export`` and ``torch.jit.trace`` take. Build it again after further training.
    ``live=True`` instead reads the current ``R_task`` (no gradient) at every call and
    holds no rotation of its own (the compat facade's heads).
    """

    rotation: Tensor | None  # the buffer: None when live or without rotations

    def __init__(self, head: nn.Module, rotations: Rotations | None, task: int, *, live: bool = False):
        super().__init__()
        self.head, self.task, self.live = head, task, bool(live)
        self._rotations = [rotations]  # a reference, not a submodule: its parameters stay the optimizer's
        rotation = None
        if rotations is not None and not self.live:
            with torch.no_grad():
                rotation = rotations.matrix(task)[0].detach().clone()
        self.register_buffer("rotation", rotation)

    def forward(self, z: Tensor) -> Any:  # what the head returns
        rotations = self._rotations[0]
        if rotations is None:
            return self.head(z)
        if self.live:
            with torch.no_grad():
                r = rotations.matrix(self.task)[0]
        else:
            assert self.rotation is not None, "a RotatedHead built with rotations and live=False holds R_task"
            r = self.rotation
        _, feat, post, _ = rotations.layout(z.shape)
        rotated = rotations.rotate(z.reshape(-1, feat, post), r.unsqueeze(0).to(z.dtype))
        return self.head(rotated.reshape_as(z))

    def extra_repr(self) -> str:
        return f"task={self.task}" + (", live=True" if self.live else "")


def build(method: Method, num_tasks: int, *, rotation: bool | None, rep_size: int | None,
          rotation_shape: int | Sequence[int] | None, post_shape: int | Sequence[int],
          init: str | Tensor, coop: bool, level: str, dtype: torch.dtype,
          device: torch.device, param: str | Callable[[Tensor], Tensor] = "expm") -> Rotations | None:
    """The :class:`Rotations` a :class:`~gradsurgery.MultiTaskOptimizer` uses (``None``
    without rotations). ``rotation=None`` takes the method's class attribute ``rotation``.
    Every option is checked before anything is drawn or built."""
    use = type(method).rotation if rotation is None else rotation
    if not isinstance(use, bool):
        raise TypeError(f"rotation must be True, False or None (the method's default), got {rotation!r}")
    if not use:
        if coop:
            raise ValueError(f"coop=True needs rotations, but {method!r} runs without them; pass "
                             "rotation=True (or a RotoGrad-family method)")
        if rotation_shape is not None or tuple(_as_shape(post_shape, "post_shape")) or not isinstance(init, str) \
                or init != "random":
            raise ValueError(f"rotation_shape, post_shape and rotation_init only apply with rotations, but "
                             f"{method!r} runs without them; pass rotation=True or drop those options")
        if not (isinstance(param, str) and param == "expm"):
            raise ValueError(f"rotation_param={param!r} only applies with rotations, but {method!r} runs without "
                             "them; pass rotation=True or drop rotation_param")
        return None
    if level != "rep":
        raise ValueError(f"rotations act on the shared representation, so they cannot run with level={level!r}; "
                         "use level='rep' or rotation=False")
    shape = rotation_shape if rotation_shape is not None else rep_size
    if shape is None:
        raise ValueError(f"{method!r} learns rotations of the representation and needs their size: pass "
                         "rep_size=<number of features of z> (or rotation_shape=<shape of z's features>)")
    if rotation_shape is not None and rep_size is not None \
            and _as_shape(rotation_shape, "rotation_shape") != _as_shape(rep_size, "rep_size"):
        raise ValueError(f"rep_size={rep_size!r} and rotation_shape={rotation_shape!r} disagree; pass one of them")
    cls = RiemannianRotations if isinstance(param, str) and param == "riemannian" else Rotations
    # rotations live in float32 or wider (half-precision models: eigh needs it; the views are cast)
    return cls(num_tasks, shape, post_shape=post_shape, init=init, coop=coop, param=param,
               dtype=compute_dtype(dtype), device=device)
