"""The benchmark protocol that :func:`gradsurgery.compare` trains and evaluates.

A benchmark (built-in or your own) is any object with these attributes and methods::

    tasks: Sequence[str]             # task names; K = len(tasks)
    metrics: Sequence[str]           # the held-out metric of each task ("acc", "nmse", ...)
    higher_is_better: Sequence[bool] # its direction: accuracy up, error down
    rep_size: int                    # features of the shared representation z
    epochs: int                      # default number of epochs
    seeds: Sequence[int]             # default training seeds
    method_lr: float | None          # learning rate of the methods' own parameters

    build(seed) -> (backbone, heads)             # fresh model; torch is already seeded
    optimizer(params) -> torch.optim.Optimizer   # the wrapped optimizer
    train_batches(generator) -> Iterable[(x, [y_1, ..., y_K])]   # one epoch
    losses(outputs, targets) -> [L_1, ..., L_K]  # K scalar losses
    evaluate(predict) -> [m_1, ..., m_K]         # held-out metrics (floats); predict(x)
                                                 # returns the K heads' outputs

and, optionally, ``name``, ``threads`` (torch's intra-op threads during the run; the
bundled benchmarks' models are so small that one thread is fastest, and many times faster
on a busy machine), ``track(backbone) -> Tensor`` (recorded after every step, e.g.
the toy problem's point), ``outcome(backbone, heads) -> dict`` (recorded once after
training as ``Run.outcome``; its yes/no entries are counted in the table, e.g. the toy's
``reached``), ``extra_table(results, fmt) -> str`` (appended to ``Results.table``) and
``extra_plots(results, out_dir) -> list[Path]``.
:class:`Benchmark` holds the defaults; :class:`TensorBenchmark` implements batching and
evaluation for data held in tensors, so a custom benchmark only writes ``build``,
``losses`` and ``metric_values``.
"""
from __future__ import annotations

from typing import Callable, Iterable, Iterator, Sequence

import torch
from torch import Tensor, nn

Batch = tuple[Tensor, list[Tensor]]
#: ``predict(x)``: the K heads' outputs for input ``x`` (the model in evaluation mode,
#: through the optimizer's ``fork``, so rotation methods' heads read their rotated view).
Predict = Callable[[Tensor], list[Tensor]]


class Benchmark:
    """Defaults of the benchmark protocol (see the module docstring)."""

    name: str = "custom"
    tasks: Sequence[str] = ()
    metrics: Sequence[str] = ()
    higher_is_better: Sequence[bool] = ()
    rep_size: int = 0
    epochs: int = 10
    seeds: Sequence[int] = (0, 1, 2)
    lr: float = 1e-3
    method_lr: float | None = None
    threads: int | None = None

    def build(self, seed: int) -> tuple[nn.Module, Sequence[nn.Module]]:
        raise NotImplementedError

    def optimizer(self, params: Iterable[nn.Parameter]) -> torch.optim.Optimizer:
        """Adam with the benchmark's ``lr``."""
        return torch.optim.Adam(params, lr=self.lr)

    def train_batches(self, generator: torch.Generator) -> Iterable[Batch]:
        raise NotImplementedError

    def losses(self, outputs: Sequence[Tensor], targets: Sequence[Tensor]) -> list[Tensor]:
        raise NotImplementedError

    def evaluate(self, predict: Predict) -> list[float]:
        raise NotImplementedError

    def __repr__(self) -> str:
        return f"{type(self).__name__}(name={self.name!r}, K={len(self.tasks)})"


class TensorBenchmark(Benchmark):
    """A benchmark whose data are tensors: ``x_train``, ``y_train`` (K target tensors),
    ``x_test``, ``y_test``, shuffled into batches of ``batch_size`` every epoch.

    Subclasses set the data and implement ``build``, ``losses`` and
    ``metric_values(outputs, targets) -> list[float]``.
    """

    batch_size: int = 128
    x_train: Tensor
    y_train: list[Tensor]
    x_test: Tensor
    y_test: list[Tensor]

    def train_batches(self, generator: torch.Generator) -> Iterator[Batch]:
        order = torch.randperm(len(self.x_train), generator=generator)
        for i in range(0, len(order), self.batch_size):
            idx = order[i:i + self.batch_size]
            yield self.x_train[idx], [y[idx] for y in self.y_train]

    def evaluate(self, predict: Predict) -> list[float]:
        """The held-out metrics, from one forward pass over the test split."""
        return self.metric_values(predict(self.x_test), self.y_test)

    def metric_values(self, outputs: Sequence[Tensor], targets: Sequence[Tensor]) -> list[float]:
        raise NotImplementedError


def mlp(sizes: Sequence[int]) -> nn.Sequential:
    """``Linear -> ReLU`` for each consecutive pair of ``sizes``."""
    layers: list[nn.Module] = []
    for a, b in zip(sizes[:-1], sizes[1:]):
        layers += [nn.Linear(a, b), nn.ReLU()]
    return nn.Sequential(*layers)


def split(n: int, test: int, generator: torch.Generator) -> tuple[Tensor, Tensor]:
    """Random train/test indices of ``n`` examples, ``test`` of them held out."""
    order = torch.randperm(n, generator=generator)
    return order[test:], order[:test]
