"""What maptools does so that PPQ quantizes real exporters' graphs: rewrites, operator fixes, final Concats.

Each rewrite is checked against the original graph in onnxruntime, and each fix with a model that fails or
comes out wrecked without it.
"""

from __future__ import annotations

import json

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch
from onnx import TensorProto, helper, numpy_helper

from maptools.quantization import quantize, read_quantinfo
from maptools.quantization.engine import PPQSession
from maptools.quantization.engine.operators import FixedOperatorExecutor, prelu_forward
from maptools.quantization.engine.outputs import final_concats
from maptools.quantization.engine.quantizer import LowBitSpec
from maptools.quantization.engine.rewrites import (
    bypass_output_identities,
    fill_empty_resize_inputs,
    inline_identity_initializers,
)

RNG = np.random.default_rng(0)


def _model(nodes, inputs: dict[str, list[int]], outputs: list[str], inits: dict[str, np.ndarray],
           opset: int = 13) -> onnx.ModelProto:
    graph = helper.make_graph(nodes, "g",
                              [helper.make_tensor_value_info(n, TensorProto.FLOAT, s) for n, s in inputs.items()],
                              [helper.make_tensor_value_info(n, TensorProto.FLOAT, None) for n in outputs],
                              [numpy_helper.from_array(v, k) for k, v in inits.items()])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)])
    model.ir_version = 8
    return onnx.shape_inference.infer_shapes(model)


def _ort(model: onnx.ModelProto, feed: dict[str, np.ndarray]) -> list[np.ndarray]:
    options = ort.SessionOptions()
    options.log_severity_level = 3
    return ort.InferenceSession(model.SerializeToString(), options, providers=["CPUExecutionProvider"]).run(None, feed)


def _save(model: onnx.ModelProto, path) -> str:
    onnx.save(model, str(path))
    return str(path)


def _conv(name: str, x: str, out: str, cin: int, cout: int, inits: dict, scale: float = 0.3) -> onnx.NodeProto:
    inits[f"{name}_w"] = RNG.normal(0, scale, (cout, cin, 3, 3)).astype(np.float32)
    inits[f"{name}_b"] = RNG.normal(0, 0.1, (cout,)).astype(np.float32)
    return helper.make_node("Conv", [x, f"{name}_w", f"{name}_b"], [out], name=name, pads=[1, 1, 1, 1])


def _calib(shape: list[int], count: int = 8, seed: int = 0) -> list[dict[str, np.ndarray]]:
    rng = np.random.default_rng(seed)
    return [{"input": rng.standard_normal(shape).astype(np.float32)} for _ in range(count)]


# -- Identity-produced graph outputs (Paddle2ONNX) ----------------------------------------------------------
def _paddle_style() -> onnx.ModelProto:
    inits: dict[str, np.ndarray] = {}
    nodes = [_conv("conv", "input", "c", 3, 4, inits),
             helper.make_node("Relu", ["c"], ["r"], name="relu"),
             _conv("conv2", "r", "feat", 4, 4, inits),
             helper.make_node("Softmax", ["feat"], ["prob"], name="softmax", axis=1),
             helper.make_node("Identity", ["prob"], ["save_infer_model/scale_0.tmp_1"], name="identity"),
             helper.make_node("Identity", ["feat"], ["save_infer_model/scale_1.tmp_1"], name="identity_1"),
             helper.make_node("Relu", ["feat"], ["also_used"], name="relu_2")]
    return _model(nodes, {"input": [1, 3, 8, 8]}, ["save_infer_model/scale_0.tmp_1", "save_infer_model/scale_1.tmp_1",
                                                    "also_used"], inits)


def test_bypass_output_identities_is_equivalent() -> None:
    model = _paddle_style()
    rewritten = onnx.ModelProto.FromString(model.SerializeToString())
    assert bypass_output_identities(rewritten) == 2
    assert "Identity" not in {n.op_type for n in rewritten.graph.node}
    onnx.checker.check_model(rewritten)
    feed = _calib([1, 3, 8, 8], 1)[0]
    for before, after in zip(_ort(model, feed), _ort(rewritten, feed), strict=True):
        np.testing.assert_array_equal(before, after)


