"""Writing gradients as autograd does."""
from __future__ import annotations

from torch import Tensor


def accumulate_grad(param: Tensor, grad: Tensor) -> None:
    """Adds ``grad`` to ``param.grad`` as ``loss.backward()`` would: the first gradient is
    stored as it is (no copy), later ones are added in place."""
    if param.grad is None:
        param.grad = grad
    else:
        param.grad.add_(grad)
