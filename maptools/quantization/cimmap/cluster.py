"""Where the parallel tasks of a sweep or a search run: the local process pool, or a Dask distributed cluster.

Both give a :class:`concurrent.futures.Executor` whose worker processes were set up once by an initializer
(the map, the data), so the callers submit the same tasks either way and get the same results bit for bit.
Dask (``pip install "dask[distributed]"``, the ``cluster`` extra) is imported only when a cluster is named.
"""

from __future__ import annotations

import contextlib
import logging
import uuid
from collections.abc import Callable, Iterator
from concurrent.futures import Executor
from typing import Any

from maptools.errors import InvalidArgumentError, InvalidTypeError
from maptools.quantization.cimmap.pool import process_pool

__all__ = ["CONNECT_TIMEOUT_S", "task_pool"]

logger = logging.getLogger(__name__)

#: Seconds to wait for the cluster's scheduler before giving up.
CONNECT_TIMEOUT_S = 30


def _client(address: Any) -> Any:
    """A Dask client of the scheduler at ``address`` (a ``tcp://host:port`` string or a ``LocalCluster``)."""
    try:
        from distributed import Client
    except ImportError:
        raise InvalidArgumentError(f"cluster: got {address!r}, but Dask distributed is not installed; expected "
                                   "None, or install it: pip install 'dask[distributed]'") from None
    if not isinstance(address, str) and not hasattr(address, "scheduler_address"):
        raise InvalidTypeError(f"cluster: got {type(address).__name__}, expected a scheduler address such as "
                               "'tcp://127.0.0.1:8786' or a dask LocalCluster")
    try:
        return Client(address, timeout=CONNECT_TIMEOUT_S, set_as_default=False)
    except (OSError, TimeoutError) as exc:
        raise InvalidArgumentError(f"cluster: no Dask scheduler answered at {address!r} within "
                                   f"{CONNECT_TIMEOUT_S} s ({type(exc).__name__}); expected the address of a running "
                                   "scheduler (dask scheduler / LocalCluster().scheduler_address)") from None


@contextlib.contextmanager
def task_pool(jobs: int, initializer: Callable[..., Any], initargs: tuple[Any, ...], cluster: Any = None, *,
              one_thread: bool = False) -> Iterator[Executor]:
    """An executor whose workers ran ``initializer(*initargs)``: ``jobs`` local processes, or a Dask cluster.

    Args:
        jobs: Local worker processes (ignored with a cluster: its workers are what it has).
        initializer: Run once in every worker process before its first task.
        initargs: Its arguments (pickled to every worker).
        cluster: None for the local process pool; a Dask scheduler address (``'tcp://host:port'``) or a
            ``distributed.LocalCluster``.
        one_thread: Refuse a cluster whose workers run more than one task at a time (tasks that are not
            thread-safe, as PPQ's quantization).

    Raises:
        InvalidArgumentError: No scheduler at the address, no worker, or workers of several threads with
            ``one_thread``.
    """
    if cluster is None:
        with process_pool(jobs, initializer, initargs) as pool:
            yield pool
        return
    client = _client(cluster)
    name = f"maptools-init-{uuid.uuid4().hex}"
    try:
        threads = client.nthreads()
        if not threads:
            raise InvalidArgumentError(f"cluster: the scheduler at {client.scheduler.address} has no worker; "
                                       "expected at least one (dask worker ADDRESS --nthreads 1)")
        if one_thread and any(n != 1 for n in threads.values()):
            raise InvalidArgumentError(f"cluster: workers with {sorted(set(threads.values()))} threads; expected "
                                       "one thread per worker (dask worker ADDRESS --nthreads 1, or "
                                       "LocalCluster(threads_per_worker=1)): the tasks are not thread-safe")
        from maptools.quantization.cimmap.daskplugin import Initializer

        client.register_plugin(Initializer(initializer, initargs), name=name)
        logger.info("running on the Dask cluster %s: %d workers", client.scheduler.address, len(threads))
        executor = client.get_executor(pure=False)
        try:
            yield executor
        finally:
            executor.shutdown(wait=True)
            with contextlib.suppress(Exception):  # workers that left the cluster hold no plugin to remove
                client.unregister_worker_plugin(name)
    finally:
        client.close()
