"""Method state is declared (``Method.state_names``): ``state_dict``, ``load_state_dict`` and
``repr`` come from the base class for every registered method, and save exactly the declared
names (issue #20). Resuming bit for bit from that state is ``tests/test_state_dict.py``'s."""
import pytest
import torch

import gradsurgery as gs
from gradsurgery.methods import Method


@pytest.mark.parametrize("name", gs.methods.available())
def test_state_dict_load_state_dict_and_repr_come_from_the_base_class(name):
    cls = gs.methods.get(name)
    for member in ("state_dict", "load_state_dict", "check_state_dict", "extra_repr", "__repr__"):
        assert getattr(cls, member) is getattr(Method, member), f"{name} writes its own {member}"


@pytest.mark.parametrize("name", gs.methods.available())
def test_the_declared_state_is_saved_and_the_options_shown(name):
    method = gs.methods.create(name)
    method.bind(3, device=torch.device("cpu"), dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    assert list(method.state_dict()) == list(method.state_names)
    text = repr(method)
    assert text.startswith(type(method).__name__ + "(")
    for option, value in method.options().items():
        assert f"{option}={value!r}" in text


def test_another_methods_state_is_refused_naming_the_keys():
    uw = gs.methods.create("uw")
    uw.bind(2, device=torch.device("cpu"), dtype=torch.float64, generator=torch.Generator())
    before = uw.log_vars.detach().clone()
    with pytest.raises(ValueError, match=r"keys \['initial_losses', 'task_weights'\].*\['log_vars'\]"):
        uw.load_state_dict({"task_weights": torch.ones(2), "initial_losses": None})
    assert torch.equal(uw.log_vars, before)
