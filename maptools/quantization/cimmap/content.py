"""What ``quantize(..., cim=spec)`` adds to a map: the crossbar placement, ADC parameters and integer requantization.

:func:`map_cim_content` runs on the artifacts ``quantize`` has built in memory, before anything is written: it
builds the integer reference executor from them, calibrates the ADC ranges on calibration batches
(:func:`~maptools.quantization.cimmap.mapcal.calibrate_map`, only for ``adc_range='calibrated'`` with
``adc_bits`` set) and returns

* the :class:`~maptools.quantization.cim.mapcalibration.MapCalibration` stored as ``cim.json`` (for a spec without
  calibrated ranges, the spec alone: ``simulate(mapname, inputs, cim=True)`` then runs that crossbar);
* every crossbar MAC's record with its ``cim`` field set (:func:`record_cim`);
* ``quantparams.pkl`` with the weight slices of every crossbar MAC
  (:func:`~maptools.quantization.format.weight_slices_key`) and, when ``spec.requant`` is not ``'float'``,
  its int32 multipliers and shifts (:func:`~maptools.quantization.format.requant_multiplier_key`,
  :func:`~maptools.quantization.format.requant_shift_key`).

A record's ``cim`` field is a :class:`~maptools.quantization.placement.CrossbarPlacement`, pickled as the
plain data (dicts, lists, numbers, strings) of its ``to_dict``, so ``quantinfo.pkl`` stays loadable by the
restricted unpickler:

.. code-block:: python

    {"file": "cim.json",             # the map's spec and calibration (histogram statistics included)
     "layout": {"op_type": "Conv", "weight_shape": [16, 8, 3, 3], "trans_b": False, "weight_bits": 4,
                "weight_min": -7, "encoding": "differential", "signs": 2, "slices": 2, "cell_bits": 2,
                "offset": 0, "columns_per_weight": 4, "groups": 1, "out_channels": 16, "depth": 72,
                "row_tiles": 1, "channels_per_array": 64, "col_tiles": 1, "arrays": 1, "utilization": 0.07},
     "input_planes": 4,              # P = ceil(input_bits / dac_bits)
     "adc": {"bits": 6, "range": "calibrated", "levels": 63, "fraction_bits": 16,
             "gains": [[[...]]]},    # (row tiles, slices, planes): g = round(r / levels * 2^16), integers
     "weight_slices": "conv1_conv_weight_slices",
     "requant": {"mode": "fixed_point", "multiplier": "conv1_conv_requant_multiplier",
                 "shift": "conv1_conv_requant_shift"}}

Each fact is stored once: the spec and the calibrated ADC ranges ``r`` live in ``cim.json``, and
:func:`resolve_record_cim` gives a record's entry with its ``spec`` and ``adc.ranges`` (``(row tiles, slices,
planes)``, the ADC full-scale partial sums) resolved from it. Older 1.2 maps copied both into every record;
they load as they are. The gains are derived from the ranges and stored for the converter, which reads the
records and not ``cim.json``;
:func:`~maptools.quantization.cim.derived.check_record_gains` checks that they equal their derivation.

``adc`` is None for an ideal ADC (``adc_bits=None``); ``requant`` is None for ``requant='float'`` and for a MAC
the executor requantizes in float in every mode (no output record, a bias left in float, a Gemm with
``alpha`` or ``beta`` other than 1; see :mod:`~maptools.quantization.reference.crossbar`).
"""

from __future__ import annotations

import dataclasses
import itertools
import logging
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any

import numpy as np
import onnx

from maptools.errors import InvalidArgumentError
from maptools.quantization.cim.adc import ADC_FRACTION_BITS
from maptools.quantization.cim.arithmetic import adc_grid
from maptools.quantization.cim.cost import MapCost
from maptools.quantization.cim.derived import adc_ranges, placement_gains, record_adc_ranges
from maptools.quantization.cim.mapcalibration import MapCalibration
from maptools.quantization.cim.requant import requant_multiplier
from maptools.quantization.cim.spec import CIMSpec
from maptools.quantization.cim.tiles import TileLayout
from maptools.quantization.cimmap.mapcal import calibrate_map, map_weight_slices
from maptools.quantization.cimmap.mapcost import mac_layout, map_cost
from maptools.quantization.format import (
    CIM_FILE,
    requant_multiplier_key,
    requant_shift_key,
    weight_slices_key,
)
from maptools.quantization.placement import AdcGains, CrossbarLayout, CrossbarPlacement, RequantKeys
from maptools.quantization.records import OperatorQuantConfig
from maptools.quantization.reference.crossbar import MacOperands, record_multipliers
from maptools.quantization.reference.executor import ReferenceExecutor
from maptools.quantization.reference.registry import attrs

