"""Map directories: where maps live, their names, atomic writing, the writers' lock and resolving a map.

Writing is atomic: every file goes into a staging directory beside the target
(``.<mapname>.tmp-<pid>-*``), which replaces the old map directory only once complete (two renames), so an
interrupted run -- even by SIGKILL -- leaves the earlier map untouched and loadable. One writer at a time
swaps a map: the swap holds ``<mapsave>/.<mapname>.lock`` (``fcntl.flock``), and a writer that cannot get it
within :data:`LOCK_TIMEOUT` raises :class:`~maptools.MapBusyError`. Under the lock the writer also
finishes a swap a killed writer left half done and removes staging directories whose owner is gone;
readers never rename anything (a reader that finds a half-done swap reads the earlier map where it was
moved aside).

What the files hold is :mod:`maptools.quantization.format`; reading them safely is
:mod:`maptools.quantization.artifacts`.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import os
import re
import shutil
import tempfile
import time
from collections.abc import Callable, Iterator, Mapping
from pathlib import Path
from typing import Any

from maptools.errors import InvalidArgumentError, InvalidTypeError, MapBusyError, MapNotFoundError
from maptools.quantization.format import MANIFEST, MAPSAVE_ENV, ROUNDING, format_version

try:
    import fcntl
except ImportError:  # pragma: no cover - not POSIX: no lock (one writer per map is then up to the caller)
    fcntl = None  # type: ignore[assignment]

__all__ = [
    "LOCK_TIMEOUT",
    "READ_WAIT",
    "STALE_SECONDS",
    "check_mapname",
    "map_directory",
    "map_lock",
    "mapsave_root",
    "recover_interrupted",
    "resolve_map",
    "add_map_file",
    "file_entry",
    "manifest_bytes",
    "sha256_of",
    "write_file_atomically",
    "write_map",
]

logger = logging.getLogger(__name__)

#: Seconds a writer waits for another writer's swap of the same map before :class:`~maptools.MapBusyError`.
LOCK_TIMEOUT = 60.0
#: Seconds a reader that finds a map between the two renames of a swap waits for the writer to finish it.
READ_WAIT = 10.0
#: Age in seconds after which a staging directory is removed even if a process of its owner's PID runs (a
#: reused PID), and a staging directory of maptools 0.1 (no PID in its name) at all.
STALE_SECONDS = 3600.0

_MAPNAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._+-]{0,127}$")


def mapsave_root(mapsave_dir: str | os.PathLike | None = None) -> Path:
    """The mapsave directory: ``mapsave_dir``, else ``$MAPTOOLS_MAPSAVE``, else ``./mapsave``."""
    if mapsave_dir is not None and not isinstance(mapsave_dir, (str, os.PathLike)):
        raise InvalidTypeError(f"mapsave_dir: expected a directory path or None, got {type(mapsave_dir).__name__}")
    chosen = mapsave_dir if mapsave_dir is not None else os.environ.get(MAPSAVE_ENV) or "mapsave"
    return Path(chosen).expanduser()


def check_mapname(mapname: object) -> str:
    """Return ``mapname`` if it is a safe directory name, else raise :class:`InvalidArgumentError`."""
    if not isinstance(mapname, str):
        raise InvalidTypeError(f"mapname: expected a string such as 'resnet18', got {type(mapname).__name__}")
    if not mapname:
        raise InvalidArgumentError("mapname: is empty; expected a name such as 'resnet18'")
    if "/" in mapname or "\\" in mapname or os.sep in mapname or mapname.startswith(".") or ".." in mapname:
        raise InvalidArgumentError(
            f"mapname: {mapname!r} contains a path separator, '..' or a leading dot; expected a plain name "
            "such as 'resnet18' (letters, digits, '.', '_', '+', '-')"
        )
    if not _MAPNAME.match(mapname):
        raise InvalidArgumentError(
            f"mapname: {mapname!r} has characters unsafe in file names; expected letters, digits, '.', '_', '+', '-' "
            "(at most 128, starting with a letter or digit)"
        )
    return mapname


def map_directory(mapname: str, mapsave_dir: str | os.PathLike | None = None) -> Path:
    """``<mapsave>/<mapname>`` for a checked map name."""
    return mapsave_root(mapsave_dir) / check_mapname(mapname)


def sha256_of(data: bytes) -> str:
    """Hex SHA-256 of bytes."""
    return hashlib.sha256(data).hexdigest()


def _fsync_dir(path: Path) -> None:
    with contextlib.suppress(OSError):
        fd = os.open(path, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


def file_entry(data: bytes) -> dict[str, Any]:
    """A file's entry in the manifest's ``files``: its SHA-256 and size."""
    return {"sha256": sha256_of(data), "bytes": len(data)}


def manifest_bytes(manifest: Mapping[str, Any]) -> bytes:
    """``manifest.json`` as written: indented, keys sorted, a final newline."""
    return (json.dumps(manifest, indent=2, sort_keys=True) + "\n").encode()


def write_file_atomically(path: Path, data: bytes) -> None:
    """Write ``path`` through a temporary file in its folder, renamed over it once complete (mode 0644)."""
    handle, tmp = tempfile.mkstemp(prefix=f".{path.name}.tmp-", dir=path.parent)
    try:
        with os.fdopen(handle, "wb") as out:
            out.write(data)
            out.flush()
            os.fsync(out.fileno())
        os.chmod(tmp, 0o644)
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise
    _fsync_dir(path.parent)


def add_map_file(target: Path, name: str, data: bytes, manifest: Mapping[str, Any]) -> Path:
    """Add (or replace) one file of an existing map and list it in its manifest, each file atomically.

    The caller holds the map's writer lock (:func:`map_lock`) and passes the manifest it read under it; every
    other entry is kept.

    Returns:
        The file's path.
    """
    updated = dict(manifest)
    updated["files"] = {**manifest.get("files", {}), name: file_entry(data)}
    write_file_atomically(target / name, data)
    write_file_atomically(target / MANIFEST, manifest_bytes(updated))
    return target / name


def _lock_path(target: Path) -> Path:
    return target.parent / f".{target.name}.lock"


@contextlib.contextmanager
def map_lock(target: Path, timeout: float, shared: bool = False) -> Iterator[None]:
    """Hold the lock of map directory ``target``: exclusive for a writer's swap, shared for a reader's wait.

    The lock is ``fcntl.flock`` on ``<mapsave>/.<mapname>.lock`` (created by writers and kept; a reader never
    creates it: without the file no writer is at work). The kernel releases it when its holder dies.

    Args:
        target: ``<mapsave>/<mapname>``.
        timeout: Seconds to wait for another holder.
        shared: A reader's shared lock (it only waits for a writer's swap) instead of a writer's exclusive one.

    Raises:
        MapBusyError: another process held the lock for ``timeout`` seconds.
    """
    if fcntl is None:  # pragma: no cover
        yield
        return
    try:
        fd = os.open(_lock_path(target), os.O_RDONLY if shared else os.O_RDWR | os.O_CREAT, 0o666)
    except FileNotFoundError:
        yield
        return
    try:
        deadline = time.monotonic() + timeout
        while True:
            try:
                fcntl.flock(fd, (fcntl.LOCK_SH if shared else fcntl.LOCK_EX) | fcntl.LOCK_NB)
                break
            except BlockingIOError:
                if time.monotonic() >= deadline:
                    raise MapBusyError(
                        f"mapname: map {target.name!r} at {target} is being written by another process (it held "
                        f"{_lock_path(target)} for {timeout:g} s); wait for it to finish, or use another mapname"
                    ) from None
                time.sleep(0.05)
        yield
    finally:
        os.close(fd)  # releases the lock


def _staging_pattern(name: str) -> re.Pattern[str]:
    # tempfile's 8 random characters; the PID is absent from the names of maptools 0.1
    return re.compile(rf"^\.{re.escape(name)}\.tmp-(?:(?P<pid>\d+)-)?[a-z0-9_]{{8}}$")


def _old_pattern(name: str) -> re.Pattern[str]:
    return re.compile(rf"^\.{re.escape(name)}\.old-[a-z0-9_]{{8}}$")


def _process_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # someone else's process
        return True
    except OSError:
        return False
    return True


def _age(path: Path) -> float:
    try:
        return time.time() - path.stat().st_mtime
    except OSError:
        return 0.0


def _leftovers(target: Path, pattern: re.Pattern[str]) -> list[Path]:
    """The folders beside ``target`` whose names match ``pattern``, oldest first."""
    if not target.parent.is_dir():
        return []
    found = [p for p in target.parent.iterdir() if pattern.match(p.name) and p.is_dir()]
    return sorted(found, key=lambda p: (p.stat().st_mtime, p.name))


def _recover(target: Path) -> None:
    """Under the lock: finish a swap a killed writer left between its two renames, drop stale folders."""
    olds = _leftovers(target, _old_pattern(target.name))
    if not target.exists() and olds:
        os.replace(olds[-1], target)  # the map moved aside by the last, interrupted swap
        olds = olds[:-1]
        logger.warning("restored %s from an interrupted write", target)
    for old in olds:  # the earlier map of a finished swap whose writer died before deleting it
        shutil.rmtree(old, ignore_errors=True)
    for staging in _leftovers(target, _staging_pattern(target.name)):
        match = _staging_pattern(target.name).match(staging.name)
        pid = match.group("pid") if match else None
        owner_alive = pid is not None and _process_alive(int(pid))
        if (pid is not None and not owner_alive) or _age(staging) > STALE_SECONDS:
            shutil.rmtree(staging, ignore_errors=True)
            logger.debug("removed the staging directory %s of a writer that is gone", staging)


def write_map(target: Path, files: Mapping[str, bytes], manifest: dict[str, Any],
              before_swap: Callable[[Path], None] | None = None, lock_timeout: float | None = None) -> None:
    """Write a complete map directory atomically.

    Args:
        target: ``<mapsave>/<mapname>``.
        files: File name -> bytes (the manifest is added with every file's SHA-256).
        manifest: Manifest fields; ``files``, ``format_version`` (:func:`~maptools.quantization.format.format_version`
            of the files) and ``rounding`` are filled in here.
        before_swap: Test hook called with the staging directory once everything is written (before the lock
            is taken).
        lock_timeout: Seconds to wait for another writer's swap of the same map; None for
            :data:`LOCK_TIMEOUT`.

    Raises:
        MapBusyError: another writer held the map's lock for ``lock_timeout`` seconds (nothing was changed).
    """
    parent = target.parent
    parent.mkdir(parents=True, exist_ok=True)
    manifest = dict(manifest)
    manifest["format_version"] = format_version(files)
    manifest["rounding"] = ROUNDING
    manifest["files"] = {name: file_entry(data) for name, data in files.items()}
    payload = dict(files)
    payload[MANIFEST] = manifest_bytes(manifest)
    staging = Path(tempfile.mkdtemp(prefix=f".{target.name}.tmp-{os.getpid()}-", dir=parent))
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(staging, 0o777 & ~umask)
    try:
        for name, data in payload.items():
            with open(staging / name, "wb") as handle:
                handle.write(data)
                handle.flush()
                os.fsync(handle.fileno())
        _fsync_dir(staging)
        if before_swap is not None:
            before_swap(staging)
        old = None
        with map_lock(target, LOCK_TIMEOUT if lock_timeout is None else lock_timeout):
            _recover(target)
            if target.exists():
                old = Path(tempfile.mkdtemp(prefix=f".{target.name}.old-", dir=parent))
                os.rmdir(old)
                os.replace(target, old)
            os.replace(staging, target)
            _fsync_dir(parent)
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise


def recover_interrupted(target: Path, timeout: float | None = None) -> None:
    """Finish a swap of :func:`write_map` that a killed process left between its two renames.

    Takes the map's lock (so it never races a live writer); :func:`write_map` does the same before every
    swap, and readers need not call it (they read the earlier map where the swap moved it).

    Raises:
        MapBusyError: a writer held the lock for ``timeout`` seconds (default :data:`LOCK_TIMEOUT`).
    """
    if not target.parent.is_dir():
        return
    with map_lock(target, LOCK_TIMEOUT if timeout is None else timeout):
        _recover(target)


def resolve_map(mapname: str, mapsave_dir: str | os.PathLike | None) -> Path:
    """The directory holding map ``mapname``; renames nothing.

    Normally ``<mapsave>/<mapname>``. Between the two renames of a swap that directory is briefly missing:
    the reader waits for the writer (its lock, at most :data:`READ_WAIT` seconds), and if the swap was
    interrupted by a killed writer, returns the earlier map where the swap had moved it
    (``.<mapname>.old-*``; the next writer puts it back).

    Raises:
        MapNotFoundError: no such map.
        MapBusyError: a writer held the map's lock for :data:`READ_WAIT` seconds mid-swap.
    """
    directory = map_directory(mapname, mapsave_dir)
    if directory.is_dir():
        return directory
    pattern = _old_pattern(directory.name)
    if _leftovers(directory, pattern):
        with map_lock(directory, READ_WAIT, shared=True):
            pass
        if directory.is_dir():
            return directory
        olds = _leftovers(directory, pattern)
        if olds:
            logger.info("map %r: reading %s, left by an interrupted write", mapname, olds[-1])
            return olds[-1]
    raise MapNotFoundError(
        f"mapname: no map {mapname!r} at {directory}; produce it with "
        f"maptools.quantization.quantize(..., mapname={mapname!r}) (or `maptools quantize`)"
    )

