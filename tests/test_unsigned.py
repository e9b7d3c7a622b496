"""Which tensors may use the unsigned range: decided from the graph's structure (engine.unsigned)."""

from __future__ import annotations

import warnings
from pathlib import Path

import torch

from maptools.quantization.engine.facade import import_ppq

import_ppq()

from ppq.api import load_onnx_graph  # noqa: E402

from maptools.quantization.engine.unsigned import non_negative_variables, unsigned_variables  # noqa: E402

FUSION = {"Relu", "Clip", "Swish", "SoftPlus", "Sigmoid", "Gelu"}  # TensorRT quantizer's fused activations


class _Signs(torch.nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.a = torch.nn.Conv2d(3, 4, 3)
        self.b = torch.nn.Conv2d(4, 4, 3)

    def forward(self, x: torch.Tensor):
        r = torch.relu(self.a(x))
        negative_pad = torch.nn.functional.pad(r, (1, 1, 1, 1), value=-1.0)
        zero_pad = torch.nn.functional.pad(r, (1, 1, 1, 1))
        gate = torch.clamp(x, 0.0, 6.0) + torch.sigmoid(x)
        residual = torch.relu(x) + x  # a non-negative and a signed input of one Add
        return self.b(negative_pad), torch.nn.functional.max_pool2d(zero_pad, 2), gate, residual


def _graph(tmp_path: Path):
    path = tmp_path / "signs.onnx"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(_Signs().eval(), torch.randn(1, 3, 8, 8), str(path), opset_version=13, dynamo=False,
                          input_names=["x"], output_names=["y1", "y2", "gate", "residual"])
    return load_onnx_graph(str(path))


def _outputs_of(graph, op_type: str) -> list[str]:
    return [op.outputs[0].name for op in graph.topological_sort() if op.type == op_type]


def test_non_negative_by_structure(tmp_path):
    graph = _graph(tmp_path)
    known = non_negative_variables(graph)
    pads = _outputs_of(graph, "Pad")
    assert [name in known for name in pads] == [False, True]  # pad value -1, then pad value 0
    assert set(_outputs_of(graph, "Relu")) <= known
    assert set(_outputs_of(graph, "Clip")) | set(_outputs_of(graph, "Sigmoid")) <= known
    assert set(_outputs_of(graph, "MaxPool")) <= known
    adds = _outputs_of(graph, "Add")
    assert [name in known for name in adds] == [True, False]  # clip + sigmoid, relu(x) + x
    assert "x" not in known and not set(_outputs_of(graph, "Conv")) & known


def test_aligned_tensors_share_one_range(tmp_path):
    graph = _graph(tmp_path)
    unsigned = unsigned_variables(graph, FUSION)
    relu_of = {op.inputs[0].name: op.outputs[0].name for op in graph.topological_sort() if op.type == "Relu"}
    # relu(x) is added to the signed x: PPQ gives both Add inputs one scale, so it stays signed
    assert relu_of["x"] not in unsigned
    # relu(conv(x)) is padded with -1 by a Pad, which PPQ runs on its input's scale: signed too, and so is
    # the max-pool of its zero-padded copy
    conv_relu = next(name for source, name in relu_of.items() if source != "x")
    assert conv_relu not in unsigned and not set(_outputs_of(graph, "MaxPool")) & unsigned
    # clamp(x, 0, 6) + sigmoid(x): both Add inputs and its output are non-negative
    assert set(_outputs_of(graph, "Clip")) | set(_outputs_of(graph, "Sigmoid")) | {"gate"} <= unsigned
    assert not set(_outputs_of(graph, "Conv")) & unsigned


class _SiLU(torch.nn.Module):
    """YOLO-style Conv -> SiLU (exported as x * Sigmoid(x)) -> MaxPool, and a SiLU of the raw input (not fused)."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = torch.nn.Conv2d(3, 4, 3)

    def forward(self, x: torch.Tensor):
        return torch.nn.functional.max_pool2d(torch.nn.functional.silu(self.conv(x)), 2), torch.nn.functional.silu(x)


def test_swish_outputs_are_bounded_below_and_go_unsigned(tmp_path):
    path = tmp_path / "silu.onnx"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(_SiLU().eval(), torch.randn(1, 3, 8, 8), str(path), opset_version=13, dynamo=False,
                          input_names=["x"], output_names=["pooled", "raw"])
    graph = load_onnx_graph(str(path))
    muls = _outputs_of(graph, "Mul")
    assert len(muls) == 2
    assert not set(muls) & non_negative_variables(graph)  # x * sigmoid(x) can be negative...
    bounded = non_negative_variables(graph, bounded_below=True)  # ... but never below -0.279
    fused_mul = next(op.outputs[0].name for op in graph.topological_sort()
                     if op.type == "Mul" and op.inputs[0].source_op is not None)
    assert fused_mul in bounded and "pooled" in bounded
    unsigned = unsigned_variables(graph, FUSION)
    assert {fused_mul, "pooled"} <= unsigned
    # the Conv output the fused SiLU reads is never materialized; the raw input x of the unfused SiLU is signed
    assert "x" not in unsigned
