"""How many CPU threads torch uses while maptools quantizes.

PPQ calibrates on batches of a few images, one operator at a time: each operator's work is too small to
spread over several threads, and torch's OpenMP threads spin while they wait. On a quiet 2-core machine
one thread is faster than two (EfficientNet-Lite1, W8A8 ``default``: see the speed benchmark), and beside
other CPU-bound jobs (a sweep over bit widths, CI, the mapper) extra threads wait for cores held by others
and the run slows down several times over. maptools therefore quantizes with :data:`DEFAULT_THREADS` torch
thread unless told otherwise (``quantize(threads=...)``, ``maptools quantize --threads``), and restores the
process's setting afterwards.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import torch

__all__ = ["DEFAULT_THREADS", "torch_threads"]

#: torch threads used while quantizing when ``threads`` is not given.
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
