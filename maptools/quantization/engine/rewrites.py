"""maptools' rewrites of an ONNX graph before PPQ loads it: the same computation in a form PPQ 0.6.6 handles.

Each rewrite returns an equivalent graph (checked against the original in onnxruntime by the tests) and
touches only the nodes it names:

* :func:`inline_identity_initializers`: an ``Identity`` of an initializer (torch's exporter deduplicates
  equal initializers that way) becomes a copy of the initializer. PPQ requires BatchNormalization/Conv
  parameters to be initializers ("BatchNorm should have 4 parameters"), e.g. densenet121.
* :func:`fill_empty_resize_inputs`: a ``Resize`` with ``sizes`` but an empty ``roi``/``scales`` input gets
  empty initializers there; PPQ's Resize calls ``.cpu()`` on the missing input (lraspp_mobilenet_v3_large).
* :func:`bypass_output_identities`: a graph output produced by an ``Identity`` (Paddle2ONNX writes
  ``save_infer_model/scale_0.tmp_1`` that way) is renamed onto the tensor the ``Identity`` copies, and the
  ``Identity`` removed. PPQ's parser drops ``Identity`` nodes and then cannot find the output ("is not a
  variable name").
* :func:`split_shared_constants`: an initializer or ``Constant`` output read by several node inputs (two
  ``Resize`` nodes sharing their ``scales``) gets one copy per further reader, named after it. PPQ splits shared
  parameters itself, but numbers the copies in the order of a set of names, which changes with the process's
  string hashing: the graph ``verify`` rebuilt then differed from the quantized one.

:func:`ppq_compatible` applies them all to a copy of the model.
"""

from __future__ import annotations

import logging

import numpy as np
import onnx

__all__ = ["bypass_output_identities", "fill_empty_resize_inputs", "inline_identity_initializers",
           "ppq_compatible", "split_shared_constants"]

logger = logging.getLogger(__name__)


def inline_identity_initializers(model: onnx.ModelProto) -> int:
    """Replace every ``Identity`` of an initializer (not a graph output) by a copy of it; return the count."""
    graph = model.graph
    inits = {init.name: init for init in graph.initializer}
    outputs = {vi.name for vi in graph.output}
    kept, count = [], 0
    for node in graph.node:
        if node.op_type == "Identity" and node.input[0] in inits and node.output[0] not in outputs:
            copy = onnx.TensorProto()
            copy.CopyFrom(inits[node.input[0]])
            copy.name = node.output[0]
            graph.initializer.append(copy)
            count += 1
            continue
        kept.append(node)
    del graph.node[:]
    graph.node.extend(kept)
    return count


def fill_empty_resize_inputs(model: onnx.ModelProto) -> int:
    """Give a ``Resize`` that uses ``sizes`` empty ``roi``/``scales`` initializers; return the count."""
    graph = model.graph
    count = 0
    for node in graph.node:
        if node.op_type == "Resize" and len(node.input) == 4 and node.input[3]:
            for index in (1, 2):
                if not node.input[index]:
                    name = f"{node.name}__empty_{index}"
                    graph.initializer.append(onnx.numpy_helper.from_array(np.zeros((0,), np.float32), name))
                    node.input[index] = name
                    count += 1
    return count


def bypass_output_identities(model: onnx.ModelProto) -> int:
    """Let the producer of an ``Identity`` that makes a graph output write that output itself; return the count.

    The copied tensor is renamed to the output's name in its producer and in every other consumer, and the
    ``Identity`` is removed. An ``Identity`` of a graph input, an initializer or another graph output is left
    as it is (there is nothing to rename).
    """
    graph = model.graph
    count = 0
    while True:
        outputs = {vi.name for vi in graph.output}
        fixed = {vi.name for vi in graph.input} | {init.name for init in graph.initializer} | outputs
        producers = {name: node for node in graph.node for name in node.output}
        found = next((node for node in graph.node if node.op_type == "Identity" and node.output[0] in outputs
                      and node.input[0] not in fixed and node.input[0] in producers), None)
        if found is None:
            return count
        old, new = found.input[0], found.output[0]
        graph.node.remove(found)
        for node in graph.node:
            for index, name in enumerate(node.output):
                if name == old:
                    node.output[index] = new
            for index, name in enumerate(node.input):
                if name == old:
                    node.input[index] = new
        for vi in graph.value_info:
            if vi.name == old:
                vi.name = new
        count += 1


def _unique(name: str, taken: set[str]) -> str:
    candidate, suffix = name, 1
    while candidate in taken:
        candidate, suffix = f"{name}_{suffix}", suffix + 1
    taken.add(candidate)
    return candidate


def split_shared_constants(model: onnx.ModelProto) -> int:
    """Give every further reader of a shared initializer or ``Constant`` output its own copy; return the count.

    The first reader (in node order) keeps the tensor; the others read ``<tensor>__<node>_<input index>``, a
    copy made in node order, so the names are the same in every process.
    """
    graph = model.graph
    inits = {init.name: init for init in graph.initializer}
    constants = {node.output[0]: node for node in graph.node if node.op_type == "Constant" and node.output}
    taken = {init.name for init in graph.initializer} | {vi.name for vi in graph.input} | \
        {name for node in graph.node for name in (*node.input, *node.output)} | {node.name for node in graph.node}
    seen: set[str] = set()
    added_nodes: list[tuple[onnx.NodeProto, onnx.NodeProto]] = []  # (copy, the Constant it copies)
    count = 0
    for node in graph.node:
        for index, name in enumerate(node.input):
            if name not in inits and name not in constants:
                continue
            if name not in seen:
                seen.add(name)
                continue
            copy_name = _unique(f"{name}__{node.name}_{index}", taken)
            if name in inits:
                tensor = onnx.TensorProto()
                tensor.CopyFrom(inits[name])
                tensor.name = copy_name
                graph.initializer.append(tensor)
            else:
                constant = onnx.NodeProto()
                constant.CopyFrom(constants[name])
                constant.name = _unique(f"{constants[name].name or name}__{node.name}_{index}", taken)
                del constant.output[:]
                constant.output.append(copy_name)
                added_nodes.append((constant, constants[name]))
            node.input[index] = copy_name
            count += 1
    for constant, original in added_nodes:  # right after the Constant it copies: the order stays topological
        position = list(graph.node).index(original) + 1
        graph.node.insert(position, constant)
    return count


def ppq_compatible(model: onnx.ModelProto) -> onnx.ModelProto:
    """A copy of ``model`` with every rewrite of this module applied (the same computation)."""
    model = onnx.ModelProto.FromString(model.SerializeToString())
    counts = {
        "identity initializers inlined": inline_identity_initializers(model),
        "empty Resize inputs filled": fill_empty_resize_inputs(model),
        "output identities bypassed": bypass_output_identities(model),
        "shared constants split": split_shared_constants(model),
    }
    done = {what: count for what, count in counts.items() if count}
    if done:
        logger.info("rewrote the graph for PPQ: %s", ", ".join(f"{count} {what}" for what, count in done.items()))
    return model
