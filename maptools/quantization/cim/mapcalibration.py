"""A map's ADC calibration as plain data (:class:`MapCalibration`, its JSON form :data:`CIM_FORMAT`) and its
reading from a map's ``cim.json``: below the executor, which runs a map on its stored crossbar."""

from __future__ import annotations

import json
import os
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from maptools.errors import ArtifactError, InvalidArgumentError, InvalidTypeError
from maptools.quantization import artifacts, mapdir
from maptools.quantization.artifacts import read_json
from maptools.quantization.boundedio import MAX_ARTIFACT_BYTES, read_regular
from maptools.quantization.cim.adc import AdcCalibration
from maptools.quantization.cim.spec import CIMSpec
from maptools.quantization.format import CIM_FILE
from maptools.quantization.mapdir import write_file_atomically
from maptools.quantization.schemas import check_cim_file

__all__ = ["CIM_FORMAT", "MapCalibration", "has_map_calibration", "read_map_calibration"]

#: Version of :data:`CIM_FILE`'s layout.
CIM_FORMAT = 1


@dataclass(frozen=True, eq=False)
class MapCalibration:
    """The ADC ranges of every crossbar MAC of a map, for one crossbar.

    A calibration without ranges (``adc`` empty) may hold a spec with an ideal ADC or ``adc_range='full'``:
    it records the crossbar only, as ``quantize(..., cim=spec)`` stores it for such a spec, so that
    ``simulate(mapname, inputs, cim=True)`` runs the map's crossbar.

    Attributes:
        spec: The crossbar (``adc_bits`` set, ``adc_range='calibrated'``, when ``adc`` holds ranges).
        adc: Node name -> the MAC's :class:`~maptools.quantization.cim.adc.AdcCalibration`.
        method: How the ranges were chosen (``'mse'`` or ``'percentile'``).
        batches: Calibration batches run.
        fingerprint: The :attr:`~maptools.quantization.reference.executor.ReferenceExecutor.fingerprint` of the
            executor calibrated ("" when unknown: not checked).
    """

    spec: CIMSpec
    adc: dict[str, AdcCalibration]
    method: str = "mse"
    batches: int = 0
    fingerprint: str = ""

    def __post_init__(self) -> None:
        if not isinstance(self.spec, CIMSpec):
            raise InvalidTypeError(f"MapCalibration.spec: got {type(self.spec).__name__}, expected a CIMSpec")
        if self.adc or (self.spec.adc_bits is not None and self.spec.adc_range == "calibrated"):
            if self.spec.adc_bits is None:
                raise InvalidArgumentError("MapCalibration.spec: adc_bits is None (an ideal ADC has no range)")
            if self.spec.adc_range != "calibrated":
                object.__setattr__(self, "spec", self.spec.replace(adc_range="calibrated"))
        for node, adc in self.adc.items():
            if not isinstance(adc, AdcCalibration):
                raise InvalidTypeError(f"MapCalibration.adc[{node!r}]: got {type(adc).__name__}, expected an "
                                       "AdcCalibration")

    def __eq__(self, other: object) -> bool:
        """Equal when every field and every range is equal (compared as their JSON form)."""
        return isinstance(other, MapCalibration) and self.to_json() == other.to_json()

    __hash__ = None  # type: ignore[assignment]  # mutable arrays inside

    @property
    def clipped(self) -> dict[str, float]:
        """Node name -> the fraction of its calibration partial sums above their ADC range."""
        return {node: float((adc.clipped * adc.samples).sum() / max(1, adc.samples.sum()))
                for node, adc in self.adc.items()}

    # -- serialization (JSON, no pickle) -------------------------------------------------------------------
    def to_dict(self) -> dict[str, Any]:
        """A JSON-serializable dict."""
        return {"format": CIM_FORMAT, "spec": self.spec.to_dict(), "method": self.method, "batches": self.batches,
                "fingerprint": self.fingerprint, "adc": {node: adc.to_dict() for node, adc in self.adc.items()}}

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> MapCalibration:
        """The calibration of :meth:`to_dict`'s form.

        Raises:
            ArtifactError: Another format, a missing key or malformed values.
        """
        try:
            if int(data.get("format", 0)) != CIM_FORMAT:
                raise ArtifactError(f"CIM calibration: format {data.get('format')!r}, expected {CIM_FORMAT}")
            adc = {str(node): AdcCalibration.from_dict(entry) for node, entry in dict(data["adc"]).items()}
            return cls(spec=CIMSpec.from_dict(dict(data["spec"])), adc=adc, method=str(data.get("method", "mse")),
                       batches=int(data.get("batches", 0)), fingerprint=str(data.get("fingerprint", "")))
        except ArtifactError:
            raise
        except (KeyError, TypeError, ValueError, InvalidArgumentError) as exc:
            raise ArtifactError(f"CIM calibration: malformed data ({exc})") from exc

    def to_json(self) -> bytes:
        """The JSON bytes of :data:`CIM_FILE` (sorted keys: equal calibrations give equal bytes)."""
        return (json.dumps(self.to_dict(), sort_keys=True, separators=(",", ":"), allow_nan=False) + "\n").encode()

    @classmethod
    def from_json(cls, data: bytes | str, what: str = "CIM calibration") -> MapCalibration:
        """The calibration of :meth:`to_json`'s bytes.

        Raises:
            ArtifactError: Not JSON, or malformed.
        """
        return cls.from_dict(check_cim_file(read_json(data.encode() if isinstance(data, str) else data, what), what))

    def save(self, path: str | os.PathLike[str]) -> Path:
        """Write the calibration as JSON to ``path`` (atomically); returns the path."""
        path = Path(path)
        write_file_atomically(path, self.to_json())
        return path

    @classmethod
    def load(cls, path: str | os.PathLike[str]) -> MapCalibration:
        """Read :meth:`save`'s file.

        Raises:
            ArtifactError: The file is unreadable or malformed.
        """
        path = Path(path)
        data = read_regular(path, "CIM calibration", MAX_ARTIFACT_BYTES)
        return cls.from_json(data, str(path))


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
                "maptools.quantization.cimmap.calibrate_map and store it with write_map_calibration, or pass a CIMSpec "
                "(and adc=) instead of cim=True")
        data = artifacts.read_artifact_bytes(mapname, CIM_FILE, mapsave_dir)
    return MapCalibration.from_json(data, f"{directory / CIM_FILE}")
