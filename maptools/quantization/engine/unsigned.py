"""Which activation tensors may use the unsigned integer range.

A symmetric ``b``-bit activation spans ``-2^(b-1) .. 2^(b-1)-1``: a tensor that is never negative (a ReLU,
ReLU6 or sigmoid output, a max-pool of one...) then uses only the upper half, one bit of its resolution
wasted. Quantized over ``0 .. 2^b-1`` with zero point 0 it keeps ``real = scale * integer`` and gains that
bit back, which matters most at 4 bits and below. A CIM crossbar's input DACs are unsigned anyway.

Non-negativity is decided from the graph's structure, never from the calibration data (a tensor that
happened to be non-negative on the calibration batches may not be on others):

* an operator whose output is non-negative by definition (``Relu``, ``Sigmoid``, ``Softmax``, a ``Clip``
  whose lower bound is a constant >= 0...);
* an operator that keeps the sign of its data input (pooling, reshaping, slicing, resizing...) fed by a
  non-negative tensor;
* ``Add``, ``Mul``, ``Concat``... all of whose inputs are non-negative (constants by their values).

Swish-like activations are bounded below by a small negative number: ``x * sigmoid(x) >= -0.279`` (SiLU, fused
by PPQ), ``x * hardsigmoid(x) >= -0.375`` (HardSwish), GELU ``>= -0.17``, Mish ``>= -0.31``. Their outputs, and
what carries them on (pooling, reshaping...), also go on the unsigned range, with the small zero point
calibration gives them (a few steps above 0): a signed range would spend a whole bit on a negative lobe a
fraction of a step deep (what that gains: :ref:`bench-recipes`).

PPQ then shares one scale between tensors it aligns (the inputs of a residual ``Add``, the inputs and
output of a ``Concat``, a pooling's input and output, a Conv's output fused with its activation): all the
tensors of such a group share one integer range too, unsigned only if every one of them is non-negative.
A Conv output fused into its activation (so never materialized) takes the activation's range.
"""

from __future__ import annotations

from collections.abc import Iterable

import numpy as np

from maptools.quantization.engine.facade import (
    PASSIVE_OPERATIONS,
    TYPES_FOR_ALIGNMENT,
    BaseGraph,
    Operation,
    Variable,
)
from maptools.quantization.engine.fusion import GATES, fused_activation, gated_activations

__all__ = ["BOUNDED_BELOW_TYPES", "NON_NEGATIVE_TYPES", "SIGN_PRESERVING_TYPES", "non_negative_variables",
           "unsigned_variables"]

#: Operators whose output is never negative.
NON_NEGATIVE_TYPES = frozenset({"Relu", "Sigmoid", "HardSigmoid", "Softmax", "Softplus", "Abs", "Exp"})
#: Operators whose output is never below a small negative bound (Swish-like activations as one operator; the
#: ``x * gate(x)`` forms are found by :func:`~maptools.quantization.engine.fusion.gated_activations`).
BOUNDED_BELOW_TYPES = frozenset({"HardSwish", "Gelu", "Mish", "Swish"})
#: Operators whose output is non-negative when their data input (input 0) is.
SIGN_PRESERVING_TYPES = frozenset({
    "MaxPool", "GlobalMaxPool", "AveragePool", "GlobalAveragePool", "Flatten", "Reshape", "Transpose",
    "Squeeze", "Unsqueeze", "Identity", "Dropout", "Resize", "Upsample", "Slice", "Split", "DepthToSpace",
    "SpaceToDepth", "ReduceMax", "ReduceMin", "ReduceMean", "Gather", "Tile", "Expand", "Relu6",
})
#: Operators whose output is non-negative when every input is.
ALL_INPUTS_TYPES = frozenset({"Add", "Mul", "Concat", "Sum", "Max", "Min", "Mean"})


def _constant_min(var: Variable | None) -> float | None:
    """Smallest value of a constant input, None when it is not a constant."""
    if var is None or not var.is_parameter or var.value is None:
        return None
    value = np.asarray(var.value.detach().cpu().numpy() if hasattr(var.value, "detach") else var.value)
    return float(value.min()) if value.size else 0.0


def _input(op: Operation, index: int) -> Variable | None:
    return op.inputs[index] if index < len(op.inputs) and op.inputs[index] is not None else None


