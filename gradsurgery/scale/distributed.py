"""Distributed-exact surgery: every rank takes the step of single-process training on the
global batch, for the price of one all-reduce of ``O(K^2)`` numbers per step.

**The global objective** is the mean over the global batch. With ``R`` ranks holding equal
slices of it (what ``DistributedSampler`` gives), rank ``r`` computes the mean losses
``L_k^r`` of its slice and the task gradients ``G_r = dL^r/dz_r`` w.r.t. its slice ``z_r``
of the representation. Then

.. math::
    L_k = \\frac1R \\sum_r L_k^r,\\qquad
    \\frac{\\partial L_k}{\\partial z_r} = \\frac1R\\, G_r[k],\\qquad
    G = \\frac1R\\,[G_1 \\,|\\, \\dots \\,|\\, G_R],\\qquad
    M = G G^\\top = \\frac1{R^2} \\sum_r G_r G_r^\\top .

So one ``SUM`` all-reduce of the ranks' ``K x K`` Grams and ``K`` losses gives every rank
the global ``M`` (divided by ``R^2``) and ``L`` (divided by ``R``), hence the same
coefficients ``c``. The global combined gradient on rank ``r``'s slice is
``c^T G[:, slice r] = c^T G_r / R``; each rank sends the unscaled ``c^T G_r`` through its
backbone and DDP's gradient *averaging* supplies the ``1/R``:
``(1/R) sum_r J_r^T c^T G_r`` is exactly the global gradient of the shared parameters.
Heads are replicated parameters: their global gradient ``(1/R) sum_r dL^r/dtheta`` is the
average of the ranks' gradients, which the optimizer all-reduces in the same buffer (heads
cannot sit inside DDP here: their gradients come from ``torch.autograd.grad``, which DDP's
hooks do not see). Norms, cosines and GradNorm's targets, all functions of ``M`` and ``L``,
are the global ones, so the methods' own parameters receive identical gradients on every
rank and their state (initial losses, weights, random draws from equally seeded generators)
stays identical.

The same buffer carries a finiteness flag (NaN when anything on a rank is not finite), so
every rank raises together, or under a ``GradScaler`` skips the step together. Methods
whose ``loss_weights`` may depend on the losses (loss weighting, ``normalize_losses``) get
the global losses before it, from one more all-reduce of ``K`` numbers.

**Absent tasks.** A task passed as ``None`` on some ranks is present globally: its loss is
the mean over the ``n_k`` ranks that have it (equal per-rank batches), so
``dL_k/dz_r = G_r[k] / n_k`` on those ranks and 0 elsewhere, and

.. math::
    L_k = \\frac1{n_k} \\sum_{r: k \\in r} L_k^r,\\qquad
    M_{kl} = \\frac1{n_k n_l} \\sum_r (M_r)_{kl}

(``n_k = R``: the formulas above). Each rank's presence vector (and, per head parameter,
which of its tasks reached it) rides in the same all-reduce, so every rank learns ``n``
with the Gram. The rank then sends ``sum_k c_k (R/n_k) G_r[k]`` through its backbone
(DDP's ``1/R`` makes it the global gradient), and a head parameter of task ``k`` gets the
sum of the ranks' gradients divided by ``n_k``. Methods whose loss weights need the global
losses learn ``n`` from their earlier all-reduce instead, and fold ``R/n_k`` into the
losses before the task backward. A task absent on every rank is absent for the step; the
refusals (a method that cannot decide over a subset, rotations with a task missing on
some ranks, a head parameter shared by tasks of which one is missing on some ranks) are
decided from the all-reduced counts, so every rank raises together, before anything
changed, and the next step finds the ranks in step.

Rotations (the RotoGrad family) are replicated parameters whose gradients depend on the
rows of ``G``, not only on ``M``: their alignment terms are all-reduced once more (``K m^2``
numbers, see :meth:`Sync.rotation_terms`), with the reference direction's coefficients
taken from the global Gram.

Only the Gram-based path can be exact: a method with an element-wise ``combine`` needs the
raw ``K x N`` gradients of the whole batch, so it is refused unless ``distributed_exact=False``
(per-rank surgery, what other libraries do: each rank decides from its own slice).

Without DDP, average the backbone's gradients yourself after ``opt.backward`` with
:func:`average_gradients` (the heads' are already averaged).
"""
from __future__ import annotations

import gc
import zlib
from typing import Iterable

