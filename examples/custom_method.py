"""Register your own method and compare it with the built-ins.

A method is a small class: ``weights(gram, losses)`` maps the ``K x K`` Gram matrix of the
task gradients (``M = G G^T``) and the losses to ``K`` coefficients ``c``, and the
combined gradient is ``g = c^T G``. Once registered, it works everywhere a built-in does:
``MultiTaskOptimizer(base, "equal_norm", ...)``, ``gs.compare``, and
``python -m gradsurgery compare --methods equal_norm,...`` (in a process that imported it).

Run: python examples/custom_method.py   (under a minute on CPU)
"""
import os

from torch import Tensor

import gradsurgery as gs

QUICK = os.environ.get("GRADSURGERY_QUICK") == "1"  # smoke-test size (used by the tests)


@gs.methods.register("equal_norm")
class EqualNorm(gs.methods.GramWeighting):
    """Rescales every task gradient to the mean norm: ``c_k = mean_j ||g_j|| / ||g_k||``,
    so that no task dominates the shared update by its scale alone."""

    def weights(self, gram: Tensor, losses: Tensor) -> Tensor:
        norms = gram.diagonal().clamp_min(0).sqrt()
        if not bool((norms > 0).all()):
            raise ValueError("equal_norm: a task gradient is zero; its direction is undefined")
        return norms.mean() / norms


if __name__ == "__main__":
    results = gs.compare("regression", ["mean", "pcgrad", "mgda", "equal_norm"],
                         seeds=(0,) if QUICK else (0, 1), epochs=2 if QUICK else None, progress=False)
    print(results.table())
    print("best by Δm%:", results.best())
