"""How many CPU threads torch and numpy's BLAS use while maptools quantizes.

PPQ calibrates on batches of a few images, one operator at a time: each operator's work is too small to
spread over several threads, and idle OpenMP and OpenBLAS threads spin while they wait. On a quiet 2-core
machine one thread is faster than two (EfficientNet-Lite1, W8A8 ``default``: see the speed benchmark), and
beside other CPU-bound jobs (a sweep over bit widths, CI, the mapper) extra threads wait for cores held by
others and the run slows down several times over. maptools therefore quantizes with :data:`DEFAULT_THREADS`
thread unless told otherwise (``quantize(threads=...)``, ``maptools quantize --threads``), and restores the
process's settings afterwards.

Both pools are limited: torch's (``torch.set_num_threads``) and the BLAS library numpy calls (OpenBLAS or
MKL, through ``threadpoolctl``). With torch alone at one thread, numpy's two OpenBLAS threads made
``default`` W8A8 on EfficientNet-Lite1 take 8.8 to 15 s beside two busy processes, against 7.4 to 8.5 s for
raw PPQ; with both limited, 8.6 to 9.0 s.
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
