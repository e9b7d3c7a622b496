"""Pooling: ``MaxPool`` on the integers (exact); ``AveragePool`` and ``GlobalAveragePool`` in float64.

The averages are taken of the centred integers ``q - zero_point`` and scaled, then requantized by the
core to the operator's record.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import onnx

from maptools.errors import UnsupportedOperatorError
from maptools.quantization.reference.registry import Executor, attrs, describe, register
from maptools.quantization.reference.spatial import pool, spatial_pads
from maptools.quantization.reference.values import Ints, Value, real

__all__ = ["average_pool", "global_average_pool", "max_pool"]


def _prepare_pool(executor: Executor, node: onnx.NodeProto) -> None:
    kernel = attrs(node).get("kernel_shape")
    if kernel is not None and len(kernel) > 2:
        raise UnsupportedOperatorError(
            f"{describe(node)}: {len(kernel)}-D kernels are not supported by the integer reference executor "
            "(1-D and 2-D only)"
        )
    if node.op_type == "MaxPool" and len(node.output) > 1 and node.output[1]:
        raise UnsupportedOperatorError(f"{describe(node)}: MaxPool indices output is not supported")


def _geometry(node_attrs: dict[str, Any], shape: tuple[int, ...]) -> tuple[list[int], list[int], list[int], list[int]]:
    kernel = list(node_attrs["kernel_shape"])
    dims = len(kernel)
    strides = list(node_attrs.get("strides", [1] * dims))
    dilations = list(node_attrs.get("dilations", [1] * dims))
    pads = spatial_pads(node_attrs, list(shape[2:]), kernel, strides, dilations)
    return kernel, strides, dilations, pads


@register("MaxPool", kind="integer", prepare=_prepare_pool)
def max_pool(executor: Executor, node: onnx.NodeProto, args: list[Value | None], state: Any) -> list[Value]:
    """Window maximum of the integers (pads never win)."""
    node_attrs = attrs(node)
    x = args[0]
    data = x.q if isinstance(x, Ints) else real(x)
    kernel, strides, dilations, pads = _geometry(node_attrs, data.shape)
    low = np.iinfo(np.int64).min if isinstance(x, Ints) else -np.inf
    out = pool(data, kernel, strides, pads, dilations, bool(node_attrs.get("ceil_mode", 0)), np.maximum, low)
    return [x.with_q(out) if isinstance(x, Ints) else out]


@register("AveragePool", kind="float", prepare=_prepare_pool)
def average_pool(executor: Executor, node: onnx.NodeProto, args: list[Value | None],
                 state: Any) -> list[Value]:
    """Window mean in float64 (``count_include_pad``, ``ceil_mode`` as ONNX)."""
    node_attrs = attrs(node)
    x = args[0]
    data = x.centred() if isinstance(x, Ints) else real(x).astype(np.float64)
    kernel, strides, dilations, pads = _geometry(node_attrs, data.shape)
    ceil_mode = bool(node_attrs.get("ceil_mode", 0))
    total = pool(data, kernel, strides, pads, dilations, ceil_mode, np.add, 0.0)
    ones = np.ones((1, 1) + data.shape[2:], dtype=np.float64)
    include = float(bool(node_attrs.get("count_include_pad", 0)))
    count = pool(ones, kernel, strides, pads, dilations, ceil_mode, np.add, include, 0.0)
    mean = total / count
    return [x.scale * mean if isinstance(x, Ints) else mean]


@register("GlobalAveragePool", kind="float")
def global_average_pool(executor: Executor, node: onnx.NodeProto, args: list[Value | None],
                        state: Any) -> list[Value]:
    """Mean over the spatial axes in float64."""
    x = args[0]
    axes = tuple(range(2, np.ndim(x.q if isinstance(x, Ints) else real(x))))
    if isinstance(x, Ints):
        return [x.scale * x.centred().mean(axis=axes, keepdims=True)]
    return [real(x).astype(np.float64).mean(axis=axes, keepdims=True)]
