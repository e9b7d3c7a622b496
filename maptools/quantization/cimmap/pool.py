"""The process pool of the map-level CIM runs (sweeps, Monte-Carlo chips): spawned workers of one BLAS thread each."""

from __future__ import annotations

import contextlib
import multiprocessing
import os
from collections.abc import Callable, Iterator
from concurrent.futures import ProcessPoolExecutor
from typing import Any

__all__ = ["process_pool"]

#: The environment variables that size a worker's BLAS / OpenMP pool.
_BLAS_ENV = ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS")


@contextlib.contextmanager
def _one_blas_thread() -> Iterator[None]:
    """Worker processes inherit one BLAS/OpenMP thread each (the environment is restored afterwards)."""
    saved = {name: os.environ.get(name) for name in _BLAS_ENV}
    os.environ.update(dict.fromkeys(_BLAS_ENV, "1"))
    try:
        yield
    finally:
        for name, value in saved.items():
            if value is None:
                os.environ.pop(name, None)
            else:
                os.environ[name] = value


@contextlib.contextmanager
def process_pool(jobs: int, initializer: Callable[..., Any],
                 initargs: tuple[Any, ...]) -> Iterator[ProcessPoolExecutor]:
    """A pool of ``jobs`` spawned processes (no fork of a process holding BLAS threads), each of one BLAS thread."""
    context = multiprocessing.get_context("spawn")
    with _one_blas_thread(), ProcessPoolExecutor(max_workers=jobs, mp_context=context, initializer=initializer,
                                                 initargs=initargs) as pool:
        yield pool
