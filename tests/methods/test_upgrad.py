"""UPGrad against torchjd 0.18 ``UPGrad`` (TorchJD/torchjd, the authors' code,
``aggregation/_upgrad.py``, ``UPGradWeighting.forward``): the shared dual-cone tests of
``dual_cone_cases.py``, run on ``upgrad``."""
from __future__ import annotations

import pytest

jd = pytest.importorskip("torchjd.aggregation", reason="torchjd 0.18 is a test-only dependency")
pytest.importorskip("quadprog", reason="torchjd's projector needs quadprog")

from dual_cone_cases import (  # noqa: E402,F401  (collected here)
    test_above_the_enumeration_limit_equals_torchjd,
    test_bad_options_raise,
    test_default_is_the_exact_projection,
    test_equals_torchjd_default_projector,
    test_exact_default_near_torchjd_default,
    test_exact_default_never_conflicts,
    test_float32_permutation_equivariant_on_singular_grams,
    test_float32_zero_inside_the_hull_projects_to_zero,
    test_homogeneous_with_zero_rows_above_the_enumeration_limit,
    test_pref_vector_matches_torchjd,
)


@pytest.fixture
def case():
    return "upgrad", jd.UPGrad
