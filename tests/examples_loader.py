"""Temporary shim (removed after the current run)."""
import importlib.util
from pathlib import Path

_path = Path(__file__).resolve().parent.parent / "examples" / "rotograd_migration.py"
_spec = importlib.util.spec_from_file_location("examples_rotograd_migration", _path)
migration = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(migration)
