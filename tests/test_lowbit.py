"""Seed 000's API (quantize_onnx_model_lowbit and friends) on the bundled example."""

from __future__ import annotations

import numpy as np
import onnxruntime as ort
import torch

from maptools.examples import digits
from maptools.quantization.lowbit import export_lowbit_onnx, quantize_onnx_model_lowbit


def test_lowbit_api_quantizes_at_the_given_bits(tmp_path, digits_test):
    images, labels = digits_test
    calib = [torch.from_numpy(images[i:i + 16]) for i in range(0, 16 * 8, 16)]
    graph = quantize_onnx_model_lowbit(str(digits.MODEL_PATH), calib, calib_steps=8, input_shape=[16, 1, 8, 8],
                                       collate_fn=lambda x: x, device="cpu", bit_width=3, symmetrical=False)
    conv = graph.operations["/stem/stem.0/Conv"]
    weight, act = conv.config.input_quantization_config[1], conv.config.input_quantization_config[0]
    assert (weight.num_of_bits, weight.quant_min, weight.quant_max) == (3, -4, 3)
    assert (act.dominated_by.quant_min, act.dominated_by.quant_max) == (0, 7)
    model = export_lowbit_onnx(graph, str(tmp_path / "q.onnx"))
    assert any(n.op_type == "Clip" for n in model.graph.node)
    session = ort.InferenceSession(str(tmp_path / "q.onnx"), providers=["CPUExecutionProvider"])
    logits = np.concatenate([session.run(None, {"input": images[i:i + 16]})[0] for i in range(0, 528, 16)])
    top1 = float(np.mean(logits.argmax(1) == labels[:528]) * 100)
    assert top1 > 80, top1
