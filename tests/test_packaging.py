"""What the wheel ships: the ``py.typed`` marker (PEP 561), so type checkers read the
package's annotations; declared in setup.cfg's package_data and present in a built wheel."""
from __future__ import annotations

import configparser
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent


def test_py_typed_is_declared_as_package_data():
    assert (ROOT / "gradsurgery" / "py.typed").is_file()
    cfg = configparser.ConfigParser()
    cfg.read(ROOT / "setup.cfg")
    assert "py.typed" in cfg["options.package_data"]["gradsurgery"].split()


def test_wheel_contains_py_typed(tmp_path):
    pytest.importorskip("setuptools", reason="building the wheel without isolation needs setuptools in this venv")
    done = subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q",
                           "-w", str(tmp_path), str(ROOT)], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    wheel = next(tmp_path.glob("gradsurgery-*.whl"))
    names = zipfile.ZipFile(wheel).namelist()
    assert "gradsurgery/py.typed" in names
    assert "gradsurgery/testing.py" in names


def test_geotorch_is_a_test_dependency_only():
    """The package never imports geotorch (docs/design-notes.md, "Dependencies")."""
    cfg = configparser.ConfigParser()
    cfg.read(ROOT / "setup.cfg")
    assert "geotorch" not in cfg["options"]["install_requires"].split()
    assert "geotorch" in cfg["options.extras_require"]["test"].split()
    code = ("import sys, torch, gradsurgery as gs, gradsurgery.compat, gradsurgery.testing\n"
            "opt = gs.MultiTaskOptimizer(torch.optim.SGD(torch.nn.Linear(2, 2).parameters(), lr=0.1), 'rotograd', "
            "num_tasks=2, rep_size=2)\n"
            "assert not [m for m in sys.modules if m.startswith('geotorch')], 'geotorch was imported'")
    subprocess.run([sys.executable, "-c", code], check=True, cwd=ROOT)

