"""The documentation runs: every ```python block of README.md and docs/**/*.md executes, the
blocks of a page in order in one namespace (a block may use what an earlier block of its page
defined). A block that must not run is preceded by ``<!-- docs-test: skip (the reason) -->``.

Also checked: the README's set-up commands are the ones CI runs, every ``python -m gradsurgery
compare`` line of the docs parses with the real command line, every registered method has a
row in the README's method table and in docs/methods/index.md, and relative links point to
files that exist."""
from __future__ import annotations

import os
import re
import shlex
import socket
from pathlib import Path

import pytest
import torch

import gradsurgery as gs
from gradsurgery.methods import registry

ROOT = Path(__file__).resolve().parent.parent
PAGES = [ROOT / "README.md", *sorted((ROOT / "docs").rglob("*.md"))]
FENCE = re.compile(r"^(?P<indent> *)```(?P<lang>[\w-]*)\s*$")
SKIP = re.compile(r"<!--\s*docs-test:\s*skip\s*\((?P<reason>[^)]*)\)\s*-->")


def blocks(page: Path, lang: str = "python") -> list[tuple[int, str, str | None]]:
    """``(line, code, skip_reason)`` of every fenced block of ``lang`` (indented ones too,
    e.g. inside a list item), in page order."""
    lines = page.read_text().splitlines()
    found, i = [], 0
    while i < len(lines):
        match = FENCE.match(lines[i])
        if not match or not match["lang"]:
            i += 1
            continue
        indent, start = len(match["indent"]), i + 1
        end = start
        while end < len(lines) and lines[end].strip() != "```":
            end += 1
        if match["lang"] == lang:
            previous = next((line for line in reversed(lines[:i]) if line.strip()), "")
            skip = SKIP.search(previous)
            code = "\n".join(line[indent:] for line in lines[start:end])
            found.append((start + 1, code, skip["reason"].strip() if skip else None))
        i = end + 1
    return found


def _page_id(page: Path) -> str:
    return str(page.relative_to(ROOT))


RUNNABLE = [page for page in PAGES if blocks(page)]


@pytest.fixture
def isolated(tmp_path, monkeypatch):
    """A page runs in a scratch folder, with its own registry, environment (a free
    ``MASTER_PORT``) and torch settings, so what it registers, writes or sets is gone
    afterwards."""
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(registry, "_REGISTRY", dict(registry._REGISTRY))
    environ = dict(os.environ)
    os.environ["MPLBACKEND"] = "Agg"
    with socket.socket() as free:  # the distributed recipes read MASTER_PORT if it is set
        free.bind(("127.0.0.1", 0))
        os.environ["MASTER_PORT"] = str(free.getsockname()[1])
    threads = torch.get_num_threads()
    state = torch.get_rng_state()
    yield
    os.environ.clear()
    os.environ.update(environ)
    torch.set_num_threads(threads)
    torch.set_rng_state(state)
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        torch.distributed.destroy_process_group()


@pytest.mark.parametrize("page", RUNNABLE, ids=_page_id)
def test_python_blocks_run(page, isolated, capsys):
    namespace: dict = {"__name__": "__docs__"}
    for line, code, skip in blocks(page):
        if skip is not None:
            assert skip, f"{_page_id(page)}:{line}: a skipped block must give its reason"
            continue
        try:
            exec(compile(code, f"{_page_id(page)}:{line}", "exec"), namespace)
        except Exception as err:
            raise AssertionError(f"the block at {_page_id(page)}:{line} failed: {type(err).__name__}: {err}") from err


def test_block_finder_sees_indented_blocks_and_skips(tmp_path):
    page = tmp_path / "page.md"
    page.write_text("text\n\n```python\na = 1\n```\n\n- item\n\n  ```python\n  b = a\n  ```\n\n"
                    "<!-- docs-test: skip (needs a GPU) -->\n```python\nraise SystemExit\n```\n"
                    "```bash\nls\n```\n")
    assert blocks(page) == [(4, "a = 1", None), (10, "b = a", None), (15, "raise SystemExit", "needs a GPU")]


def test_skips_are_rare_and_explained():
    skipped = [(page, line, reason) for page in PAGES for line, _, reason in blocks(page) if reason is not None]
    assert all(reason for _, _, reason in skipped)
    assert len(skipped) <= 3, skipped


# -- commands ------------------------------------------------------------------------------
def _bash_lines(page: Path) -> list[str]:
    return [line.strip() for _, code, _ in blocks(page, "bash") for line in code.replace("\\\n", " ").splitlines()
            if line.strip() and not line.strip().startswith("#")]


