"""Which activations are fused into the MAC before them, and which tensors that leaves unquantized."""

from __future__ import annotations

import warnings
from pathlib import Path

import torch

from maptools.quantization.engine.facade import import_ppq

import_ppq()

from ppq.api import load_onnx_graph  # noqa: E402

from maptools.quantization.engine.fusion import (  # noqa: E402
    FUSED_ACTIVATION_TYPES,
    gated_activations,
    unmaterialized_variables,
)


class _Gates(torch.nn.Module):
    """Three ``x * HardSigmoid(x)``: fusable, x also used elsewhere, x not from a MAC; a Conv -> Sigmoid."""

    def __init__(self) -> None:
        super().__init__()
        self.a = torch.nn.Conv2d(3, 4, 1)
        self.b = torch.nn.Conv2d(4, 4, 1)
        self.c = torch.nn.Conv2d(4, 4, 1)

    def forward(self, x: torch.Tensor):
        fused = torch.nn.functional.hardswish(self.a(x))
        shared = self.b(fused)
        reused = torch.nn.functional.hardswish(shared) + shared  # x is needed as integers by the Add
        not_mac = torch.nn.functional.hardswish(x)  # no accumulator to read
        return reused, not_mac, torch.sigmoid(self.c(fused))


def _graph(tmp_path: Path):
    path = tmp_path / "gates.onnx"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(_Gates().eval(), torch.randn(1, 3, 4, 4), str(path), opset_version=13, dynamo=False,
                          input_names=["x"], output_names=["reused", "not_mac", "gate"])
    return load_onnx_graph(str(path))


def test_only_exclusive_gates_after_a_mac_are_fused(tmp_path):
    graph = _graph(tmp_path)
    assert sum(op.type == "HardSigmoid" for op in graph.operations.values()) == 3
    found = gated_activations(graph, "HardSigmoid")
    assert [(computing.name, mul.type) for computing, _, mul in found] == [("/a/Conv", "Mul")]
    inside = unmaterialized_variables(graph, set(FUSED_ACTIVATION_TYPES))
    conv_out = {op.name: op.outputs[0].name for op in graph.operations.values() if op.type == "Conv"}
    gate_out = found[0][1].outputs[0].name
    assert inside == {conv_out["/a/Conv"], gate_out, conv_out["/c/Conv"]}  # HardSwish and Conv -> Sigmoid
    # without HardSwish among the fused types only the Conv -> Sigmoid accumulator stays inside
    assert unmaterialized_variables(graph, set(FUSED_ACTIVATION_TYPES) - {"HardSwish"}) == {conv_out["/c/Conv"]}
