"""Models of newer opsets brought down to opset 13 (maptools.quantization.opset), checked in onnxruntime.

Every rewrite rule runs on a small graph at the opset that introduced the form, and the opset-13 graph must
compute the same as the original in onnxruntime. Forms opset 13 cannot express are refused with an error
naming the node. Then whole models: an IR-10 opset-17 model and a torch default (dynamo) export quantize.
"""

from __future__ import annotations

import warnings

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch
from onnx import TensorProto, helper, numpy_helper

from maptools.errors import UnsupportedOperatorError
from maptools.examples import digits
from maptools.quantization import quantize
from maptools.quantization.opset import default_opset, downgrade_to_opset13


def _model(nodes: list[onnx.NodeProto], inputs: dict[str, list[int]], outputs: list[str], opset: int,
           initializers: dict[str, np.ndarray] | None = None) -> onnx.ModelProto:
    graph = helper.make_graph(
        nodes, "g", [helper.make_tensor_value_info(n, TensorProto.FLOAT, s) for n, s in inputs.items()],
        [helper.make_tensor_value_info(n, TensorProto.FLOAT, None) for n in outputs],
        [numpy_helper.from_array(v, k) for k, v in (initializers or {}).items()])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)])
    model.ir_version = 10 if opset >= 21 else 8
    model = onnx.shape_inference.infer_shapes(model)  # the checker wants the outputs' shapes
    onnx.checker.check_model(model)
    return model


def _run(model: onnx.ModelProto, feed: dict[str, np.ndarray]) -> list[np.ndarray]:
    options = ort.SessionOptions()
    options.log_severity_level = 3
    return ort.InferenceSession(model.SerializeToString(), options, providers=["CPUExecutionProvider"]).run(None, feed)


def _same_in_onnxruntime(model: onnx.ModelProto, feed: dict[str, np.ndarray], atol: float = 1e-5) -> onnx.ModelProto:
    converted, changed = downgrade_to_opset13(model)
    assert changed >= 1 and default_opset(converted) == 13
    onnx.checker.check_model(converted)
    for before, after in zip(_run(model, feed), _run(converted, feed), strict=True):
        np.testing.assert_allclose(after, before, atol=atol, rtol=1e-5)
    return converted


X = np.random.default_rng(0).standard_normal((2, 6, 5, 4)).astype(np.float32)


@pytest.mark.parametrize("op", ["ReduceMean", "ReduceMax", "ReduceL2"])
def test_reduce_axes_input_becomes_attribute(op: str) -> None:
    model = _model([helper.make_node(op, ["x", "axes"], ["y"], name="r", keepdims=1)], {"x": list(X.shape)}, ["y"],
                   18, {"axes": np.array([2, 3], np.int64)})
    converted = _same_in_onnxruntime(model, {"x": X})
    assert [a.ints for a in converted.graph.node[0].attribute if a.name == "axes"] == [[2, 3]]


def test_reduce_without_axes_and_noop_is_identity() -> None:
    model = _model([helper.make_node("ReduceMean", ["x"], ["y"], name="r", noop_with_empty_axes=1)],
                   {"x": list(X.shape)}, ["y"], 18)
    assert _same_in_onnxruntime(model, {"x": X}).graph.node[0].op_type == "Identity"


@pytest.mark.parametrize("parts", [2, 3])
def test_split_num_outputs(parts: int) -> None:
    outputs = [f"y{i}" for i in range(parts)]
    model = _model([helper.make_node("Split", ["x"], outputs, name="s", axis=1, num_outputs=parts)],
                   {"x": list(X.shape)}, outputs, 18)
    _same_in_onnxruntime(model, {"x": X})


def test_split_num_outputs_uneven() -> None:
    x = X[:, :5]
    model = _model([helper.make_node("Split", ["x"], ["a", "b"], name="s", axis=1, num_outputs=2)],
                   {"x": list(x.shape)}, ["a", "b"], 18)
    converted = _same_in_onnxruntime(model, {"x": np.ascontiguousarray(x)})
    assert len(converted.graph.node[0].input) == 2  # explicit sizes 3, 2


def test_pad_axes_input_becomes_full_rank_pads() -> None:
    model = _model([helper.make_node("Pad", ["x", "pads", "", "axes"], ["y"], name="p", mode="constant")],
                   {"x": list(X.shape)}, ["y"], 18,
                   {"pads": np.array([1, 2, 0, 3], np.int64), "axes": np.array([2, -1], np.int64)})
    _same_in_onnxruntime(model, {"x": X})


