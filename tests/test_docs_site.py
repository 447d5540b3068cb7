"""The documentation site's configuration (mkdocs.yml): every page it lists exists, every
page under docs/ is listed (or excluded on purpose), every registered method's card is
listed, and the ``docs`` extra installs the builder. Building the site needs mkdocs
(``pip install -e ".[docs]"``, then ``mkdocs build --strict``); this test does not."""
from __future__ import annotations

import configparser
from pathlib import Path

import yaml

import gradsurgery as gs

ROOT = Path(__file__).resolve().parent.parent
DOCS = ROOT / "docs"


def _config() -> dict:
    return yaml.safe_load((ROOT / "mkdocs.yml").read_text())


def _nav_pages(nav) -> list[str]:
    if isinstance(nav, str):
        return [nav]
    if isinstance(nav, list):
        return [page for item in nav for page in _nav_pages(item)]
    if isinstance(nav, dict):
        return [page for value in nav.values() for page in _nav_pages(value)]
    raise AssertionError(f"unexpected nav entry {nav!r}")


def test_listed_pages_exist_and_every_page_is_listed():
    config = _config()
    assert (ROOT / config["docs_dir"]).resolve() == DOCS
    listed = _nav_pages(config["nav"])
    assert len(listed) == len(set(listed)), "a page is listed twice"
    missing = [page for page in listed if not (DOCS / page).is_file()]
    assert not missing, f"mkdocs.yml lists pages that do not exist: {missing}"
    excluded = set(config.get("exclude_docs", "").split())
    pages = {str(path.relative_to(DOCS)) for path in DOCS.rglob("*.md")}
    orphans = sorted(pages - set(listed) - excluded)
    assert not orphans, f"pages under docs/ that mkdocs.yml does not list: {orphans}"


def test_every_method_card_is_listed():
    listed = set(_nav_pages(_config()["nav"]))
    unlisted = [name for name in gs.methods.available() if f"methods/{name}.md" not in listed]
    assert not unlisted, f"method cards missing from mkdocs.yml: {unlisted}"


def test_docs_extra_holds_the_builder_and_test_extra_does_not():
    cfg = configparser.ConfigParser()
    cfg.read(ROOT / "setup.cfg")
    extras = cfg["options.extras_require"]
    assert "mkdocs" in extras["docs"]
    assert "mkdocs" not in extras["test"]
