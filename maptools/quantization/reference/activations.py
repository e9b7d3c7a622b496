"""Activation functions: ``Relu`` on the integers; ``Sigmoid``, ``HardSigmoid``, ``HardSwish``, ``Tanh`` in float64.

The float activations read the dequantized input, or the real accumulator of a MAC whose output has no
record (an activation fused into it); the core requantizes their result to the activation's record.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

import numpy as np
import onnx

from maptools.quantization.reference.registry import Executor, attrs, register
from maptools.quantization.reference.values import Ints, Value, real

__all__ = ["FLOAT_ACTIVATIONS", "float_activation", "relu"]


@register("Relu", kind="integer")
def relu(executor: Executor, node: onnx.NodeProto, args: list[Value | None], state: Any) -> list[Value]:
    """``max(q, zero_point)`` on integers (exact), ``max(x, 0)`` on float tensors."""
    x = args[0]
    if isinstance(x, Ints):
        return [x.with_q(np.maximum(x.q, x.zero_point), qmin=max(x.qmin, x.zero_point))]
    return [np.maximum(real(x), 0.0)]


def _hard_sigmoid(x: np.ndarray, node_attrs: Mapping[str, Any]) -> np.ndarray:
    return np.clip(float(node_attrs.get("alpha", 0.2)) * x + float(node_attrs.get("beta", 0.5)), 0.0, 1.0)


#: Activation functions computed in float64 on the dequantized input (or on a fused MAC's accumulator).
FLOAT_ACTIVATIONS: dict[str, Callable[[np.ndarray, Mapping[str, Any]], np.ndarray]] = {
    "Sigmoid": lambda x, node_attrs: 0.5 * (1.0 + np.tanh(0.5 * x)),  # 1 / (1 + exp(-x)), without overflow
    "HardSigmoid": _hard_sigmoid,
    "HardSwish": lambda x, node_attrs: x * np.clip(x / 6.0 + 0.5, 0.0, 1.0),
    "Tanh": lambda x, node_attrs: np.tanh(x),
}


@register(*FLOAT_ACTIVATIONS, kind="float")
def float_activation(executor: Executor, node: onnx.NodeProto, args: list[Value | None],
                     state: Any) -> list[Value]:
    """The activation in float64 on the real input."""
    return [FLOAT_ACTIVATIONS[node.op_type](real(args[0]).astype(np.float64), attrs(node))]
