"""``python -m gradsurgery compare``: the command-line front end of :func:`compare`."""
from __future__ import annotations

import argparse
import ast
import importlib
import os
import sys
import tempfile
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Iterator, Sequence

from .. import data
from .. import methods as registry
from .runner import LEVELS, OPTIMIZER_OPTIONS, Plan, prepare

DEFAULT_OUT = "compare-out"


class UsageError(ValueError):
    """A bad command line, reported as ``error: ...`` with exit status 2."""


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="gradsurgery", description="gradsurgery command-line tools.")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    p = sub.add_parser("compare", help="train every method on a benchmark and compare them",
                       description="Train methods on a bundled benchmark, print the comparison table "
                                   "(per-task metrics, Δm%, time per step) and write CSV, JSON and PNG "
                                   "plots to --out.")
    p.add_argument("--benchmark", default=data.DEFAULT,
                   help=f"one of: {', '.join(data.available())} (default: {data.DEFAULT}), or your own as "
                        "package.module:Name (a benchmark object, or a class or function building one)")
    p.add_argument("--import", dest="imports", action="append", default=[], metavar="MODULE",
                   help="import MODULE first, e.g. one that registers your own methods with "
                        "@gs.methods.register (repeatable; looked up on sys.path and in the current directory)")
    p.add_argument("--methods", help="comma-separated method names (default: every registered method)")
    p.add_argument("--seeds", help="comma-separated training seeds (default: the benchmark's, 0,1,2)")
    p.add_argument("--epochs", type=int, help="epochs per run (default: the benchmark's)")
    p.add_argument("--level", choices=LEVELS, default=None,
                   help="where the methods decide: 'rep' (task gradients w.r.t. the shared representation) "
                        "or 'params' (w.r.t. the shared parameters, the papers' setting); default: each "
                        "method's own default level (see its card); "
                        "METHOD.level=rep in --method-option overrides it for one method")
    p.add_argument("--baseline", default="mean", help="the method Δm%% is measured against (default: mean)")
    p.add_argument("--method-option", action="append", default=[], metavar="METHOD.OPTION=VALUE",
                   help="an option for one method, e.g. gradnorm.alpha=0.5 (repeatable)")
    p.add_argument("--out", default=DEFAULT_OUT, help=f"output folder (default: ./{DEFAULT_OUT})")
    p.add_argument("--format", choices=("text", "markdown"), default="text", help="printed table format")
    p.add_argument("--no-plots", action="store_true", help="skip the PNG figures (no matplotlib needed)")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    p.add_argument("--list", action="store_true", help="list the benchmarks and methods, then exit")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of ``python -m gradsurgery`` and the ``gradsurgery`` console script."""
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        with _cwd_on_path():
            import_modules(args.imports)
            if args.list:
                print(listing())
                return 0
            plan, out = _plan(args)
    except (UsageError, ValueError, TypeError, ImportError, OSError) as err:
        print(f"gradsurgery compare: error: {err}", file=sys.stderr)
        return 2
    results = plan.run(progress=not args.quiet)
    print(results.table(args.format))
    written = [results.to_csv(out / "results.csv"), results.to_json(out / "results.json")]
    (out / "table.md").write_text(results.table("markdown"))
    written.append(out / "table.md")
    if not args.no_plots:
        written += results.plot(out)
    print(f"best Δm%: {results.best()}")
    print("wrote: " + ", ".join(str(p) for p in written))
    return 0


def _plan(args: argparse.Namespace) -> tuple[Plan, Path]:
    """Everything checked before training: names, options, seeds, the output folder and
    matplotlib."""
    methods = _split(args.methods) if args.methods is not None else None
    seeds = None
    if args.seeds is not None:
        try:
            seeds = [int(s) for s in _split(args.seeds)]
        except ValueError:
            raise UsageError(f"--seeds takes comma-separated integers, got {args.seeds!r}") from None
    options = parse_method_options(args.method_option)
    out = check_writable(Path(args.out))
    if not args.no_plots:
        from .plotting import require_matplotlib
        require_matplotlib()
    plan = prepare(args.benchmark, methods, seeds=seeds, epochs=args.epochs, baseline=args.baseline,
                   method_options=options, level=args.level)
    return plan, out


def import_modules(names: Sequence[str]) -> None:
    """Imports the ``--import`` modules (which register methods, benchmarks' code, ...)."""
    for name in names:
        try:
            importlib.import_module(name)
        except ImportError as err:
            raise UsageError(f"--import {name}: cannot import it ({err}); give an importable module name "
                             "(installed, on PYTHONPATH, or a .py file's name in the current directory)") from err


@contextmanager
def _cwd_on_path() -> Iterator[None]:
    """The current directory on ``sys.path`` while user code is imported (``python -m``
    puts it there; the ``gradsurgery`` console script does not)."""
    added = "" not in sys.path and os.getcwd() not in sys.path
    if added:
        sys.path.insert(0, os.getcwd())
    try:
        yield
    finally:
        if added:
            sys.path.remove(os.getcwd())


def _split(text: str) -> list[str]:
    return [part.strip() for part in text.split(",") if part.strip()]


def parse_method_options(items: Sequence[str]) -> dict[str, dict[str, Any]]:
    """``["gradnorm.alpha=0.5", ...]`` -> ``{"gradnorm": {"alpha": 0.5}}``; values are Python
    literals (numbers, strings, lists, True/False/None) or plain strings."""
    options: dict[str, dict[str, Any]] = {}
    for item in items:
        key, sep, raw = item.partition("=")
        method, dot, option = key.strip().partition(".")
        if not sep or not dot or not method or not option:
            raise UsageError(f"--method-option takes METHOD.OPTION=VALUE (e.g. gradnorm.alpha=0.5), got {item!r}")
        try:
            value = ast.literal_eval(raw.strip())
        except (ValueError, SyntaxError):
            value = raw.strip()
        options.setdefault(method, {})[option] = value
    return options


def check_writable(out: Path) -> Path:
    """Creates ``out`` if needed and checks a file can be written there."""
    try:
        out.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryFile(dir=out):
            pass
    except OSError as err:
        raise UsageError(f"cannot write to the output folder {str(out)!r} ({err.strerror or err}); "
                         "choose another one with --out DIR") from None
    return out


def listing() -> str:
    """The benchmarks (with their first docstring line) and methods (with their options)."""
    lines = ["benchmarks:"]
    for name, cls in data.BENCHMARKS.items():
        doc = (cls.__doc__ or "").strip().splitlines()
        default = " (default)" if name == data.DEFAULT else ""
        lines.append(f"  {name:<14} {doc[0] if doc else ''}{default}")
    lines.append("methods (options):")
    for name in registry.available():
        opts = [*registry.options(name), *OPTIMIZER_OPTIONS]
        lines.append(f"  {name:<14} {', '.join(opts)}")
    return "\n".join(lines)
