"""The benchmarked training steps: one model per configuration, one step function per row.

Every row trains the same model on the same batch with Adam; only the way the K task
gradients reach the shared backbone differs:

- ``plain``: ``sum(losses).backward()``, the baseline every ratio divides by;
- ``gradsurgery``: :class:`gradsurgery.MultiTaskOptimizer` with a registered method, at the
  representation level (and at the parameter level when the optimizer has ``level=``);
- ``torchjd``: torchjd 0.18's ``mtl_backward`` then ``jac_to_grad`` with an aggregator;
- ``naive``: PCGrad on the shared *parameters* with K separate backward passes, the way
  most reimplementations do it (written here, for the comparison only);
- ``rotograd``: the ``rotograd`` 0.1.6 package's ``RotateOnly``/``RotoGrad``/``RotoGradNorm``
  under its ``cached()`` context (geotorch 0.3, or 0.4 with :func:`import_rotograd`'s alias).

This module imports the optional libraries lazily, so an interpreter that has only torch
and rotograd (the reference interpreter) can run the ``plain`` and ``rotograd`` rows.
"""
from __future__ import annotations

import inspect
import sys
from dataclasses import dataclass
from typing import Any, Callable

import torch
from torch import Tensor, nn

#: Width of the backbone's hidden layers and of the heads' hidden layer.
HIDDEN, HEAD_HIDDEN, INPUT = 1024, 256, 64
METHOD_LR = 1e-4
ROTOGRADNORM_ALPHA = 1.5
#: Scale of the "trained" rows' rotation generators, ``A = TRAINED_SCALE * N(0, 1)``: at
#: ``d = 256`` this gives ``||skew(A)||_2`` close to 1, where a few hundred steps of Adam at
#: ``METHOD_LR`` take the generators (the untrained rows start at ``A = 0`` and stay near it).
TRAINED_SCALE = 0.03


@dataclass(frozen=True)
class Config:
    """One benchmarked model: ``d`` features, ``k`` tasks, ``batch`` samples; ``tiny``
    shrinks every layer (only to smoke-test the script)."""

    d: int
    k: int
    batch: int = 256
    tiny: bool = False

    @property
    def widths(self) -> tuple[int, int, int]:
        """(input, backbone hidden, head hidden)."""
        return (8, 32, 16) if self.tiny else (INPUT, HIDDEN, HEAD_HIDDEN)

    def as_dict(self) -> dict[str, Any]:
        return {"d": self.d, "k": self.k, "batch": self.batch, "tiny": self.tiny}


@dataclass
class Problem:
    backbone: nn.Module
    heads: nn.ModuleList
    x: Tensor
    targets: Tensor  # K x batch x 1


def make_problem(cfg: Config, seed: int = 0) -> Problem:
    """MLP backbone ``in-h-h-d`` (ReLU), heads ``d-hh-1``, fixed random batch."""
    torch.manual_seed(seed)
    inp, hid, head_hid = cfg.widths
    backbone = nn.Sequential(nn.Linear(inp, hid), nn.ReLU(), nn.Linear(hid, hid), nn.ReLU(),
                             nn.Linear(hid, cfg.d))
    heads = nn.ModuleList([nn.Sequential(nn.Linear(cfg.d, head_hid), nn.ReLU(), nn.Linear(head_hid, 1))
                           for _ in range(cfg.k)])
    x = torch.randn(cfg.batch, inp)
    targets = torch.randn(cfg.k, cfg.batch, 1)
    return Problem(backbone, heads, x, targets)


def _losses(heads, views, targets) -> list[Tensor]:
    return [nn.functional.mse_loss(h(v), t) for h, v, t in zip(heads, views, targets)]


def _adam(*modules: nn.Module) -> torch.optim.Adam:
    return torch.optim.Adam([p for m in modules for p in m.parameters()], lr=1e-3)