__all__ = ["CIM_CALIB_BATCHES", "CimContent", "map_cim_content", "record_cim",
           "requant_arrays", "resolve_record_cim"]

logger = logging.getLogger(__name__)

#: The most calibration batches ``quantize(..., cim=)`` calibrates the ADC ranges on: the first ones of the
#: batches PPQ calibrated on (the integer executor costs one float pass per MAC and batch).
CIM_CALIB_BATCHES = 8


@dataclass
class CimContent:
    """The CIM content of a map, made in memory before the map is written.

    Attributes:
        calibration: What ``cim.json`` holds.
        quantinfo: The records, crossbar MACs with their ``cim`` field set (the others unchanged).
        quantparams: The integers, with the weight slices and the requantization multipliers added.
        calib_batches: The batches the ADC ranges were calibrated on (0 when nothing was calibrated).
        cost: The crossbar cost of every MAC per input sample (``report.json``'s ``cim_cost``), counted on the
            first calibration batch.
    """

    calibration: MapCalibration
    quantinfo: dict[str, OperatorQuantConfig]
    quantparams: dict[str, np.ndarray | None]
    calib_batches: int
    cost: MapCost | None = None


def _crossbar_layout(layout: TileLayout, trans_b: bool) -> CrossbarLayout:
    fmt = layout.format
    return CrossbarLayout(
        op_type=layout.op_type, weight_shape=tuple(layout.weight_shape), trans_b=trans_b, weight_bits=fmt.bits,
        weight_min=fmt.weight_min, encoding=fmt.encoding, signs=fmt.signs, slices=fmt.slices, cell_bits=fmt.cell_bits,
        offset=fmt.offset, columns_per_weight=fmt.columns_per_weight, groups=layout.groups,
        out_channels=layout.out_channels, depth=layout.depth, row_tiles=layout.row_tiles,
        channels_per_array=layout.channels_per_array, col_tiles=layout.col_tiles, arrays=layout.num_arrays,
        utilization=float(layout.utilization))


def _integer_requant(node: onnx.NodeProto, record: OperatorQuantConfig, has_int_bias: bool) -> bool:
    """Whether the executor requantizes this MAC with integers in a fixed-point or power-of-two spec."""
    if not record.outputs or record.outputs[0] is None:
        return False  # a fused activation reads the real accumulator
    has_bias_input = len(node.input) > 2 and bool(node.input[2])
    if has_bias_input and not has_int_bias:
        return False  # a bias left in float
    node_attrs = attrs(node)
    return not (node.op_type == "Gemm"
                and (float(node_attrs.get("alpha", 1.0)) != 1.0 or float(node_attrs.get("beta", 1.0)) != 1.0))


def requant_arrays(record: OperatorQuantConfig, mode: str) -> tuple[np.ndarray, np.ndarray]:
    """The int32 multiplier and shift of every weight scale of a MAC record (:mod:`~maptools.quantization.cim.requant`).

    ``m = s_in * s_w / s_out`` with the record's input, weight and output scales, one per entry of
    ``weight_scale``, as the executor requantizes.
    """
    multiplier, shift = requant_multiplier(record_multipliers(record.inputs[0].scale, record), mode)
    return multiplier.astype(np.int32), shift.astype(np.int32)


def resolve_record_cim(record: OperatorQuantConfig, calibration: MapCalibration) -> CrossbarPlacement | None:
    """A record's ``cim`` entry with the facts kept once in ``cim.json`` filled in: ``spec`` and ``adc.ranges``.

    Args:
        record: A record of the map (an entry of an older map, which copied both, is returned as it is).
        calibration: The map's ``cim.json`` (:func:`~maptools.quantization.cim.mapcalibration.read_map_calibration`).
    """
    entry = record.cim
    if entry is None or (entry.spec is not None and (entry.adc is None or entry.adc.ranges is not None)):
        return entry
    adc = entry.adc
    if adc is not None:
        ranges = np.asarray(record_adc_ranges(record, calibration), np.float64).tolist()
        adc = dataclasses.replace(adc, ranges=tuple(tuple(tuple(row) for row in plane) for plane in ranges))
    return dataclasses.replace(entry, spec=calibration.spec.to_dict(), adc=adc)


