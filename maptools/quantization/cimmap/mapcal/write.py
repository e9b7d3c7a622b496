"""Storing a calibration in its map: ``cim.json``, listed in ``manifest.json``, under the map's writer lock."""

from __future__ import annotations

import logging
import os
from pathlib import Path

from maptools.errors import InvalidArgumentError, InvalidTypeError
from maptools.quantization import artifacts, mapdir
from maptools.quantization.cim.mapcalibration import MapCalibration
from maptools.quantization.format import CIM_FILE
from maptools.quantization.reference.executor import ReferenceExecutor

__all__ = ["write_map_calibration"]

logger = logging.getLogger("maptools.quantization.cimmap.mapcal")


def write_map_calibration(mapname: str, calibration: MapCalibration, *, mapsave_dir: str | os.PathLike | None = None,
                          lock_timeout: float | None = None) -> Path:
    """Store a calibration in its map as :data:`CIM_FILE` and list it in ``manifest.json``.

    Under the map's writer lock (the one ``quantize`` holds to swap a map): the map is loaded and its
    fingerprint compared with the calibration's, ``cim.json`` is written atomically, then the manifest is
    rewritten atomically with the file's SHA-256 and size (every other entry unchanged). An earlier
    ``cim.json`` is replaced.

    Args:
        mapname: The map.
        calibration: A calibration made on this map (:func:`calibrate_map`).
        mapsave_dir: The mapsave directory.
        lock_timeout: Seconds to wait for another writer; None for the artifacts' default.

    Returns:
        The path of ``cim.json``.

    Raises:
        MapNotFoundError: no such map.
        MapBusyError: another writer held the map's lock for ``lock_timeout`` seconds.
        InvalidArgumentError: the calibration was made on another map.
        ArtifactError: the map's files are modified or unreadable.
    """
    if not isinstance(calibration, MapCalibration):
        raise InvalidTypeError(f"calibration: got {type(calibration).__name__}, expected a MapCalibration")
    directory = artifacts.resolve_map(mapname, mapsave_dir)
    timeout = mapdir.LOCK_TIMEOUT if lock_timeout is None else lock_timeout
    with mapdir.map_lock(directory, timeout):
        fingerprint = ReferenceExecutor.load(mapname, mapsave_dir).fingerprint
        if calibration.fingerprint and calibration.fingerprint != fingerprint:
            raise InvalidArgumentError(f"calibration: made on another map than {mapname!r} (its crossbar weights or "
                                       "operands differ); calibrate this map")
        mapdir.add_map_file(directory, CIM_FILE, calibration.to_json(), artifacts.read_manifest(directory))
    logger.info("wrote the CIM calibration (%s) of map %r to %s", calibration.spec, mapname, directory / CIM_FILE)
    return directory / CIM_FILE
