"""Every method validates its numeric and boolean options with the one validator
(:func:`gradsurgery.methods.check_option`): a ``ValueError`` that names the option, the
value and the allowed range, raised when the method is built."""
import inspect
import re

import pytest

import gradsurgery as gs
from gradsurgery.methods import check_option

RANGE = r"( in [\[(][^,]+, [^\])]+[\])])?"


def _typed_options(name):
    """``(option, default)`` for the options of ``name`` whose default is a bool, int or float."""
    params = inspect.signature(gs.methods.get(name).__init__).parameters.values()
    return [(p.name, p.default) for p in params if type(p.default) in (bool, int, float)]


CASES = [(name, option, default) for name in gs.methods.available() for option, default in _typed_options(name)]


@pytest.mark.parametrize(("name", "option", "default"), CASES, ids=[f"{n}-{o}" for n, o, _ in CASES])
def test_bad_option_names_the_option_the_value_and_the_range(name, option, default):
    gs.methods.create(name, **{option: default})  # the default is valid
    bads = [1, "yes"] if type(default) is bool else [True, float("nan"), float("inf"), "1"]
    if type(default) is int:
        bads.append(float(default))
    for bad in bads:
        kinds = {bool: "True or False", int: "an integer", float: "a finite number"}[type(default)]
        pattern = rf"^{option} must be {kinds}{RANGE}( \(.*\))?, got {re.escape(repr(bad))}$"
        with pytest.raises(ValueError, match=pattern):
            gs.methods.create(name, **{option: bad})


def test_the_range_is_checked_at_both_ends():
    assert check_option("beta", 0, float, "[0, 1)") == 0.0 and isinstance(check_option("b", 0, float), float)
    with pytest.raises(ValueError, match=r"^beta must be a finite number in \[0, 1\), got 1$"):
        check_option("beta", 1, float, "[0, 1)")
    with pytest.raises(ValueError, match=r"^n must be an integer in \(0, 3\] \(the count\), got 0$"):
        check_option("n", 0, int, "(0, 3]", "the count")
    assert check_option("n", 3, int, "(0, 3]") == 3
