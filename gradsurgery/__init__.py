"""gradsurgery: gradient surgery for multi-task learning in PyTorch.

``MultiTaskOptimizer`` wraps any ``torch.optim`` optimizer; ``methods`` is the registry of
interchangeable methods (``"mean"``, ``"pcgrad"``, ``"mgda"``, ``"gradnorm"``, ...).
"""
__version__ = "0.1.0"

from . import methods
from .optimizer import MultiTaskOptimizer
from .compare import compare  # matplotlib is imported only when plotting

__all__ = ["MultiTaskOptimizer", "compare", "methods", "__version__"]
