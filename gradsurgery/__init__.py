"""gradsurgery: gradient surgery for multi-task learning in PyTorch.

``MultiTaskOptimizer`` wraps any ``torch.optim`` optimizer; ``methods`` is the registry of
interchangeable methods (``"mean"``, ``"pcgrad"``, ``"mgda"``, ``"gradnorm"``, ...);
``stats_to_scalars`` turns ``opt.stats`` into scalars for a logger. ``compare`` (the
comparison tool, callable as ``gs.compare(...)``), ``data`` (its benchmarks) and
``compat`` (the rotograd-style facade) are imported on first use, so ``import
gradsurgery`` loads neither tqdm nor matplotlib nor the benchmarks.
"""
from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

from . import methods
from .optimizer import MultiTaskOptimizer
from .stats import stats_to_scalars

if TYPE_CHECKING:
    from . import compare
    from . import compat as compat  # the lazy subpackages, for type checkers
    from . import data as data
    from . import integrations as integrations
    from . import testing as testing

__version__ = "0.1.0"

#: Subpackages imported on first attribute access (``gs.compare``, ``gs.data``, ...).
_LAZY = ("compare", "compat", "data", "integrations", "testing")


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        return importlib.import_module(f"{__name__}.{name}")
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted({*globals(), *_LAZY})


__all__ = ["MultiTaskOptimizer", "compare", "methods", "stats_to_scalars", "__version__"]
