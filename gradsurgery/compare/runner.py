"""The training loop behind :func:`compare`: every method x seed on one benchmark."""
from __future__ import annotations

import importlib
import inspect
import math
import sys
import time
import warnings
from dataclasses import dataclass
from typing import Any, Callable, Iterable, Mapping, Sequence

import torch
from torch import Tensor, nn
from tqdm.auto import tqdm

from .. import data
from .. import methods as registry
from ..optimizer import MultiTaskOptimizer
from .results import TIME_REFERENCE, Results, Run

#: Options every method takes (they go to :class:`MultiTaskOptimizer`, not the method);
#: ``level`` here overrides :func:`compare`'s ``level`` for one method; ``rep_size``,
#: ``rotation_shape`` and ``post_shape`` shape the rotations of rotation methods (e.g. the
#: channels of a feature map: ``rotation_shape=C, post_shape=(H, W)``), ``rotation=True``
#: adds rotations to any method.
OPTIMIZER_OPTIONS = ("method_lr", "level", "rotation", "rep_size", "rotation_shape", "post_shape", "rotation_param")
#: Where the methods decide (:class:`MultiTaskOptimizer`'s ``level``).
LEVELS = ("rep", "params")
_PROTOCOL = ("tasks", "metrics", "higher_is_better", "rep_size", "build", "optimizer",
             "train_batches", "losses", "evaluate")


@dataclass
class Plan:
    """A validated comparison, ready to :meth:`run` (what :func:`prepare` returns)."""

    benchmark: Any
    methods: list[str]
    seeds: list[int]
    epochs: int
    baseline: str
    options: dict[str, dict[str, Any]]
    level: str = "rep"

    def run(self, progress: bool = True) -> Results:
        """Trains every method with every seed; a tqdm bar shows method, seed, epoch and
        the running loss unless ``progress`` is False."""
        bench = self.benchmark
        runs = []
        threads = torch.get_num_threads()
        try:
            if getattr(bench, "threads", None):
                torch.set_num_threads(bench.threads)
            # one untimed epoch first, so that the first method timed does not pay the warm-up
            first = self.methods[0]
            with warnings.catch_warnings():  # a failure warns once, in the timed run
                warnings.simplefilter("ignore")
                train_one(bench, first, self.seeds[0], 1, self.options[first], tqdm(disable=True), self.level)
            total = len(self.methods) * len(self.seeds) * self.epochs
            with tqdm(total=total, disable=not progress, unit="epoch", dynamic_ncols=True) as bar, \
                    warnings.catch_warnings():
                if progress:  # print warnings (a failed method) above the bar, not through it
                    warnings.showwarning = _write_above_bar
                for name in self.methods:
                    for seed in self.seeds:
                        runs.append(train_one(bench, name, seed, self.epochs, self.options[name], bar,
                                              self.level))
        finally:
            torch.set_num_threads(threads)
        return Results(benchmark=getattr(bench, "name", type(bench).__name__), tasks=list(bench.tasks),
                       metrics=list(bench.metrics), higher_is_better=[bool(h) for h in bench.higher_is_better],
                       methods=self.methods, seeds=self.seeds, epochs=self.epochs, baseline=self.baseline,
                       runs=runs, level=self.level, source=bench)


def prepare(benchmark: Any = data.DEFAULT, methods: Sequence[str] | None = None, *,
            seeds: Sequence[int] | None = None, epochs: int | None = None, baseline: str = "mean",
            method_options: Mapping[str, Mapping[str, Any]] | None = None, level: str | None = None) -> Plan:
    """Validates the arguments of :func:`compare` (same meaning) without training: unknown
    benchmarks, methods and options raise a ``ValueError`` that lists what exists."""
    if level is not None and level not in LEVELS:
        raise ValueError(f"level must be one of {', '.join(map(repr, LEVELS))} (None: each method's default), "
                         f"got {level!r}")
    bench = _resolve_benchmark(benchmark)
    names = _resolve_methods(methods, baseline)
    seeds = _resolve_seeds(bench.seeds if seeds is None else seeds)
    epochs = _positive_int(bench.epochs if epochs is None else epochs, "epochs")
    options = _resolve_options(method_options or {}, names, bench, level)
    return Plan(bench, names, seeds, epochs, baseline, options, level or "rep")


