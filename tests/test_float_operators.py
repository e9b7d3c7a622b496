"""Operators left in float are named by quantize: the summary, report.json and the result, each with why."""

from __future__ import annotations

import json
import warnings

import pytest
import torch

from maptools.quantization import quantize
from maptools.quantization.artifacts import float_operators
from maptools.quantization.floatops import RECURRENT, float_blocks


class ConvLSTM(torch.nn.Module):
    """A Conv feature extractor, an LSTM over the columns and a classifier per step (a text recognizer's shape)."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = torch.nn.Conv2d(1, 4, 3, padding=1)
        self.lstm = torch.nn.LSTM(4 * 8, 16, batch_first=True)
        self.fc = torch.nn.Linear(16, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = torch.relu(self.conv(x)).permute(0, 3, 1, 2).reshape(x.shape[0], 12, 32)
        return self.fc(self.lstm(y)[0])


@pytest.fixture(scope="module")
def lstm_map(tmp_path_factory):
    root = tmp_path_factory.mktemp("lstm")
    torch.manual_seed(0)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(ConvLSTM().eval(), (torch.randn(2, 1, 8, 12),), str(root / "lstm.onnx"),
                          input_names=["input"], output_names=["out"], opset_version=13, dynamo=False)
    result = quantize({"input": [2, 1, 8, 12]}, "cpu", root / "lstm.onnx", mapname="lstm", calib_steps=8,
                      mapsave_dir=root / "maps", recipe="fast")
    return result, root / "maps"


def test_an_lstm_left_in_float_is_said_at_the_top_of_the_summary(lstm_map):
    result, maps = lstm_map
    lines = result.summary().splitlines()
    assert lines[1].startswith("  LEFT IN FLOAT: 1 recurrent layer(s) left in float")
    assert "/lstm/LSTM (LSTM)" in lines[1]
    floats = result.float_operators
    assert floats[0] == {"node": "/lstm/LSTM", "op_type": "LSTM", "reason": RECURRENT}
    # the same operators as inspect lists from quant_model.onnx, each with a reason
    assert [(f["node"], f["op_type"]) for f in floats] == [(f["node"], f["op_type"])
                                                            for f in float_operators("lstm", maps)]
    assert all(f["reason"] for f in floats) and len(floats) == 3
    assert f"  operators left in float: {len(floats)}" in lines
    assert any(line.startswith("    LSTM x1: recurrent layer") for line in lines)
    report = json.loads((maps / "lstm" / "report.json").read_text())
    assert report["float_operators"]["count"] == len(floats)
    assert report["float_operators"]["types"]["LSTM"] == 1
    assert report["float_operators"]["operators"] == floats
    assert result.output_snr_db["out"] > 20  # the rest is quantized and sound


def test_a_map_without_float_operators_says_zero(tmp_path, tiny_onnx):
    result = quantize({"input": [2, 3, 8, 8]}, "cpu", tiny_onnx, mapname="t", calib_steps=8, mapsave_dir=tmp_path,
                      recipe="fast")
    assert result.float_operators == [] and "LEFT IN FLOAT" not in result.summary()
    assert "  operators left in float: 0" in result.summary().splitlines()
    report = json.loads((tmp_path / "t" / "report.json").read_text())
    assert report["float_operators"] == {"count": 0, "types": {}, "operators": []}


def test_attention_left_in_float_is_a_headline():
    ops = [{"node": "attn/MatMul", "op_type": "MatMul", "reason": "dispatched to float"},
           {"node": "attn/Softmax", "op_type": "Softmax", "reason": "dispatched to float"},
           {"node": "shape/MatMul", "op_type": "MatMul", "reason": "shape or index arithmetic (runs on the host)"}]
    (line,) = float_blocks(ops)
    assert line.startswith("attention left in float (2 Softmax/MatMul operators)") and "shape/MatMul" not in line
