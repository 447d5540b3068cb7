"""Compare methods in one loop: :func:`compare` trains every method on a benchmark and
returns :class:`Results` (tables, CSV/JSON, plots). ``python -m gradsurgery compare`` is
the command-line front end."""
from .results import Results, Run, delta_m
from .runner import Plan, compare, prepare

__all__ = ["compare", "prepare", "Plan", "Results", "Run", "delta_m"]