def compare(benchmark: Any = data.DEFAULT, methods: Sequence[str] | None = None, *,
            seeds: Sequence[int] | None = None, epochs: int | None = None, baseline: str = "mean",
            method_options: Mapping[str, Mapping[str, Any]] | None = None, level: str | None = None,
            progress: bool = True) -> Results:
    """Trains every method in ``methods`` with every seed on ``benchmark`` and returns the
    :class:`~gradsurgery.compare.Results` (``.table()``, ``.to_csv()``, ``.to_json()``,
    ``.plot()``).

    Example::

        results = gs.compare("regression", ["mean", "pcgrad", "mgda"], seeds=(0, 1))
        print(results.table())
        results.plot("compare-out")

    Args:
        benchmark: a bundled benchmark's name (:func:`gradsurgery.data.available`), your
            own benchmark object (protocol in :mod:`gradsurgery.data.base`), or
            ``"package.module:Name"`` naming one (a class or function is called without
            arguments).
        methods: registered method names; ``None``: every registered method, built-in or
            your own. ``baseline`` and ``"mean"`` (the time reference) are always run.
        seeds: training seeds (model initialisation, batch order); ``None``: the
            benchmark's default (``(0, 1, 2)``; the toy's five starting points).
        epochs: ``None``: the benchmark's default.
        baseline: the method Δm% is measured against.
        method_options: ``{method: {option: value}}``, e.g. ``{"gradnorm": {"alpha": 0.5}}``;
            ``method_lr``, ``level``, ``rotation``, ``rep_size``, ``rotation_shape`` and
            ``post_shape`` are accepted for every method (e.g. ``{"rotograd":
            {"rotation_shape": 64, "post_shape": (8, 8)}}`` rotates the 64 channels of an
            ``8 x 8`` feature map; ``{"mgda": {"rotation": True}}`` adds rotations to MGDA).
        level: ``None`` (default): each method at its default level (``"rep"`` for all but
            the few whose card says otherwise, e.g. ``moco``); ``"rep"`` or ``"params"``:
            where every method decides, from the
            task gradients w.r.t. the shared representation or w.r.t. the shared parameters
            (the papers' setting; :class:`~gradsurgery.MultiTaskOptimizer`'s ``level``).
            Rotation methods run at ``"rep"`` only: with ``level="params"`` name them with
            ``method_options={"rotograd": {"level": "rep"}}`` or leave them out.
        progress: show a tqdm progress bar (method, seed, epoch, running loss).

    Everything that can be checked without data is validated before training starts
    (:func:`prepare`). A run whose loss or metric becomes non-finite is recorded as
    ``"diverged"``; one that raises anywhere (building the optimizer, ``fork``,
    ``backward``, ``step``, evaluation: e.g. a ``rotation_shape`` that does not fit the
    representation) as ``"failed"``, with a warning; the other runs still finish.
    """
    return prepare(benchmark, methods, seeds=seeds, epochs=epochs, baseline=baseline,
                   method_options=method_options, level=level).run(progress)


