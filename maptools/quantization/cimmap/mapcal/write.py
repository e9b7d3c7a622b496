"""Storing a calibration in its map: ``cim.json``, listed in ``manifest.json``, under the map's writer lock."""

from __future__ import annotations

import logging
import os
from collections.abc import Mapping
from pathlib import Path

from maptools.errors import ArtifactError, InvalidArgumentError, InvalidTypeError
from maptools.quantization import artifacts, mapdir
from maptools.quantization.cim.derived import check_records_gains
from maptools.quantization.cim.mapcalibration import MapCalibration
from maptools.quantization.format import CIM_FILE
from maptools.quantization.records import OperatorQuantConfig
from maptools.quantization.reference.executor import ReferenceExecutor

__all__ = ["write_map_calibration"]

logger = logging.getLogger("maptools.quantization.cimmap.mapcal")


def write_map_calibration(mapname: str, calibration: MapCalibration, *, mapsave_dir: str | os.PathLike | None = None,
                          lock_timeout: float | None = None) -> Path:
    """Store a calibration in its map as :data:`CIM_FILE` and list it in ``manifest.json``.

    Under the map's writer lock (the one ``quantize`` holds to swap a map): the map is loaded and its
    fingerprint compared with the calibration's, ``cim.json`` is written atomically, then the manifest is
    rewritten atomically with the file's SHA-256 and size (every other entry unchanged). An earlier
    ``cim.json`` is replaced, except in a map quantized with ``cim=``, whose records hold the layout and ADC
    gains of its crossbar: there only the same spec and gains are stored again.

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
        InvalidArgumentError: the calibration was made on another map, or the map was quantized with ``cim=``
            and the calibration's spec or ADC gains differ from its records'.
        ArtifactError: the map's files are modified or unreadable.
    """
    if not isinstance(calibration, MapCalibration):
        raise InvalidTypeError(f"calibration: got {type(calibration).__name__}, expected a MapCalibration")
    directory = artifacts.resolve_map(mapname, mapsave_dir)
    timeout = mapdir.LOCK_TIMEOUT if lock_timeout is None else lock_timeout
    with mapdir.map_lock(directory, timeout):
        executor = ReferenceExecutor.load(mapname, mapsave_dir)
        if calibration.fingerprint and calibration.fingerprint != executor.fingerprint:
            raise InvalidArgumentError(f"calibration: made on another map than {mapname!r} (its crossbar weights or "
                                       "operands differ); calibrate this map")
        _check_placements(mapname, mapsave_dir, executor.quantinfo, calibration)
        mapdir.add_map_file(directory, CIM_FILE, calibration.to_json(), artifacts.read_manifest(directory))
    logger.info("wrote the CIM calibration (%s) of map %r to %s", calibration.spec, mapname, directory / CIM_FILE)
    return directory / CIM_FILE


def _check_placements(mapname: str, mapsave_dir: str | os.PathLike | None,
                      quantinfo: Mapping[str, OperatorQuantConfig], calibration: MapCalibration) -> None:
    """A map quantized with ``cim=`` keeps its crossbar: its records' layouts and ADC gains are derived from its
    ``cim.json``, so a replacement must give the same spec and gains (the same calibration, stored again).

    Raises:
        InvalidArgumentError: the calibration's spec or ADC gains differ from those the records hold.
    """
    if all(record.cim is None for record in quantinfo.values()):
        return
    spec = MapCalibration.from_json(artifacts.read_artifact_bytes(mapname, CIM_FILE, mapsave_dir), CIM_FILE).spec
    if calibration.spec != spec:
        raise InvalidArgumentError(f"calibration: for crossbar {calibration.spec}, but map {mapname!r} was quantized "
                                   f"with cim={spec} and its records hold that crossbar's layout; quantize again "
                                   "with the new cim= instead")
    try:
        check_records_gains(quantinfo, calibration)
    except (ArtifactError, InvalidArgumentError) as exc:
        raise InvalidArgumentError(f"calibration: its ADC ranges differ from those map {mapname!r} was quantized "
                                   f"with, whose gains its records hold ({exc}); quantize again with cim= to "
                                   "recalibrate") from None
