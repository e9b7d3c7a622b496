"""Folding of the shape arithmetic a model's own fixed dimensions make constant (no PPQ here).

Exporters compute reshape targets and the like from ``Shape`` of a tensor; where the dimensions involved
are fixed in the model, :func:`fold_shape_computations` runs that arithmetic once (onnxruntime) and puts the
results in initializers, so PPQ sees constants. :func:`~maptools.quantization.model.prepare_model` calls it.
"""

from __future__ import annotations

import logging

import numpy as np
import onnx

__all__ = ["MAX_FOLDED_ELEMENTS", "fold_shape_computations"]

logger = logging.getLogger(__name__)


#: Largest tensor (in elements) :func:`fold_shape_computations` turns into an initializer: shape arithmetic
#: yields a few integers; the bound keeps weights and activations out of the folding.
MAX_FOLDED_ELEMENTS = 1024
_NOT_FOLDED = {"Constant", "RandomNormal", "RandomNormalLike", "RandomUniform", "RandomUniformLike",
               "Multinomial", "Bernoulli"}


def _static_shapes(proto: onnx.ModelProto) -> dict[str, list[int]]:
    """Fully static shapes of the graph's tensors per ONNX shape inference (unknown or symbolic dims omitted).

    Inference runs on a light copy: initializers above :data:`MAX_FOLDED_ELEMENTS` elements are declared as
    graph inputs (type and dims, no data), so no weight is copied.
    """
    light = onnx.ModelProto()
    light.ir_version, light.producer_name = proto.ir_version, proto.producer_name
    light.opset_import.extend(proto.opset_import)
    graph = light.graph
    graph.node.extend(proto.graph.node)
    graph.input.extend(proto.graph.input)
    graph.output.extend(proto.graph.output)
    declared = {vi.name for vi in proto.graph.input}
    for init in proto.graph.initializer:
        if int(np.prod(init.dims)) <= MAX_FOLDED_ELEMENTS:
            graph.initializer.append(init)
        elif init.name not in declared:
            graph.input.append(onnx.helper.make_tensor_value_info(init.name, init.data_type, list(init.dims)))
    try:
        inferred = onnx.shape_inference.infer_shapes(light, strict_mode=False).graph
    except Exception as exc:  # a model onnx cannot infer: nothing is folded
        logger.debug("shape inference failed (%s): shape computations not folded", exc)
        return {}
    shapes: dict[str, list[int]] = {}
    for vi in [*inferred.input, *inferred.value_info, *inferred.output]:
        tensor_type = vi.type.tensor_type
        if tensor_type.HasField("shape") and all(d.HasField("dim_value") for d in tensor_type.shape.dim):
            shapes[vi.name] = [int(d.dim_value) for d in tensor_type.shape.dim]
    for init in proto.graph.initializer:
        shapes[init.name] = list(init.dims)
    return shapes


def _foldable(proto: onnx.ModelProto) -> tuple[set[int], dict[str, np.ndarray]]:
    """One pass of :func:`fold_shape_computations`: indices of the foldable nodes and their output values."""
    from onnx.reference import ReferenceEvaluator

    graph = proto.graph
    shapes = _static_shapes(proto) if any(n.op_type == "Shape" for n in graph.node) else {}
    graph_outputs = {vi.name for vi in graph.output}
    initializers = {init.name: init for init in graph.initializer}
    constants: dict[str, onnx.NodeProto] = {}  # Constant nodes by output, evaluated when needed
    values: dict[str, np.ndarray] = {}  # folded values and evaluated Constant outputs
    arrays: dict[str, np.ndarray] = {}  # initializers read as inputs of candidates
    folded: set[int] = set()

    def value(name: str) -> np.ndarray:
        if name in values:
            return values[name]
        if name in constants:
            values[name] = np.asarray(ReferenceEvaluator(constants[name]).run(None, {})[0])
            return values[name]
        if name not in arrays:
            arrays[name] = onnx.numpy_helper.to_array(initializers[name])
        return arrays[name]

    for index, node in enumerate(graph.node):
        if node.domain not in ("", "ai.onnx"):
            continue
        if node.op_type == "Constant":
            constants[node.output[0]] = node
            continue
        if node.op_type in _NOT_FOLDED or any(o in graph_outputs for o in node.output):
            continue
        if node.op_type == "Shape":
            dims = shapes.get(node.input[0])
            if dims is None:
                continue
            attrs = {a.name: a.i for a in node.attribute}
            outputs = [np.array(dims[attrs.get("start", 0):attrs.get("end", len(dims))], np.int64)]
        else:
            inputs = [name for name in node.input if name]
            if not inputs or not all(n in values or n in constants or n in initializers for n in inputs):
                continue
            if all(n in initializers for n in inputs):
                continue
            if any(n in initializers and int(np.prod(initializers[n].dims)) > MAX_FOLDED_ELEMENTS for n in inputs):
                continue
            single = onnx.helper.make_model(
                onnx.helper.make_graph(
                    [node], "fold",
                    [onnx.helper.make_tensor_value_info(n, onnx.TensorProto.UNDEFINED, None) for n in inputs],
                    [onnx.helper.make_tensor_value_info(n, onnx.TensorProto.UNDEFINED, None)
                     for n in node.output if n]),
                opset_imports=list(proto.opset_import))
            try:
                outputs = [np.asarray(o) for o in ReferenceEvaluator(single).run(None, {n: value(n) for n in inputs})]
            except Exception as exc:  # an operator the reference evaluator lacks: the node is kept
                logger.debug("node %r not folded: %s", node.name, exc)
                continue
            if any(o.size > MAX_FOLDED_ELEMENTS or o.dtype == object for o in outputs):
                continue
        for name, result in zip([n for n in node.output if n], outputs, strict=True):
            values[name] = result
        folded.add(index)
    return folded, values


