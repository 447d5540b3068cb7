"""Name -> method class table: ``register``, ``get``, ``create``, ``available``."""
from __future__ import annotations

import inspect
from typing import Any, Callable, TypeVar

from .base import KINDS, Method

M = TypeVar("M", bound=type[Method])

_REGISTRY: dict[str, type[Method]] = {}


def register(name: str) -> Callable[[M], M]:
    """Class decorator that makes a :class:`Method` available by ``name``.

    Example::

        @gs.methods.register("equal_norm")
        class EqualNorm(gs.methods.GramWeighting):
            def weights(self, gram, losses):
                return 1 / gram.diagonal().sqrt().clamp_min(1e-12)
    """
    if not isinstance(name, str) or not name:
        raise ValueError(f"a method name must be a non-empty string, got {name!r}")

    def decorator(cls: M) -> M:
        if not (isinstance(cls, type) and issubclass(cls, KINDS)):
            raise TypeError(f"register({name!r}) decorates a method class: a subclass of gradsurgery.methods."
                            f"GramWeighting, LossWeighting or ElementWise, got {cls!r}")
        existing = _REGISTRY.get(name)
        if existing is not None and existing.__qualname__ != cls.__qualname__:
            raise ValueError(f"a method named {name!r} is already registered ({existing.__qualname__}); "
                             "choose another name")
        _REGISTRY[name] = cls
        cls.name = name
        return cls

    return decorator


def available() -> list[str]:
    """Names of every registered method, built-in and user-defined, sorted."""
    return sorted(_REGISTRY)


def get(name: str) -> type[Method]:
    """The class registered under ``name``."""
    try:
        return _REGISTRY[name]
    except (KeyError, TypeError):
        raise ValueError(f"unknown method {name!r}; available methods: {', '.join(available())}") from None


def options(name: str) -> list[str]:
    """Names of the options (keyword arguments) the method ``name`` accepts."""
    params = inspect.signature(get(name).__init__).parameters
    return [p.name for p in params.values() if p.name != "self" and p.kind is not p.VAR_KEYWORD
            and p.kind is not p.VAR_POSITIONAL]


def create(method: str | Method, **opts: Any) -> Method:
    """Builds the method ``method`` (a registered name) with ``opts``.

    A :class:`Method` instance is returned as it is (then ``opts`` must be empty).
    Unknown options raise a ``ValueError`` that lists the accepted ones.
    """
    if isinstance(method, Method):
        if opts:
            raise ValueError(f"options {sorted(opts)} were given with a method instance {method!r}; "
                             "pass them to the method's constructor instead")
        return method
    cls = get(method)
    accepted = options(method)
    unknown = sorted(set(opts) - set(accepted))
    if unknown:
        raise ValueError(f"method {method!r} does not take option(s) {unknown}; "
                         f"it takes: {accepted or 'no options'}")
    return cls(**opts)
