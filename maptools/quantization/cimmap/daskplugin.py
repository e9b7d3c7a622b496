"""The Dask worker plugin of :func:`~maptools.quantization.cimmap.cluster.task_pool` (imported only with Dask
installed).

Dask accepts only subclasses of its ``WorkerPlugin``, so this module imports ``distributed`` at the top and is
imported when a cluster is named, never by ``import maptools``.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from distributed import WorkerPlugin

__all__ = ["Initializer"]


class Initializer(WorkerPlugin):
    """Runs the pool's initializer in every worker process, as the local process pool does."""

    def __init__(self, initializer: Callable[..., Any], initargs: tuple[Any, ...]) -> None:
        self.initializer = initializer
        self.initargs = initargs

    def setup(self, worker: Any) -> None:
        """Set the worker's state (called by Dask in the worker process, before its next task)."""
        self.initializer(*self.initargs)
