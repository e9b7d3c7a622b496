"""What a map stores derived from ``cim.json``, and the checks that it agrees with it.

* The records' ADC gains ``g = round(r / L * 2^16)`` (:func:`~maptools.quantization.cim.adc.adc_gain`) of the
  ranges ``r`` of ``cim.json``: stored because the converter reads the records, not ``cim.json``
  (:func:`check_record_gains`).
* The manifest's ``settings.cim``: the spec ``quantize`` ran with, recorded with every other setting; it is
  ``cim.json``'s spec (:func:`check_settings_spec`).

Both are derived values, not second facts: the map is run on ``cim.json`` and these checks refuse a map whose
copies disagree with it.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import numpy as np

from maptools.errors import ArtifactError
from maptools.quantization.cim.adc import ADC_FRACTION_BITS, adc_gain, full_scale_ranges
from maptools.quantization.cim.arithmetic import adc_grid
from maptools.quantization.cim.mapcalibration import MapCalibration
from maptools.quantization.cim.spec import CIMSpec
from maptools.quantization.format import CIM_FILE, MANIFEST, QUANTINFO
from maptools.quantization.placement import Grid
from maptools.quantization.records import OperatorQuantConfig

__all__ = ["adc_ranges", "check_record_gains", "check_records_gains", "check_settings_spec", "placement_gains",
           "record_adc_ranges"]


def adc_ranges(name: str, spec: CIMSpec, calibration: MapCalibration, grid: tuple[int, int, int],
               weight_bits: int, input_bits: int) -> np.ndarray:
    """A MAC's ADC full-scale ranges ``(T, S, P)``: calibrated (from ``cim.json``) or the spec's full scale."""
    if spec.adc_range == "calibrated":
        if name not in calibration.adc:
            raise ArtifactError(f"{CIM_FILE}: holds no ADC ranges for crossbar MAC {name!r}")
        return calibration.adc[name].check(spec, grid, weight_bits=weight_bits, input_bits=input_bits)
    return full_scale_ranges(spec, grid)


def placement_gains(ranges: np.ndarray, levels: int) -> Grid:
    """The fixed-point gains of ADC ranges ``(T, S, P)``, as a record holds them (nested tuples of ints)."""
    return tuple(tuple(tuple(int(g) for g in row) for row in plane) for plane in adc_gain(ranges, levels))


def record_adc_ranges(record: OperatorQuantConfig, calibration: MapCalibration) -> np.ndarray:
    """A crossbar MAC record's ADC ranges ``(T, S, P)``, as ``cim.json`` gives them for its layout."""
    spec, layout = calibration.spec, record.cim.layout
    input_bits = record.inputs[0].bits
    grid = adc_grid(layout.depth, input_bits, layout.weight_bits, spec, weight_min=layout.weight_min)
    return adc_ranges(record.name, spec, calibration, grid, layout.weight_bits, input_bits)


def check_record_gains(record: OperatorQuantConfig, calibration: MapCalibration) -> None:
    """Check that a crossbar MAC record's ADC (bits, levels, range, gains) is what ``cim.json`` gives.

    Raises:
        ArtifactError: naming the record and the field that differs.
    """
    entry = record.cim
    if entry is None:
        return
    spec = calibration.spec
    where = f"{QUANTINFO}: record {record.name!r}: field 'cim.adc'"
    if entry.adc is None or spec.adc_bits is None:
        if (entry.adc is None) != (spec.adc_bits is None):
            raise ArtifactError(f"{where} is {'null' if entry.adc is None else 'set'}, but {CIM_FILE} has "
                                f"adc_bits={spec.adc_bits}; the map's files disagree")
        return
    levels = int(spec.adc_levels)
    stored = (entry.adc.bits, entry.adc.levels, entry.adc.range, entry.adc.fraction_bits)
    expected = (spec.adc_bits, levels, spec.adc_range, ADC_FRACTION_BITS)
    if stored != expected:
        raise ArtifactError(f"{where}: bits, levels, range, fraction_bits are {stored}; {CIM_FILE} gives {expected}; "
                            "the map's files disagree")
    if entry.adc.gains != placement_gains(record_adc_ranges(record, calibration), levels):
        raise ArtifactError(f"{where}.gains differ from round(r / {levels} * 2^{ADC_FRACTION_BITS}) of the ADC ranges "
                            f"r that {CIM_FILE} gives; the map's files disagree")


def check_records_gains(quantinfo: Mapping[str, OperatorQuantConfig], calibration: MapCalibration) -> None:
    """:func:`check_record_gains` for every record of a map."""
    for record in quantinfo.values():
        check_record_gains(record, calibration)


def check_settings_spec(settings: Mapping[str, Any], calibration: MapCalibration) -> None:
    """Check that the manifest's ``settings.cim`` (absent for a map quantized without ``cim=``) is ``cim.json``'s spec.

    Raises:
        ArtifactError: naming the field and both specs.
    """
    given = settings.get("cim")
    if given is not None and given != calibration.spec.to_dict():
        raise ArtifactError(f"{MANIFEST}: field 'settings.cim' is {given}, but {CIM_FILE} holds the spec "
                            f"{calibration.spec}; the map's files disagree")
