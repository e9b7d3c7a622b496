"""The arithmetic of a compute-in-memory crossbar, for simulating a quantized map on CIM hardware.

A CIM chip does not sum ``w * x`` exactly: weights are split into cell-sized slices over several columns,
inputs are applied a few bits per cycle, long dot products are cut into row tiles, and every column's
partial sum goes through an ADC before the digital shift-and-add. This package models that arithmetic
with numpy only (no PPQ, no torch), for the integer reference executor and for the mapper:

* :mod:`~maptools.quantization.cim.spec`: :class:`~maptools.quantization.cim.spec.CIMSpec`, the crossbar
  parameters;
* :mod:`~maptools.quantization.cim.mapping`: the placement of a MAC's weights on arrays
  (:func:`~maptools.quantization.cim.mapping.tile_layout`) and their slices
  (:func:`~maptools.quantization.cim.mapping.slice_weights`);
* :mod:`~maptools.quantization.cim.arithmetic`:
  :func:`~maptools.quantization.cim.arithmetic.cim_accumulate`, the accumulator the chip computes, a
  drop-in for :func:`maptools.quantization.reference.mac.accumulate`;
* :mod:`~maptools.quantization.cim.adc` and :mod:`~maptools.quantization.cim.calibrate`: the ADC and the
  calibration of its ranges from data (:func:`~maptools.quantization.cim.calibrate.calibrate_adc`,
  :class:`~maptools.quantization.cim.adc.AdcCalibration`);
* :mod:`~maptools.quantization.cim.requant`: integer-only requantization (fixed-point and power-of-two
  multipliers).

Everything is re-exported here: ``from maptools.quantization.cim import CIMSpec, cim_accumulate``.

.. code-block:: python

    import numpy as np
    from maptools.quantization.cim import CIMSpec, cim_accumulate

    spec = CIMSpec.parse("rows=256,cell_bits=2,dac_bits=1,adc_bits=6")
    rng = np.random.default_rng(0)
    weights = rng.integers(-8, 8, size=(64, 576))      # 4-bit weights, M x K
    columns = rng.integers(0, 16, size=(576, 3136))    # 4-bit unsigned inputs, K x P
    acc = cim_accumulate(weights, columns, input_bits=4, input_signed=False, weight_bits=4, spec=spec)

See :doc:`/cim` for the hardware model, every formula and a worked example.

This package imports only numpy and :mod:`maptools.errors` (its parent package
:mod:`maptools.quantization` currently imports the PPQ/torch front end on import).
"""

from __future__ import annotations

from maptools.quantization.cim.adc import (
    ADC_FRACTION_BITS,
    AdcCalibration,
    adc_codes,
    adc_convert,
    adc_gain,
    full_scale_ranges,
)
from maptools.quantization.cim.arithmetic import (
    InputFormat,
    PartialSums,
    adc_grid,
    cim_accumulate,
    input_format,
    partial_sums,
)
from maptools.quantization.cim.calibrate import CALIBRATION_METHODS, calibrate_adc, choose_range
from maptools.quantization.cim.mapping import (
    MAC_OPS,
    ArrayTile,
    TileLayout,
    WeightFormat,
    combine_slices,
    mac_matrix,
    slice_weights,
    tile_layout,
    weight_format,
)
from maptools.quantization.cim.requant import (
    fixed_point_multiplier,
    power_of_two_multiplier,
    requant_multiplier,
    requant_multipliers,
    requantize,
    requantize_fixed,
)
from maptools.quantization.cim.spec import ADC_RANGES, REQUANT_MODES, WEIGHT_ENCODINGS, CIMSpec

__all__ = [
    "ADC_FRACTION_BITS",
    "ADC_RANGES",
    "CALIBRATION_METHODS",
    "MAC_OPS",
    "REQUANT_MODES",
    "WEIGHT_ENCODINGS",
    "AdcCalibration",
    "ArrayTile",
    "CIMSpec",
    "InputFormat",
    "PartialSums",
    "TileLayout",
    "WeightFormat",
    "adc_codes",
    "adc_convert",
    "adc_gain",
    "adc_grid",
    "calibrate_adc",
    "choose_range",
    "cim_accumulate",
    "combine_slices",
    "fixed_point_multiplier",
    "full_scale_ranges",
    "input_format",
    "mac_matrix",
    "partial_sums",
    "power_of_two_multiplier",
    "requant_multiplier",
    "requant_multipliers",
    "requantize",
    "requantize_fixed",
    "slice_weights",
    "tile_layout",
    "weight_format",
]
