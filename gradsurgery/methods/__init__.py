"""Every method, by name: ``available()``, ``create(name, **options)``, ``get(name)``, and
the ``register(name)`` decorator for your own :class:`Method`."""
# Importing each method module registers its built-in methods.
from . import (  # noqa: F401
    aligned_mtl,
    basic,
    cagrad,
    config,
    constant,
    db_mtl,
    dualproj,
    dwa,
    excess_mtl,
    fairgrad,
    famo,
    gls,
    graddrop,
    gradnorm,
    gradvac,
    imtl,
    imtl_g,
    krum,
    mgda,
    moco,
    modo,
    nash_mtl,
    pcd,
    pcgrad,
    rlw,
    rotograd,
    sdmgrad,
    stch,
    trimmed_mean,
    upgrad,
    uw,
)
from .base import ElementWise, GramWeighting, LossWeighting, Method, check_option, kind_of
from .registry import available, create, get, options, register

__all__ = ["ElementWise", "GramWeighting", "LossWeighting", "Method", "check_option", "kind_of", "available", "create",
           "get", "options", "register"]
