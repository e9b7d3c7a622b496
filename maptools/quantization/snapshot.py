"""Reading a map as one snapshot: every file from the same map, even while another process replaces it.

A writer replaces a whole map directory by two renames (:mod:`.mapdir`), and
:func:`~maptools.quantization.mapdir.add_map_file` renames a file, then the manifest. A reader therefore opens
the map directory once and reads the manifest and every file relative to that open directory, each checked
against the manifest's SHA-256 and size: files of two maps never mix. A file that is missing or differs may
mean a swap removed the earlier map under the reader, or a file was being added: the reader reads again under
the map's shared lock (:func:`~maptools.quantization.mapdir.map_lock`), where no writer changes anything, and
only what still differs then is reported as modified.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from maptools.errors import ArtifactError, MaptoolsError
from maptools.quantization import mapdir
from maptools.quantization.boundedio import MAX_ARTIFACT_BYTES, MAX_MANIFEST_BYTES, read_regular
from maptools.quantization.format import MANIFEST

__all__ = ["MapFiles", "ManifestParser", "read_files"]

#: Checks the bytes of a manifest read from a path, returns it (:func:`.artifacts.parse_manifest`).
ManifestParser = Callable[[bytes, Path], dict[str, Any]]

#: Reads of a map before an error is final: one without the lock, then under the shared lock (again without it
#: only while no lock file exists: a first writer may be creating it).
_ATTEMPTS = 3


@dataclass(frozen=True)
class MapFiles:
    """Files of one map as one snapshot, each checked against the manifest read with them."""

    directory: Path
    manifest: dict[str, Any]
    files: dict[str, bytes]


class _ChangedError(Exception):
    """A file missing or different: final only if it persists under the lock."""

    def __init__(self, error: MaptoolsError) -> None:
        super().__init__(str(error))
        self.error = error


class _ReadError(ArtifactError):
    """A file of the map missing, not a regular file, or not of its manifest's size: final if it persists."""


def _read_at(directory_fd: int, name: str, path: Path, limit: int, size: int | None = None) -> bytes:
    """File ``name`` of the open directory: a regular file (no link) of at most ``limit`` bytes and ``size``."""
    try:
        return read_regular(name, str(path), limit, follow_links=False, expected_size=size, dir_fd=directory_fd,
                            error=_ReadError)
    except _ReadError as exc:
        raise _ChangedError(ArtifactError(str(exc))) from None


def _plain_name(name: object, manifest_path: Path) -> str:
    if not isinstance(name, str) or not name or "/" in name or name in (".", ".."):
        raise ArtifactError(f"{manifest_path}: lists {name!r}, which is not a file name inside the map")
    return name


def _read_once(mapname: str, mapsave_dir: str | os.PathLike | None, names: list[str] | None,
               parse_manifest: ManifestParser) -> MapFiles:
    directory = mapdir.resolve_map(mapname, mapsave_dir)
    manifest_path = directory / MANIFEST
    try:
        directory_fd = os.open(directory, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    except FileNotFoundError:
        raise _ChangedError(ArtifactError(f"{directory} vanished while it was read")) from None
    try:
        data = _read_at(directory_fd, MANIFEST, manifest_path, MAX_MANIFEST_BYTES)
        manifest = parse_manifest(data, manifest_path)
        listed = manifest.get("files")
        listed = listed if isinstance(listed, dict) else {}
        files: dict[str, bytes] = {}
        for name in (listed if names is None else names):
            path = directory / _plain_name(name, manifest_path)
            entry = listed.get(name)
            expected = entry.get("sha256") if isinstance(entry, dict) else None
            size = entry.get("bytes") if isinstance(entry, dict) else None
            if expected is None:
                raise _ChangedError(ArtifactError(f"{path}: not listed in {manifest_path}"))
            content = _read_at(directory_fd, name, path, MAX_ARTIFACT_BYTES, size if isinstance(size, int) else None)
            if mapdir.sha256_of(content) != expected:
                raise _ChangedError(ArtifactError(
                    f"{path} was modified after quantize wrote it (SHA-256 differs from {MANIFEST}); "
                    f"re-run quantize for map {mapname!r}"))
            files[name] = content
        return MapFiles(directory=directory, manifest=manifest, files=files)
    finally:
        os.close(directory_fd)


def read_files(mapname: str, names: Iterable[str] | None, mapsave_dir: str | os.PathLike | None,
               parse_manifest: ManifestParser) -> MapFiles:
    """Read files of map ``mapname`` (None: every file its manifest lists) and its manifest as one snapshot.

    ``parse_manifest`` checks the manifest: :func:`maptools.quantization.artifacts.parse_manifest` (passed in, as
    that module builds on this one).

    Raises:
        MapNotFoundError: no such map.
        MapBusyError: a writer held the map's lock for :data:`~maptools.quantization.mapdir.READ_WAIT` seconds.
        ArtifactError: a file is missing, not listed, modified, or the manifest is unreadable.
    """
    names = None if names is None else list(names)
    target = mapdir.map_directory(mapname, mapsave_dir)
    failure: MaptoolsError | None = None
    for attempt in range(_ATTEMPTS):
        lock = mapdir.map_lock(target, mapdir.READ_WAIT, shared=True) if attempt else contextlib.nullcontext(False)
        with lock as locked:
            try:
                return _read_once(mapname, mapsave_dir, names, parse_manifest)
            except _ChangedError as changed:
                failure = changed.error
        if locked:  # no writer changed anything meanwhile: the map itself differs from its manifest
            break
    assert failure is not None
    raise failure
