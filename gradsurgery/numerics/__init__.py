"""Numerical kernels shared by the pipeline and the methods: :mod:`.gram` (Gram, norms,
cosines), :mod:`.qp` (min-norm point, dual-cone projection, small batched solves),
:mod:`.eigh` (symmetric eigensolvers without host reads), :mod:`.expm` (the rotations'
exponential) and :mod:`.cuda_graphs` (replaying small programs as one CUDA graph)."""
