"""The weight slices of every crossbar MAC of a map, as the mapper programs them."""

from __future__ import annotations

import os

import numpy as np

from maptools.errors import InvalidTypeError
from maptools.quantization.cim.slicing import slice_weights
from maptools.quantization.cim.spec import CIMSpec
from maptools.quantization.cimmap.mapcal.histograms import MapSource, _executor
from maptools.quantization.format import weight_slices_key

__all__ = ["map_weight_slices"]


def map_weight_slices(source: MapSource, spec: CIMSpec, *,
                      mapsave_dir: str | os.PathLike | None = None) -> dict[str, np.ndarray]:
    """The cell digits of every crossbar MAC's weights, as the mapper programs them.

    Args:
        source: A map name or a :class:`~maptools.quantization.reference.executor.ReferenceExecutor`.
        spec: The crossbar (``cell_bits`` and ``weight_encoding`` are used).
        mapsave_dir: The mapsave directory of a map name.

    Returns:
        ``{<node>_conv_weight_slices | <node>_gemm_weight_slices: uint8 digits}`` (the quantparams key of the
        weight with ``_slices`` appended, :func:`~maptools.quantization.format.weight_slices_key`), each
        ``(signs, S, *weight.shape)`` in the ONNX layout of the weight
        (:func:`~maptools.quantization.cim.slicing.slice_weights`; place them on arrays with
        :func:`~maptools.quantization.cim.tiles.tile_layout`).

    Raises:
        MapNotFoundError: no such map.
        InvalidArgumentError: a weight outside its record's range.
    """
    if not isinstance(spec, CIMSpec):
        raise InvalidTypeError(f"spec: got {type(spec).__name__}, expected a CIMSpec")
    executor = _executor(source, mapsave_dir)
    slices = {}
    for node, operands in executor.crossbar_operands():
        weight = executor.mac_weights(node).weight
        slices[weight_slices_key(node.name, node.op_type)] = slice_weights(weight, operands.weight_bits, spec,
                                                                          weight_min=operands.weight_min)
    return slices
