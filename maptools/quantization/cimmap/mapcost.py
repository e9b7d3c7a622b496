"""The crossbar cost of a whole map: :func:`map_cost`, one :class:`~maptools.quantization.cim.cost.LayerCost` per MAC.

The output positions of a MAC (pixels of a Conv's output, rows of a Gemm) are read from the columns the
integer executor hands the crossbar (its MAC hook), on one batch of the map's input shape, so they are those
the simulation computes; the rest comes from the layout (:mod:`~maptools.quantization.cim.cost`).
"""

from __future__ import annotations

import logging
import math
import os
from collections.abc import Mapping
from typing import Any

import numpy as np
import onnx

from maptools.errors import InvalidArgumentError, InvalidTypeError
from maptools.quantization.artifacts import MapContents, read_map
from maptools.quantization.cim.cost import CIMCostParams, MapCost, layer_cost
from maptools.quantization.cim.mapcalibration import MapCalibration
from maptools.quantization.cim.spec import CIMSpec
from maptools.quantization.cim.tiles import TileLayout, tile_layout
from maptools.quantization.reference.crossbar import MacOperands
from maptools.quantization.reference.executor import ReferenceExecutor
from maptools.quantization.reference.registry import attrs

__all__ = ["mac_layout", "mac_positions", "map_cost"]

logger = logging.getLogger(__name__)


def mac_layout(node: onnx.NodeProto, operands: MacOperands, weight: np.ndarray, spec: CIMSpec) -> TileLayout:
    """The tile layout of one crossbar MAC (its ``group`` and ``transB`` attributes read from the node)."""
    node_attrs = attrs(node)
    group = int(node_attrs.get("group", 1)) if node.op_type in ("Conv", "ConvTranspose") else 1
    return tile_layout(weight.shape, node.op_type, group, operands.weight_bits, spec,
                       trans_b=bool(int(node_attrs.get("transB", 0))), weight_min=operands.weight_min)


def mac_positions(executor: ReferenceExecutor, batch: Mapping[str, Any] | Any) -> dict[str, int]:
    """Output positions of every crossbar MAC on one batch: node name -> positions (all samples of the batch).

    A MAC run more than once in a forward (none today) counts every run.
    """
    positions: dict[str, int] = {}

    def hook(operands: MacOperands, weights: np.ndarray, columns: np.ndarray) -> None:
        matrices = math.prod(weights.shape[:-2])
        count = columns.size // (weights.shape[-1] * matrices)  # columns (..., K, P): K * P per matrix
        positions[operands.node] = positions.get(operands.node, 0) + int(count)

    executor.with_cim(None, mac_hook=hook).run(batch)
    return positions


def _sample_batch(executor: ReferenceExecutor, shapes: Mapping[str, list[int]]) -> tuple[dict[str, np.ndarray], int]:
    """Zeros of the map's input shapes with one sample (the whole batch if the model fixes it), and its samples."""
    one = {name: np.zeros([1, *shape[1:]], np.float32) for name, shape in shapes.items()}
    try:
        executor.check_inputs(one)
        return one, 1
    except InvalidArgumentError:  # a fixed batch axis: count the map's batch and divide by it
        first = next(iter(shapes.values()))
        return {name: np.zeros(shape, np.float32) for name, shape in shapes.items()}, int(first[0])


def map_cost(source: str | MapContents | ReferenceExecutor, spec: CIMSpec | None = None,
             params: CIMCostParams | None = None, *, batch: Mapping[str, Any] | Any = None, samples: int | None = None,
             mapsave_dir: str | os.PathLike | None = None) -> MapCost:
    """The cost per input sample of every crossbar MAC of a map on ``spec``.

    Args:
        source: A map name, a map already read (:func:`~maptools.quantization.read_map`), or a
            :class:`~maptools.quantization.reference.executor.ReferenceExecutor` (with ``batch``).
        spec: The crossbar; None for the map's own (its ``cim.json``).
        params: The component parameters (default :class:`~maptools.quantization.cim.cost.CIMCostParams`).
        batch: One batch to count the positions on; None for zeros of the map's input shapes (one sample
            when the model's batch axis allows it).
        samples: Samples in ``batch`` (default: its first input's leading size).
        mapsave_dir: The mapsave directory of a map name.

    Raises:
        InvalidArgumentError: No spec and no ``cim.json``, a map without crossbar MACs, an executor without
            ``batch``, or positions that are not a multiple of ``samples``.
        InvalidTypeError: ``spec`` or ``params`` of the wrong type.
    """
    if spec is not None and not isinstance(spec, CIMSpec):
        raise InvalidTypeError(f"spec: got {type(spec).__name__}, expected a CIMSpec or None (the map's cim.json)")
    if params is not None and not isinstance(params, CIMCostParams):
        raise InvalidTypeError(f"params: got {type(params).__name__}, expected a CIMCostParams or None")
    if isinstance(source, ReferenceExecutor):
        executor = source
        if batch is None or spec is None:
            raise InvalidArgumentError("map_cost: an executor needs batch= (one batch of its inputs) and spec=")
    elif isinstance(source, (str, MapContents)):
        # the spec, graph and shapes of one snapshot of the map
        contents = source if isinstance(source, MapContents) else read_map(source, mapsave_dir, complete=True)
        if spec is None:
            if contents.cim is None:
                raise InvalidArgumentError(f"spec: got None for map {contents.mapname!r}, which has no cim.json; "
                                           "expected a CIMSpec (the crossbar to cost it on)")
            spec = MapCalibration.from_dict(contents.cim).spec
        executor = ReferenceExecutor.from_files(contents.mapname, contents.files)
        if batch is None:
            batch, samples = _sample_batch(executor, contents.manifest["settings"]["input_shapes"])
    else:
        raise InvalidTypeError(f"map: got {type(source).__name__}, expected a map name or a ReferenceExecutor")
    if not executor.crossbar_nodes:
        raise InvalidArgumentError("map: has no MAC with a constant, quantized weight (nothing runs on crossbars)")
    if samples is None:
        first = next(iter(executor.check_inputs(batch).values()))
        samples = int(first.shape[0]) if first.ndim else 1
    positions = mac_positions(executor, batch)
    layers = []
    for node, operands in executor.crossbar_operands():
        total = positions[node.name]
        if total % samples:
            raise InvalidArgumentError(f"samples: {node.name!r} has {total} output positions on the batch, not a "
                                       f"multiple of samples={samples}")
        layout = mac_layout(node, operands, executor.mac_weights(node).weight, spec)
        record = executor.record(node)
        layers.append(layer_cost(layout, input_bits=operands.input_bits, positions=total // samples, params=params,
                                 output_bits=record.output_bits if record is not None else None, node=node.name))
    cost = MapCost(spec=spec, params=params or CIMCostParams(), layers=layers, samples=samples)
    logger.info("CIM cost on %s: %d MACs, %d ADC conversions, %.3g J per sample", spec, len(layers),
                cost.total("adc_conversions"), cost.total("energy_j"))
    return cost
