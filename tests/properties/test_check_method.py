"""``gradsurgery.testing.check_method``: it passes correct methods (a user's, registered or
not, and a built-in), and catches each kind of broken method with a report that names the
property and the case."""
from __future__ import annotations

import pytest
import torch

import gradsurgery as gs
from gradsurgery.methods import registry
from gradsurgery.testing import Report, check_method


@pytest.fixture(autouse=True)
def scratch_registry(monkeypatch):
    """Methods registered by a test are gone after it (other tests loop over available())."""
    monkeypatch.setattr(registry, "_REGISTRY", dict(registry._REGISTRY))


class EqualNorm(gs.methods.GramWeighting):
    """c_k = mean_j ||g_j|| / ||g_k|| (0 for a zero gradient): finite, homogeneous, equivariant."""

    def weights(self, gram, losses):
        norms = gram.diagonal().clamp_min(0).sqrt()
        return torch.where(norms > 0, norms.mean() / norms, torch.zeros_like(norms))


class ReturnsNaN(gs.methods.GramWeighting):
    """Normalises by the trace: 0/0 on a zero Gram."""

    def weights(self, gram, losses):
        return gram.diagonal() / gram.diagonal().sum()


class FirstTaskFavoured(gs.methods.GramWeighting):
    """Weights 2 on task 0 and 1 elsewhere: not permutation equivariant."""

    def weights(self, gram, losses):
        c = torch.ones_like(losses)
        c[0] = 2
        return c


class Squares(gs.methods.GramWeighting):
    """c = ||g_k||: the update grows with the square of the gradients' scale."""

    def weights(self, gram, losses):
        return gram.diagonal().clamp_min(0).sqrt()


class ForgetfulEMA(gs.methods.LossWeighting):
    """An EMA of the losses whose state_dict forgets the average: resumes differently."""

    def bind(self, num_tasks, *, device, dtype, generator):
        super().bind(num_tasks, device=device, dtype=dtype, generator=generator)
        self.average = None

    def loss_weights(self, losses):
        return torch.ones_like(losses) if self.average is None else self.average.to(losses.dtype) / losses

    def update(self, losses):
        self.average = losses.clone() if self.average is None else 0.5 * self.average + 0.5 * losses


class NotSaveable(EqualNorm):
    """A state that torch.load(weights_only=True) refuses."""

    def state_dict(self):
        return {"callback": EqualNorm}


def test_passes_a_correct_user_method_registered_or_not():
    report = check_method(EqualNorm)
    assert isinstance(report, Report) and report.ok and not report.skipped
    assert len(report.passed) > 50
    gs.methods.register("test_equal_norm")(EqualNorm)
    assert check_method("test_equal_norm").passed == report.passed


def test_passes_a_builtin():
    report = check_method("mgda", num_tasks=(3,))
    assert report.ok


@pytest.mark.parametrize("broken, property_name", [
    (ReturnsNaN, "finite, K=1, zero"),
    (FirstTaskFavoured, "permutation, K=2"),
    (Squares, "scale, K=1, normal"),
    (ForgetfulEMA, "resume, K=1"),
    (NotSaveable, "resume, K=1"),
])
def test_catches_a_broken_method(broken, property_name):
    with pytest.raises(AssertionError) as err:
        check_method(broken)
    report = str(err.value)
    assert f"check_method({broken.__qualname__})" in report
    assert f"FAILED {property_name}" in report, report


def test_a_property_left_out_on_purpose():
    assert check_method(Squares, scale=False).ok
    assert check_method(FirstTaskFavoured, permutation=False).ok


def test_nan_report_says_what_and_where():
    with pytest.raises(AssertionError, match=r"FAILED finite, K=3, zero: step 0: non-finite update"):
        check_method(ReturnsNaN)


def test_a_crash_is_a_failure_and_a_deliberate_error_is_not():
    class Crashes(EqualNorm):
        def weights(self, gram, losses):
            raise IndexError("bug")

    class Refuses(EqualNorm):
        def weights(self, gram, losses):
            if not gram.diagonal().gt(0).all():
                raise ValueError("a zero task gradient: drop the task from this step")
            return super().weights(gram, losses)

    with pytest.raises(AssertionError, match="raised IndexError: bug"):
        check_method(Crashes)
    assert check_method(Refuses).ok


def test_options_and_bad_arguments():
    assert check_method("gradvac", num_tasks=(2,), beta=0.1).ok
    with pytest.raises(ValueError, match="does not take option"):
        check_method("mgda", nope=1)
    with pytest.raises(ValueError, match="unknown method"):
        check_method("no_such_method")
    with pytest.raises(TypeError, match="Method subclass"):
        check_method(EqualNorm())
