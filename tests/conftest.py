"""Shared test setup.

The reference package ``rotograd`` 0.1.6 does ``from geotorch.parametrize import cached``;
geotorch 0.4 removed that module (its parametrisations moved to
``torch.nn.utils.parametrize``, which provides the same ``cached`` context). With
geotorch >= 0.4 the module is aliased here so that the differential tests can import the
reference. The alias is faithful: ``geotorch.orthogonal(..., triv="expm")`` computes
``base @ matrix_exp(tril(A, -1) - tril(A, -1)^T)`` in 0.3 and 0.4 alike, which
``tests/test_rotation.py::test_parametrisation_equals_geotorch`` checks in each
environment CI runs (newest geotorch and geotorch 0.3.0).
"""
import sys

import geotorch
import pytest
import torch
import torch.nn.utils.parametrize

try:
    import geotorch.parametrize  # noqa: F401  (geotorch 0.3)
except ImportError:
    sys.modules["geotorch.parametrize"] = torch.nn.utils.parametrize
    geotorch.parametrize = torch.nn.utils.parametrize


@pytest.fixture
def single_thread():
    """Runs a test of tiny tensors on one intra-op thread (on a loaded machine, OpenMP's
    thread synchronisation costs far more than such ops), restoring the count after."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)
