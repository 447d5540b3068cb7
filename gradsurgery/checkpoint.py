"""The checkpoint of :class:`gradsurgery.MultiTaskOptimizer`: what it records about itself,
the checks a load runs before restoring anything, switching methods on purpose, and
``torch.optim``'s state-dict hooks around both.

A checkpoint is a dict of tensors, numbers, strings, lists and dicts (``torch.load`` with
``weights_only=True`` reads it)::

    {"format_version": 1, "method_name": "mgda", "method_options": {...}, "num_tasks": K,
     "optimizer": <the wrapped optimizer's state_dict>, "method": <the method's state>,
     "generator": <its RNG state>, "weight_ema": <running weights or None>,
     "rotation": <the rotations' state or None>}

gradsurgery 0.1.0 wrote the same dict without ``format_version``, ``method_name`` and
``method_options``: such a checkpoint loads, checked for everything it does record.
"""
from __future__ import annotations

import functools
from typing import TYPE_CHECKING, Any, Callable, Concatenate, ParamSpec, TypeVar

import torch
from torch import Tensor

from .methods import Method

if TYPE_CHECKING:
    from .optimizer import MultiTaskOptimizer

#: The version of the format :func:`describe` writes (0.1.0's, without one, is version 0).
FORMAT_VERSION = 1

O = TypeVar("O", bound=torch.optim.Optimizer)
P = ParamSpec("P")


def method_name(method: Method) -> str:
    """The name ``method`` is registered under (its class name when it is not registered)."""
    return getattr(type(method), "name", None) or type(method).__qualname__


def describe(method: Method) -> dict[str, Any]:
    """The checkpoint's record of who wrote it: the format version, the method's name and options."""
    return {"format_version": FORMAT_VERSION, "method_name": method_name(method),
            "method_options": _plain(method.options())}


def validate(opt: MultiTaskOptimizer, state_dict: Any, *, method_state: bool = True) -> None:
    """Raises a ``ValueError`` unless ``state_dict`` (a checkpoint of any version) can be
    loaded into ``opt`` whole; changes nothing. With ``method_state=False`` only the
    wrapped optimizer's part is checked (see :func:`wrapped_state_only`)."""
    if not isinstance(state_dict, dict) or not isinstance(state_dict.get("optimizer"), dict):
        raise ValueError("load_state_dict takes what MultiTaskOptimizer.state_dict() returned (a dict with an "
                         f"'optimizer' entry), got {type(state_dict).__name__}; to load a plain optimizer's "
                         "state, call opt.optimizer.load_state_dict(...)")
    version = state_dict.get("format_version", 0)
    if not isinstance(version, int) or not 0 <= version <= FORMAT_VERSION:
        raise ValueError(f"this checkpoint has format version {version!r}; this gradsurgery reads versions "
                         f"0..{FORMAT_VERSION}: load it with the gradsurgery that wrote it, or a newer one")
    if not method_state:
        wrapped_state_only(opt.optimizer, state_dict["optimizer"], check_only=True)
        return
    _check_method(opt, state_dict)
    _check_groups(opt, state_dict["optimizer"])
    generator = state_dict.get("generator")
    current = opt.generator.get_state()
    if not isinstance(generator, Tensor) or generator.dtype != current.dtype or generator.shape != current.shape:
        raise ValueError(f"the checkpoint's 'generator' is not the state of a CPU torch.Generator "
                         f"(got {_kind(generator)})")
    _check_rotations(opt, state_dict.get("rotation"))
    ema = state_dict.get("weight_ema")
    if ema is not None and (opt.weight_ema is None or not isinstance(ema, Tensor) or ema.shape != (opt.num_tasks,)):
        raise ValueError(f"the checkpoint holds weight_ema's running weights ({_kind(ema)}), but this optimizer "
                         f"has weight_ema={opt.weight_ema} for num_tasks={opt.num_tasks}; build it with the "
                         "weight_ema the checkpoint was written with")