def test_shape_start_end_becomes_slice() -> None:
    nodes = [helper.make_node("Shape", ["x"], ["s"], name="shape", start=1, end=3),
             helper.make_node("Cast", ["s"], ["y"], name="cast", to=TensorProto.FLOAT)]
    converted = _same_in_onnxruntime(_model(nodes, {"x": list(X.shape)}, ["y"], 15), {"x": X})
    assert [n.op_type for n in converted.graph.node] == ["Shape", "Slice", "Cast"]


def test_reshape_allowzero_without_zero_is_kept() -> None:
    model = _model([helper.make_node("Reshape", ["x", "shape"], ["y"], name="reshape", allowzero=1)],
                   {"x": list(X.shape)}, ["y"], 14, {"shape": np.array([2, -1], np.int64)})
    _same_in_onnxruntime(model, {"x": X})


@pytest.mark.parametrize(("op", "attrs"), [("HardSwish", {}), ("Mish", {}), ("Gelu", {}),
                                           ("Gelu", {"approximate": "tanh"})])
def test_activation_decompositions(op: str, attrs: dict) -> None:
    opset = 20 if op == "Gelu" else 18
    model = _model([helper.make_node(op, ["x"], ["y"], name="act", **attrs)], {"x": list(X.shape)}, ["y"], opset)
    converted = _same_in_onnxruntime(model, {"x": X * 4}, atol=1e-5)
    assert converted.graph.node[-1].name == "act"  # the node keeping the name produces the output


@pytest.mark.parametrize("bias", [True, False])
def test_layer_normalization_decomposition(bias: bool) -> None:
    rng = np.random.default_rng(1)
    inits = {"scale": rng.standard_normal(4).astype(np.float32)}
    if bias:
        inits["bias"] = rng.standard_normal(4).astype(np.float32)
    model = _model([helper.make_node("LayerNormalization", ["x", *inits], ["y"], name="ln", axis=-1, epsilon=1e-5)],
                   {"x": list(X.shape)}, ["y"], 17, inits)
    _same_in_onnxruntime(model, {"x": X}, atol=1e-4)


def test_type_only_revisions_are_kept_as_they_are() -> None:
    nodes = [helper.make_node("Relu", ["x"], ["r"], name="relu"),  # Relu-14: bfloat16 added
             helper.make_node("Add", ["r", "x"], ["y"], name="add")]  # Add-14
    model = _model(nodes, {"x": list(X.shape)}, ["y"], 17)
    converted, changed = downgrade_to_opset13(model)
    assert changed == 0 and default_opset(converted) == 13
    np.testing.assert_array_equal(_run(converted, {"x": X})[0], _run(model, {"x": X})[0])


@pytest.mark.parametrize(("node", "opset", "expected"), [
    (helper.make_node("Resize", ["x", "", "scales"], ["y"], name="resize_sym", mode="linear",
                      coordinate_transformation_mode="half_pixel_symmetric"), 19, "half_pixel_symmetric"),
    (helper.make_node("AveragePool", ["x"], ["y"], name="pool_dilated", kernel_shape=[2, 2], dilations=[2, 2]), 19,
     "dilations"),
    (helper.make_node("Resize", ["x", "", "scales"], ["y"], name="resize_aa", mode="linear", antialias=1), 18,
     "antialias"),
    (helper.make_node("DFT", ["x"], ["y"], name="dft"), 17, "does not exist at opset 13"),
])
def test_forms_without_an_opset13_equivalent_are_refused(node: onnx.NodeProto, opset: int, expected: str) -> None:
    graph = helper.make_graph([node], "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, list(X.shape))],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)],
                              [numpy_helper.from_array(np.array([1, 1, 2, 2], np.float32), "scales")])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)])
    with pytest.raises(UnsupportedOperatorError, match=rf"node '{node.name}' \({node.op_type}\).*{expected}"):
        downgrade_to_opset13(model)


def test_opset13_model_is_returned_unchanged() -> None:
    model = onnx.load(str(digits.MODEL_PATH))
    assert downgrade_to_opset13(model) == (model, 0)