def test_identity_output_model_quantizes(tmp_path) -> None:
    """Without the rewrite PPQ stops: "save_infer_model/scale_0.tmp_1 (is not a variable name)"."""
    path = _save(_paddle_style(), tmp_path / "paddle.onnx")
    result = quantize({"input": [1, 3, 8, 8]}, "cpu", path, mapname="paddle", calibset=_calib([1, 3, 8, 8], 12),
                      calib_steps=8, mapsave_dir=tmp_path, recipe="fast")
    assert set(result.output_snr_db) == {"save_infer_model/scale_0.tmp_1", "save_infer_model/scale_1.tmp_1",
                                         "also_used"}
    assert min(result.output_snr_db.values()) > 15.0
    exported = onnx.load(str(result.model_path))
    assert [o.name for o in exported.graph.output] == [o.name for o in _paddle_style().graph.output]


def test_inline_identity_initializers_and_empty_resize_inputs_are_equivalent() -> None:
    inits = {"w": RNG.normal(0, 0.3, (4, 3, 3, 3)).astype(np.float32),
             "sizes": np.array([1, 4, 16, 16], np.int64)}
    nodes = [helper.make_node("Identity", ["w"], ["w_copy"], name="dedup"),
             helper.make_node("Conv", ["input", "w_copy"], ["c"], name="conv", pads=[1, 1, 1, 1]),
             helper.make_node("Resize", ["c", "", "", "sizes"], ["y"], name="resize", mode="nearest")]
    model = _model(nodes, {"input": [1, 3, 8, 8]}, ["y"], inits)
    rewritten = onnx.ModelProto.FromString(model.SerializeToString())
    assert inline_identity_initializers(rewritten) == 1 and fill_empty_resize_inputs(rewritten) == 2
    feed = _calib([1, 3, 8, 8], 1)[0]
    np.testing.assert_array_equal(_ort(model, feed)[0], _ort(rewritten, feed)[0])


# -- PRelu with the slope shapes exporters write --------------------------------------------------------------
@pytest.mark.parametrize(("x_shape", "slope_shape"), [
    ([1, 4, 6, 6], [4, 1, 1]),  # torch's legacy exporter (MTCNN)
    ([1, 4, 6, 6], [1, 4, 1, 1]),  # torch's dynamo exporter
    ([2, 4], [4]),  # after a Gemm
    ([1, 4, 6, 6], [1]),  # one shared slope
])
def test_prelu_runs_in_ppq_as_in_onnxruntime(tmp_path, x_shape: list[int], slope_shape: list[int]) -> None:
    slope = RNG.uniform(0.05, 0.5, slope_shape).astype(np.float32)
    model = _model([helper.make_node("PRelu", ["input", "slope"], ["y"], name="prelu")], {"input": x_shape}, ["y"],
                   {"slope": slope})
    session = PPQSession.from_onnx(model, LowBitSpec(), "cpu")
    x = RNG.standard_normal(x_shape).astype(np.float32)
    ppq = session.forward({"input": torch.from_numpy(x)}, quantized=False)["y"]
    np.testing.assert_allclose(ppq, _ort(model, {"input": x})[0], rtol=1e-6, atol=1e-7)


def test_fixed_operator_executor_runs_ppqs_loop_with_maptools_prelu() -> None:
    """maptools' executor runs PPQ's own forward loop, which finds maptools' PRelu and PPQ's other operators;
    PPQ's tables keep PPQ's PRelu."""
    from ppq.core import TargetPlatform
    from ppq.executor import TorchExecutor
    from ppq.executor.base import OPERATION_FORWARD_TABLE
    from ppq.executor.op.torch.default import PRelu_forward

    ours, ppqs = FixedOperatorExecutor._TorchExecutor__forward, TorchExecutor._TorchExecutor__forward
    assert ours.__code__ is ppqs.__code__ and "OPERATION_FORWARD_TABLE" in ours.__code__.co_names
    tables = ours.__globals__["OPERATION_FORWARD_TABLE"]
    for platform in (TargetPlatform.TRT_INT8, TargetPlatform.FP32):
        assert tables[platform]["PRelu"] is prelu_forward
        assert tables[platform]["Conv"] is OPERATION_FORWARD_TABLE[platform]["Conv"]
    assert all(table["PRelu"] is PRelu_forward for table in OPERATION_FORWARD_TABLE.values() if "PRelu" in table)