def _check_method(opt: MultiTaskOptimizer, state_dict: dict[str, Any]) -> None:
    """The method: its name and options (recorded from format version 1), ``num_tasks``,
    and its state's keys and shapes."""
    name, mine = state_dict.get("method_name"), method_name(opt.method)
    switch = ("; to switch method on purpose, keeping the wrapped optimizer's state only, call "
              "opt.load_state_dict(state, method_state=False)")
    if name is not None and name != mine:
        raise ValueError(f"this checkpoint was written by method {name!r}, but this optimizer runs {mine!r}: "
                         f"build it with method={name!r}{switch}")
    if state_dict.get("num_tasks") != opt.num_tasks:
        raise ValueError(f"this checkpoint is for num_tasks={state_dict.get('num_tasks')}, the optimizer has "
                         f"num_tasks={opt.num_tasks}")
    saved = state_dict.get("method_options")
    if saved is not None:
        current = _plain(opt.method.options())
        differ = sorted(k for k in set(saved) | set(current)
                        if k not in saved or k not in current or not _equal(saved[k], current[k]))
        if differ:
            raise ValueError(f"this checkpoint's {mine!r} has options "
                             f"{', '.join(f'{k}={saved.get(k)!r}' for k in differ)}, this optimizer's "
                             f"{', '.join(f'{k}={current.get(k)!r}' for k in differ)}: build it with the "
                             f"checkpoint's options{switch}")
    if not isinstance(state_dict.get("method"), dict):
        raise ValueError(f"the checkpoint's 'method' entry is {_kind(state_dict.get('method'))}, not a method state")
    try:
        opt.method.check_state_dict(state_dict["method"])
    except ValueError as error:
        raise ValueError(f"this checkpoint's method state does not fit {mine!r}: {error}{switch}") from None


def _check_groups(opt: MultiTaskOptimizer, saved: dict[str, Any]) -> None:
    """The wrapped optimizer's param groups: as many, of the same sizes (what
    ``torch.optim.Optimizer.load_state_dict`` checks, here before anything is restored)."""
    groups = saved.get("param_groups")
    if not isinstance(groups, list) or not isinstance(saved.get("state"), dict):
        raise ValueError("the checkpoint's 'optimizer' entry is not a torch.optim state_dict")
    mine = [len(g["params"]) for g in opt.optimizer.param_groups]
    theirs = [len(g["params"]) if isinstance(g, dict) and "params" in g else None for g in groups]
    if mine != theirs:
        raise ValueError(f"the checkpoint's wrapped optimizer has param groups of sizes {theirs}, this one "
                         f"{mine}: build the model and optimizer as when the checkpoint was written")


def _check_rotations(opt: MultiTaskOptimizer, saved: Any) -> None:
    """The rotations: both or neither, the same parametrisation, tensors of the same shapes."""
    if (saved is None) != (opt.rotations is None):
        raise ValueError("this checkpoint and this optimizer disagree on rotations (one has them, the other "
                         "not); build the optimizer with the same method and rotation= option")
    if opt.rotations is None:
        return
    saved = dict(saved)
    param, mine = saved.pop("param", "expm"), opt._rotation_param_name()
    if param != mine:
        raise ValueError(f"this checkpoint's rotations are parametrised by {param!r}, this optimizer's by "
                         f"{mine!r}: the same generators give other rotations; build the optimizer with "
                         f"rotation_param={param!r}")
    saved.pop("coop", None)
    current = opt.rotations.state_dict()
    shapes = {k: tuple(v.shape) if isinstance(v, Tensor) else _kind(v) for k, v in saved.items()}
    expected = {k: tuple(v.shape) if isinstance(v, Tensor) else _kind(v) for k, v in current.items()}
    if shapes != expected:
        raise ValueError(f"the checkpoint's rotations are {shapes}, this optimizer's {expected}: build it with "
                         "the rep_size/rotation_shape the checkpoint was written with")