# -- whole models ------------------------------------------------------------------------------------------
@pytest.mark.stack
def test_ir10_opset17_model_quantizes(tmp_path) -> None:
    """An IR-10, opset-17 file (what YOLO exports and PyPI wheels ship) loads and quantizes, at opset 13."""
    if onnx.IR_VERSION < 10:
        with pytest.raises(Exception, match="ir_version"):  # onnx < 1.16 cannot read IR 10 (documented)
            onnx.checker.check_model(_ir10_digits())
        return
    path = tmp_path / "digits_ir10.onnx"
    onnx.save(_ir10_digits(), str(path))
    result = quantize({"input": list(digits.INPUT_SHAPE)}, "cpu", path, mapname="ir10", calib_steps=8, bit_width=8,
                      mapsave_dir=tmp_path, recipe="fast", analysis_steps=1)
    exported = onnx.load(str(result.model_path))
    assert default_opset(exported) == 13
    images, labels = digits.load_split("test")
    fp32 = digits.onnx_top1(digits.MODEL_PATH, images, labels)
    assert digits.onnx_top1(result.model_path, images, labels) >= fp32 - 1


def _ir10_digits() -> onnx.ModelProto:
    model = onnx.load(str(digits.MODEL_PATH))
    model.ir_version = 10
    del model.opset_import[:]
    model.opset_import.extend([helper.make_opsetid("", 17)])
    return model


class _OnnxAsTorch(torch.nn.Module):
    """The bundled digits ONNX graph (Conv, Relu, Add, GlobalAveragePool, Flatten, Gemm) as a torch module."""

    def __init__(self, model: onnx.ModelProto) -> None:
        super().__init__()
        self.nodes = list(model.graph.node)
        self.keys = {init.name: f"p{i}" for i, init in enumerate(model.graph.initializer)}
        self.params = torch.nn.ParameterDict({
            self.keys[init.name]: torch.nn.Parameter(torch.from_numpy(numpy_helper.to_array(init).copy()),
                                                     requires_grad=False) for init in model.graph.initializer})
        self.input_name = model.graph.input[0].name

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        env = {self.input_name: x}
        for node in self.nodes:
            a = [env[n] if n in env else self.params[self.keys[n]] for n in node.input if n]
            attrs = {at.name: helper.get_attribute_value(at) for at in node.attribute}
            if node.op_type == "Conv":
                pads = list(attrs.get("pads", [0, 0, 0, 0]))
                out = torch.nn.functional.conv2d(a[0], a[1], a[2] if len(a) > 2 else None,
                                                 stride=list(attrs.get("strides", [1, 1])), padding=pads[:2],
                                                 groups=int(attrs.get("group", 1)))
            elif node.op_type == "Relu":
                out = torch.relu(a[0])
            elif node.op_type == "Add":
                out = a[0] + a[1]
            elif node.op_type == "GlobalAveragePool":
                out = a[0].mean(dim=(2, 3), keepdim=True)
            elif node.op_type == "Flatten":
                out = torch.flatten(a[0], 1)
            elif node.op_type == "Gemm":
                out = torch.nn.functional.linear(a[0], a[1], a[2])
            else:
                raise NotImplementedError(node.op_type)
            env[node.output[0]] = out
        return out


def test_torch_default_dynamo_export_quantizes(tmp_path) -> None:
    """torch's default exporter (dynamo, opset 18+: ReduceMean with an axes input, Reshape allowzero=1)."""
    pytest.importorskip("onnxscript")
    module = _OnnxAsTorch(onnx.load(str(digits.MODEL_PATH))).eval()
    path = tmp_path / "digits_dynamo.onnx"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(module, (torch.zeros(digits.INPUT_SHAPE),), str(path), input_names=["input"],
                          output_names=["logits"], dynamic_axes={"input": {0: "batch"}, "logits": {0: "batch"}},
                          dynamo=True)
    exported = onnx.load(str(path))
    assert default_opset(exported) >= 18 and {"ReduceMean", "Reshape"} <= {n.op_type for n in exported.graph.node}
    result = quantize({"input": list(digits.INPUT_SHAPE)}, "cpu", path, mapname="dynamo", calib_steps=8,
                      bit_width=8, mapsave_dir=tmp_path, recipe="fast", analysis_steps=1)
    assert default_opset(onnx.load(str(result.model_path))) == 13
    images, labels = digits.load_split("test")
    batch = images[:16]
    np.testing.assert_allclose(_run(exported, {"input": batch})[0], _run(onnx.load(str(digits.MODEL_PATH)),
                                                                          {"input": batch})[0], atol=1e-4)
    fp32 = digits.onnx_top1(digits.MODEL_PATH, images, labels)
    assert digits.onnx_top1(result.model_path, images, labels) >= fp32 - 1.0
    assert min(result.output_snr_db.values()) > 25.0
