"""Reading the calibration stored in a map (its ``cim.json``): no executor needed, so its loader can use it."""

from __future__ import annotations

import os

from maptools.errors import ArtifactError
from maptools.quantization import artifacts, mapdir
from maptools.quantization.cim.mapcal.calibration_data import MapCalibration
from maptools.quantization.format import CIM_FILE

__all__ = ["has_map_calibration", "read_map_calibration"]


def has_map_calibration(mapname: str, mapsave_dir: str | os.PathLike | None = None) -> bool:
    """Whether the map's manifest lists a :data:`CIM_FILE`."""
    directory = artifacts.resolve_map(mapname, mapsave_dir)
    return CIM_FILE in artifacts.read_manifest(directory).get("files", {})


def read_map_calibration(mapname: str, mapsave_dir: str | os.PathLike | None = None) -> MapCalibration:
    """The calibration stored in a map by :func:`write_map_calibration` (checked against the manifest).

    Raises:
        MapNotFoundError: no such map.
        ArtifactError: the map has no ``cim.json``, or it is modified or malformed.
    """
    directory = artifacts.resolve_map(mapname, mapsave_dir)
    with mapdir.map_lock(directory, mapdir.READ_WAIT, shared=True):
        if CIM_FILE not in artifacts.read_manifest(directory).get("files", {}):
            raise ArtifactError(
                f"map {mapname!r} has no CIM calibration ({CIM_FILE}); make one with "
                "maptools.quantization.cim.calibrate_map and store it with write_map_calibration, or pass a CIMSpec "
                "(and adc=) instead of cim=True")
        data = artifacts.read_artifact_bytes(mapname, CIM_FILE, mapsave_dir)
    return MapCalibration.from_json(data, f"{directory / CIM_FILE}")
