"""Every method, by name: ``available()``, ``create(name, **options)``, ``get(name)``, and
the ``register(name)`` decorator for your own :class:`Method`."""
from .base import Method
from .registry import available, create, get, options, register
from . import basic, gradnorm, mgda, pcgrad  # noqa: F401  (register the built-ins)

__all__ = ["Method", "available", "create", "get", "options", "register"]
