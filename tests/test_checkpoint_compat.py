"""Checkpoints written by gradsurgery 0.1.0 (``tests/data/checkpoints-0.1.0.pt``, written by
``tests/data/make_checkpoints_0_1_0.py`` with the 0.1.0 package) load into today's optimizer,
and the run continues bit for bit: the steps taken after loading reproduce the parameters
0.1.0 reached with the same steps."""
import importlib.util
import pathlib

import pytest
import torch

DATA = pathlib.Path(__file__).with_name("data")
_spec = importlib.util.spec_from_file_location("make_checkpoints_0_1_0", DATA / "make_checkpoints_0_1_0.py")
fixture = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(fixture)
SAVED = torch.load(fixture.PATH, weights_only=True)
#: Options under which today's methods run what 0.1.0's defaults ran (defaults that changed
#: since, CHANGELOG.md): a 0.1.0 checkpoint records no options, so its user passes these.
DEFAULTS_0_1_0 = {"moco": dict(beta=0.5, normalize=True, scale_by_tasks=False, decay="step")}
#: Methods whose decision is computed differently since 0.1.0, equal to rounding: compared to
#: a tolerance (the checkpoint's state still decides every step), the others bit for bit.
REWRITTEN = {"cagrad": "its Gram's spectrum is cleaned before the solve (float32-exact solver, issue #19)",
             "mgda": "its affine minimisers are solved on the unit-diagonal Gram (exact on norms far apart, issue #19)",
             "imtl": "its IMTL-G half decides on the Gram cleaned at its input's precision (issue #19)"}


def test_fixture_is_from_0_1_0():
    assert SAVED["version"] == "0.1.0"
    assert set(SAVED["cases"]) == {case for case, _, _ in fixture.CASES}


@pytest.mark.parametrize(("case", "method", "options"), fixture.CASES, ids=[c for c, _, _ in fixture.CASES])
def test_0_1_0_checkpoint_resumes_bit_exactly(case, method, options):
    saved = SAVED["cases"][case]
    model, opt = fixture.build(method, {**DEFAULTS_0_1_0.get(method, {}), **options})
    torch.manual_seed(12345)  # another global seed: every random state must come from the checkpoint
    torch.nn.utils.vector_to_parameters(saved["model"].clone(), model.parameters())
    opt.load_state_dict(saved["optimizer"])
    for j, expected in enumerate(saved["after"]):
        fixture.train_step(model, opt, fixture.TRAIN + j)
        if method in REWRITTEN:
            torch.testing.assert_close(fixture.flat(model), expected, rtol=1e-10, atol=1e-12,
                                       msg=f"{case}: step {j + 1} after loading differs ({REWRITTEN[method]})")
        else:
            assert torch.equal(fixture.flat(model), expected), f"{case}: step {j + 1} after loading differs"
