"""Gemm (transA, transB, alpha, beta), MatMul and ConvTranspose quantized by ``quantize`` and run by onnxruntime.

Small hand-built models: every MAC type the chip maps, with the attributes exporters write, goes through
the whole pipeline and the QDQ model is compared with FP32 and with PPQ's simulation and the integer
executor (``verify``).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

from maptools.quantization import quantize, verify

#: name -> (input shape, node to check, attributes it must keep in quant_model.onnx)
MODELS = {
    "gemm_matmul": ([16, 4], "gemm", {"transA": 1, "transB": 1, "alpha": 0.5, "beta": 2.0}),
    "conv_transpose": ([2, 4, 8, 8], "convt", {"strides": [2, 2], "output_padding": [1, 1]}),
}
#: Least SNR (dB) of the QDQ model against FP32, per bit width.
MIN_SNR = {8: 25.0, 4: 8.0}


def _save(nodes: list, inputs: list, outputs: list, initializers: dict[str, np.ndarray], path: Path) -> Path:
    graph = helper.make_graph(nodes, path.stem, inputs, outputs,
                              [numpy_helper.from_array(v.astype(np.float32), k) for k, v in initializers.items()])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)])
    model.ir_version = 8
    onnx.checker.check_model(model)
    onnx.save(model, str(path))
    return path


def _gemm_matmul(path: Path) -> Path:
    """x [K=16, M=4] -> Gemm(transA, transB, alpha 0.5, beta 2) -> Relu -> MatMul -> out [4, 3]."""
    rng = np.random.default_rng(0)
    nodes = [
        helper.make_node("Gemm", ["x", "w", "c"], ["g"], name="gemm", transA=1, transB=1, alpha=0.5, beta=2.0),
        helper.make_node("Relu", ["g"], ["r"], name="relu"),
        helper.make_node("MatMul", ["r", "w2"], ["out"], name="matmul"),
    ]
    return _save(nodes, [helper.make_tensor_value_info("x", TensorProto.FLOAT, [16, 4])],
                 [helper.make_tensor_value_info("out", TensorProto.FLOAT, [4, 3])],
                 {"w": rng.normal(0, 0.3, (8, 16)), "c": rng.normal(0, 0.1, 8), "w2": rng.normal(0, 0.3, (8, 3))}, path)


def _conv_transpose(path: Path) -> Path:
    """x [2,4,8,8] -> ConvTranspose(stride 2, pads 1, output_padding 1) -> Relu -> Conv 1x1 -> out [2,2,16,16]."""
    rng = np.random.default_rng(1)
    nodes = [
        helper.make_node("ConvTranspose", ["x", "w", "b"], ["t"], name="convt", strides=[2, 2], pads=[1, 1, 1, 1],
                         output_padding=[1, 1]),
        helper.make_node("Relu", ["t"], ["r"], name="relu"),
        helper.make_node("Conv", ["r", "w2"], ["out"], name="conv"),
    ]
    return _save(nodes, [helper.make_tensor_value_info("x", TensorProto.FLOAT, [2, 4, 8, 8])],
                 [helper.make_tensor_value_info("out", TensorProto.FLOAT, [2, 2, 16, 16])],
                 {"w": rng.normal(0, 0.3, (4, 6, 3, 3)), "b": rng.normal(0, 0.1, 6),
                  "w2": rng.normal(0, 0.3, (2, 6, 1, 1))}, path)


@pytest.fixture(scope="module")
def mac_models(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    folder = tmp_path_factory.mktemp("macs")
    return {"gemm_matmul": _gemm_matmul(folder / "gemm_matmul.onnx"),
            "conv_transpose": _conv_transpose(folder / "conv_transpose.onnx")}


@pytest.mark.parametrize("bits", [8, 4])
@pytest.mark.parametrize("name", list(MODELS))
def test_mac_types_through_quantize_match_onnxruntime(mac_models, tmp_path, name: str, bits: int) -> None:
    shape, node_name, attributes = MODELS[name]
    result = quantize({"x": shape}, "cpu", mac_models[name], mapname=name, calib_steps=8, bit_width=bits,
                      mapsave_dir=tmp_path, recipe="fast", analysis_steps=1)
    macs = {n for n, record in result.operators.items() if record.weight_bits == bits}
    assert macs == ({"gemm", "matmul"} if name == "gemm_matmul" else {"convt", "conv"})
    node = next(n for n in onnx.load(str(result.model_path)).graph.node if n.name == node_name)
    kept = {a.name: helper.get_attribute_value(a) for a in node.attribute}
    assert all(kept[key] == pytest.approx(value) for key, value in attributes.items()), kept
    report = verify(name, mapsave_dir=tmp_path)
    assert not report.failures
    assert report.get("fp32", "onnxruntime").snr_db > MIN_SNR[bits]
    for reference, candidate in (("ppq", "onnxruntime"), ("ppq", "integer"), ("onnxruntime", "integer")):
        assert report.get(reference, candidate).within_one_step >= 0.995, report.table()
