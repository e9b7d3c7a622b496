"""Layout operators: they move, copy or drop values without computing, so they act on the integers directly.

``Identity``, ``Flatten``, ``Reshape``, ``Transpose``, ``Squeeze``, ``Unsqueeze``, ``Slice``, ``Split``,
``Pad`` (constant with a value on the integer grid, edge, reflect, wrap; negative pads crop),
``Concat`` of equally quantized inputs and ``ScatterND`` of equally quantized data and updates keep their
input's quantization. ``Concat`` and ``ScatterND`` of differently quantized inputs and ``Pad`` with a value
off the grid fall back to the real values, which the core requantizes to the operator's record.
``Constant`` produces its tensor.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import numpy as np
import onnx
from onnx import numpy_helper

from maptools.errors import UnsupportedOperatorError
from maptools.quantization.reference.registry import Executor, attrs, describe, int_list, register, string_attr
from maptools.quantization.reference.values import Ints, Value, real, same_scale

__all__ = ["concat", "constant", "flatten", "identity", "pad", "reshape", "scatter_nd", "slice_", "split",
           "squeeze", "transpose", "unsqueeze"]


def _layout(x: Value | None, fn: Callable[[np.ndarray], np.ndarray]) -> Value:
    """``fn`` applied to the integers of ``x`` (same quantization), or to its real values."""
    if isinstance(x, Ints):
        return x.with_q(fn(x.q))
    return fn(real(x))


def _axes(node: onnx.NodeProto, args: list[Value | None]) -> list[int] | None:
    """Axes from the second input (opset 13) or the ``axes`` attribute."""
    if len(args) > 1 and args[1] is not None:
        return int_list(args[1])
    axes = attrs(node).get("axes")
    return None if axes is None else [int(v) for v in axes]


@register("Identity", kind="integer")
def identity(executor: Executor, node: onnx.NodeProto, args: list[Value | None], state: Any) -> list[Value]:
    """The input itself."""
    return [_layout(args[0], lambda a: a)]


@register("Flatten", kind="integer")
def flatten(executor: Executor, node: onnx.NodeProto, args: list[Value | None], state: Any) -> list[Value]:
    """Reshape to 2-D at ``axis``."""
    axis = int(attrs(node).get("axis", 1))

    def flatten_(a: np.ndarray) -> np.ndarray:
        ax = axis + a.ndim if axis < 0 else axis
        return a.reshape(int(np.prod(a.shape[:ax], dtype=np.int64)), -1)

    return [_layout(args[0], flatten_)]


@register("Reshape", kind="integer")
def reshape(executor: Executor, node: onnx.NodeProto, args: list[Value | None], state: Any) -> list[Value]:
    """Reshape (0 copies the input dim unless ``allowzero``)."""
    shape = int_list(args[1]) or []
    allowzero = int(attrs(node).get("allowzero", 0))

    def reshape_(a: np.ndarray) -> np.ndarray:
        target = [a.shape[i] if (s == 0 and not allowzero) else s for i, s in enumerate(shape)]
        return a.reshape(target)

    return [_layout(args[0], reshape_)]


@register("Transpose", kind="integer")
def transpose(executor: Executor, node: onnx.NodeProto, args: list[Value | None], state: Any) -> list[Value]:
    """Permute the axes (reversed without ``perm``)."""
    perm = attrs(node).get("perm")
    return [_layout(args[0], lambda a: np.transpose(a, perm))]


@register("Squeeze", kind="integer")
def squeeze(executor: Executor, node: onnx.NodeProto, args: list[Value | None], state: Any) -> list[Value]:
    """Drop axes of size one."""
    axes = _axes(node, args)
    return [_layout(args[0], lambda a: np.squeeze(a, axis=None if axes is None else tuple(axes)))]


@register("Unsqueeze", kind="integer")
def unsqueeze(executor: Executor, node: onnx.NodeProto, args: list[Value | None],
              state: Any) -> list[Value]:
    """Insert axes of size one."""
    axes = _axes(node, args) or []

    def unsqueeze_(a: np.ndarray) -> np.ndarray:
        rank = a.ndim + len(axes)
        return np.expand_dims(a, tuple(ax + rank if ax < 0 else ax for ax in axes))

    return [_layout(args[0], unsqueeze_)]


@register("Slice", kind="integer")
def slice_(executor: Executor, node: onnx.NodeProto, args: list[Value | None], state: Any) -> list[Value]:
    """Strided slice (starts, ends, axes, steps from inputs or, before opset 10, attributes)."""
    node_attrs = attrs(node)

    def ints(index: int, key: str) -> list[int] | None:
        if len(args) > index and args[index] is not None:
            return int_list(args[index])
        return None if key not in node_attrs else [int(v) for v in node_attrs[key]]

    starts, ends = ints(1, "starts"), ints(2, "ends")
    axes, steps = ints(3, "axes"), ints(4, "steps")

    def slice_values(a: np.ndarray) -> np.ndarray:
        index = [slice(None)] * a.ndim
        for k, (start, end) in enumerate(zip(starts, ends, strict=True)):
            axis = axes[k] if axes is not None else k
            step = steps[k] if steps is not None else 1
            index[axis] = slice(start, end, step)
        return a[tuple(index)]

    return [_layout(args[0], slice_values)]


@register("Split", kind="integer")
def split(executor: Executor, node: onnx.NodeProto, args: list[Value | None], state: Any) -> list[Value]:
    """Split along ``axis`` by the ``split`` sizes (input or attribute), else into equal parts."""
    node_attrs = attrs(node)
    x = args[0]
    shape = (x.q if isinstance(x, Ints) else real(x)).shape
    axis = int(node_attrs.get("axis", 0))
    axis = axis + len(shape) if axis < 0 else axis
    sizes = int_list(args[1]) if len(args) > 1 and args[1] is not None else node_attrs.get("split")
    if not sizes:
        parts = int(node_attrs.get("num_outputs", len(node.output)))
        size = -(-shape[axis] // parts)  # ceil: the last part is smaller when the axis does not divide
        sizes = [size] * (parts - 1) + [shape[axis] - size * (parts - 1)]
    bounds = np.cumsum([0, *sizes])
    outputs = []
    for start, stop in zip(bounds[:-1], bounds[1:], strict=True):
        index = (slice(None),) * axis + (slice(int(start), int(stop)),)
        outputs.append(_layout(x, lambda a, index=index: a[index]))
    return outputs


@register("Pad", kind="integer")
def pad(executor: Executor, node: onnx.NodeProto, args: list[Value | None], state: Any) -> list[Value]:
    """Pad (or crop, for negative pads) on the integers; a constant off the integer grid pads real values."""
    node_attrs = attrs(node)
    mode = string_attr(node_attrs, "mode", "constant")
    if mode not in ("constant", "edge", "reflect", "wrap"):
        raise UnsupportedOperatorError(f"{describe(node)}: Pad mode {mode!r} is not supported")
    x = args[0]
    data = x.q if isinstance(x, Ints) else real(x)
    pads = int_list(args[1]) if len(args) > 1 and args[1] is not None else [int(v) for v in node_attrs["pads"]]
    value = float(np.asarray(real(args[2])).reshape(-1)[0]) if len(args) > 2 and args[2] is not None \
        else float(node_attrs.get("value", 0.0))
    half = len(pads) // 2
    axes = int_list(args[3]) if len(args) > 3 and args[3] is not None else list(range(half))
    widths = [(0, 0)] * data.ndim
    for k, axis in enumerate(axes):
        widths[axis + data.ndim if axis < 0 else axis] = (pads[k], pads[k + half])
    crop = tuple(slice(max(0, -b), n - max(0, -e)) for (b, e), n in zip(widths, data.shape, strict=True))
    widths = [(max(0, b), max(0, e)) for b, e in widths]

    def pad_values(a: np.ndarray, fill: float | int) -> np.ndarray:
        a = a[crop]
        if mode == "constant":
            return np.pad(a, widths, constant_values=fill)
        return np.pad(a, widths, mode=mode)

    if isinstance(x, Ints):
        level = value / x.scale + x.zero_point
        if mode != "constant" or (level == round(level) and x.qmin <= level <= x.qmax):  # the value is on the grid
            return [x.with_q(pad_values(x.q, int(round(level)) if mode == "constant" else 0))]
        return [pad_values(x.real(), value)]
    if np.issubdtype(data.dtype, np.floating):
        return [pad_values(data.astype(np.float64), value)]
    return [pad_values(data, data.dtype.type(value))]


@register("Concat", kind="integer")
def concat(executor: Executor, node: onnx.NodeProto, args: list[Value | None], state: Any) -> list[Value]:
    """Concatenate integers of one quantization; otherwise the real values (requantized to the record)."""
    axis = int(attrs(node)["axis"])
    parts = [a for a in args if a is not None]
    first = parts[0]
    if all(isinstance(p, Ints) for p in parts) and all(
        same_scale(p.scale, first.scale) and p.zero_point == first.zero_point for p in parts
    ):
        q = np.concatenate([p.q for p in parts], axis=axis)
        return [first.with_q(q, qmin=min(p.qmin for p in parts), qmax=max(p.qmax for p in parts), raw=False)]
    return [np.concatenate([real(p) for p in parts], axis=axis)]


_SCATTER_REDUCTIONS = {"add": np.add, "mul": np.multiply, "max": np.maximum, "min": np.minimum}


@register("ScatterND", kind="integer")
def scatter_nd(executor: Executor, node: onnx.NodeProto, args: list[Value | None],
               state: Any) -> list[Value]:
    """Write ``updates`` at ``indices`` (on the integers when data and updates share one quantization).

    Not left to :mod:`onnx.reference`, whose ScatterND indexes wrongly before onnx 1.15.
    """
    data, updates = args[0], args[2]
    index = tuple(np.moveaxis(np.asarray(args[1]).astype(np.int64), -1, 0))
    reduction = string_attr(attrs(node), "reduction", "none")
    if reduction not in ("none", *_SCATTER_REDUCTIONS):
        raise UnsupportedOperatorError(f"{describe(node)}: ScatterND reduction {reduction!r} is not supported")
    if reduction == "none" and isinstance(data, Ints) and isinstance(updates, Ints) and same_scale(
            data.scale, updates.scale) and data.zero_point == updates.zero_point:
        q = data.q.copy()
        q[index] = updates.q
        return [data.with_q(q, qmin=min(data.qmin, updates.qmin), qmax=max(data.qmax, updates.qmax), raw=False)]
    values = real(data)
    out = values.astype(np.float64) if np.issubdtype(values.dtype, np.floating) else values.copy()
    new = real(updates).astype(out.dtype)
    if reduction == "none":
        out[index] = new
    else:
        _SCATTER_REDUCTIONS[reduction].at(out, index, new)
    return [out]


def _prepare_constant(executor: Executor, node: onnx.NodeProto) -> np.ndarray:
    node_attrs = attrs(node)
    if "value" in node_attrs:
        return numpy_helper.to_array(node_attrs["value"])
    for key, dtype in (("value_float", np.float32), ("value_floats", np.float32), ("value_int", np.int64),
                       ("value_ints", np.int64)):
        if key in node_attrs:
            return np.asarray(node_attrs[key], dtype=dtype)
    raise UnsupportedOperatorError(f"{describe(node)}: Constant with a string or sparse value is not supported")


@register("Constant", kind="integer", prepare=_prepare_constant)
def constant(executor: Executor, node: onnx.NodeProto, args: list[Value | None],
             state: np.ndarray) -> list[Value]:
    """The constant tensor."""
    return [state]