def test_mtcnn_like_prelu_model_quantizes(tmp_path) -> None:
    """Conv -> PRelu (slope [C,1,1]) -> Conv: PPQ failed with "Op Execution Error" before the fix."""
    inits: dict[str, np.ndarray] = {"slope": RNG.uniform(0.1, 0.3, (6, 1, 1)).astype(np.float32)}
    nodes = [_conv("conv1", "input", "c1", 3, 6, inits),
             helper.make_node("PRelu", ["c1", "slope"], ["p"], name="prelu"), _conv("conv2", "p", "out", 6, 2, inits)]
    path = _save(_model(nodes, {"input": [1, 3, 12, 12]}, ["out"], inits), tmp_path / "pnet.onnx")
    result = quantize({"input": [1, 3, 12, 12]}, "cpu", path, mapname="pnet", calibset=_calib([1, 3, 12, 12], 12),
                      calib_steps=8, mapsave_dir=tmp_path)
    assert result.output_snr_db["out"] > 30.0
    record = read_quantinfo("pnet", tmp_path)["prelu"]
    assert record.input_bits == 8 and record.output_bits == 8


# -- a graph output built by a final Concat of parts with different ranges (YOLO heads) -------------------------
def _detector_head(final: bool) -> onnx.ModelProto:
    """output = Concat(boxes in 0..~300 (Relu(conv) * 100), scores in 0..1 (Sigmoid(conv))) along channels.

    With ``final=False`` the Concat is followed by a Slice taking the scores back (an internal Concat).
    """
    inits: dict[str, np.ndarray] = {"scale": np.array(100.0, np.float32)}
    nodes = [_conv("trunk", "input", "t", 3, 8, inits), helper.make_node("Relu", ["t"], ["tr"], name="trunk_relu"),
             _conv("box", "tr", "bc", 8, 4, inits), helper.make_node("Relu", ["bc"], ["br"], name="box_relu"),
             helper.make_node("Mul", ["br", "scale"], ["boxes"], name="box_scale"),
             _conv("cls", "tr", "cc", 8, 3, inits), helper.make_node("Sigmoid", ["cc"], ["scores"], name="cls_sigmoid"),
             helper.make_node("Concat", ["boxes", "scores"], ["cat"], name="head_concat", axis=1)]
    if final:
        nodes.append(helper.make_node("Reshape", ["cat", "shape"], ["output0"], name="head_reshape"))
        inits["shape"] = np.array([1, 7, -1], np.int64)
        return _model(nodes, {"input": [1, 3, 8, 8]}, ["output0"], inits)
    inits.update(starts=np.array([4], np.int64), ends=np.array([7], np.int64), axes=np.array([1], np.int64))
    nodes.append(helper.make_node("Slice", ["cat", "starts", "ends", "axes"], ["scores_out"], name="take_scores"))
    return _model(nodes, {"input": [1, 3, 8, 8]}, ["scores_out"], inits)


def test_final_concat_found_with_layout_tail() -> None:
    (found,) = final_concats(_detector_head(final=True))
    assert (found.node, found.output, found.parts) == ("head_concat", "output0", ("boxes", "scores"))
    assert found.float_nodes == ("head_concat", "head_reshape")
    assert final_concats(_detector_head(final=False)) == []


def _dynamic_reshape_output() -> onnx.ModelProto:
    """output = Reshape(conv, Concat(Unsqueeze(N), Unsqueeze(C), [-1])): the shape a dynamic-batch export builds."""
    inits: dict[str, np.ndarray] = {"zero": np.array(0, np.int64), "one": np.array(1, np.int64),
                                    "minus_one": np.array([-1], np.int64), "axes0": np.array([0], np.int64)}
    nodes = [_conv("trunk", "input", "t", 3, 4, inits), helper.make_node("Shape", ["t"], ["shape"], name="shape"),
             helper.make_node("Gather", ["shape", "zero"], ["n"], name="gather_n", axis=0),
             helper.make_node("Gather", ["shape", "one"], ["c"], name="gather_c", axis=0),
             helper.make_node("Unsqueeze", ["n", "axes0"], ["n1"], name="unsqueeze_n"),
             helper.make_node("Unsqueeze", ["c", "axes0"], ["c1"], name="unsqueeze_c"),
             helper.make_node("Concat", ["n1", "c1", "minus_one"], ["dims"], name="dims_concat", axis=0),
             helper.make_node("Reshape", ["t", "dims"], ["output0"], name="flatten")]
    model = _model(nodes, {"input": [1, 3, 8, 8]}, ["output0"], inits)
    model.graph.output[0].CopyFrom(helper.make_tensor_value_info("output0", TensorProto.FLOAT, [1, 4, 64]))
    return model


