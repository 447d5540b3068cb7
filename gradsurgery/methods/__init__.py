"""Every method, by name: ``available()``, ``create(name, **options)``, ``get(name)``, and
the ``register(name)`` decorator for your own :class:`Method`."""
from .base import ElementWise, GramWeighting, LossWeighting, Method, check_option, kind_of
from .registry import available, create, get, options, register
from . import basic, gradnorm, mgda, pcgrad, rotograd  # noqa: F401  (register the built-ins)
from . import (aligned_mtl, cagrad, db_mtl, dualproj, dwa, famo, graddrop, gradvac,  # noqa: F401
               imtl_g, nash_mtl, rlw, upgrad, uw)
from . import excess_mtl, moco, modo, sdmgrad  # noqa: F401
from . import imtl  # noqa: F401
from . import config, constant, fairgrad, gls, krum, pcd, stch, trimmed_mean  # noqa: F401

__all__ = ["ElementWise", "GramWeighting", "LossWeighting", "Method", "check_option", "kind_of", "available", "create", "get", "options", "register"]
