"""Activation fusion: which activation functions the chip applies to the accumulator of a MAC operator.

A CIM tile's peripheral applies the activation function to the (wide) accumulator of a ``Conv`` or
``Gemm`` before requantizing, so the tensor between the MAC and the activation never exists as low-bit
integers. PPQ's TensorRT quantizer fuses ``Relu``, ``Clip``, ``Sigmoid``, ``Swish`` (``x * Sigmoid(x)``),
``Softplus`` and ``Gelu`` this way; maptools adds HardSwish, both as the single ``HardSwish`` operator of
opset 14 and as ``x * HardSigmoid(x)``, the form PyTorch's exporter writes at opset 13
(:class:`LowBitFusionPass`). Without it, a 4-bit HardSwish quantized ``x``, ``HardSigmoid(x)`` and the
product separately: on the bundled mobile CNN at W4A4 that cost 4 points of top-1.

A fused clipping activation (``Relu``, ``Clip``) commutes with the requantization, so the MAC output is
recorded at the activation's quantization (exact); any other fused activation reads the accumulator, and
:func:`unmaterialized_variables` names the tensors that therefore carry no quantization.
"""

from __future__ import annotations

from maptools.quantization.engine.facade import (
    BaseGraph,
    Operation,
    QuantableOperation,
    QuantizeFusionPass,
)

__all__ = [
    "CLIPPING_ACTIVATIONS",
    "FUSED_ACTIVATION_TYPES",
    "GATES",
    "LowBitFusionPass",
    "fused_activation",
    "gated_activations",
    "unmaterialized_variables",
]

#: Activation types fused into the computing operator before them: PPQ's TensorRT set (its spelling,
#: ``'SoftPlus'`` included) plus ``'HardSwish'``.
FUSED_ACTIVATION_TYPES = frozenset({"Relu", "Clip", "Swish", "SoftPlus", "Sigmoid", "Gelu", "HardSwish"})

#: Fused activations that commute with requantization: the MAC output may be clipped at their range.
CLIPPING_ACTIVATIONS = frozenset({"Relu", "Clip"})

#: ``x * gate(x)`` activations: fusion type -> gate operator type.
GATES = {"Swish": "Sigmoid", "HardSwish": "HardSigmoid"}


def fused_activation(graph: BaseGraph, op: Operation, fusion_types: set[str]) -> Operation | None:
    """The single activation operator fused into computing operator ``op`` (PPQ's QuantizeFusionPass rule).

    Args:
        graph: The PPQ graph.
        op: Any operator.
        fusion_types: The activation types the quantizer fuses.

    Returns:
        The activation, or None when ``op`` is not a computing operator followed by exactly one fusable
        activation that has no other input.
    """
    if not op.is_computing_op:
        return None
    downstream = graph.get_downstream_operations(op)
    if len(downstream) != 1 or downstream[0].type not in fusion_types:
        return None
    activation = downstream[0]
    return activation if len(graph.get_upstream_operations(activation)) == 1 else None


def gated_activations(graph: BaseGraph, gate_type: str) -> list[tuple[Operation, Operation, Operation]]:
    """Every ``x * gate(x)`` whose ``x`` is the output of a computing operator used by nothing else.

    Args:
        graph: The PPQ graph.
        gate_type: ``'Sigmoid'`` (Swish) or ``'HardSigmoid'`` (HardSwish).

    Returns:
        ``(computing, gate, mul)`` triples.
    """
    found = []
    for gate in graph.operations.values():
        if gate.type != gate_type or not gate.inputs or not gate.outputs:
            continue
        x = gate.inputs[0]
        computing = x.source_op
        if computing is None or not computing.is_computing_op or len(computing.outputs) != 1:
            continue
        consumers = x.dest_ops
        gate_consumers = gate.outputs[0].dest_ops
        if len(consumers) != 2 or len(gate_consumers) != 1:
            continue
        mul = gate_consumers[0]
        operands = {var.name for var in mul.inputs}
        if mul.type != "Mul" or mul not in consumers or operands != {x.name, gate.outputs[0].name}:
            continue
        found.append((computing, gate, mul))
    return found


class LowBitFusionPass(QuantizeFusionPass):
    """PPQ's fusion pass, plus HardSwish written as ``x * HardSigmoid(x)`` when ``'HardSwish'`` is fused.

    Like PPQ's Swish fusion, the computing operator's output, the gate and the ``Mul`` inputs are all
    dominated by the ``Mul`` output: only the HardSwish result is quantized.
    """

    def optimize(self, graph: BaseGraph, **kwargs) -> None:  # noqa: D102 - PPQ's signature
        super().optimize(graph, **kwargs)
        if not self.fuse_activation or "HardSwish" not in self.activation_types:
            return
        for computing, gate, mul in gated_activations(graph, GATES["HardSwish"]):
            ops = (computing, gate, mul)
            if not all(isinstance(op, QuantableOperation) for op in ops) or not self.is_same_platform(list(ops)):
                continue
            master = mul.config.output_quantization_config[0]
            computing.config.output_quantization_config[0].dominated_by = master
            gate.config.input_quantization_config[0].dominated_by = master
            gate.config.output_quantization_config[0].dominated_by = master
            for config in mul.config.input_quantization_config:
                config.dominated_by = master


def unmaterialized_variables(graph: BaseGraph, fusion_types: set[str]) -> set[str]:
    """Tensors inside a fused non-clipping activation: the accumulator it reads and, for ``x * gate(x)``, the gate.

    Args:
        graph: The PPQ graph.
        fusion_types: The activation types the quantizer fuses.

    Returns:
        Variable names (whether PPQ actually fused them is for the caller to check in the configs).
    """
    names: set[str] = set()
    for op in graph.operations.values():
        activation = fused_activation(graph, op, fusion_types)
        if activation is not None and activation.type not in CLIPPING_ACTIVATIONS and op.outputs:
            names.add(op.outputs[0].name)
    for fusion, gate_type in GATES.items():
        if fusion in fusion_types:
            for computing, gate, _ in gated_activations(graph, gate_type):
                names.update({computing.outputs[0].name, gate.outputs[0].name})
    return names