def test_a_concat_building_a_reshape_shape_is_no_output_part(tmp_path) -> None:
    """The Unsqueezed dimensions of a final Reshape's shape were reported as output parts (SNR inf dB)."""
    assert final_concats(_dynamic_reshape_output()) == []
    path = _save(_dynamic_reshape_output(), tmp_path / "reshape.onnx")
    result = quantize({"input": [1, 3, 8, 8]}, "cpu", path, mapname="rs", calibset=_calib([1, 3, 8, 8], 12),
                      calib_steps=8, mapsave_dir=tmp_path)
    assert result.part_snr_db == {} and "part " not in result.summary()
    assert json.loads(result.report_path.read_text())["output_parts"] == {}
    assert result.output_snr_db["output0"] > 30.0


def test_final_concat_keeps_each_part_at_its_own_quantization(tmp_path) -> None:
    """The scores survive (they rounded to 0 at the boxes' scale before) and each part's error is reported."""
    path = _save(_detector_head(final=True), tmp_path / "head.onnx")
    calib = _calib([1, 3, 8, 8], 12)
    result = quantize({"input": [1, 3, 8, 8]}, "cpu", path, mapname="head", calibset=calib, calib_steps=8,
                      mapsave_dir=tmp_path)
    feed = _calib([1, 3, 8, 8], 1, seed=5)[0]
    fp32 = _ort(onnx.load(path), feed)[0]
    quant = _ort(onnx.load(str(result.model_path)), feed)[0]
    scores_fp32, scores_quant = fp32[:, 4:], quant[:, 4:]
    assert np.abs(scores_quant - scores_fp32).max() < 0.05, "scores lost to the boxes' scale"
    assert np.std(scores_quant) > 0.5 * np.std(scores_fp32)
    assert "head_concat" not in read_quantinfo("head", tmp_path)
    parts = result.part_snr_db["output0"]
    assert set(parts) == {"boxes", "scores"} and min(parts.values()) > 25.0
    report = json.loads(result.report_path.read_text())
    assert set(report["output_parts"]["output0"]) == {"boxes", "scores"}
    assert not result.warnings


def test_collapsed_output_is_warned_about(tmp_path) -> None:
    """An internal Concat aligns the scores to the boxes' scale: they collapse to 0, and the map says so."""
    path = _save(_detector_head(final=False), tmp_path / "internal.onnx")
    result = quantize({"input": [1, 3, 8, 8]}, "cpu", path, mapname="internal", calibset=_calib([1, 3, 8, 8], 12),
                      calib_steps=8, mapsave_dir=tmp_path)
    (warning,) = result.warnings
    assert "output 'scores_out' collapsed to a constant" in warning and "held-out data" in warning
    assert "when quantized alone" in warning and "recipe='best'" in warning and "Check the task metric" in warning
    # a W8A8 map: no more bits to suggest (it was told "activation_bits=8" and "layer_bits={...: 8}")
    assert "activation_bits" not in warning and "layer_bits" not in warning and "first_last_bits" not in warning
    report = json.loads(result.report_path.read_text())
    assert report["warnings"] == result.warnings
    assert "WARNING: output 'scores_out' collapsed" in result.summary()


def test_warning_advice_from_the_command_line_uses_its_options(tmp_path, capsys) -> None:
    """From the CLI, a W4A8 map is advised in CLI options: --recipe best, the worst operators' bits (which the
    command line cannot set per layer, said so), and never the activation bits it already has."""
    from maptools.cli import main

    path = _save(_detector_head(final=False), tmp_path / "internal.onnx")
    (tmp_path / "npy").mkdir()
    for index, batch in enumerate(_calib([1, 3, 8, 8], 12)):
        np.save(tmp_path / "npy" / f"{index:02d}.npy", batch["input"])
    assert main(["quantize", str(path), "--input", "input:1,3,8,8", "--mapname", "cli", "--weight-bits", "4",
                 "--act-bits", "8", "--calib-npy", str(tmp_path / "npy"), "--calib-steps", "8", "--mapsave-dir",
                 str(tmp_path / "maps")]) == 0
    (warning,) = [line for line in capsys.readouterr().out.splitlines() if "WARNING" in line]
    assert "collapsed to a constant" in warning and "--recipe best" in warning
    assert "--act-bits" not in warning and "activation_bits" not in warning and "recipe='best'" not in warning
    assert "--layer-bits " in warning and "layer_bits=" not in warning
    assert "Check the task metric" in warning


