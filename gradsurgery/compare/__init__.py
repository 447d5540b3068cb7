"""Compare methods in one loop: :func:`compare` trains every method on a benchmark and
returns :class:`Results` (tables, CSV/JSON, plots). ``python -m gradsurgery compare`` is
the command-line front end.

This module is itself callable, so ``gs.compare(...)`` runs :func:`compare` while
``gs.compare.Results``, ``gs.compare.delta_m`` etc. reach the rest of the subpackage
(e.g. ``gradsurgery.compare.Results.from_json("results.json")``)."""
import inspect as _inspect
import sys as _sys
import types as _types
from typing import Any as _Any

from .results import Results, Run, delta_m
from .runner import Plan, compare, prepare

__all__ = ["compare", "prepare", "Plan", "Results", "Run", "delta_m"]


class _CallableModule(_types.ModuleType):
    """``gradsurgery.compare(...)`` is ``gradsurgery.compare.compare(...)``."""

    def __call__(self, *args: _Any, **kwargs: _Any) -> Results:
        return compare(*args, **kwargs)


__signature__ = _inspect.signature(compare)
_sys.modules[__name__].__class__ = _CallableModule
