"""The operators a quantized PPQ graph leaves in float, each with why (see :mod:`maptools.quantization.floatops`)."""

from __future__ import annotations

from collections.abc import Collection

from maptools.quantization.engine.facade import (
    BaseGraph,
    Operation,
    QuantableOperation,
    TargetPlatform,
)
from maptools.quantization.floatops import (
    DISPATCHED,
    FINAL_CONCAT,
    FOLLOWS_FLOAT,
    RECURRENT,
    RECURRENT_TYPES,
    SHAPE,
    not_quantizable,
)

__all__ = ["float_operators"]


def _reason(op: Operation, quantizable: Collection[str], final_nodes: Collection[str],
            floats: Collection[str]) -> str:
    if op.platform == TargetPlatform.SOI:
        return SHAPE
    if op.name in final_nodes:
        return FINAL_CONCAT
    if op.type in RECURRENT_TYPES:
        return RECURRENT
    if any(var.source_op is not None and var.source_op.name in floats for var in op.inputs):
        return FOLLOWS_FLOAT
    if op.type not in quantizable:
        return not_quantizable(op.type)
    return DISPATCHED


def float_operators(graph: BaseGraph, quantizable: Collection[str],
                    final_nodes: Collection[str] = ()) -> list[dict[str, str]]:
    """Every operator of a quantized graph without quantization, in graph order, with why.

    Args:
        graph: The quantized PPQ graph.
        quantizable: The operator types the quantizer quantizes.
        final_nodes: The nodes kept in float around final Concats (:mod:`.outputs`).

    Returns:
        ``[{"node", "op_type", "reason"}, ...]``.
    """
    floats = {op.name for op in graph.operations.values() if not isinstance(op, QuantableOperation)}
    return [{"node": op.name, "op_type": op.type, "reason": _reason(op, quantizable, final_nodes, floats)}
            for op in graph.topological_sort() if op.name in floats]