def train_one(bench: Any, method: str, seed: int, epochs: int, options: Mapping[str, Any],
              bar: tqdm, level: str = "rep") -> Run:
    """One run: seeds torch, builds the model and the optimizer (at ``level``, unless the
    method's ``options`` say otherwise), trains ``epochs`` epochs (timing the training
    steps), evaluates after each epoch, records ``opt.stats``, and at the end the
    benchmark's ``outcome(backbone, heads)`` when it has one. Whatever raises while the
    method runs (building the optimizer, ``fork``, ``backward``, ``step``, evaluation)
    ends the run as ``"failed"`` (``"diverged"`` when a loss or parameter is not finite)."""
    torch.manual_seed(seed)
    backbone, heads = bench.build(seed)
    heads = list(heads)
    modules = nn.ModuleList([backbone, *heads])
    base = bench.optimizer(list(modules.parameters()))  # shared parameters counted once
    options = {**optimizer_defaults(bench, level, options), **options}
    run = Run(method=method, seed=seed, level=options["level"])
    try:
        opt = MultiTaskOptimizer(base, method, num_tasks=len(heads), **options)
    except Exception as err:  # noqa: BLE001 - a method's failure is recorded, not fatal
        _stop(run, err, None, modules.parameters())
        epochs_run = 0
    else:
        epochs_run = epochs
    shuffle = torch.Generator().manual_seed(seed)
    track = getattr(bench, "track", None)
    outcome = getattr(bench, "outcome", None)
    cosines: list[Tensor] = []
    weights: list[Tensor] = []
    tracked: list[Tensor] = []
    elapsed = 0.0  # of every step but the first (lazy initialisation, warm-up)
    clock = _clock(modules)

    def predict(x: Tensor) -> list[Tensor]:
        return [head(view) for head, view in zip(heads, opt.fork(backbone(x)))]

    for epoch in range(epochs_run):
        bar.set_description(f"{method} seed={seed} epoch={epoch + 1}/{epochs}", refresh=False)
        modules.train()
        loss_sum = torch.zeros(len(heads), dtype=torch.float64)
        steps = 0
        start = clock()
        values = None
        try:
            for x, targets in bench.train_batches(shuffle):
                values = None
                opt.zero_grad()
                views = opt.fork(backbone(x))
                losses = bench.losses([head(v) for head, v in zip(heads, views)], targets)
                values = torch.stack([loss.detach().reshape(()) for loss in losses]).double()
                opt.backward(losses)
                _record(opt.stats, len(heads), cosines, weights)  # what this step decided
                opt.step()
                if opt.method.observes_losses:  # FAMO learns from the same batch's losses after the step
                    with torch.no_grad():
                        opt.observe(bench.losses([head(v) for head, v in zip(heads, opt.fork(backbone(x)))],
                                                 targets))
                loss_sum += values
                steps += 1
                if run.steps + steps == 1:  # restart the clock after the very first step
                    start = clock()
                if track is not None:
                    tracked.append(track(backbone))
            opt.end_epoch()  # DWA's and STCH's epoch-level statistics
        except Exception as err:  # noqa: BLE001 - a method's failure is recorded, not fatal
            _stop(run, err, values, modules.parameters())
        _sync(loss_sum)
        elapsed += clock() - start
        run.steps += steps
        if not run.ok:
            break
        mean_loss = (loss_sum / max(steps, 1)).tolist()
        run.train_losses.append(mean_loss)
        modules.eval()
        try:
            with torch.no_grad():
                metrics = [float(m) for m in bench.evaluate(predict)]
        except Exception as err:  # noqa: BLE001 - e.g. a rotation that does not fit the test batch
            _stop(run, err, None, modules.parameters())
            break
        run.curves.append(metrics)
        bar.update(1)
        bar.set_postfix(loss=f"{sum(mean_loss):.4g}", refresh=False)
        if not all(map(math.isfinite, mean_loss + metrics)):
            run.status, run.error = "diverged", f"non-finite training loss or metric in epoch {epoch + 1}"
            break
    if run.ok:
        run.metrics = run.curves[-1]
    else:
        bar.update(epochs - len(run.curves))
    run.step_time = elapsed / (run.steps - 1) if run.steps > 1 else math.nan
    cosine = torch.stack(cosines) if cosines else None
    # a method that does not look at the gradients reports NaN cosines: not recorded
    run.cosine = cosine.tolist() if cosine is not None and not bool(cosine.isnan().all()) else []
    run.weights = torch.stack(weights).tolist() if weights else []
    run.track = torch.stack(tracked).tolist() if tracked else []
    if outcome is not None:
        run.outcome = dict(outcome(backbone, heads))
    return run


def optimizer_defaults(bench: Any, level: str | None, options: Mapping[str, Any]) -> dict[str, Any]:
    """What :class:`MultiTaskOptimizer` gets unless the method's ``options`` say otherwise:
    the benchmark's ``method_lr`` and ``rep_size`` (not with ``rotation_shape``, which
    replaces it) and the comparison's ``level``."""
    defaults = {"method_lr": getattr(bench, "method_lr", None), "level": level}
    if "rotation_shape" not in options:
        defaults["rep_size"] = bench.rep_size
    return defaults


