"""Map directories: where maps live, their names, atomic writing, the writers' lock and resolving a map.

Writing is atomic: every file goes into a staging directory beside the target
(``.<mapname>.tmp-<pid>-*``), which replaces the old map directory only once complete (two renames), so an
interrupted run -- even by SIGKILL -- leaves the earlier map untouched and loadable. One writer at a time
swaps a map: the swap holds ``<mapsave>/.<mapname>.lock`` (``fcntl.flock``), and a writer that cannot get it
within :data:`LOCK_TIMEOUT` raises :class:`~maptools.MapBusyError`. Under the lock the writer also
finishes a swap a killed writer left half done and removes staging directories whose owner is gone;
readers never rename anything (a reader that finds a half-done swap reads the earlier map where it was
moved aside).

Only maptools' own files are ever moved or deleted: a target that exists and is not a map maptools wrote (a
file, a link, a folder without a maptools manifest or with files its manifest does not list) is refused with
:class:`~maptools.NotAMapError` (:func:`check_replaceable`), as is a lock file that is not a regular file, and
an OS error while writing (a full disk...) is a :class:`~maptools.MapWriteError` naming the map.

What the files hold is :mod:`maptools.quantization.format`; reading them safely is
:mod:`maptools.quantization.artifacts`.
"""

from __future__ import annotations

import contextlib
import errno
import hashlib
import json
import logging
import os
import re
import shutil
import stat
import tempfile
import threading
import time
from collections.abc import Callable, Iterator, Mapping
from pathlib import Path
from typing import Any

from maptools.errors import (
    InvalidArgumentError,
    InvalidTypeError,
    MapBusyError,
    MapNotFoundError,
    MaptoolsError,
    MapWriteError,
    NotAMapError,
)
from maptools.quantization.format import CIM_FILE, MANIFEST, MAPSAVE_ENV, format_version
from maptools.quantization.intmath import ROUNDING

try:
    import fcntl
except ImportError:  # pragma: no cover - not POSIX: no lock (one writer per map is then up to the caller)
    fcntl = None  # type: ignore[assignment]

__all__ = [
    "LOCK_TIMEOUT",
    "READ_WAIT",
    "STALE_SECONDS",
    "check_mapname",
    "check_replaceable",
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

_MAPNAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._+-]{0,127}\Z")  # \Z: "$" would accept a final newline


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
    tmp = _staged_file(path, data)
    try:
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise
    _fsync_dir(path.parent)


@contextlib.contextmanager
def _os_errors(target: Path) -> Iterator[None]:
    """Turn an OS error while writing map ``target`` into a :class:`~maptools.MapWriteError` naming it."""
    try:
        yield
    except MaptoolsError:
        raise
    except OSError as exc:
        code = errno.errorcode.get(exc.errno or 0, "")
        cause = f"{exc.strerror or exc}" + (f" ({code})" if code else "") + (f" at {exc.filename}" if exc.filename
                                                                             else "")
        raise MapWriteError(
            f"mapname: could not write map {target.name!r} at {target}: {cause}; nothing of this write was kept "
            "and the earlier map, if any, is unchanged. Free space or fix the permissions of the mapsave "
            "directory and run again") from exc


#: Largest ``manifest.json`` read to decide whether a folder is a map (a map's manifest is a few KiB).
_MANIFEST_LIMIT = 16 << 20