# -- rows -------------------------------------------------------------------------------
def plain_step(p: Problem) -> Callable[[], None]:
    opt = _adam(p.backbone, p.heads)

    def step():
        opt.zero_grad()
        z = p.backbone(p.x)
        sum(_losses(p.heads, [z] * len(p.heads), p.targets)).backward()
        opt.step()
    return step


def gradsurgery_supports(option: str) -> bool:
    """Whether :class:`gradsurgery.MultiTaskOptimizer` takes ``option`` (e.g. ``level``)."""
    import gradsurgery as gs
    return option in inspect.signature(gs.MultiTaskOptimizer.__init__).parameters


def trained_generators(k: int, m: int, seed: int = 1) -> Tensor:
    """The "trained" rows' rotation generators ``A`` (``k x m x m``), the same for every library."""
    return TRAINED_SCALE * torch.randn(k, m, m, generator=torch.Generator().manual_seed(seed))


def gradsurgery_step(p: Problem, method: str, level: str = "rep", rotation_size: int | None = None,
                     rotation_param: str = "expm", trained: bool = False) -> Callable[[], None]:
    import gradsurgery as gs
    d = p.heads[0][0].in_features
    opts: dict[str, Any] = {"num_tasks": len(p.heads), "rep_size": d, "method_lr": METHOD_LR}
    if level != "rep":
        opts.update(level=level, shared_params=list(p.backbone.parameters()))
    if rotation_size is not None:  # rotate the leading rotation_size features only
        del opts["rep_size"]
        opts["rotation_shape"] = (rotation_size,)
    if rotation_param != "expm":
        opts["rotation_param"] = rotation_param
    opt = gs.MultiTaskOptimizer(_adam(p.backbone, p.heads), method, **opts)
    if trained:
        with torch.no_grad():
            opt.rotations.skew_params.copy_(trained_generators(*opt.rotations.skew_params.shape[:2]))

    def step():
        opt.zero_grad()
        views = opt.fork(p.backbone(p.x))
        opt.backward(_losses(p.heads, views, p.targets))
        opt.step()
    return step


TORCHJD_AGGREGATORS = ("Mean", "PCGrad", "MGDA", "UPGrad")


def torchjd_step(p: Problem, aggregator: str) -> Callable[[], None]:
    import torchjd.aggregation as agg
    from torchjd.autojac import jac_to_grad, mtl_backward
    aggregate = getattr(agg, aggregator)()
    shared = list(p.backbone.parameters())
    opt = _adam(p.backbone, p.heads)

    def step():
        opt.zero_grad()
        z = p.backbone(p.x)
        mtl_backward(_losses(p.heads, [z] * len(p.heads), p.targets), features=z)
        jac_to_grad(shared, aggregate)
        opt.step()
    return step


def naive_pcgrad_step(p: Problem) -> Callable[[], None]:
    """PCGrad (Yu et al., 2020) on the flattened shared-parameter gradients, obtained by K
    backward passes through the whole model; each task's head gets its own gradient."""
    shared = list(p.backbone.parameters())
    opt = _adam(p.backbone, p.heads)
    gen = torch.Generator().manual_seed(0)

    def step():
        opt.zero_grad()
        z = p.backbone(p.x)
        losses = _losses(p.heads, [z] * len(p.heads), p.targets)
        k = len(losses)
        flat = []
        for i, (loss, head) in enumerate(zip(losses, p.heads)):
            own = list(head.parameters())
            grads = torch.autograd.grad(loss, shared + own, retain_graph=i < k - 1)
            for param, g in zip(own, grads[len(shared):]):
                param.grad = g
            flat.append(torch.cat([g.reshape(-1) for g in grads[:len(shared)]]))
        g = torch.stack(flat)
        projected = g.clone()
        for i in range(k):
            for j in torch.randperm(k, generator=gen).tolist():
                if j == i:
                    continue
                dot = projected[i] @ g[j]
                if dot < 0:
                    projected[i] -= dot / (g[j] @ g[j]) * g[j]
        combined = projected.sum(0)
        offset = 0
        for param in shared:
            n = param.numel()
            param.grad = combined[offset:offset + n].view_as(param)
            offset += n
        opt.step()
    return step