def _is_non_negative_output(op: Operation, known: set[str]) -> bool:
    def non_negative(var: Variable | None) -> bool:
        if var is None:
            return False
        if var.is_parameter:
            low = _constant_min(var)
            return low is not None and low >= 0.0
        return var.name in known

    if op.type in NON_NEGATIVE_TYPES:
        return True
    if op.type == "Clip":
        low = _constant_min(_input(op, 1)) if _input(op, 1) is not None else op.attributes.get("min")
        return low is not None and float(low) >= 0.0
    if op.type == "Pad":  # the constant pad value (default 0) must be non-negative too
        pad_value = _input(op, 2)
        if pad_value is not None and pad_value.name:
            low = _constant_min(pad_value)
            if low is None or low < 0.0:
                return False
        return non_negative(_input(op, 0))
    if op.type in SIGN_PRESERVING_TYPES:
        return non_negative(_input(op, 0))
    if op.type in ALL_INPUTS_TYPES:
        return all(non_negative(var) for var in op.inputs)
    return False


def non_negative_variables(graph: BaseGraph, bounded_below: bool = False) -> set[str]:
    """Names of the activation tensors that are non-negative by the graph's structure alone.

    With ``bounded_below``, the outputs of Swish-like activations (never below a small negative bound: see the
    module documentation) count as non-negative too.
    """
    gated = {mul.name for gate_type in GATES.values() for _, _, mul in gated_activations(graph, gate_type)}
    known: set[str] = set()
    for op in graph.topological_sort():
        swish_like = bounded_below and (op.type in BOUNDED_BELOW_TYPES or op.name in gated)
        if swish_like or _is_non_negative_output(op, known):
            known.update(var.name for var in op.outputs)
    return known


class _Groups:
    """Union-find over variable names."""

    def __init__(self) -> None:
        self._parent: dict[str, str] = {}

    def find(self, name: str) -> str:
        parent = self._parent.setdefault(name, name)
        if parent != name:
            parent = self._parent[name] = self.find(parent)
        return parent

    def union(self, names: Iterable[str]) -> None:
        names = list(names)
        for other in names[1:]:
            self._parent[self.find(other)] = self.find(names[0])


def unsigned_variables(graph: BaseGraph, fusion_types: set[str]) -> set[str]:
    """Activation tensors that can be quantized over the unsigned range.

    Args:
        graph: The PPQ graph, before quantization.
        fusion_types: The activation types the quantizer fuses into a preceding computing operator.

    Returns:
        Names of the variables whose every alignment group member is non-negative (or Swish-like).
    """
    non_negative = non_negative_variables(graph, bounded_below=True)
    groups = _Groups()
    exempt: set[str] = set()  # computing outputs fused into their activation: never materialized
    activations = [var.name for var in graph.variables.values() if not var.is_parameter]
    for name in activations:
        groups.find(name)
    for op in graph.operations.values():
        act_inputs = [var.name for var in op.inputs if var is not None and not var.is_parameter]
        outputs = [var.name for var in op.outputs]
        # PPQ's PASSIVE_OPERATIONS misses 'Slice' and 'Dropout' (a missing comma joins them); Resize is aligned
        # to its output by the TensorRT setting
        if op.type in PASSIVE_OPERATIONS or op.type in {"Slice", "Dropout", "Resize"}:
            groups.union(act_inputs[:1] + outputs[:1])
        elif op.type in TYPES_FOR_ALIGNMENT["Elementwise"]:
            groups.union(act_inputs)
        elif op.type in TYPES_FOR_ALIGNMENT["Concat"]:
            groups.union(act_inputs + outputs)
        activation = fused_activation(graph, op, fusion_types)
        if activation is not None and op.outputs and activation.outputs:
            groups.union([op.outputs[0].name, activation.outputs[0].name])
            exempt.add(op.outputs[0].name)
    for fusion, gate_type in GATES.items():
        if fusion in fusion_types:
            # PPQ's Swish fusion and maptools' HardSwish fusion (computing op x, then x * gate(x)) give x,
            # gate(x) and the product one scale; a squeeze-excite gate (sigmoid of another tensor) is not fused.
            for computing, gate, mul in gated_activations(graph, gate_type):
                groups.union([mul.outputs[0].name, computing.outputs[0].name, gate.outputs[0].name])
                exempt.add(computing.outputs[0].name)  # fused: the gate reads the accumulator
    signed_roots = {groups.find(name) for name in activations if name not in non_negative and name not in exempt}
    return {name for name in activations if name in non_negative and groups.find(name) not in signed_roots}
