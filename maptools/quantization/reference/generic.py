"""The generic float handler: any listed ONNX operator, evaluated by :mod:`onnx.reference` in float64.

Operators without an integer meaning of their own (``Softmax``, ``PRelu``, ``Erf``, reductions...) and the
shape arithmetic exporters leave in graphs with dynamic dims (``Shape``, ``Gather``, ``Range``,
``Expand``, ``Where``...) all run here: quantized inputs are dequantized to float64, float inputs widened
to float64, integer and bool tensors (shapes, indices, masks) passed as they are; the node is evaluated
by a single-node :class:`onnx.reference.ReferenceEvaluator`, built once per node when the map is loaded,
at the model's opset. The results come back as they are (float64, or integers for shape operators); the
core then requantizes them where the node has a quantinfo record, like every other float operator.

:data:`GENERIC_OPS` lists the operator types accepted: the types of :data:`CANDIDATE_OPS` that the installed
onnx implements. Control flow (``If``, ``Loop``, ``Scan``), random generators, sequences, optionals,
strings and the integer-quantized operators (``QLinearConv``...) are not candidates: the executor refuses
them when the map is loaded.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np
import onnx
from onnx import helper

from maptools.errors import UnsupportedOperatorError
from maptools.quantization.reference.registry import Executor, describe, register
from maptools.quantization.reference.values import Ints, Param, Value

if TYPE_CHECKING:
    from onnx.reference import ReferenceEvaluator


__all__ = ["CANDIDATE_OPS", "GENERIC_OPS", "GenericNode", "float_inputs", "prepare_generic", "run_generic"]

logger = logging.getLogger(__name__)

#: Operator types the generic handler may serve (none has a dedicated handler); :data:`GENERIC_OPS` keeps
#: those the installed onnx implements.
CANDIDATE_OPS = frozenset({
    # element-wise functions
    "Abs", "Neg", "Exp", "Log", "Sqrt", "Reciprocal", "Pow", "Erf", "Floor", "Ceil", "Round", "Sign",
    "Sin", "Cos", "Softplus", "Softsign", "Elu", "Selu", "Celu", "LeakyRelu", "PRelu", "ThresholdedRelu",
    "Mish", "Gelu", "Max", "Min", "Mean", "Sum", "Mod", "Dropout",
    # comparisons and logic
    "Equal", "Greater", "GreaterOrEqual", "Less", "LessOrEqual", "And", "Or", "Not", "Xor", "Where",
    "IsNaN", "IsInf",
    # normalizations
    "Softmax", "LogSoftmax", "Hardmax", "InstanceNormalization", "LayerNormalization",
    "LpNormalization", "LRN",
    # reductions
    "ReduceMean", "ReduceMax", "ReduceMin", "ReduceSum", "ReduceProd", "ReduceL1", "ReduceL2",
    "ReduceSumSquare", "ReduceLogSumExp", "ArgMax", "ArgMin", "GlobalMaxPool", "CumSum", "TopK",
    # shapes, indices and data movement
    "Shape", "Size", "Gather", "GatherElements", "GatherND", "ScatterElements", "Range",
    "Expand", "ConstantOfShape", "Cast", "CastLike", "Tile", "NonZero", "DepthToSpace", "SpaceToDepth",
    "Trilu", "OneHot",
})


def _implemented(op_type: str) -> bool:
    """Whether the installed :mod:`onnx.reference` evaluates ``op_type`` (natively or by its function body)."""
    from onnx.reference.ops import load_op

    try:
        load_op("", op_type)
        return True
    except Exception:  # not a plain implementation: maybe a function body
        try:
            schema = onnx.defs.get_schema(op_type)
        except Exception:  # no such schema
            return False
        return bool(schema.has_function or schema.has_context_dependent_function)


def float_inputs(value: Value | None) -> np.ndarray | None:
    """A value as the generic handler feeds it: real float64 for quantized/float tensors, else unchanged."""
    if value is None:
        return None
    if isinstance(value, (Ints, Param)):
        return value.real()
    array = np.asarray(value)
    return array.astype(np.float64) if np.issubdtype(array.dtype, np.floating) else array


@dataclass(frozen=True)
class GenericNode:
    """What the generic handler prepares for one node.

    Attributes:
        evaluator: The single-node evaluator.
        inputs: The tensor names it is fed (the node's non-empty inputs).
        coerce_axis: For ``Softmax``/``LogSoftmax``/``Hardmax`` before opset 13, the axis at which the input
            is coerced to 2-D (the evaluator then runs the opset-13 operator on axis 1, which
            :mod:`onnx.reference` implements for every opset); None otherwise.
    """

    evaluator: ReferenceEvaluator
    inputs: frozenset[str]
    coerce_axis: int | None = None


_COERCED_TO_2D = frozenset({"Softmax", "LogSoftmax", "Hardmax"})


def prepare_generic(executor: Executor, node: onnx.NodeProto) -> GenericNode:
    """Build the single-node evaluator of ``node`` at the model's opset.

    Raises:
        UnsupportedOperatorError: the node has a subgraph, or :mod:`onnx.reference` cannot build it.
    """
    from onnx.reference import ReferenceEvaluator

    if any(a.type in (onnx.AttributeProto.GRAPH, onnx.AttributeProto.GRAPHS) for a in node.attribute):
        raise UnsupportedOperatorError(f"{describe(node)}: operators with subgraphs are not supported")
    coerce_axis = None
    if node.op_type in _COERCED_TO_2D and executor.opset < 13:
        coerce_axis = next((int(a.i) for a in node.attribute if a.name == "axis"), 1)
        evaluated = helper.make_node(node.op_type, list(node.input), list(node.output), name=node.name, axis=1)
    else:
        evaluated = node
    names = list(dict.fromkeys(name for name in node.input if name))
    graph = helper.make_graph(
        [evaluated], f"generic_{node.op_type}",
        [helper.make_value_info(name, onnx.TypeProto()) for name in names],
        [helper.make_value_info(name, onnx.TypeProto()) for name in node.output if name],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", executor.opset)])
    try:
        return GenericNode(ReferenceEvaluator(model), frozenset(names), coerce_axis)
    except Exception as exc:
        raise UnsupportedOperatorError(
            f"{describe(node)}: onnx.reference cannot evaluate this node ({type(exc).__name__}: {exc})"
        ) from None


def run_generic(executor: Executor, node: onnx.NodeProto, args: list[Value | None],
                state: GenericNode) -> list[Value]:
    """Evaluate ``node`` on float64 (real) inputs with its prepared evaluator."""
    feeds = {name: float_inputs(value) for name, value in zip(node.input, args, strict=False) if name in state.inputs}
    if state.coerce_axis is None:
        return [np.asarray(result) for result in state.evaluator.run(None, feeds)]
    x = feeds[node.input[0]]
    axis = state.coerce_axis + x.ndim if state.coerce_axis < 0 else state.coerce_axis
    rows = int(np.prod(x.shape[:axis], dtype=np.int64))
    (result,) = state.evaluator.run(None, {node.input[0]: x.reshape(rows, -1)})
    return [np.asarray(result).reshape(x.shape)]


#: Operator types served by the generic float handler (with the installed onnx).
GENERIC_OPS: frozenset[str] = frozenset(op for op in CANDIDATE_OPS if _implemented(op))

register(*sorted(GENERIC_OPS), kind="generic", prepare=prepare_generic)(run_generic)
