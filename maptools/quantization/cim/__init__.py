"""The arithmetic of a compute-in-memory crossbar, for simulating a quantized map on CIM hardware.

A CIM chip does not sum ``w * x`` exactly: weights are split into cell-sized slices over several columns,
inputs are applied a few bits per cycle, long dot products are cut into row tiles, and every column's
partial sum goes through an ADC before the digital shift-and-add. This package models that arithmetic
with numpy only (no PPQ, no torch), for the integer reference executor and for the mapper:

* :mod:`~maptools.quantization.cim.spec`: :class:`~maptools.quantization.cim.spec.CIMSpec`, the crossbar
  parameters;
* :mod:`~maptools.quantization.cim.tiles` and :mod:`~maptools.quantization.cim.slicing`: the placement of a
  MAC's weights on arrays (:func:`~maptools.quantization.cim.tiles.tile_layout`) and their slices
  (:func:`~maptools.quantization.cim.slicing.slice_weights`);
* :mod:`~maptools.quantization.cim.arithmetic`:
  :func:`~maptools.quantization.cim.arithmetic.cim_accumulate`, the accumulator the chip computes, a
  drop-in for :func:`maptools.quantization.reference.mac.accumulate`;
* :mod:`~maptools.quantization.cim.adc` and :mod:`~maptools.quantization.cim.calibrate`: the ADC and the
  calibration of its ranges from data (:func:`~maptools.quantization.cim.calibrate.calibrate_adc`,
  :class:`~maptools.quantization.cim.adc.AdcCalibration`);
* :mod:`~maptools.quantization.cim.requant`: integer-only requantization (fixed-point and power-of-two
  multipliers);
* :mod:`~maptools.quantization.cim.cost`: what a layer costs on crossbars (arrays, cells, ADC conversions, DAC
  drives, energy, latency and area estimates);
* :mod:`~maptools.quantization.cim.device` and :mod:`~maptools.quantization.cim.analog`: the analog cells'
  non-idealities (:class:`~maptools.quantization.cim.device.DeviceModel`) and one MAC's cells on a simulated
  chip (:class:`~maptools.quantization.cim.analog.AnalogMac`);
* :mod:`~maptools.quantization.cim.mapcalibration`: the ADC calibration of every MAC of a map as plain data
  (:class:`~maptools.quantization.cim.mapcalibration.MapCalibration`) and its reading from a map's ``cim.json``.

The executor runs a map on a crossbar with ``simulate(mapname, inputs, cim=spec)`` (see
:mod:`maptools.quantization.reference.crossbar`); the features that drive it over a whole map (calibration,
cost, sweeps, Monte-Carlo) are one layer up, in :mod:`maptools.quantization.cimmap`.

The names above are exported here: ``from maptools.quantization.cim import CIMSpec, cim_accumulate``.

.. code-block:: python

    import numpy as np
    from maptools.quantization.cim import CIMSpec, cim_accumulate

    spec = CIMSpec.parse("rows=256,cell_bits=2,dac_bits=1,adc_bits=6")
    rng = np.random.default_rng(0)
    weights = rng.integers(-8, 8, size=(64, 576))      # 4-bit weights, M x K
    columns = rng.integers(0, 16, size=(576, 3136))    # 4-bit unsigned inputs, K x P
    acc = cim_accumulate(weights, columns, input_bits=4, input_signed=False, weight_bits=4, spec=spec)

See :doc:`/cim` for the hardware model, every formula and a worked example.

This package imports numpy and the lowest layer of maptools only (errors, the map format); it sits below the
reference executor (``tests/test_structure.py`` holds the layer table).
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
from maptools.quantization.cim.analog import AnalogMac, child_seed
from maptools.quantization.cim.arithmetic import (
    InputFormat,
    PartialSums,
    adc_grid,
    cim_accumulate,
    input_format,
    partial_sums,
)
from maptools.quantization.cim.calibrate import CALIBRATION_METHODS, AdcHistogram, calibrate_adc, choose_range
from maptools.quantization.cim.cost import (
    CIMCostParams,
    LayerCost,
    MapCost,
    adc_area,
    adc_energy,
    adc_latency,
    cell_read_energy,
    layer_cost,
)
from maptools.quantization.cim.device import DeviceModel
from maptools.quantization.cim.mapcalibration import (
    CIM_FORMAT,
    MapCalibration,
    has_map_calibration,
    read_map_calibration,
)
from maptools.quantization.cim.requant import (
    fixed_point_multiplier,
    power_of_two_multiplier,
    requant_multiplier,
    requant_multipliers,
    requantize,
    requantize_fixed,
)
from maptools.quantization.cim.slicing import WeightFormat, combine_slices, slice_weights, weight_format
from maptools.quantization.cim.spec import ADC_RANGES, REQUANT_MODES, WEIGHT_ENCODINGS, CIMSpec
from maptools.quantization.cim.tiles import ArrayTile, TileLayout, mac_matrix, tile_layout

__all__ = [
    "ADC_FRACTION_BITS",
    "ADC_RANGES",
    "CALIBRATION_METHODS",
    "CIM_FORMAT",
    "REQUANT_MODES",
    "WEIGHT_ENCODINGS",
    "AdcCalibration",
    "AdcHistogram",
    "AnalogMac",
    "ArrayTile",
    "CIMCostParams",
    "CIMSpec",
    "DeviceModel",
    "InputFormat",
    "LayerCost",
    "MapCalibration",
    "MapCost",
    "PartialSums",
    "TileLayout",
    "WeightFormat",
    "adc_area",
    "adc_codes",
    "adc_convert",
    "adc_energy",
    "adc_gain",
    "adc_grid",
    "adc_latency",
    "calibrate_adc",
    "cell_read_energy",
    "child_seed",
    "choose_range",
    "cim_accumulate",
    "combine_slices",
    "fixed_point_multiplier",
    "full_scale_ranges",
    "has_map_calibration",
    "input_format",
    "layer_cost",
    "mac_matrix",
    "partial_sums",
    "power_of_two_multiplier",
    "read_map_calibration",
    "requant_multiplier",
    "requant_multipliers",
    "requantize",
    "requantize_fixed",
    "slice_weights",
    "tile_layout",
    "weight_format",
]
