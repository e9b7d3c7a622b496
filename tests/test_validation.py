"""Every bad argument gets a specific maptools error naming it, raised before anything is written."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import onnx
import pytest
import torch
from onnx import TensorProto, helper

import maptools
from maptools import (
    CalibrationError,
    DeviceError,
    InvalidArgumentError,
    InvalidTypeError,
    MaptoolsError,
    ModelError,
    ModelNotFoundError,
    UnsupportedOperatorError,
)
from maptools.quantization import quantize

SHAPES = {"input": [2, 3, 8, 8]}


def snapshot(directory: Path) -> dict[str, bytes]:
    return {p.relative_to(directory).as_posix(): p.read_bytes() for p in sorted(directory.rglob("*")) if p.is_file()}


@pytest.fixture(scope="module")
def earlier(tmp_path_factory, tiny_onnx) -> tuple[Path, dict[str, bytes]]:
    """An earlier map 'm' that no failing call may touch."""
    root = tmp_path_factory.mktemp("mapsave")
    quantize(SHAPES, "cpu", tiny_onnx, mapname="m", calib_steps=8, bit_width=4, mapsave_dir=root, recipe="fast")
    return root, snapshot(root)


def batches(n=8, shape=(2, 3, 8, 8), **overrides):
    return [{"input": torch.randn(*shape)} for _ in range(n)]


def nan_batches():
    data = batches()
    data[3]["input"][0, 0, 0, 0] = math.nan
    return data


def inf_batches():
    data = batches()
    data[5]["input"][1, 2, 3, 4] = math.inf
    return data


def files(tmp: Path) -> dict[str, Path]:
    (tmp / "dir.onnx").mkdir(exist_ok=True)
    (tmp / "empty.onnx").write_bytes(b"")
    (tmp / "text.onnx").write_text("this is not a model\n" * 20)
    (tmp / "afile").write_text("x")
    return {"dir": tmp / "dir.onnx", "empty": tmp / "empty.onnx", "text": tmp / "text.onnx",
            "missing": tmp / "nope.onnx", "afile": tmp / "afile"}


# (id, keyword overrides, expected exception class, argument named in the message)
ROWS = [
    ("onnx-missing", {"onnx_path": "missing"}, ModelNotFoundError, "onnx_path"),
    ("onnx-directory", {"onnx_path": "dir"}, ModelNotFoundError, "onnx_path"),
    ("onnx-empty", {"onnx_path": "empty"}, ModelError, "onnx_path"),
    ("onnx-not-onnx", {"onnx_path": "text"}, ModelError, "onnx_path"),
    ("onnx-corrupt", {"onnx_path": "corrupt"}, ModelError, "onnx_path"),
    ("onnx-type", {"onnx_path": 42}, InvalidTypeError, "onnx_path"),
    ("shapes-not-mapping", {"input_shapes": [[2, 3, 8, 8]]}, InvalidTypeError, "input_shapes"),
    ("shapes-missing-input", {"input_shapes": {}}, InvalidArgumentError, "input_shapes"),
    ("shapes-unknown-input", {"input_shapes": {"input": [2, 3, 8, 8], "other": [1]}}, InvalidArgumentError,
     "input_shapes"),
    ("shapes-non-int", {"input_shapes": {"input": [2, 3, 8.5, 8]}}, InvalidTypeError, "input_shapes"),
    ("shapes-non-positive", {"input_shapes": {"input": [2, 3, 0, 8]}}, InvalidArgumentError, "input_shapes"),
    ("shapes-rank", {"input_shapes": {"input": [2, 3, 8]}}, InvalidArgumentError, "input_shapes"),
    ("shapes-fixed-dim", {"input_shapes": {"input": [2, 4, 8, 8]}}, InvalidArgumentError, "input_shapes"),
    ("calib-not-iterable", {"calibset": 42}, CalibrationError, "calibset"),
    ("calib-empty", {"calibset": []}, CalibrationError, "calibset"),
    ("calib-too-few", {"calibset": batches(3)}, CalibrationError, "calibset"),
    ("calib-item-type", {"calibset": ["a"] * 8}, CalibrationError, "calibset"),
    ("calib-names", {"calibset": [{"image": torch.zeros(2, 3, 8, 8)}] * 8}, CalibrationError, "calibset"),
    ("calib-shape", {"calibset": batches(shape=(2, 3, 9, 8))}, CalibrationError, "calibset"),
    ("calib-dtype", {"calibset": [{"input": np.zeros((2, 3, 8, 8), np.int64)}] * 8}, CalibrationError, "calibset"),
    ("calib-nan", {"calibset": nan_batches()}, CalibrationError, "calibset"),
    ("calib-inf", {"calibset": inf_batches()}, CalibrationError, "calibset"),
    ("calib-steps-zero", {"calib_steps": 0}, InvalidArgumentError, "calib_steps"),
    ("calib-steps-float", {"calib_steps": 8.0}, InvalidTypeError, "calib_steps"),
    ("calib-steps-below-ppq-minimum", {"calib_steps": 4}, CalibrationError, "calib_steps"),
    ("bits-low", {"bit_width": 1}, InvalidArgumentError, "bit_width"),
    ("bits-high", {"bit_width": 9}, InvalidArgumentError, "bit_width"),
    ("bits-type", {"bit_width": "4"}, InvalidTypeError, "bit_width"),
    ("bits-bool", {"bit_width": True}, InvalidTypeError, "bit_width"),
    ("weight-bits", {"weight_bits": 0}, InvalidArgumentError, "weight_bits"),
    ("activation-bits", {"activation_bits": 4.5}, InvalidTypeError, "activation_bits"),
    ("layer-bits-node", {"layer_bits": {"no_such_node": 8}}, InvalidArgumentError, "layer_bits"),
    ("layer-bits-value", {"layer_bits": {"conv": (8, 1)}}, InvalidArgumentError, "layer_bits"),
    ("symmetrical-type", {"symmetrical": "yes"}, InvalidTypeError, "symmetrical"),
    ("per-channel-type", {"per_channel": 1}, InvalidTypeError, "per_channel"),
    ("layerwise-type", {"layerwise_analysis": "yes"}, InvalidTypeError, "layerwise_analysis"),
    ("unsigned-type", {"unsigned_nonnegative": "yes"}, InvalidTypeError, "unsigned_nonnegative"),
    ("seed-negative", {"seed": -1}, InvalidArgumentError, "seed"),
    ("observer", {"observer": "magic"}, InvalidArgumentError, "observer"),
    ("recipe", {"recipe": "fastest"}, InvalidArgumentError, "recipe"),
    ("device-unknown", {"device": "tpu"}, DeviceError, "device"),
    ("device-type", {"device": 0}, DeviceError, "device"),
    ("mapname-empty", {"mapname": ""}, InvalidArgumentError, "mapname"),
    ("mapname-separator", {"mapname": "a/m"}, InvalidArgumentError, "mapname"),
    ("mapname-dotdot", {"mapname": ".."}, InvalidArgumentError, "mapname"),
    ("mapname-absolute", {"mapname": "/tmp/m"}, InvalidArgumentError, "mapname"),
    ("mapname-unsafe-chars", {"mapname": "m*?"}, InvalidArgumentError, "mapname"),
    ("mapname-type", {"mapname": 3}, InvalidTypeError, "mapname"),
    ("mapsave-not-writable", {"mapsave_dir": "afile/sub"}, InvalidArgumentError, "mapsave_dir"),
]


@pytest.mark.parametrize("row", ROWS, ids=[r[0] for r in ROWS])
def test_bad_argument(row, earlier, tiny_onnx, tmp_path):
    _, overrides, error, argument = row
    root, before = earlier
    paths = files(tmp_path)
    corrupt = tmp_path / "corrupt.onnx"
    corrupt.write_bytes(tiny_onnx.read_bytes()[:-40])
    paths["corrupt"] = corrupt
    kwargs = {"input_shapes": SHAPES, "device": "cpu", "onnx_path": tiny_onnx, "mapname": "m", "calibset": None,
              "calib_steps": 8, "bit_width": 4, "mapsave_dir": root}
    for key, value in overrides.items():
        if key == "onnx_path" and isinstance(value, str):
            value = paths[value]
        if key == "mapsave_dir":
            value = tmp_path / value
        kwargs[key] = value
    with pytest.raises(error) as caught:
        quantize(**kwargs)
    assert isinstance(caught.value, MaptoolsError)
    message = str(caught.value)
    assert message.startswith(argument) or f"{argument}:" in message or f"{argument}[" in message, message
    assert snapshot(root) == before
    if "mapsave_dir" in overrides:
        assert not (tmp_path / "afile").is_dir()


def test_cuda_without_gpu_is_an_error(tiny_onnx, earlier):
    if torch.cuda.is_available():
        pytest.skip("this machine has a GPU: 'cuda' is valid here")
    root, before = earlier
    with pytest.raises(DeviceError, match="device: 'cuda'.*no CUDA GPU"):
        quantize(SHAPES, "cuda", tiny_onnx, mapname="m", mapsave_dir=root)
    assert snapshot(root) == before


def _save_graph(path: Path, nodes: list, out_shape: list[int], initializer: list | None = None) -> Path:
    """Save an opset-13 model of ``nodes`` from ``input`` ([2, 3, 8, 8]) to ``out``; return ``path``."""
    graph = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("input", TensorProto.FLOAT, [2, 3, 8, 8])],
                              [helper.make_tensor_value_info("out", TensorProto.FLOAT, out_shape)],
                              initializer=initializer or [])
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)]), str(path))
    return path


def test_unsupported_operator_is_named(tmp_path, earlier):
    path = _save_graph(tmp_path / "hardmax.onnx", [helper.make_node("Relu", ["input"], ["r"], name="relu"),
                       helper.make_node("Hardmax", ["r"], ["out"], name="the_hardmax", axis=-1)], [2, 3, 8, 8])
    root, before = earlier
    with pytest.raises(UnsupportedOperatorError, match="the_hardmax.*Hardmax"):
        quantize(SHAPES, "cpu", path, mapname="m", mapsave_dir=root)
    assert snapshot(root) == before


def test_graph_without_a_quantized_mac_is_an_error(tmp_path, earlier):
    """PPQ's dispatcher keeps a one-Conv graph in float: empty artifacts would be written without this check."""
    weight = helper.make_tensor("w", TensorProto.FLOAT, [4, 3, 3, 3], np.ones(108, np.float32).tolist())
    path = _save_graph(tmp_path / "lonely.onnx",
                       [helper.make_node("Conv", ["input", "w"], ["out"], name="lonely", pads=[1, 1, 1, 1])],
                       [2, 4, 8, 8], [weight])
    root, before = earlier
    with pytest.raises(ModelError, match="onnx_path: PPQ quantized no Conv/Gemm/MatMul"):
        quantize(SHAPES, "cpu", path, mapname="m", mapsave_dir=root)
    assert snapshot(root) == before


def test_all_errors_share_the_base_class():
    for name in maptools.errors.__all__:
        assert issubclass(getattr(maptools, name), MaptoolsError)