import torch
import torch.distributed as dist
from torch import Tensor

from ..methods import ElementWise, Method


def active_group(process_group=None):
    """The process group to synchronise over, or ``None`` when training is single-process
    (``torch.distributed`` not initialised and no group given)."""
    if process_group is not None:
        return process_group
    if dist.is_available() and dist.is_initialized():
        return dist.group.WORLD
    return None


def is_exact(method: Method) -> bool:
    """Whether ``method`` decides from the Gram and the losses alone (not element-wise),
    so that its distributed step can equal the single-process one."""
    return not isinstance(method, ElementWise)


def average_gradients(params: Iterable[Tensor], process_group=None) -> None:
    """Averages the ``.grad`` of ``params`` across ranks in one coalesced all-reduce per
    dtype and device (what DDP does for the parameters it wraps).

    Use it for a backbone that is *not* wrapped in ``DistributedDataParallel``, after
    ``opt.backward(...)`` and before ``opt.step()``. Every rank must pass the same
    parameters, with a gradient on all ranks or on none.
    """
    group = active_group(process_group)
    if group is None:
        return
    grads = [p.grad for p in params if p.grad is not None]
    world = dist.get_world_size(group)
    for same in _by_dtype_and_device(grads).values():
        flat = torch.cat([g.reshape(-1) for g in same])
        dist.all_reduce(flat, group=group)
        flat /= world
        for g, part in zip(same, flat.split([g.numel() for g in same])):
            g.copy_(part.view_as(g))


def check_heads_outside_ddp(heads: Iterable[Tensor]) -> None:
    """Raises when a head parameter sits inside a ``DistributedDataParallel`` module (the
    whole model wrapped) that synchronises this backward: the heads' gradients come from
    ``torch.autograd.grad``, which DDP's hooks never see, so its reducer would wait for them
    forever (DDP's ``find_unused_parameters`` error at the next forward). Not a DDP module
    whose reducer never runs: one wrapping a Lightning module in manual optimisation
    (Lightning turns the reducer off around its ``training_step``;
    :class:`gradsurgery.integrations.lightning.MultiTaskModule` averages the backbone's
    gradients itself). Looks for DDP modules once (a scan of the live objects, at the first step)."""
    wanted = {id(p) for p in heads}
    ddp = torch.nn.parallel.DistributedDataParallel
    for obj in gc.get_objects():
        if not issubclass(type(obj), ddp):  # type(): never dereferences a dead weak proxy
            continue
        if getattr(obj.module, "automatic_optimization", True) is False:
            continue
        inside = [name for name, p in obj.module.named_parameters() if id(p) in wanted]
        if inside:
            raise ValueError(
                f"the heads' parameters ({', '.join(inside[:3])}{', ...' if len(inside) > 3 else ''}) are inside "
                "DistributedDataParallel: wrap the backbone only, DDP(backbone), and keep the heads outside "
                "(gradsurgery averages their gradients across ranks in its own all-reduce). Nothing was changed")


def _by_dtype_and_device(tensors: list[Tensor]) -> dict[tuple, list[Tensor]]:
    out: dict[tuple, list[Tensor]] = {}
    for t in tensors:
        out.setdefault((t.dtype, t.device), []).append(t)
    return out


class NoSync:
    """Single-process training: every collective is the identity (the no-op default of
    :class:`Sync`, so the pipeline has no ``is None`` branches)."""

    exact = False
    world_size = 1
    counts = None
    presence_applied = False

    def begin_step(self, num_tasks: int, method: Method) -> None:
        pass

    def losses(self, values: Tensor) -> Tensor:
        return values

    def reduce(self, gram, values, flag, head_grads):
        return gram, values, flag, head_grads

    def rotation_terms(self, alignment, task, losses, batch_averaged):
        return alignment, task, losses


