"""Graph outputs built by a final ``Concat``: each part keeps its own quantization.

A detector head concatenates tensors of very different ranges into one output: YOLOv8's ``output0`` is
``Concat(box coordinates in pixels (0..320), class scores (0..1))``. PPQ aligns the inputs of a ``Concat`` to
one scale, the one of the widest part: at 8 bits the scores then round to 0 and every detection is lost,
while the output's SNR stays high because the boxes dominate its energy (:ref:`detector-heads`).

Such a ``Concat`` only lays the parts side by side in memory; the chip produces each part with its own
quantization. So a ``Concat`` whose output reaches a graph output through layout operators only (reshapes,
transposes...) is kept in float, together with those layout operators: its parts stay quantized, each at its
own scale, and the graph output is their dequantized values side by side. :func:`final_concats` finds them
in the ONNX graph before PPQ dispatches it; the engine dispatches the listed nodes to FP32, ``quantinfo.pkl``
has no record for them (``maptools inspect`` lists them as operators left in float) and the error analysis
reports each part on its own.
"""

from __future__ import annotations

from dataclasses import dataclass

import onnx

__all__ = ["LAYOUT_TYPES", "FinalConcat", "final_concats"]

#: Operators that only move values: they may stand between a final Concat and the graph output.
LAYOUT_TYPES = frozenset({"Reshape", "Transpose", "Flatten", "Squeeze", "Unsqueeze", "Identity"})


@dataclass(frozen=True)
class FinalConcat:
    """A ``Concat`` that builds a graph output.

    Attributes:
        node: Name of the ``Concat`` node.
        output: The graph output it builds.
        axis: The ``Concat``'s axis.
        parts: Its input tensors, in order.
        float_nodes: The ``Concat`` and the layout nodes between it and the output: kept in float.
    """

    node: str
    output: str
    axis: int
    parts: tuple[str, ...]
    float_nodes: tuple[str, ...]


def final_concats(model: onnx.ModelProto) -> list[FinalConcat]:
    """Every ``Concat`` of at least two activation parts whose output reaches a graph output through layout
    operators only (as their data input, not a ``Reshape``'s shape), each tensor on the way read by nothing else.

    Args:
        model: The prepared model (named nodes).
    """
    graph = model.graph
    outputs = {vi.name for vi in graph.output}
    constants = {init.name for init in graph.initializer}
    constants |= {n.output[0] for n in graph.node if n.op_type == "Constant"}
    consumers: dict[str, list[onnx.NodeProto]] = {}
    for node in graph.node:
        for name in node.input:
            consumers.setdefault(name, []).append(node)
    found = []
    for node in graph.node:
        parts = tuple(name for name in node.input if name and name not in constants)
        if node.op_type != "Concat" or len(parts) < 2:
            continue
        chain, tensor = [node.name], node.output[0]
        while tensor not in outputs:
            readers = consumers.get(tensor, [])
            # the data input only: a Concat building a Reshape's shape (Unsqueezed dimensions) lays out no data
            if len(readers) != 1 or readers[0].op_type not in LAYOUT_TYPES or readers[0].input[0] != tensor:
                break
            chain.append(readers[0].name)
            tensor = readers[0].output[0]
        if tensor in outputs and not consumers.get(tensor):
            axis = next((onnx.helper.get_attribute_value(a) for a in node.attribute if a.name == "axis"), 0)
            found.append(FinalConcat(node=node.name, output=tensor, axis=int(axis), parts=parts,
                                     float_nodes=tuple(chain)))
    return found
