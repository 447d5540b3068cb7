"""The backward pipeline: :mod:`.paths` (the :class:`~.paths.Path` protocol and the paths
from the forked views to the shared backward), :mod:`.stages` (the functions they share),
:mod:`.checks` (the finite check and overflow), :mod:`.rotation` (per-task rotations),
:mod:`.params_level` (the shared parameters' Jacobian) and :mod:`.graph` (graph walks)."""