def _read_small_file(path: Path, limit: int) -> bytes | None:
    """The bytes of regular file ``path`` (no link, FIFO or device) of at most ``limit`` bytes, else None."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC)
    except OSError:
        return None
    try:
        info = os.fstat(fd)
        if not stat.S_ISREG(info.st_mode) or info.st_size > limit:
            return None
        with os.fdopen(os.dup(fd), "rb") as handle:
            return handle.read(limit + 1)
    finally:
        os.close(fd)


def _why_not_a_map(directory: Path) -> str | None:
    """None if real directory ``directory`` is a map maptools wrote, else the reason it is not."""
    data = _read_small_file(directory / MANIFEST, _MANIFEST_LIMIT)
    if data is None:
        return f"it has no {MANIFEST} that maptools wrote"
    try:
        manifest = json.loads(data)
    except (ValueError, RecursionError):
        return f"its {MANIFEST} is not valid JSON"
    files = manifest.get("files") if isinstance(manifest, dict) else None
    version = manifest.get("format_version") if isinstance(manifest, dict) else None
    if not (isinstance(version, str) and re.match(r"^\d+\.\d+\Z", version) and isinstance(files, dict)
            and all(isinstance(entry, dict) and isinstance(entry.get("sha256"), str) for entry in files.values())):
        return f"its {MANIFEST} lacks maptools' format_version and files"
    listed = {*files, MANIFEST}
    # an add_map_file of a killed process leaves ".<file>.tmp-XXXXXXXX" of a listed file (or of cim.json)
    leftover = re.compile(r"^\.(?P<file>[^/]+)\.tmp-[a-z0-9_]{8}\Z")
    try:
        with os.scandir(directory) as entries:
            for entry in entries:
                match = leftover.match(entry.name)
                owned = entry.name in listed or (match is not None and match.group("file") in listed | {CIM_FILE})
                if not owned:
                    return f"it holds {entry.name!r}, which its {MANIFEST} does not list"
                if not entry.is_file(follow_symlinks=False):
                    return f"{entry.name!r} in it is not a regular file"
    except OSError as exc:
        return f"it cannot be listed ({exc.strerror})"
    return None


def _foreign_lock(target: Path) -> NotAMapError:
    return NotAMapError(
        f"mapname: the lock file {_lock_path(target)} of map {target.name!r} is not a regular file (a link, a "
        "folder, a FIFO...); maptools only locks a regular file it created itself and writes nothing through it. "
        "Remove it and run again")


def check_replaceable(target: Path) -> None:
    """Refuse a ``target`` that exists and is not a map maptools wrote, which replacing it would destroy.

    A map maptools wrote is a real directory (not a link) holding a ``manifest.json`` with maptools' format
    keys and nothing else than the files that manifest lists. The map's lock file, if there, must be a regular
    file.

    Raises:
        NotAMapError: ``target`` is a file, a link, or a folder that is not such a map, or its lock file is
            not a regular file (nothing is touched).
    """
    with contextlib.suppress(FileNotFoundError):
        if not stat.S_ISREG(os.lstat(_lock_path(target)).st_mode):
            raise _foreign_lock(target)
    try:
        info = os.lstat(target)
    except FileNotFoundError:
        return
    except OSError as exc:
        raise MapWriteError(f"mapname: cannot look at {target} ({exc.strerror}); expected a map folder or nothing "
                            "there") from exc
    if stat.S_ISLNK(info.st_mode):
        reason = "it is a symbolic link"
    elif not stat.S_ISDIR(info.st_mode):
        reason = "it is a file, not a folder"
    else:
        reason = _why_not_a_map(target)
    if reason is not None:
        raise NotAMapError(
            f"mapname: {target} exists and is not a map written by maptools ({reason}); refusing to replace it, "
            "nothing was moved, deleted or written. Choose another mapname or mapsave_dir, or move it away")


def _staged_file(path: Path, data: bytes) -> str:
    """Write ``data`` to a new temporary file beside ``path`` (mode 0644, synced); returns its path."""
    handle, tmp = tempfile.mkstemp(prefix=f".{path.name}.tmp-", dir=path.parent)
    try:
        with os.fdopen(handle, "wb") as out:
            out.write(data)
            out.flush()
            os.fsync(out.fileno())
        os.chmod(tmp, 0o644)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise
    return tmp


def add_map_file(target: Path, name: str, data: bytes, manifest: Mapping[str, Any]) -> Path:
    """Add (or replace) one file of an existing map and list it in its manifest.

    The caller holds the map's writer lock (:func:`map_lock`) and passes the manifest it read under it; every
    other entry is kept but ``format_version``, computed from the files the map now holds
    (:func:`~maptools.quantization.format.format_version`: adding ``cim.json`` makes it 2.1). Both files are
    written in full before either is renamed into place, so a write that fails (a full disk) changes nothing.

    Returns:
        The file's path.

    Raises:
        MapWriteError: the operating system refused a write (the map is unchanged).
    """
    updated = dict(manifest)
    updated["files"] = {**manifest.get("files", {}), name: file_entry(data)}
    updated["format_version"] = format_version(updated["files"], manifest.get("format_version"))
    staged: list[str] = []
    try:
        with _os_errors(target):
            staged.append(_staged_file(target / name, data))
            staged.append(_staged_file(target / MANIFEST, manifest_bytes(updated)))
            os.replace(staged[0], target / name)
            os.replace(staged[1], target / MANIFEST)
            staged.clear()
            _fsync_dir(target)
    finally:
        for tmp in staged:
            with contextlib.suppress(OSError):
                os.unlink(tmp)
    return target / name


def _lock_path(target: Path) -> Path:
    return target.parent / f".{target.name}.lock"


#: (lock file, thread) of the writer's locks this process holds: that thread's reads must not wait for itself.
_held: set[tuple[str, int]] = set()


@contextlib.contextmanager
def map_lock(target: Path, timeout: float, shared: bool = False) -> Iterator[bool]:
    """Hold the lock of map directory ``target``: exclusive for a writer's swap, shared for a reader's wait.

    The lock is ``fcntl.flock`` on ``<mapsave>/.<mapname>.lock`` (created by writers and kept; a reader never
    creates it: without the file no writer is at work). The kernel releases it when its holder dies.

    Args:
        target: ``<mapsave>/<mapname>``.
        timeout: Seconds to wait for another holder.
        shared: A reader's shared lock (it only waits for a writer's swap) instead of a writer's exclusive one.

    Yields:
        Whether a lock is held: False for a reader when no lock file exists (no writer ever came) or it is not a
        regular file (no writer can lock it either).

    Raises:
        MapBusyError: another process held the lock for ``timeout`` seconds.
        NotAMapError: a writer found a lock file that is not a regular file (a link, even a dangling one, a
            folder, a FIFO); nothing is created or written through it.
    """
    if fcntl is None:  # pragma: no cover
        yield False
        return
    path = _lock_path(target)
    mine = (str(path), threading.get_ident())
    flags = os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC  # never through a link, never blocked on a FIFO
    try:
        fd = os.open(path, flags | (os.O_RDONLY if shared else os.O_RDWR | os.O_CREAT), 0o666)
    except FileNotFoundError:
        yield False
        return
    except OSError as exc:
        if exc.errno not in (errno.ELOOP, errno.EISDIR) and not (shared and exc.errno == errno.EACCES):
            raise
        fd = -1
    if fd < 0 or not stat.S_ISREG(os.fstat(fd).st_mode):
        if fd >= 0:
            os.close(fd)
        if shared:  # not a lock a maptools writer can hold (or one this reader may not open): no wait
            yield False
            return
        raise _foreign_lock(target)
    if shared and mine in _held:  # this thread holds the writer's lock: nothing moves meanwhile
        os.close(fd)
        yield True
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
        if not shared:
            _held.add(mine)
        try:
            yield True
        finally:
            _held.discard(mine)
    finally:
        os.close(fd)  # releases the lock


def _staging_pattern(name: str) -> re.Pattern[str]:
    # tempfile's 8 random characters; the PID is absent from the names of maptools 0.1
    return re.compile(rf"^\.{re.escape(name)}\.tmp-(?:(?P<pid>\d+)-)?[a-z0-9_]{{8}}\Z")


def _old_pattern(name: str) -> re.Pattern[str]:
    return re.compile(rf"^\.{re.escape(name)}\.old-[a-z0-9_]{{8}}\Z")


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
    """The real folders (not links) beside ``target`` whose names match ``pattern``, oldest first."""
    found = []
    with contextlib.suppress(OSError), os.scandir(target.parent) as entries:
        found = [Path(e.path) for e in entries if pattern.match(e.name) and e.is_dir(follow_symlinks=False)]
    return sorted(found, key=lambda p: (_mtime(p), p.name))


def _mtime(path: Path) -> float:
    try:
        return path.lstat().st_mtime
    except OSError:
        return 0.0


def _only_files(directory: Path) -> bool:
    """Whether ``directory`` holds regular files only, as a staging directory of maptools does."""
    try:
        with os.scandir(directory) as entries:
            return all(entry.is_file(follow_symlinks=False) for entry in entries)
    except OSError:
        return False


def _recover(target: Path) -> None:
    """Under the lock: finish a swap a killed writer left between its two renames, drop stale folders.

    Only maptools' own folders go: an earlier map (``.<name>.old-*``) only if it is a map, a staging folder
    (``.<name>.tmp-<pid>-*``) only if it holds nothing but files; anything else of those names is left, logged.
    """
    olds = []
    for old in _leftovers(target, _old_pattern(target.name)):
        reason = _why_not_a_map(old)
        if reason is None:
            olds.append(old)
        else:
            logger.warning("left %s alone: named like an earlier map of %r, but %s", old, target.name, reason)
    if not os.path.lexists(target) and olds:
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
            if not _only_files(staging):
                logger.warning("left %s alone: named like a staging folder of %r, but it holds more than files",
                               staging, target.name)
                continue
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
        NotAMapError: ``target`` exists and is not a map maptools wrote (:func:`check_replaceable`), or its lock
            file is not a regular file; nothing was moved, deleted or written.
        MapBusyError: another writer held the map's lock for ``lock_timeout`` seconds (nothing was changed).
        MapWriteError: the operating system refused a write (a full disk...); nothing of this write is left and
            the earlier map is unchanged.
    """
    check_replaceable(target)  # before anything is written; again under the lock, before the swap
    with _os_errors(target):
        _write_map(target, files, manifest, before_swap, lock_timeout)


def _write_map(target: Path, files: Mapping[str, bytes], manifest: dict[str, Any],
               before_swap: Callable[[Path], None] | None, lock_timeout: float | None) -> None:
    parent = target.parent
    parent.mkdir(parents=True, exist_ok=True)
    manifest = dict(manifest)
    manifest["format_version"] = format_version(files, manifest.get("format_version"))
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
            check_replaceable(target)
            if os.path.lexists(target):
                old = Path(tempfile.mkdtemp(prefix=f".{target.name}.old-", dir=parent))
                os.rmdir(old)
                os.replace(target, old)
            try:
                os.replace(staging, target)
            except BaseException:
                if old is not None:  # the earlier map goes back where it was
                    os.replace(old, target)
                raise
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

