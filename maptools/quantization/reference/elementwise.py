"""Arithmetic: ``Add``, ``Sub``, ``Mul``, ``Div`` and the inference ``BatchNormalization``.

On activations they dequantize the inputs, compute in float64 and leave the requantization to the core
(the operator's record). On integer tensors that are not quantized (shape arithmetic) the binary
operators compute in integers, ``Div`` truncating toward zero like ONNX.

``BatchNormalization`` left unfolded has a dedicated handler because :mod:`onnx.reference` runs opsets
9 to 13 of it in training mode (batch statistics).
"""

from __future__ import annotations

from typing import Any

import numpy as np
import onnx

from maptools.errors import UnsupportedOperatorError
from maptools.quantization.reference.registry import Executor, attrs, describe, register
from maptools.quantization.reference.values import Value, real

__all__ = ["batch_normalization", "binary"]

_FLOAT = {"Add": np.add, "Sub": np.subtract, "Mul": np.multiply, "Div": np.divide}


def _integer_div(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Integer division truncating toward zero (C semantics, as ONNX Div on integers)."""
    quotient = np.floor_divide(a, b)
    adjust = (np.remainder(a, b) != 0) & ((a < 0) ^ (b < 0))
    return quotient + adjust.astype(quotient.dtype)


def _is_plain_integer(value: Value | None) -> bool:
    return isinstance(value, np.ndarray) and (np.issubdtype(value.dtype, np.integer) or value.dtype == np.bool_)


@register(*_FLOAT, kind="float")
def binary(executor: Executor, node: onnx.NodeProto, args: list[Value | None], state: Any) -> list[Value]:
    """``a <op> b`` in float64 on the real values, or in integers for two unquantized integer tensors."""
    if _is_plain_integer(args[0]) and _is_plain_integer(args[1]):
        a, b = np.asarray(args[0]), np.asarray(args[1])
        if node.op_type == "Div":
            return [_integer_div(a, b).astype(a.dtype)]
        return [_FLOAT[node.op_type](a, b).astype(a.dtype)]
    a, b = (real(v).astype(np.float64) for v in args[:2])
    return [_FLOAT[node.op_type](a, b)]


def _prepare_batch_normalization(executor: Executor, node: onnx.NodeProto) -> None:
    if int(attrs(node).get("training_mode", 0)) or len([name for name in node.output if name]) > 1:
        raise UnsupportedOperatorError(f"{describe(node)}: BatchNormalization in training mode is not supported")


@register("BatchNormalization", kind="float", prepare=_prepare_batch_normalization)
def batch_normalization(executor: Executor, node: onnx.NodeProto, args: list[Value | None],
                        state: Any) -> list[Value]:
    """``scale * (x - mean) / sqrt(var + epsilon) + bias`` per channel (axis 1), in float64."""
    x = real(args[0]).astype(np.float64)
    shape = (-1,) + (1,) * (x.ndim - 2)
    scale, bias, mean, var = (real(v).astype(np.float64).reshape(shape) for v in args[1:5])
    epsilon = float(attrs(node).get("epsilon", 1e-5))
    return [scale * (x - mean) / np.sqrt(var + epsilon) + bias]
