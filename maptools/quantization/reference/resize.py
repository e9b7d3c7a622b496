"""``Resize`` (opset 11 and later): nearest on the integers, linear in float64, anything else generic.

Nearest-neighbour resizing copies input values, so it keeps the integers and their quantization (exact).
Linear resizing interpolates the real values axis by axis (n-linear interpolation is separable) and the
core requantizes the result to the operator's record. Both follow the ONNX coordinate transformation
modes ``half_pixel``, ``pytorch_half_pixel``, ``align_corners``, ``asymmetric``,
``tf_half_pixel_for_nn`` and ``half_pixel_symmetric``, with ``scales`` or ``sizes``. Other modes
(``cubic``, ``tf_crop_and_resize``, ``antialias``, ``axes``, ``keep_aspect_ratio_policy``) and opset 10
go to the generic float handler.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import onnx

from maptools.quantization.reference.generic import prepare_generic, run_generic
from maptools.quantization.reference.registry import Executor, attrs, int_list, register, string_attr
from maptools.quantization.reference.values import Ints, Value, real

__all__ = ["resize", "source_coordinates"]

_COORDINATE_MODES = frozenset({"half_pixel", "pytorch_half_pixel", "align_corners", "asymmetric",
                               "tf_half_pixel_for_nn", "half_pixel_symmetric"})


def _native(node_attrs: dict[str, Any], opset: int) -> bool:
    """Whether the dedicated handler implements these attributes."""
    return (opset >= 11
            and string_attr(node_attrs, "mode", "nearest") in ("nearest", "linear")
            and string_attr(node_attrs, "coordinate_transformation_mode", "half_pixel") in _COORDINATE_MODES
            and not int(node_attrs.get("antialias", 0)) and "axes" not in node_attrs
            and string_attr(node_attrs, "keep_aspect_ratio_policy", "stretch") == "stretch")


def _prepare_resize(executor: Executor, node: onnx.NodeProto) -> Any:
    """None for the dedicated handler, else the generic handler's evaluator.

    An empty constant ``roi`` is left out of the evaluated node (onnx 1.14's reference Resize indexes it).
    """
    if _native(attrs(node), executor.opset):
        return None
    roi = executor.initializers.get(node.input[1]) if len(node.input) > 1 and node.input[1] else None
    if roi is not None and roi.size == 0:
        inputs = list(node.input)
        inputs[1] = ""
        evaluated = onnx.NodeProto()
        evaluated.CopyFrom(node)
        del evaluated.input[:]
        evaluated.input.extend(inputs)
        return prepare_generic(executor, evaluated)
    return prepare_generic(executor, node)


def source_coordinates(mode: str, out_size: int, in_size: int, scale: float) -> np.ndarray:
    """The input coordinate of every output index along one axis (ONNX ``coordinate_transformation_mode``)."""
    x = np.arange(out_size, dtype=np.float64)
    if mode == "align_corners":
        return np.zeros(out_size) if out_size == 1 else x * (in_size - 1) / (out_size - 1)
    if mode == "asymmetric":
        return x / scale
    if mode == "tf_half_pixel_for_nn":
        return (x + 0.5) / scale
    if mode == "pytorch_half_pixel":
        return np.zeros(out_size) if out_size == 1 else (x + 0.5) / scale - 0.5
    if mode == "half_pixel_symmetric":
        offset = in_size / 2 * (1 - out_size / (scale * in_size))
        return offset + (x + 0.5) / scale - 0.5
    return (x + 0.5) / scale - 0.5  # half_pixel


def _nearest_index(coords: np.ndarray, mode: str, in_size: int) -> np.ndarray:
    """The nearest input index of every coordinate (ONNX ``nearest_mode``), clamped to the input."""
    floor = np.floor(coords)
    frac = coords - floor
    if mode == "floor":
        index = floor
    elif mode == "ceil":
        index = np.ceil(coords)
    elif mode == "round_prefer_ceil":
        index = np.where(frac >= 0.5, floor + 1, floor)
    else:  # round_prefer_floor
        index = np.where(frac > 0.5, floor + 1, floor)
    return np.clip(index, 0, in_size - 1).astype(np.intp)


def _output_geometry(shape: tuple[int, ...], args: list[Value | None]) -> tuple[list[int], list[float]]:
    """Output sizes and per-axis scales from the ``sizes`` or ``scales`` input."""
    sizes = int_list(args[3]) if len(args) > 3 and args[3] is not None else None
    if sizes:
        return sizes, [out / size for out, size in zip(sizes, shape, strict=True)]
    scales = [float(s) for s in np.asarray(real(args[2])).reshape(-1)]
    return [int(np.floor(size * scale)) for size, scale in zip(shape, scales, strict=True)], scales


@register("Resize", kind="integer", prepare=_prepare_resize)
def resize(executor: Executor, node: onnx.NodeProto, args: list[Value | None], state: Any) -> list[Value]:
    """Nearest resize of the integers, linear resize of the real values (see the module documentation)."""
    if state is not None:
        return run_generic(executor, node, args, state)
    node_attrs = attrs(node)
    coordinate_mode = string_attr(node_attrs, "coordinate_transformation_mode", "half_pixel")
    x = args[0]
    data = x.q if isinstance(x, Ints) else real(x)
    out_sizes, scales = _output_geometry(data.shape, args)
    if string_attr(node_attrs, "mode", "nearest") == "nearest":
        nearest_mode = string_attr(node_attrs, "nearest_mode", "round_prefer_floor")
        for axis, (out, size, scale) in enumerate(zip(out_sizes, data.shape, scales, strict=True)):
            if out != size or scale != 1.0:
                coords = source_coordinates(coordinate_mode, out, size, scale)
                data = np.take(data, _nearest_index(coords, nearest_mode, size), axis=axis)
        return [x.with_q(data, raw=False) if isinstance(x, Ints) else data]
    result = x.real() if isinstance(x, Ints) else np.asarray(data, dtype=np.float64)
    for axis, (out, size, scale) in enumerate(zip(out_sizes, result.shape, scales, strict=True)):
        if out == size and scale == 1.0:
            continue
        coords = np.clip(source_coordinates(coordinate_mode, out, size, scale), 0, size - 1)
        low = np.floor(coords).astype(np.intp)
        high = np.minimum(low + 1, size - 1)
        shape = [1] * result.ndim
        shape[axis] = out
        weight = (coords - low).reshape(shape)
        result = np.take(result, low, axis=axis) * (1.0 - weight) + np.take(result, high, axis=axis) * weight
    return [result]
