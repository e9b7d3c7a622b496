"""Loading a map into a :class:`~maptools.quantization.reference.ReferenceExecutor`: :meth:`MapLoadingMixin.load`."""

from __future__ import annotations

import os
from collections.abc import Mapping
from typing import TYPE_CHECKING

from maptools.errors import InvalidArgumentError
from maptools.quantization.artifacts import (
    QUANTINFO,
    QUANTMODEL,
    QUANTPARAMS,
    load_quant_model,
    load_quantinfo,
    load_quantparams,
    read_map_files,
)
from maptools.quantization.cim.adc import AdcCalibration
from maptools.quantization.cim.analog import SeedLike, check_device
from maptools.quantization.cim.device import DeviceModel
from maptools.quantization.cim.spec import CIMSpec

if TYPE_CHECKING:
    from maptools.quantization.cim.mapcal import MapCalibration
    from maptools.quantization.reference.executor import ReferenceExecutor

__all__ = ["MapLoadingMixin"]


class MapLoadingMixin:
    """``ReferenceExecutor.load``: the executor of a map on disk (each file checked against the manifest)."""

    @classmethod
    def load(cls, mapname: str, mapsave_dir: str | os.PathLike | None = None, cim: CIMSpec | bool | None = None,
             adc: MapCalibration | Mapping[str, AdcCalibration] | None = None, *, device: DeviceModel | None = None,
             seed: SeedLike = 0) -> ReferenceExecutor:
        """Load ``mapsave/<mapname>`` (each file checked against the manifest, all three of one snapshot).

        Args:
            mapname: The map name given to ``quantize``.
            mapsave_dir: The mapsave directory (default ``$MAPTOOLS_MAPSAVE`` or ``./mapsave``).
            cim: None for exact MACs; a :class:`~maptools.quantization.cim.spec.CIMSpec` for the crossbar
                model; True for the map's own CIM spec and ADC calibration (its ``cim.json``, see
                :func:`~maptools.quantization.cim.mapcal.write_map_calibration`).
            adc: The ADC calibration of a spec with ``adc_range='calibrated'``; None for the map's stored one
                (which must then exist and match the spec).
            device: The analog non-idealities of the chip (needs ``cim``); None for exact cells.
            seed: The chip's seed (an int or a SeedSequence).

        Raises:
            MapNotFoundError: no such map.
            ArtifactError: a file is missing, modified, corrupt, or the files disagree; ``cim=True`` on a map
                without a CIM calibration.
            UnsupportedOperatorError: the graph holds an operator this executor cannot run.
            InvalidArgumentError: a calibrated spec without a matching calibration.
        """
        check_device(device, seed, cim)  # before reading anything (cim=True: the cells are checked once known)
        # the graph, records and parameters of the same quantize run, even while the map is being replaced
        files = read_map_files(mapname, [QUANTMODEL, QUANTINFO, QUANTPARAMS], mapsave_dir)
        spec: CIMSpec | None = None
        if cim is True or (isinstance(cim, CIMSpec) and adc is None and cim.adc_bits is not None
                           and cim.adc_range == "calibrated"):
            from maptools.quantization.cim.mapcal.read import (  # mapcal imports us
                has_map_calibration,
                read_map_calibration,
            )

            if cim is not True and not has_map_calibration(mapname, mapsave_dir):
                raise InvalidArgumentError(
                    f"cim: spec {cim} has adc_range='calibrated' but no adc= was given and map {mapname!r} stores no "
                    "ADC calibration; pass adc=maptools.quantization.cim.calibrate_map(...) or use adc_range='full'")
            stored = read_map_calibration(mapname, mapsave_dir)
            spec = stored.spec if cim is True else cim
            adc = stored
        elif cim is not False:
            spec = cim  # type: ignore[assignment]  # None or a CIMSpec (anything else is refused below)
        return cls.from_files(mapname, files, spec, adc, device=device, seed=seed)

    @classmethod
    def from_files(cls, mapname: str, files: Mapping[str, bytes], cim: CIMSpec | None = None,
                   adc: MapCalibration | Mapping[str, AdcCalibration] | None = None, *,
                   device: DeviceModel | None = None, seed: SeedLike = 0) -> ReferenceExecutor:
        """The executor of a map's files already read as one snapshot (:func:`~maptools.quantization.read_map`).

        Args:
            mapname: The map, for errors.
            files: At least ``quant_model.onnx``, ``quantinfo.pkl`` and ``quantparams.pkl``: their checked bytes.
            cim, adc, device, seed: As :meth:`load` (``cim`` a spec or None).

        Raises:
            ArtifactError: a file is corrupt, or the files disagree.
        """
        return cls(load_quant_model(mapname, files[QUANTMODEL]), load_quantinfo(files[QUANTINFO]),
                   load_quantparams(files[QUANTPARAMS]), cim, adc, device=device, seed=seed)
