"""Bounded reading of the files a map names: regular files only, their size checked before a byte is read.

A crafted map must not hang a reader (a FIFO), exhaust its memory (``/dev/zero``, a huge file) or be hashed
before its own checks. Every file a map reader opens goes through :func:`open_regular`: opened without
blocking, checked with ``fstat`` to be a regular file no larger than a limit (and of the size the manifest
records, when it records one), then read with a bounded read (:func:`read_regular`) or hashed in chunks
(:func:`hash_regular`). The limits are documented in ``docs/troubleshooting.rst``.
"""

from __future__ import annotations

import contextlib
import os
import stat
from collections.abc import Iterator
from typing import Any, BinaryIO

from maptools.errors import ArtifactError, MaptoolsError

__all__ = ["CHUNK_BYTES", "MAX_ARTIFACT_BYTES", "MAX_EXTERNAL_DATA_BYTES", "MAX_MANIFEST_BYTES", "MAX_MODEL_BYTES",
           "hash_regular", "open_regular", "read_regular"]

#: Largest ``manifest.json`` read (it is read before anything can be checked against it).
MAX_MANIFEST_BYTES = 16 << 20
#: Largest artifact file of a map (a pickle, a JSON file, ``quant_model.onnx``) read into memory.
MAX_ARTIFACT_BYTES = 4 << 30
#: Largest ONNX model file read (protobuf's own limit on one message is 2 GiB).
MAX_MODEL_BYTES = 2 << 30
#: Largest external-data file of a model that is hashed (read in chunks, never whole).
MAX_EXTERNAL_DATA_BYTES = 256 << 30
#: Bytes read at a time while hashing.
CHUNK_BYTES = 1 << 20

_KINDS = ((stat.S_ISDIR, "a directory"), (stat.S_ISFIFO, "a FIFO"), (stat.S_ISCHR, "a character device"),
          (stat.S_ISBLK, "a block device"), (stat.S_ISSOCK, "a socket"))


def _is_link(path: str | os.PathLike, dir_fd: int | None) -> bool:
    try:
        return stat.S_ISLNK(os.stat(path, dir_fd=dir_fd, follow_symlinks=False).st_mode)
    except OSError:
        return False


def _kind(mode: int) -> str:
    return next((name for test, name in _KINDS if test(mode)), "not a regular file")


@contextlib.contextmanager
def open_regular(path: str | os.PathLike, what: str, limit: int, *, error: type[MaptoolsError] = ArtifactError,
                 follow_links: bool = True, expected_size: int | None = None, dir_fd: int | None = None,
                 missing: type[MaptoolsError] | None = None) -> Iterator[tuple[BinaryIO, int]]:
    """Open ``path`` for reading if it is a regular file of at most ``limit`` bytes; yields (file, size).

    Args:
        path: The file.
        what: What the file is, for errors (``"quantinfo.pkl of map 'm'"``).
        limit: The largest size accepted, in bytes.
        error: The error class raised.
        follow_links: False to refuse a symbolic link (``O_NOFOLLOW``): a map's own files are never links.
        expected_size: The size the manifest records, or None.
        dir_fd: An open directory ``path`` is relative to (a map read as one snapshot), or None.
        missing: The error class of a missing file (a dangling link included), if not ``error``.

    Raises:
        error: missing, a link (``follow_links=False``), not a regular file, larger than ``limit`` or of
            another size than ``expected_size`` (a missing file raises :class:`FileNotFoundError` wrapped as
            ``missing`` or ``error`` with "is missing" in the message).
    """
    flags = os.O_RDONLY | getattr(os, "O_NONBLOCK", 0) | getattr(os, "O_CLOEXEC", 0)  # a FIFO opens at once
    if not follow_links:
        flags |= getattr(os, "O_NOFOLLOW", 0)
    try:
        fd = os.open(path, flags, dir_fd=dir_fd)
    except FileNotFoundError:
        raise (missing or error)(f"{what}: {path} is missing") from None
    except OSError as exc:
        if not follow_links and _is_link(path, dir_fd):
            raise error(f"{what}: {path} is a symbolic link; expected a regular file (maptools writes no links in "
                        "a map)") from None
        raise error(f"{what}: cannot open {path} ({exc.strerror or exc})") from None
    try:
        info = os.fstat(fd)
        if not stat.S_ISREG(info.st_mode):
            raise error(f"{what}: {path} is {_kind(info.st_mode)}; expected a regular file")
        if info.st_size > limit:
            raise error(f"{what}: {path} holds {info.st_size} bytes, more than the {limit} bytes accepted")
        if expected_size is not None and info.st_size != expected_size:
            raise error(f"{what}: {path} holds {info.st_size} bytes, the manifest records {expected_size}: the file "
                        "was modified after quantize wrote it")
        handle = os.fdopen(fd, "rb", buffering=0)
    except BaseException:
        os.close(fd)
        raise
    with handle:
        yield handle, info.st_size  # type: ignore[misc]


def read_regular(path: str | os.PathLike, what: str, limit: int, **options: Any) -> bytes:
    """The bytes of a regular file of at most ``limit`` bytes (see :func:`open_regular` for ``options``).

    Reads at most the size ``fstat`` gave plus one byte, so a file that grows meanwhile is refused, not followed.
    """
    error = options.get("error", ArtifactError)
    with open_regular(path, what, limit, **options) as (handle, size):
        chunks, left = [], size + 1
        while left > 0:
            chunk = handle.read(min(left, CHUNK_BYTES << 4))
            if not chunk:
                break
            chunks.append(chunk)
            left -= len(chunk)
    data = b"".join(chunks)
    if len(data) != size:
        raise error(f"{what}: {path} changed size while it was read ({size} bytes, then {len(data)})")
    return data


def hash_regular(digest: Any, path: str | os.PathLike, what: str, limit: int, **options: Any) -> None:
    """Feed a regular file of at most ``limit`` bytes to ``digest`` (a hashlib object) in chunks."""
    with open_regular(path, what, limit, **options) as (handle, _size):
        read = 0
        while chunk := handle.read(CHUNK_BYTES):
            read += len(chunk)
            if read > limit:
                raise options.get("error", ArtifactError)(f"{what}: {path} grew past {limit} bytes while it was read")
            digest.update(chunk)