def _write_above_bar(message: Warning | str, category: type[Warning], *args: Any, **kwargs: Any) -> None:
    tqdm.write(f"{category.__name__}: {message}", file=sys.stderr)


def _record(stats: Mapping[str, Tensor], k: int, cosines: list[Tensor], weights: list[Tensor]) -> None:
    """Appends the step's mean pairwise cosine (NaN when the method did not measure it) and
    the method's coefficients (a copy: the stats tensor may alias the method's parameter,
    which the step then changes)."""
    if "cosines" in stats and k > 1:
        cosines.append(_mean_pairwise(stats["cosines"]))
    if stats.get("weights") is not None and stats["weights"].shape == (k,):
        weights.append(stats["weights"].clone())


def _stop(run: Run, err: Exception, values: Tensor | None, params: Iterable[Tensor]) -> None:
    """Records why a run stopped: ``diverged`` when a loss (``values``, ``None`` when the
    step failed before the losses) or a parameter is non-finite, otherwise ``failed``
    (with a warning): the method raised on finite input."""
    finite = ((values is None or bool(torch.isfinite(values).all()))
              and all(bool(torch.isfinite(p).all()) for p in params))
    run.error = f"{type(err).__name__}: {err}"
    if not finite:
        run.status = "diverged"
        return
    run.status = "failed"
    warnings.warn(f"method {run.method!r} failed with seed {run.seed}: {run.error}", RuntimeWarning, stacklevel=3)


def _mean_pairwise(cos: Tensor) -> Tensor:
    """Mean of the off-diagonal entries of a ``K x K`` cosine matrix."""
    k = cos.shape[0]
    return (cos.sum() - cos.diagonal().sum()) / (k * (k - 1))


def _clock(modules: nn.Module) -> Callable[[], float]:
    """The clock of the step time: the process's CPU time when the run is on CPU with one
    thread (then it is the compute time, unaffected by other programs on the machine),
    wall time otherwise (several threads, or an accelerator)."""
    on_cpu = all(p.device.type == "cpu" for p in modules.parameters())
    return time.process_time if on_cpu and torch.get_num_threads() == 1 else time.perf_counter


def _sync(t: Tensor) -> None:
    """Waits for queued device work so the timing covers it (a no-op on CPU)."""
    if t.is_cuda:
        torch.cuda.synchronize(t.device)


# -- validation (all before any training) ------------------------------------------------
def _resolve_benchmark(benchmark: Any) -> Any:
    if isinstance(benchmark, str):
        benchmark = load_benchmark(benchmark) if ":" in benchmark else data.get(benchmark)
    missing = [a for a in _PROTOCOL if not hasattr(benchmark, a)]
    if missing:
        raise TypeError(f"{benchmark!r} is neither a benchmark name ({', '.join(data.available())}) nor a "
                        f"benchmark object: it lacks {missing} (see gradsurgery.data.base for the protocol)")
    k = len(benchmark.tasks)
    if k < 1 or len(benchmark.metrics) != k or len(benchmark.higher_is_better) != k:
        raise ValueError(f"benchmark {benchmark!r}: tasks, metrics and higher_is_better must have the "
                         f"same length >= 1, got {len(benchmark.tasks)}, {len(benchmark.metrics)}, "
                         f"{len(benchmark.higher_is_better)}")
    return benchmark


def load_benchmark(spec: str) -> Any:
    """The benchmark ``"package.module:Name"`` names: ``Name`` from the imported module,
    called without arguments when it is a class or a function."""
    module_name, _, attr = spec.partition(":")
    if not module_name or not attr:
        raise ValueError(f"a benchmark given as a string is a bundled name ({', '.join(data.available())}) or "
                         f"'package.module:Name', got {spec!r}")
    try:
        module = importlib.import_module(module_name)
    except ImportError as err:
        raise ValueError(f"cannot import module {module_name!r} for benchmark {spec!r} ({err}); it must be "
                         "importable (installed, on PYTHONPATH, or in the current directory)") from err
    try:
        found = getattr(module, attr)
    except AttributeError:
        raise ValueError(f"module {module_name!r} has no attribute {attr!r} (benchmark {spec!r}); it has: "
                         f"{', '.join(n for n in dir(module) if not n.startswith('_'))}") from None
    return found() if inspect.isclass(found) or inspect.isfunction(found) else found


