"""Every method, by name: ``available()``, ``create(name, **options)``, ``get(name)``, and
the ``register(name)`` decorator for your own :class:`Method`."""
from .base import Method
from .registry import available, create, get, options, register
from . import basic, gradnorm, mgda, pcgrad, rotograd  # noqa: F401  (register the built-ins)
from . import (aligned_mtl, cagrad, db_mtl, dualproj, dwa, famo, graddrop, gradvac,  # noqa: F401
               imtl_g, nash_mtl, rlw, upgrad, uw)

__all__ = ["Method", "available", "create", "get", "options", "register"]
