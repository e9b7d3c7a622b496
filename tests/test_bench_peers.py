"""The peers of the benchmarks: what onnxruntime's quantizer really does to the weights it is asked for."""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "bench"))

import peers  # noqa: E402


def _two_convs(path: Path) -> None:
    """Two 1x1 Convs: the first's weight an initializer, the second's computed (``Identity`` of one), as
    Paddle's exporter writes the recognizer's folded Convs."""
    rng = np.random.default_rng(0)
    w1 = numpy_helper.from_array(rng.normal(size=(4, 3, 1, 1)).astype(np.float32), "w1")
    w2 = numpy_helper.from_array(rng.normal(size=(4, 4, 1, 1)).astype(np.float32), "w2_source")
    graph = helper.make_graph(
        [helper.make_node("Conv", ["x", "w1"], ["h"], name="conv1"),
         helper.make_node("Identity", ["w2_source"], ["w2"], name="computed"),
         helper.make_node("Conv", ["h", "w2"], ["y"], name="conv2")],
        "two", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 3, 8, 8])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 4, 8, 8])], [w1, w2])
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)]), str(path))


def test_onnxruntime_leaves_a_computed_weight_at_8_bits_when_asked_for_4(tmp_path, caplog):
    """quantize_static with QInt4 weights: the initializer weight is int4, the computed one is quantized as an
    activation (uint8); the peer logs it, so a W4A8 row of onnxruntime is not read as 4-bit weights."""
    from onnxruntime.quantization import CalibrationDataReader, QuantFormat, QuantType, quantize_static

    model, out = tmp_path / "two.onnx", tmp_path / "q.onnx"
    _two_convs(model)
    feeds = [{"x": np.random.default_rng(i).normal(size=(1, 3, 8, 8)).astype(np.float32)} for i in range(4)]

    class Reader(CalibrationDataReader):
        def __init__(self) -> None:
            self._feeds = iter(feeds)

        def get_next(self):
            return next(self._feeds, None)

    quantize_static(str(model), str(out), Reader(), quant_format=QuantFormat.QDQ, per_channel=True,
                    activation_type=QuantType.QUInt8, weight_type=QuantType.QInt4)
    assert peers.ort_weight_bits(out) == {"int4": 1, "uint8": 1}
    with caplog.at_level("WARNING"):
        outputs = peers.run_ort(model, 4, 8, "MinMax", feeds, feeds[:1])
    assert outputs[0][0].shape == (1, 4, 8, 8)
    assert "{'int4': 1, 'uint8': 1}" in caplog.text and "asked: all int4" in caplog.text