def wrapped_state_only(optimizer: torch.optim.Optimizer, saved: dict[str, Any], *,
                       check_only: bool = False) -> dict[str, Any]:
    """A state_dict for ``optimizer`` made of ``saved``'s (the wrapped optimizer's state in
    a checkpoint, maybe of another method) groups that are not a method's own (named
    ``"method"``), and of ``optimizer``'s own method group as it is now: what loading with
    ``method_state=False`` restores. With ``check_only`` it only checks that the groups
    match (a ``ValueError`` otherwise) and returns an empty dict."""
    groups = saved.get("param_groups")
    if not isinstance(groups, list) or not isinstance(saved.get("state"), dict):
        raise ValueError("the checkpoint's 'optimizer' entry is not a torch.optim state_dict")
    theirs = [g for g in groups if not (isinstance(g, dict) and g.get("name") == "method")]
    mine = [g for g in optimizer.param_groups if g.get("name") != "method"]
    sizes = [len(g.get("params", ())) for g in theirs]
    if sizes != [len(g["params"]) for g in mine]:
        raise ValueError(f"the checkpoint's wrapped optimizer has param groups of sizes "
                         f"{sizes} (the method's own left out), this one "
                         f"{[len(g['params']) for g in mine]}: build the model and optimizer as when the "
                         "checkpoint was written")
    if check_only:
        return {}
    current = optimizer.state_dict()
    state: dict[int, Any] = {}
    out_groups, taken = [], iter(theirs)
    for group in current["param_groups"]:
        if group.get("name") == "method":
            out_groups.append(group)
            state.update({i: current["state"][i] for i in group["params"] if i in current["state"]})
            continue
        source = next(taken)
        out_groups.append({**source, "params": group["params"]})
        state.update({i: saved["state"][j] for i, j in zip(group["params"], source["params"], strict=True)
                      if j in saved["state"]})
    return {"state": state, "param_groups": out_groups}


def state_dict_hooks(state_dict: Callable[[O], dict[str, Any]]) -> Callable[[O], dict[str, Any]]:
    """Runs ``torch.optim``'s state-dict hooks around ``state_dict``, as
    ``torch.optim.Optimizer.state_dict`` does: the pre-hooks with the optimizer, the
    post-hooks with the optimizer and the dict (a hook's return value replaces it)."""
    @functools.wraps(state_dict)
    def wrapper(self: O) -> dict[str, Any]:
        for pre_hook in self._optimizer_state_dict_pre_hooks.values():
            pre_hook(self)
        result = state_dict(self)
        for post_hook in self._optimizer_state_dict_post_hooks.values():
            replaced = post_hook(self, result)
            if replaced is not None:
                result = replaced
        return result
    return wrapper


def load_state_dict_hooks(load_state_dict: Callable[Concatenate[O, dict[str, Any], P], None]
                          ) -> Callable[Concatenate[O, dict[str, Any], P], None]:
    """Runs ``torch.optim``'s load-state-dict hooks around ``load_state_dict``, as
    ``torch.optim.Optimizer.load_state_dict`` does: the pre-hooks with the optimizer and a
    shallow copy of the dict (a hook's return value replaces it), the post-hooks with the
    optimizer once it is loaded."""
    @functools.wraps(load_state_dict)
    def wrapper(self: O, state_dict: dict[str, Any], *args: P.args, **kwargs: P.kwargs) -> None:
        state_dict = state_dict.copy() if isinstance(state_dict, dict) else state_dict
        for pre_hook in self._optimizer_load_state_dict_pre_hooks.values():
            replaced = pre_hook(self, state_dict)
            if replaced is not None:
                state_dict = replaced
        load_state_dict(self, state_dict, *args, **kwargs)
        for post_hook in self._optimizer_load_state_dict_post_hooks.values():
            post_hook(self)
    return wrapper


def _plain(value: Any) -> Any:
    """``value`` as checkpoint data: tensors (cloned), numbers, strings, ``None``, lists and
    dicts as they are; tuples as lists; anything else (e.g. a function) as its ``repr``."""
    if isinstance(value, Tensor):
        return value.detach().clone()
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    if isinstance(value, dict):
        return {str(k): _plain(v) for k, v in value.items()}
    if value is None or isinstance(value, (bool, int, float, str)):
        return value
    return repr(value)


def _equal(a: Any, b: Any) -> bool:
    """Equality of checkpoint data (tensors by value, on the CPU)."""
    if isinstance(a, Tensor) or isinstance(b, Tensor):
        return isinstance(a, Tensor) and isinstance(b, Tensor) and a.shape == b.shape \
            and torch.equal(a.cpu().to(b.dtype), b.cpu())
    if isinstance(a, list) and isinstance(b, list):
        return len(a) == len(b) and all(_equal(x, y) for x, y in zip(a, b, strict=True))
    if isinstance(a, dict) and isinstance(b, dict):
        return a.keys() == b.keys() and all(_equal(a[k], b[k]) for k in a)
    return type(a) is type(b) and a == b


def _kind(value: Any) -> str:
    return f"a tensor of shape {tuple(value.shape)}" if isinstance(value, Tensor) else type(value).__name__
