"""The backward pipeline: :mod:`.stages` (fork, task gradients, Gram, combine, shared
backward), :mod:`.paths` (the representation paths built from them), :mod:`.rotation`
(per-task rotations) and :mod:`.params_level` (the shared parameters' Jacobian)."""