def record_cim(node: onnx.NodeProto, operands: MacOperands, weight: np.ndarray, spec: CIMSpec,
               calibration: MapCalibration, requant: bool) -> CrossbarPlacement:
    """A crossbar MAC record's ``cim`` field (see the module docstring).

    Args:
        node: The MAC node.
        operands: Its crossbar operands.
        weight: Its integer weight (ONNX layout).
        spec: The crossbar.
        calibration: The map's calibration (its ranges are used when the spec's are calibrated).
        requant: Whether integer multipliers were stored for it.
    """
    layout = mac_layout(node, operands, weight, spec)
    grid = adc_grid(layout.depth, operands.input_bits, operands.weight_bits, spec, weight_min=operands.weight_min)
    adc = None
    if spec.adc_bits is not None:
        levels = int(spec.adc_levels)
        ranges = adc_ranges(node.name, spec, calibration, grid, operands.weight_bits, operands.input_bits)
        adc = AdcGains(bits=spec.adc_bits, range=spec.adc_range, levels=levels, fraction_bits=ADC_FRACTION_BITS,
                       gains=placement_gains(ranges, levels))
    return CrossbarPlacement(
        file=CIM_FILE, input_planes=grid[2], layout=_crossbar_layout(layout, bool(int(attrs(node).get("transB", 0)))),
        adc=adc, weight_slices=weight_slices_key(node.name, node.op_type),
        requant=None if not requant else RequantKeys(mode=spec.requant,
                                                     multiplier=requant_multiplier_key(node.name, node.op_type),
                                                     shift=requant_shift_key(node.name, node.op_type)))


def map_cim_content(model: onnx.ModelProto, quantinfo: Mapping[str, OperatorQuantConfig],
                    quantparams: Mapping[str, np.ndarray | None], spec: CIMSpec, calibset: Iterable[Any], *,
                    method: str = "mse", max_batches: int = CIM_CALIB_BATCHES) -> CimContent:
    """The CIM content of in-memory artifacts (see the module docstring).

    Args:
        model: The QDQ model.
        quantinfo: The records.
        quantparams: The integer weights and biases.
        spec: The crossbar (checked as ``quantize`` checks its ``cim``).
        calibset: Calibration batches; the first ``max_batches`` calibrate the ADC ranges of a calibrated spec.
        method: How the ADC ranges are chosen (``'mse'`` or ``'percentile'``).
        max_batches: The most batches calibrated on.

    Raises:
        InvalidArgumentError: the map has no crossbar MAC, or no calibration batch.
    """
    executor = ReferenceExecutor(model, quantinfo, quantparams)
    if not executor.crossbar_nodes:
        raise InvalidArgumentError("cim: the quantized model has no MAC with a constant, quantized weight (nothing "
                                   "runs on crossbars); quantize without cim")
    batches = 0
    chosen = list(itertools.islice(calibset, max_batches))
    if not chosen:
        raise InvalidArgumentError("calibset: holds no batch; expected at least one batch of the map's inputs")
    if spec.adc_bits is not None and spec.adc_range == "calibrated":
        calibration = calibrate_map(executor, chosen, spec, method=method)
        batches = len(chosen)
    else:
        calibration = MapCalibration(spec=spec, adc={}, method=method, batches=0, fingerprint=executor.fingerprint)
    params: dict[str, np.ndarray | None] = dict(quantparams)
    params.update(map_weight_slices(executor, spec))
    info = dict(quantinfo)
    for node, operands in executor.crossbar_operands():
        record = info[node.name]
        state = executor.mac_weights(node)
        requant = spec.requant != "float" and _integer_requant(node, record, state.bias is not None)
        if requant:
            multiplier, shift = requant_arrays(record, spec.requant)
            params[requant_multiplier_key(node.name, node.op_type)] = multiplier
            params[requant_shift_key(node.name, node.op_type)] = shift
        info[node.name] = dataclasses.replace(
            record, cim=record_cim(node, operands, state.weight, spec, calibration, requant))
    logger.info("CIM content for %s: %d crossbar MACs, %d arrays, ADC ranges %s", spec, len(executor.crossbar_nodes),
                sum(info[n.name].cim.layout.arrays for n in executor.crossbar_nodes),
                f"calibrated on {batches} batches" if batches else spec.adc_range if spec.adc_bits else "ideal")
    cost = map_cost(executor, spec, batch=chosen[0])
    return CimContent(calibration=calibration, quantinfo=info, quantparams=params, calib_batches=batches, cost=cost)