def test_readme_setup_commands_are_what_ci_runs():
    """The README's test command is the one .ci/run runs, after the same installs."""
    ci = (ROOT / ".ci" / "run").read_text()
    readme = _bash_lines(ROOT / "README.md")
    test_line = next(line for line in readme if "pytest" in line)
    steps = [step.strip() for step in test_line.split("&&")]
    assert steps[-1] == "python -m pytest" and "( . \"$1/bin/activate\" && python -m pytest )" in ci
    assert "pip install torch==2.13.0" in steps
    assert 'pip install -e ".[test]"' in steps and '-m pip install -q -e ".[test]"' in ci
    assert re.search(r"-m pip install -q torch==2\.13\.0", ci)
    compare_line = next(line for line in readme if "gradsurgery compare" in line)
    assert compare_line.split("&&")[-1].strip() == "python -m gradsurgery compare"


def test_documented_compare_commands_parse():
    from gradsurgery.compare.cli import build_parser

    parser = build_parser()
    commands = [line.split("&&")[-1].strip() for page in PAGES for line in _bash_lines(page)
                if "gradsurgery compare" in line]
    assert len(commands) >= 4
    for command in commands:
        argv = shlex.split(command.split("#")[0])
        args = parser.parse_args(argv[argv.index("gradsurgery") + 1:])
        for name in (args.methods or "").split(","):
            assert not name or name in gs.methods.available(), (command, name)
        for option in args.method_option:
            assert option.split(".")[0] in gs.methods.available(), (command, option)


# -- methods and links ---------------------------------------------------------------------
def _table_names(page: Path) -> list[str]:
    """Method names in the first column of the page's tables: ``| [`name`](...) |`` rows."""
    return re.findall(r"^\| \[`(\w+)`\]\(", page.read_text(), flags=re.M)


@pytest.mark.parametrize("page", ["README.md", "docs/methods/index.md"])
def test_every_registered_method_has_one_row(page):
    names = _table_names(ROOT / page)
    assert sorted(names) == gs.methods.available(), (
        f"{page}: rows without a method: {sorted(set(names) - set(gs.methods.available()))}; "
        f"methods without a row: {sorted(set(gs.methods.available()) - set(names))}")


LINK = re.compile(r"\]\((?P<target>[^)\s]+)\)")


CODE = re.compile(r"^ *```.*?^ *```|`[^`\n]*`", flags=re.M | re.S)


@pytest.mark.parametrize("page", PAGES, ids=_page_id)
def test_relative_links_exist(page):
    missing = []
    for target in LINK.findall(CODE.sub("", page.read_text())):
        if re.match(r"[a-z]+:", target) or target.startswith("#"):
            continue
        path = (page.parent / target.split("#")[0]).resolve()
        if not path.exists():
            missing.append(target)
    assert not missing, f"{_page_id(page)} links to missing files: {missing}"


def test_methods_index_kinds_match_the_classes():
    """The "kind" column of docs/methods/index.md says what each method's class is."""
    from gradsurgery.methods.base import ElementWise, GramWeighting, LossWeighting

    kinds = {"Gram": GramWeighting, "loss": LossWeighting, "element-wise": ElementWise}
    rows = re.findall(r"^\| \[`(\w+)`\]\([^)]*\) \| ([^|]+) \|", (ROOT / "docs/methods/index.md").read_text(), re.M)
    assert rows
    for name, kind in rows:
        rotation, _, kind = kind.strip().rpartition(" + ")
        cls = gs.methods.get(name)
        assert issubclass(cls, kinds[kind]), (name, kind)
        assert bool(getattr(cls, "rotation", False)) == (rotation == "rotation"), name


def test_readme_stays_one_screen_per_idea():
    """The README is the set-up, the loop, the method table and links (issue 12: about 250
    lines); everything else belongs in a guide under docs/."""
    lines = (ROOT / "README.md").read_text().splitlines()
    assert len(lines) <= 250, f"README.md has {len(lines)} lines; move the details into docs/"


@pytest.mark.parametrize("page", PAGES, ids=_page_id)
def test_named_test_files_exist(page):
    """A page that says which test checks something names a file that exists (tests move)."""
    named = set(re.findall(r"\b(tests/[\w/]+\.py)\b", page.read_text()))
    missing = sorted(path for path in named if not (ROOT / path).is_file())
    assert not missing, f"{_page_id(page)} names test files that do not exist: {missing}"
