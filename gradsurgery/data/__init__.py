"""Bundled benchmarks for :func:`gradsurgery.compare`, all generated offline from a seed.

``available()`` lists them; ``get(name, **options)`` builds one. Your own benchmark is any
object following the protocol of :class:`Benchmark` (see :mod:`gradsurgery.data.base`).
"""
from __future__ import annotations

from typing import Any, Callable

from .base import Benchmark, TensorBenchmark
from .celeba import CelebaLike
from .digits import MultiDigits
from .regression import Regression
from .toy import Toy

#: name -> class (the default benchmark of ``python -m gradsurgery compare`` is the first).
BENCHMARKS: dict[str, Callable[..., Benchmark]] = {
    "regression": Regression,
    "toy": Toy,
    "multidigits": MultiDigits,
    "celeba-like": CelebaLike,
}
DEFAULT = "regression"


def available() -> list[str]:
    """Names of the bundled benchmarks."""
    return list(BENCHMARKS)


def get(name: str, **options: Any) -> Benchmark:
    """Builds the bundled benchmark ``name`` (its data are generated here, from ``seed``)."""
    try:
        cls = BENCHMARKS[name]
    except (KeyError, TypeError):
        raise ValueError(f"unknown benchmark {name!r}; available benchmarks: {', '.join(available())}") from None
    return cls(**options)


__all__ = ["Benchmark", "TensorBenchmark", "available", "get", "Regression", "Toy", "MultiDigits", "CelebaLike"]