def fold_shape_computations(proto: onnx.ModelProto, max_rounds: int = 8) -> int:
    """Replace, in place, the nodes that compute constants (shape arithmetic) by initializers.

    Exporters leave shape arithmetic in the graph, e.g. torch's ``scaled_dot_product_attention`` at opset 14:
    ``Shape -> Slice -> Cast -> Sqrt`` for the attention scale and ``Mod`` of two constants for a slice bound.
    PPQ executes every node on every calibration batch and cannot run some of them (it has no ``Mod``, and its
    ``Slice`` mishandles a missing ``axes`` input), although their values never change. A node is folded when

    * it is a ``Shape`` whose input has a fully static shape per ONNX shape inference from the graph's
      declared input shapes (a symbolic dim, such as a dynamic batch, keeps the ``Shape`` and what depends on
      it), or
    * all its inputs are constants (initializers, ``Constant`` outputs, folded values), at least one of them is
      not an initializer (so weight re-routing such as ``Identity`` or ``Transpose`` of a weight, which PPQ
      handles as parameters, is left alone), it is a deterministic default-domain operator, and each of its
      outputs has at most :data:`MAX_FOLDED_ELEMENTS` elements.

    Values are computed with :class:`onnx.reference.ReferenceEvaluator` (numpy) at the model's opset; a node
    it cannot evaluate is kept. Folded outputs still consumed become initializers of the same name, folded
    nodes and the ``Constant`` nodes and initializers left unused are removed, and the remaining nodes keep
    their names. Graph outputs are never folded, and a graph with control flow (subgraph attributes) is left
    unchanged. Shape inference is re-run after each round (a folded ``Reshape`` target can make further
    shapes static), at most ``max_rounds`` times.

    Args:
        proto: The model, modified in place; only the dims its graph inputs declare fixed count as known.
        max_rounds: Rounds of shape inference and folding.

    Returns:
        The number of nodes removed.
    """
    graph = proto.graph
    if any(attr.type in (onnx.AttributeProto.GRAPH, onnx.AttributeProto.GRAPHS)
           for node in graph.node for attr in node.attribute):
        return 0
    graph_outputs = {vi.name for vi in graph.output}
    removed = 0
    for _ in range(max_rounds):
        initializers = {init.name: init for init in graph.initializer}
        folded, values = _foldable(proto)
        if not folded:
            break
        kept = [node for index, node in enumerate(graph.node) if index not in folded]
        folded_outputs = {name for index in folded for name in graph.node[index].output if name}
        used = {name for node in kept for name in node.input} | graph_outputs
        fed = {name for index in folded for name in graph.node[index].input}
        # Constant nodes whose outputs only fed folded nodes are dropped with them
        kept = [node for node in kept
                if node.op_type != "Constant" or node.output[0] not in fed or node.output[0] in used]
        used = {name for node in kept for name in node.input} | graph_outputs
        removed += len(graph.node) - len(kept)
        new_initializers = [onnx.numpy_helper.from_array(values[name], name)
                            for name in sorted(folded_outputs & used)]
        # initializers that only fed folded nodes go too (others, even if unused, are left as they were)
        unused = {name for index in folded for name in graph.node[index].input
                  if name in initializers and name not in used}
        kept_initializers = [init for init in graph.initializer if init.name not in unused]
        del graph.node[:]
        graph.node.extend(kept)
        del graph.initializer[:]
        graph.initializer.extend(kept_initializers + new_initializers)
        graph_inputs = [vi for vi in graph.input if vi.name not in unused]
        if proto.ir_version < 4:  # initializers must also be graph inputs before IR version 4
            graph_inputs += [onnx.helper.make_tensor_value_info(init.name, init.data_type, list(init.dims))
                             for init in new_initializers]
        del graph.input[:]
        graph.input.extend(graph_inputs)
    return removed