class Sync:
    """The collective side of one :class:`~gradsurgery.MultiTaskOptimizer`.

    Attributes:
        group: the process group.
        world_size: ``R``.
        exact: distributed-exact (global Gram and losses) or per-rank surgery.
        bytes_last_step: bytes this optimizer all-reduced in the last ``backward``,
            split into ``"surgery"`` (Gram, losses, finiteness flag: ``O(K^2)``, whatever
            the model size), ``"heads"`` (the heads' gradients, which DDP would
            all-reduce for any replicated parameter) and ``"rotations"`` (the rotations'
            gradient terms, ``K m^2``). Counted on the host, no sync.
    """

    def __init__(self, group, exact: bool):
        self.group = group
        self.world_size = dist.get_world_size(group)
        self.exact = exact
        self.checked = False
        self.bytes_last_step = {"surgery": 0, "heads": 0, "rotations": 0}
        self.backbone: set[int] | None = None  # ids of the backbone's parameters (found once)
        self.present = torch.zeros(0)  # this rank's tasks (1: a loss, 0: None) and 1 if it has none
        self.reach = torch.zeros(0, 0)  # per head parameter: which tasks' losses reached it
        self.candidates: list[bool] = []  # the head parameters every rank sends (zeros when None)
        self.counts: Tensor | None = None  # n_k: the ranks that have task k (after an all-reduce; CPU)
        self.empty = 0  # the ranks that had no task this step
        self.folded = False  # n came before the task backward: R/n_k is in the losses
        self.inexact: list[int] = []  # head parameters shared by tasks missing on some ranks
        self.presence_applied = False  # the optimizer acted on this step's counts
        self.layout: list[tuple] = []  # shape, dtype, device of each head parameter

    def begin_step(self, num_tasks: int, method: Method) -> None:
        """Resets the byte counters; at the first step, checks that the ranks agree."""
        self.bytes_last_step = {"surgery": 0, "heads": 0, "rotations": 0}
        self.counts, self.folded, self.inexact, self.presence_applied = None, False, [], False
        self.check(num_tasks, method)

    def note_presence(self, present: list[bool], params: list[Tensor], reach: Tensor, candidates: list[bool]) -> None:
        """This rank's presence vector, and per head parameter (``params``, the order of
        ``head_grads`` in :meth:`reduce`) the tasks whose loss reached it (``P x K``, 0/1)
        and whether every rank sends it (``candidates``: not the backbone's; zeros when
        this rank's losses did not reach it), for the step's all-reduce."""
        self.present = torch.tensor([float(p) for p in present] + [float(not any(present))], dtype=torch.float64)
        self.reach, self.candidates = reach, candidates
        self.layout = [(p.shape, p.dtype, p.device) for p in params]

    def check(self, num_tasks: int, method: Method) -> None:
        """First step only (one small all-reduce and one host read): every rank must
        agree on ``num_tasks``, the method (class and options) and ``distributed_exact``;
        otherwise every rank raises the same error instead of hanging in a collective
        whose size differs across ranks."""
        if self.checked:
            return
        ident = f"{type(method).__module__}.{type(method).__qualname__}({method.extra_repr()})"
        values = [float(num_tasks), float(zlib.crc32(ident.encode())), float(self.exact)]
        sig = torch.tensor(values + [-v for v in values], dtype=torch.float64, device=self._device())
        dist.all_reduce(sig, op=dist.ReduceOp.MAX, group=self.group)
        hi, lo = sig[:3].tolist(), [-v for v in sig[3:].tolist()]
        problems = []
        if hi[0] != lo[0]:
            problems.append(f"num_tasks differs across ranks (between {int(lo[0])} and {int(hi[0])})")
        if hi[1] != lo[1]:
            problems.append(f"the method or its options differ across ranks (this rank: {ident})")
        if hi[2] != lo[2]:
            problems.append("distributed_exact is True on some ranks and False on others")
        if problems:
            raise RuntimeError("MultiTaskOptimizer: ranks disagree: " + "; ".join(problems)
                               + ". Build the optimizer with the same arguments on every rank.")
        self.checked = True

    def _device(self) -> torch.device:
        backend = dist.get_backend(self.group)
        if backend == "nccl":
            return torch.device("cuda", torch.cuda.current_device())
        return torch.device("cpu")

    def losses(self, values: Tensor) -> Tensor:
        """The global losses ``(1/R) sum_r L^r`` (one all-reduce of ``K`` numbers); used
        before ``loss_weights`` by methods whose loss weights may depend on the losses."""
        k = values.numel()
        buf = torch.cat([values, self.present.to(values)])
        dist.all_reduce(buf, group=self.group)
        self.bytes_last_step["surgery"] += buf.numel() * buf.element_size()
        if not self.present.numel():  # not tracking presence (check_finite=False: no host read)
            return buf / self.world_size
        presence = buf[k:].to(device="cpu", dtype=torch.float64)  # a host read (small integers)
        self.counts, self.empty, self.folded = presence[:k], int(presence[k]), True
        return self._mean(buf[:k], self.counts)

    def _mean(self, total: Tensor, counts: Tensor) -> Tensor:
        """``total / n`` (``/ R`` when every rank has every task: bit for bit the same)."""
        r = self.world_size
        if bool((counts == r).all()):
            return total / r
        return total / counts.clamp(min=1).to(total.device, total.dtype)

    def row_factors(self) -> Tensor | None:
        """``R / n_k`` for the tasks present on some ranks (0 where absent everywhere), or
        ``None`` when every rank has every task."""
        counts, r = self.counts, self.world_size
        if counts is None or bool((counts == r).all()):
            return None
        return torch.where(counts > 0, r / counts.clamp(min=1), torch.zeros_like(counts))

    def reduce(self, gram: Tensor | None, values: Tensor | None, flag: Tensor,
               head_grads: list[Tensor | None]) -> tuple[Tensor | None, Tensor | None, Tensor, list[Tensor | None]]:
        """One all-reduce of everything the step needs from the other ranks.

        Args:
            gram: this rank's ``K x K`` Gram ``G_r G_r^T`` (``None``: no Gram needed or
                per-rank mode).
            values: this rank's ``K`` losses (``None``: already global or per-rank mode).
            flag: a 0-d tensor, ``nan`` when something on this rank is not finite, else 0.
            head_grads: this rank's gradients of the heads' parameters.

        Returns:
            the global Gram ``sum_r M_r / R^2``, the global losses ``sum_r L^r / R``, the
            global flag (``nan`` if any rank's is) and the averaged heads' gradients
            (with absent tasks: ``/ (n_k n_l)``, ``/ n_k``, see the module's docstring;
            :attr:`counts` holds ``n``).
        """
        if not self.present.numel():  # not tracking presence (check_finite=False): every rank has every task
            return self._plain_reduce(gram, values, flag, head_grads)
        known = self.counts is not None  # the losses' all-reduce brought n already
        surgery = [t.reshape(-1) for t in (gram, values) if t is not None] + [flag.reshape(1)]
        sent = [i for i, g in enumerate(head_grads) if g is not None or self.candidates[i]]
        grads = [g if (g := head_grads[i]) is not None else self._zeros(i) for i in sent]
        presence = ([] if known else [self.present]) + [self.reach.reshape(-1)]  # small integers: exact
        parts = surgery + [g.reshape(-1) for g in grads]
        dtype = parts[0].dtype
        for p in parts[1:]:
            dtype = torch.promote_types(dtype, p.dtype)
        parts = surgery + presence + parts[len(surgery):]
        buf = torch.cat([p.to(device=parts[0].device, dtype=dtype) for p in parts])
        dist.all_reduce(buf, group=self.group)
        sizes = [p.numel() for p in parts]
        n_surgery = sum(sizes[:len(surgery) + len(presence)])
        self.bytes_last_step["surgery"] += n_surgery * buf.element_size()
        self.bytes_last_step["heads"] += (buf.numel() - n_surgery) * buf.element_size()
        out = list(buf.split(sizes))
        r = self.world_size
        total_gram = None if gram is None else out.pop(0).view_as(gram).to(gram.dtype)
        total_values = None if values is None else out.pop(0).to(values.dtype)
        flag = out.pop(0)[0]
        k = self.present.numel() - 1
        received = torch.cat(out[:len(presence)]).to(device="cpu", dtype=torch.float64)  # a host read
        out = out[len(presence):]
        counts = self.counts
        if counts is None:
            counts, self.empty, received = received[:k], int(received[k]), received[k + 1:]
            self.counts = counts
        divisors = self._head_divisors(received.view_as(self.reach), sent)
        if total_gram is not None:
            everywhere = self.folded or bool((counts == r).all())
            gram = total_gram / (r * r) if everywhere else total_gram / torch.outer(counts, counts).clamp(min=1).to(
                total_gram.device, total_gram.dtype)
        if total_values is not None:
            values = self._mean(total_values, counts)
        averaged = {i: None if d == 0 else (o / d).view_as(g).to(g.dtype)
                    for i, o, g, d in zip(sent, out, grads, divisors)}
        return gram, values, flag, [averaged.get(i) for i in range(len(head_grads))]

    def _plain_reduce(self, gram: Tensor | None, values: Tensor | None, flag: Tensor, head_grads: list[Tensor | None]
                      ) -> tuple[Tensor | None, Tensor | None, Tensor, list[Tensor | None]]:
        """:meth:`reduce` without presence (no host read): ``/ R^2``, ``/ R``, ``/ R``."""
        surgery = [t.reshape(-1) for t in (gram, values) if t is not None] + [flag.reshape(1)]
        present = [g for g in head_grads if g is not None]
        parts = surgery + [g.reshape(-1) for g in present]
        dtype = parts[0].dtype
        for p in parts[1:]:
            dtype = torch.promote_types(dtype, p.dtype)
        buf = torch.cat([p.to(dtype) for p in parts])
        dist.all_reduce(buf, group=self.group)
        sizes = [p.numel() for p in parts]
        n_surgery = sum(sizes[:len(surgery)])
        self.bytes_last_step["surgery"] += n_surgery * buf.element_size()
        self.bytes_last_step["heads"] += (buf.numel() - n_surgery) * buf.element_size()
        out = list(buf.split(sizes))
        r = self.world_size
        if gram is not None:
            gram = out.pop(0).view_as(gram).to(gram.dtype) / (r * r)
        if values is not None:
            values = out.pop(0).to(values.dtype) / r
        flag = out.pop(0)[0]
        averaged = iter([(o / r).view_as(g).to(g.dtype) for o, g in zip(out, present)])
        return gram, values, flag, [None if g is None else next(averaged) for g in head_grads]

    def _zeros(self, i: int) -> Tensor:
        """Zeros in place of head parameter ``i``'s gradient (this rank's tasks missed it)."""
        shape, dtype, device = self.layout[i]
        return torch.zeros(shape, dtype=dtype, device=device)

    def _head_divisors(self, reached: Tensor, sent: list[int]) -> list[float]:
        """Per sent head parameter: what the sum of the ranks' gradients is divided by.
        A parameter of one task ``k``: ``n_k``, the ranks whose loss ``k`` reached it; of
        several tasks: ``R`` when each of them is on every rank, else it is recorded in
        :attr:`inexact` (its global gradient cannot be told apart from the sum); of none
        (no rank gave it a gradient): 0, and it keeps no gradient. When ``R / n_k`` was
        folded into the losses, every reached parameter's sum is divided by ``R``."""
        r = self.world_size
        rows = reached.tolist()
        divisors = []
        for i in sent:
            counts = [c for c in rows[i] if c > 0]
            if not counts:
                divisors.append(0.0)
            elif self.folded:
                divisors.append(float(r))
            elif len(counts) == 1:
                divisors.append(counts[0])
            else:
                divisors.append(float(r))
                if any(c != r for c in counts):
                    self.inexact.append(i)
        return divisors

    def rotation_terms(self, alignment: Tensor, task: Tensor | None, losses: Tensor,
                       batch_averaged: bool) -> tuple[Tensor, Tensor | None, Tensor]:
        """The rotations' gradient terms for the global batch, from this rank's: one
        all-reduce of ``K m^2`` numbers (twice that in cooperative mode) and the ``K``
        alignment losses. Rotations are replicated parameters; these are their gradients.

        Distributed-exact: the alignment loss sums (``batch_averaged``: averages) squared
        differences over the rows of the representation, and the global batch's rows are
        the ranks' rows divided by ``R`` (the reference's coefficients already come from
        the global Gram), so the global terms are ``sum_r a_r / R^2`` (``/ R^3`` when
        averaged over a batch ``R`` times larger). The task-loss term of cooperative mode
        is the gradient of a mean loss: the ranks' mean, like any replicated parameter's.
        Per-rank surgery: plain means, which keeps the replicas identical.
        """
        parts = [alignment, losses] + ([task] if task is not None else [])
        buf = torch.cat([p.reshape(-1).to(alignment.dtype) for p in parts])
        dist.all_reduce(buf, group=self.group)
        self.bytes_last_step["rotations"] += buf.numel() * buf.element_size()
        r = self.world_size
        factor = (1.0 / (r * r * (r if batch_averaged else 1))) if self.exact else 1.0 / r
        out = buf.split([p.numel() for p in parts])
        alignment = out[0].view_as(alignment) * factor
        losses = (out[1] * factor).view_as(losses).to(losses.dtype)
        task = None if task is None else (out[2] / r).view_as(task).to(task.dtype)
        return alignment, task, losses