def _resolve_methods(methods: Sequence[str] | None, baseline: str) -> list[str]:
    if isinstance(methods, str):
        raise TypeError(f"methods must be a list of names, got the string {methods!r}; "
                        f"write methods=[{methods!r}]")
    known = registry.available()
    names = known if methods is None else list(methods)
    unknown = [n for n in [*names, baseline] if n not in known]
    if unknown:
        raise ValueError(f"unknown method(s) {unknown}; available methods: {', '.join(known)}. A method of your "
                         "own: register it with @gs.methods.register before comparing (command line: "
                         "--import MODULE)")
    if not names:
        raise ValueError("methods is empty; pass method names or None for every registered method")
    return list(dict.fromkeys([baseline, TIME_REFERENCE, *names]))


def _resolve_seeds(seeds: Sequence[int]) -> list[int]:
    seeds = list(seeds)
    if not seeds or any(isinstance(s, bool) or not isinstance(s, int) or s < 0 for s in seeds):
        raise ValueError(f"seeds must be a non-empty list of integers >= 0, got {seeds!r}")
    if len(set(seeds)) != len(seeds):
        raise ValueError(f"seeds must be distinct, got {seeds!r}")
    return seeds


def _positive_int(value: Any, what: str) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"{what} must be an integer >= 1, got {value!r}")
    return value


def _resolve_options(method_options: Mapping[str, Mapping[str, Any]], names: list[str],
                     bench: Any, level: str | None = None) -> dict[str, dict[str, Any]]:
    """Checks ``{method: {option: value}}`` against each method's accepted options and
    levels (``level``, unless its options name another; ``None``: the method's default),
    then builds each method once on a dummy parameter so that bad values raise now."""
    stray = [m for m in method_options if m not in names]
    if stray:
        raise ValueError(f"method_options names method(s) {stray} that are not compared; compared: {', '.join(names)}")
    resolved = {}
    elsewhere = []  # methods that cannot run at the comparison's level, reported together
    for name in names:
        opts = dict(method_options.get(name, {}))
        accepted = [*registry.options(name), *OPTIMIZER_OPTIONS]
        unknown = sorted(set(opts) - set(accepted))
        if unknown:
            raise ValueError(f"method {name!r} does not take option(s) {unknown}; it takes: {', '.join(accepted)}")
        levels = registry.get(name).levels
        if opts.get("level", level) is None:
            opts["level"] = levels[0]
        elif opts.get("level", level) not in levels:
            elsewhere.append((name, levels[0]))
            continue
        dummy = torch.optim.SGD([nn.Parameter(torch.zeros(1))], lr=0.0)
        rng = torch.get_rng_state()
        try:
            MultiTaskOptimizer(dummy, name, num_tasks=len(bench.tasks),
                               **{**optimizer_defaults(bench, level, opts), **opts})
        except (TypeError, ValueError) as err:
            if not method_options.get(name):  # defaults that do not fit this benchmark (e.g. Krum with 2 tasks):
                resolved[name] = opts         # its runs are marked failed with the reason, the others go on
                continue
            raise ValueError(f"method {name!r} cannot be built with options {opts}: {err}") from err
        finally:
            torch.set_rng_state(rng)
        resolved[name] = opts
    if elsewhere:
        names_ = [n for n, _ in elsewhere]
        fix = ", ".join(f"{n!r}: {{'level': {lv!r}}}" for n, lv in elsewhere)
        flags = " ".join(f"--method-option {n}.level={lv}" for n, lv in elsewhere)
        raise ValueError(f"method(s) {names_} cannot run at level={level!r} (see their cards); run them at their "
                         f"level with method_options={{{fix}}} (command line: {flags}), leave them out, or drop "
                         "level= to run every method at its default level")
    return resolved