def test_low_snr_output_is_warned_about(tmp_path) -> None:
    path = _save(_paddle_style(), tmp_path / "paddle.onnx")
    result = quantize({"input": [1, 3, 8, 8]}, "cpu", path, mapname="w2", calibset=_calib([1, 3, 8, 8], 12),
                      calib_steps=8, mapsave_dir=tmp_path, bit_width=2)
    noisy = [name for name, snr in result.output_snr_db.items() if snr < 10.0]
    assert noisy and len(result.warnings) >= len(noisy)
    assert all("below 10 dB" in w or "collapsed" in w for w in result.warnings)


# -- where the error is measured --------------------------------------------------------------------------------
def test_error_is_measured_on_held_out_data(tmp_path) -> None:
    """Calibrated on small inputs, the model meets larger ones after the first calib_steps batches: the held-out
    figure shows what the in-sample one hid; an evalset replaces it; each case is recorded in report.json."""
    path = _save(_paddle_style(), tmp_path / "paddle.onnx")
    small = [{"input": 0.1 * b["input"]} for b in _calib([1, 3, 8, 8], 8)]
    large = [{"input": 3.0 * b["input"]} for b in _calib([1, 3, 8, 8], 4, seed=1)]
    common = dict(input_shapes={"input": [1, 3, 8, 8]}, device="cpu", onnx_path=path, calib_steps=8,
                  mapsave_dir=tmp_path, recipe="fast")
    in_sample = quantize(mapname="in", calibset=small, **common)
    held_out = quantize(mapname="out", calibset=small + large, **common)
    given = quantize(mapname="eval", calibset=small, evalset=large, **common)
    random = quantize(mapname="rand", calibset=None, **common)
    assert (in_sample.analysis_data, held_out.analysis_data, given.analysis_data, random.analysis_data) == (
        "in-sample", "held-out", "evalset", "random (held-out)")
    name = "save_infer_model/scale_1.tmp_1"
    assert held_out.output_snr_db[name] < in_sample.output_snr_db[name] - 10.0
    assert given.output_snr_db[name] == pytest.approx(held_out.output_snr_db[name])
    assert read_quantinfo("in", tmp_path)["conv"].input_scale == read_quantinfo("out", tmp_path)["conv"].input_scale
    report = json.loads(held_out.report_path.read_text())
    fitted = report["analysis"].pop("calibration_output_snr_db")
    assert report["analysis"] == {"data": "held-out", "batches": 4, "samples": 4}
    # the calibration batches' figure beside it; 4 samples are too few for the fit warning to trust the gap
    assert fitted[name] > held_out.output_snr_db[name] + 10.0
    assert not any("on the calibration data" in w for w in held_out.warnings)
    assert "calibration_output_snr_db" not in json.loads(in_sample.report_path.read_text())["analysis"]
    assert "NOTE: the error was measured on only 4 samples" in held_out.summary()


def test_split_shared_constants_is_the_same_computation():
    """Each further reader of a shared initializer or Constant gets a copy named after it, in node order."""
    from maptools.quantization.engine.rewrites import split_shared_constants

    inits = {"s": np.array([1, 1, 2, 2], np.float32), "roi": np.zeros((0,), np.float32)}
    nodes = [helper.make_node("Constant", [], ["k"], name="kc", value=numpy_helper.from_array(np.float32(0.5))),
             helper.make_node("Resize", ["x", "roi", "s"], ["a"], name="r1", mode="nearest"),
             helper.make_node("Mul", ["a", "k"], ["am"], name="m1"),
             helper.make_node("Resize", ["am", "roi", "s"], ["b"], name="r2", mode="nearest"),
             helper.make_node("Mul", ["b", "k"], ["y"], name="m2")]
    model = _model(nodes, {"x": [1, 2, 3, 3]}, ["y"], inits)
    split = onnx.ModelProto.FromString(model.SerializeToString())
    assert split_shared_constants(split) == 3
    onnx.checker.check_model(split)
    by_name = {node.name: list(node.input) for node in split.graph.node}
    assert by_name["r1"] == ["x", "roi", "s"] and by_name["r2"] == ["am", "roi__r2_1", "s__r2_2"]
    assert by_name["m2"] == ["b", "k__m2_1"] and by_name["kc__m2_1"] == []
    feed = {"x": RNG.normal(size=(1, 2, 3, 3)).astype(np.float32)}
    np.testing.assert_array_equal(_ort(model, feed)[0], _ort(split, feed)[0])
    assert split_shared_constants(split) == 0  # nothing shared is left
