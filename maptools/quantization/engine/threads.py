"""How many CPU threads torch and numpy's BLAS use while maptools quantizes.

PPQ calibrates on small batches one operator at a time, work too small to spread over threads, and idle
OpenMP and OpenBLAS threads slow the run down beside other CPU-bound jobs; so maptools quantizes with
:data:`DEFAULT_THREADS` thread unless told otherwise (``quantize(threads=...)``, ``maptools quantize
--threads``), limits both torch's pool and the BLAS library numpy calls (through ``threadpoolctl``), and
restores the process's settings afterwards. The timings are on the benchmarks page ("Speed and memory").
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import torch
from threadpoolctl import threadpool_limits

__all__ = ["DEFAULT_THREADS", "compute_threads", "torch_threads"]

#: Threads used while quantizing when ``threads`` is not given.
DEFAULT_THREADS = 1


@contextlib.contextmanager
def torch_threads(count: int) -> Iterator[None]:
    """Within the block, torch runs its CPU operators on ``count`` threads."""
    previous = torch.get_num_threads()
    torch.set_num_threads(count)
    try:
        yield
    finally:
        torch.set_num_threads(previous)


@contextlib.contextmanager
def compute_threads(count: int) -> Iterator[None]:
    """Within the block, torch and numpy's BLAS each use at most ``count`` threads (restored afterwards)."""
    with torch_threads(count), threadpool_limits(limits=count, user_api="blas"):
        yield
