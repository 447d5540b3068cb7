"""CUDA-graph replay of small branch-free tensor programs (one launch instead of hundreds)."""
from __future__ import annotations

import functools
from typing import Any, Callable

import torch
from torch import Tensor


def replay(fn: Callable[..., tuple[Tensor, ...]], *tensors: Tensor, **options: Any) -> tuple[Tensor, ...]:
    """``fn(*tensors, **options)`` for a branch-free tensor program ``fn`` (a fixed number of
    small ops, no host read) returning a tuple of tensors. On CUDA it runs from a CUDA graph
    captured once per ``(fn, options, shapes, dtypes, device)`` and replayed: one launch
    instead of hundreds (an H200 spent ~20 µs per launch of the Jacobi sweeps: K = 8 took
    20 ms eagerly). Elsewhere, inside another capture, or under ``torch.compile``, ``fn``
    simply runs. The outputs are copies (the graph's buffers are reused)."""
    first = tensors[0]
    if (first.device.type != "cuda" or torch.cuda.is_current_stream_capturing()
            or torch.compiler.is_compiling()):
        return fn(*tensors, **options)
    key = tuple((t.shape, t.dtype) for t in tensors)
    graph, static, out = _captured(fn, tuple(sorted(options.items())), key, first.device)
    for buffer, t in zip(static, tensors):
        buffer.copy_(t)
    graph.replay()
    return tuple(o.clone() for o in out)


@functools.lru_cache(maxsize=64)
def _captured(fn: Callable[..., tuple[Tensor, ...]], options: tuple, layout: tuple,
              device: torch.device) -> tuple[Any, list[Tensor], tuple[Tensor, ...]]:
    """The CUDA graph of ``fn`` for inputs of this layout, its static inputs and outputs.
    Capturing synchronises once (``torch.cuda.graph`` does), like the other first-call
    caches; a warm-up run on a side stream first builds ``fn``'s own caches."""
    static = [torch.zeros(shape, dtype=dtype, device=device) for shape, dtype in layout]
    kwargs = dict(options)
    side = torch.cuda.Stream(device)
    side.wait_stream(torch.cuda.current_stream(device))
    with torch.no_grad():
        with torch.cuda.stream(side):
            fn(*static, **kwargs)
        torch.cuda.current_stream(device).wait_stream(side)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph, capture_error_mode="thread_local"):
            out = fn(*static, **kwargs)
    return graph, static, out
