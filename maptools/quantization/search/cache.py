"""The content-hashed cache of measured points, so that a killed search resumes without recomputing.

A point's key is the SHA-256 of what determines its measurement: the float model's bytes, the data's bytes,
the settings (quantization options, crossbar, cost parameters, metric) and the assignment. Each point is one
JSON file ``<key>.json``, written to a temporary file and renamed: a kill leaves whole points or none.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import tempfile
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

import numpy as np

from maptools.errors import InvalidArgumentError

__all__ = ["PointCache", "data_digest", "default_cache_dir"]

logger = logging.getLogger(__name__)

#: Bump when what a cached point holds changes: older entries are then not read.
CACHE_VERSION = 2


def default_cache_dir() -> Path:
    """``$MAPTOOLS_SEARCH_CACHE``, else ``~/.cache/maptools-search``."""
    return Path(os.environ.get("MAPTOOLS_SEARCH_CACHE") or Path.home() / ".cache" / "maptools-search")


def data_digest(batches: Iterable[Mapping[str, np.ndarray]]) -> str:
    """SHA-256 of batches: every input's name, dtype, shape and bytes, in order."""
    digest = hashlib.sha256()
    for batch in batches:
        for name in sorted(batch):
            array = np.ascontiguousarray(batch[name])
            digest.update(f"{name}|{array.dtype.str}|{array.shape}|".encode())
            digest.update(array.tobytes())
    return digest.hexdigest()


class PointCache:
    """Measured points by content key, one JSON file each in ``directory`` (None: no cache)."""

    def __init__(self, directory: str | os.PathLike[str] | None, identity: Mapping[str, Any]) -> None:
        """``identity``: what every key of this search shares (model and data digests, settings)."""
        self.directory = None if directory is None else Path(directory)
        if self.directory is not None:
            if self.directory.exists() and not self.directory.is_dir():
                raise InvalidArgumentError(f"cache_dir: got {str(self.directory)!r}, which is not a folder; "
                                           "expected a folder (created when missing) or None")
            self.directory.mkdir(parents=True, exist_ok=True)
        self.identity = {"version": CACHE_VERSION, **identity}
        self.hits = 0
        self.misses = 0

    def key(self, task: Mapping[str, Any]) -> str:
        """The SHA-256 of the search's identity and one task (its kind and assignment)."""
        text = json.dumps({"identity": self.identity, "task": task}, sort_keys=True, separators=(",", ":"))
        return hashlib.sha256(text.encode()).hexdigest()

    def get(self, task: Mapping[str, Any]) -> dict[str, Any] | None:
        """The measurement of ``task``, or None when not cached (or unreadable: then measured again)."""
        if self.directory is None:
            self.misses += 1
            return None
        path = self.directory / f"{self.key(task)}.json"
        try:
            entry = json.loads(path.read_text())
        except FileNotFoundError:
            self.misses += 1
            return None
        except (OSError, ValueError) as exc:
            logger.warning("search cache: %s unreadable (%s); measuring again", path, exc)
            self.misses += 1
            return None
        if not isinstance(entry, dict) or entry.get("task") != json.loads(json.dumps(task)) \
                or not isinstance(entry.get("result"), dict):
            logger.warning("search cache: %s is not this task's entry; measuring again", path)
            self.misses += 1
            return None
        self.hits += 1
        return entry["result"]

    def put(self, task: Mapping[str, Any], result: Mapping[str, Any]) -> None:
        """Store a measurement atomically (temporary file, then rename)."""
        if self.directory is None:
            return
        path = self.directory / f"{self.key(task)}.json"
        text = json.dumps({"task": task, "result": result}, sort_keys=True)
        handle, tmp = tempfile.mkstemp(dir=self.directory, prefix=".tmp-", suffix=".json")
        try:
            with os.fdopen(handle, "w") as stream:
                stream.write(text)
            os.replace(tmp, path)
        except BaseException:
            Path(tmp).unlink(missing_ok=True)
            raise