ROTOGRAD_CLASSES = ("RotateOnly", "RotoGrad", "RotoGradNorm")


def import_rotograd():
    """Imports the ``rotograd`` 0.1.6 package. It does ``from geotorch.parametrize import
    cached``, a module geotorch 0.4 removed (its parametrisations moved to
    ``torch.nn.utils.parametrize``, which has the same ``cached``): with geotorch >= 0.4
    the module is aliased first. The alias changes nothing the package computes:
    ``geotorch.orthogonal(..., triv="expm")`` is ``base @ matrix_exp(skew(A))`` in both."""
    import geotorch
    try:
        import geotorch.parametrize  # noqa: F401  (geotorch 0.3)
    except ImportError:
        import torch.nn.utils.parametrize as parametrize
        sys.modules["geotorch.parametrize"] = parametrize
        geotorch.parametrize = parametrize
    import rotograd
    return rotograd


def rotograd_step(p: Problem, cls_name: str, rotation_size: int | None = None,
                  trained: bool = False) -> Callable[[], None]:
    """The ``rotograd`` package's model with its rotations trained by their own Adam
    (lr ``METHOD_LR``), its forward and backward under ``cached()`` as its README advises."""
    rotograd = import_rotograd()
    cls = getattr(rotograd, cls_name)
    d = p.heads[0][0].in_features
    kwargs: dict[str, Any] = {"alpha": ROTOGRADNORM_ALPHA} if cls_name == "RotoGradNorm" else {}
    model = cls(p.backbone, list(p.heads), rotation_size or d, **kwargs)
    if trained:
        a = trained_generators(len(p.heads), rotation_size or d)
        with torch.no_grad():
            for i in range(len(p.heads)):
                getattr(model.parametrizations, f"rotation_{i}").original.copy_(a[i])
    opt = torch.optim.Adam([{"params": list(model.model_parameters())},
                            {"params": list(model.parameters()), "lr": METHOD_LR}], lr=1e-3)

    def step():
        opt.zero_grad()
        with rotograd.cached():
            preds = model(p.x)
            model.backward([nn.functional.mse_loss(y, t) for y, t in zip(preds, p.targets)])
        opt.step()
    return step


def build(row: dict[str, Any], p: Problem) -> Callable[[], None]:
    """The step function of ``row`` (a dict from :func:`step_time.rows`) on ``p``."""
    lib = row["lib"]
    if lib == "plain":
        return plain_step(p)
    if lib == "gradsurgery":
        return gradsurgery_step(p, row["method"], row.get("level", "rep"), row.get("rotation_size"),
                                row.get("rotation_param", "expm"), row.get("trained", False))
    if lib == "torchjd":
        return torchjd_step(p, row["method"])
    if lib == "naive":
        return naive_pcgrad_step(p)
    if lib == "rotograd":
        return rotograd_step(p, row["method"], row.get("rotation_size"), row.get("trained", False))
    raise ValueError(f"unknown row library {lib!r}")


def preload(libs: set[str]) -> dict[str, str]:
    """Imports the libraries the rows need (so that memory is measured above them);
    returns ``{lib: reason}`` for those that cannot be imported."""
    modules = {"gradsurgery": ["gradsurgery"], "torchjd": ["torchjd.autojac", "torchjd.aggregation"]}
    # the first optimizer built imports torch._dynamo (seconds): do it here, once
    torch.optim.Adam([nn.Parameter(torch.zeros(1))])
    missing = {}
    if "rotograd" in libs:
        try:
            import_rotograd()
        except Exception as e:  # noqa: BLE001 - any import failure skips the rows
            missing["rotograd"] = f"rotograd not importable ({type(e).__name__}: {e})"
    for lib in libs:
        for mod in modules.get(lib, []):
            try:
                __import__(mod)
            except Exception as e:  # noqa: BLE001 - any import failure skips the rows
                missing[lib] = f"{mod} not importable ({type(e).__name__}: {e})"
    return missing
