"""Quantization boundaries: ``QuantizeLinear -> [Clip] -> DequantizeLinear``, and ``Clip`` itself."""

from __future__ import annotations

from typing import Any

import numpy as np
import onnx

from maptools.errors import ArtifactError
from maptools.quantization.artifacts import QUANTMODEL
from maptools.quantization.records import TensorQuant
from maptools.quantization.reference.registry import Executor, attrs, describe, register
from maptools.quantization.reference.values import (
    Ints,
    Param,
    Value,
    real,
    requantize,
    same_scale,
    same_zero_point,
)

__all__ = ["clip", "dequantize_linear", "quantize_linear"]


def _prepare_quantize(executor: Executor, node: onnx.NodeProto) -> TensorQuant:
    return executor.resolve_boundary(node)


@register("QuantizeLinear", kind="integer", prepare=_prepare_quantize)
def quantize_linear(executor: Executor, node: onnx.NodeProto, args: list[Value | None],
                    state: TensorQuant) -> list[Value]:
    """Quantize to the boundary's record (exact when the input already holds those integers)."""
    out = requantize(args[0], state)
    out.raw = True
    return [out]


@register("DequantizeLinear", kind="integer")
def dequantize_linear(executor: Executor, node: onnx.NodeProto, args: list[Value | None],
                      state: Any) -> list[Value]:
    """End of a boundary (the integers become an activation), or an integer initializer (a :class:`Param`)."""
    x = args[0]
    scale = np.asarray(args[1])
    zp = np.asarray(args[2]) if len(args) > 2 and args[2] is not None else np.zeros_like(scale, dtype=np.int64)
    if isinstance(x, Ints):
        per_channel = x.axis is not None
        axis = int(attrs(node).get("axis", 1)) if scale.size > 1 else None
        if axis is not None and axis < 0:
            axis += x.q.ndim
        if (per_channel and axis != x.axis) or (not per_channel and scale.size != 1) \
                or not same_scale(scale if per_channel else float(scale.reshape(-1)[0]), x.scale) \
                or not same_zero_point(zp if per_channel else zp.reshape(-1)[:1], x.zero_point):
            raise ArtifactError(
                f"{QUANTMODEL}: {describe(node)} dequantizes with other numbers than its QuantizeLinear"
            )
        return [x.with_q(x.q, raw=False)]
    if node.input[0] in executor.initializers:
        axis = int(attrs(node).get("axis", 1)) if scale.size > 1 else None
        q = np.asarray(x)
        if axis is not None and axis < 0:
            axis += q.ndim
        return [Param(node.input[0], q.astype(np.int64), scale.reshape(-1), zp.reshape(-1), axis)]
    raise ArtifactError(f"{QUANTMODEL}: {describe(node)} dequantizes a tensor that is not quantized")


@register("Clip", kind="float")
def clip(executor: Executor, node: onnx.NodeProto, args: list[Value | None], state: Any) -> list[Value]:
    """The integer Clip of a boundary (on the raw integers), else a float64 clip of the real values."""
    x = args[0]
    if isinstance(x, Ints) and x.raw:  # the integer Clip of a QuantizeLinear -> Clip -> DequantizeLinear chain
        lo = int(np.asarray(args[1]).reshape(-1)[0]) if len(args) > 1 and args[1] is not None else x.qmin
        hi = int(np.asarray(args[2]).reshape(-1)[0]) if len(args) > 2 and args[2] is not None else x.qmax
        return [x.with_q(np.clip(x.q, lo, hi), qmin=max(lo, x.qmin), qmax=min(hi, x.qmax))]
    node_attrs = attrs(node)
    if isinstance(x, np.ndarray) and not np.issubdtype(x.dtype, np.floating):  # shape arithmetic
        lo = args[1] if len(args) > 1 and args[1] is not None else np.iinfo(np.int64).min
        hi = args[2] if len(args) > 2 and args[2] is not None else np.iinfo(np.int64).max
        return [np.clip(x, lo, hi).astype(x.dtype)]
    lo = real(args[1]) if len(args) > 1 and args[1] is not None else node_attrs.get("min", -np.inf)
    hi = real(args[2]) if len(args) > 2 and args[2] is not None else node_attrs.get("max", np.inf)
    return [np.clip(real(x).astype(np.float64), lo, hi)]
