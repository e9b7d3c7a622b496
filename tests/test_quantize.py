"""The core quantization stage, run for real with PPQ and onnxruntime on small models."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from collections.abc import Callable

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch
from conftest import R18, write_images

from maptools.errors import InvalidArgumentError
from maptools.examples import digits
from maptools.quantization import (
    OperatorQuantConfig,
    imagefolder_calibset,
    quantize,
    random_calibset,
    read_quantinfo,
    read_quantparams,
)
from maptools.quantization.engine import LowBitSpec, PPQSession
from maptools.quantization.format import bias_key, weight_key
from maptools.quantization.intmath import cosine_of, int_range
from maptools.quantization.model import check_input_shapes, load_model, prepare_model

pytestmark = pytest.mark.stack  # also run on the oldest supported stack (make test)

def run_ort(path, feeds: dict[str, np.ndarray]) -> list[np.ndarray]:
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    return session.run(None, feeds)


def dequantized_weight(cfg: OperatorQuantConfig, integers: np.ndarray) -> np.ndarray:
    shape = [1] * integers.ndim
    if cfg.weight_axis is not None:
        shape[cfg.weight_axis] = -1
    return integers.astype(np.float32) * cfg.weight_scale.astype(np.float32).reshape(shape)


@pytest.mark.slow
@pytest.mark.parametrize("bits", [8, 4])
def test_resnet18_artifacts(resnet18_onnx, resnet18_maps, bits):
    result = resnet18_maps(bits)  # quantize(..., calib_steps=8, bit_width=bits, recipe="fast"), shared
    info = read_quantinfo(result.mapname, result.directory.parent)
    params = read_quantparams(result.mapname, result.directory.parent)
    convs = [n for n in onnx.load(str(resnet18_onnx)).graph.node if n.op_type == "Conv"]
    inits = {i.name: i for i in onnx.load(str(resnet18_onnx)).graph.initializer}
    assert len(convs) == 20
    low, high = int_range(bits)
    for node in convs:
        cfg = info[node.name]
        assert cfg.op_type == "Conv" and cfg.weight_bits == bits and cfg.input_bits == bits
        assert (cfg.weight_min, cfg.weight_max) == (low, high)
        w = params[weight_key(node.name, "Conv")]
        assert w.shape == tuple(inits[node.input[1]].dims)
        assert np.issubdtype(w.dtype, np.integer) and low <= w.min() and w.max() <= high
        assert cfg.weight_scale.shape == (w.shape[0],) and np.all(cfg.weight_scale > 0)
        bias = params[bias_key(node.name, "Conv")]
        assert bias.dtype == np.int32 and bias.shape == (w.shape[0],)
        np.testing.assert_allclose(cfg.bias_scale, cfg.input_scale * cfg.weight_scale, rtol=1e-6)
    fc = info["/fc/Gemm"]
    assert params["/fc/Gemm_gemm_weight"].shape == (1000, 512) and fc.weight_scale.shape == (1000,)
    assert "QuantizationResult" in type(result).__name__ and result.model_path.is_file()
    onnx.checker.check_model(onnx.load(str(result.model_path)))
    x = torch.randn(1, 3, 224, 224, generator=torch.Generator().manual_seed(7)).numpy()
    fp32 = run_ort(resnet18_onnx, {"input": x})[0]
    quant = run_ort(result.model_path, {"input": x})[0]
    assert quant.shape == fp32.shape == (1, 1000)
    if bits == 8:
        assert cosine_of(fp32, quant) >= 0.99
        assert result.output_snr_db["output"] > 15
    else:
        assert cosine_of(fp32, quant) >= 0.8


def _session(path, shapes, bits, symmetrical=True) -> PPQSession:
    model = load_model(path)
    checked = check_input_shapes(shapes, model)
    session = PPQSession.from_onnx(prepare_model(model, checked), LowBitSpec(bits, bits, symmetrical), "cpu")
    session.quantize(random_calibset(checked, 8, seed=0))
    return session


@pytest.fixture(scope="module")
def resnet18_sessions(resnet18_onnx) -> Callable[[int], PPQSession]:
    """``get(bits)``: a quantized PPQ session of resnet18, made once per module (tests only read it)."""
    made: dict[int, PPQSession] = {}

    def get(bits: int) -> PPQSession:
        if bits not in made:
            made[bits] = _session(resnet18_onnx, R18, bits)
        return made[bits]

    return get


@pytest.mark.slow
@pytest.mark.parametrize("bits", [8, 4])
def test_dequantized_weights_equal_ppq(resnet18_sessions, bits):
    session = resnet18_sessions(bits)
    info, params, fake = session.quantinfo(), session.quantparams(), session.fake_quantized_parameters()
    assert set(fake) == {k for k, v in params.items() if v is not None} and len(fake) == 42
    for key, ppq_value in fake.items():
        node = key.rsplit("_", 2)[0]
        cfg = info[node]
        if key.endswith("_weight"):
            ours = dequantized_weight(cfg, params[key])
        else:
            ours = params[key].astype(np.float32) * cfg.bias_scale
        np.testing.assert_array_equal(ours, ppq_value, err_msg=key)


@pytest.mark.slow
def test_quant_model_matches_ppq_simulation_at_4_bits(resnet18_sessions):
    session = resnet18_sessions(4)
    model = session.export_qdq()
    batch = random_calibset({"input": (1, 3, 224, 224)}, 1, seed=11)[0]
    ppq_out = session.forward(batch)["output"]
    ort_out = run_ort_model(model, {"input": batch["input"].numpy()})[0]
    step = session.quantinfo()["/fc/Gemm"].output_scale
    assert np.mean(np.abs(ppq_out - ort_out) <= step * 1.001) >= 0.995


def run_ort_model(model: onnx.ModelProto, feeds):
    return ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"]).run(None, feeds)


def test_digits_example_keeps_top1_at_8_bits(mapsave, digits_test, tmp_path):
    images, labels = digits_test
    shapes = {"input": list(digits.INPUT_SHAPE)}
    root = digits.write_imagefolder(tmp_path / "calib", split="train", limit_per_class=20)
    calib = imagefolder_calibset(root, shapes, mean=digits.MEAN, std=digits.STD)
    assert len(calib) == 12 and calib[0]["input"].shape == (16, 1, 8, 8)
    result = quantize(shapes, "cpu", digits.MODEL_PATH, mapname="digits8", calibset=calib, calib_steps=16,
                      bit_width=8, mapsave_dir=mapsave)
    fp32 = digits.onnx_top1(digits.MODEL_PATH, images, labels)
    quant = digits.onnx_top1(result.model_path, images, labels)
    assert fp32 > 98.5
    assert abs(fp32 - quant) <= 1.0, (fp32, quant)


def test_two_inputs_two_outputs(two_io_onnx, mapsave):
    shapes = {"x": [2, 3, 16, 16], "y": [2, 1, 16, 16]}
    result = quantize(shapes, "cpu", two_io_onnx, mapname="twoio", calib_steps=8, bit_width=8,
                      mapsave_dir=mapsave, recipe="fast")
    assert set(result.output_snr_db) == {"cls", "seg"}
    info = read_quantinfo("twoio", mapsave)
    assert sum(cfg.op_type == "Conv" for cfg in info.values()) == 4
    rng = np.random.default_rng(3)
    feeds = {"x": rng.normal(size=(5, 3, 16, 16)).astype(np.float32),
             "y": rng.normal(size=(5, 1, 16, 16)).astype(np.float32)}
    fp_cls, fp_seg = run_ort(two_io_onnx, feeds)
    q_cls, q_seg = run_ort(result.model_path, feeds)  # batch 5: dynamic batch kept from the float model
    assert q_cls.shape == (5, 5) and q_seg.shape == (5, 4, 8, 8)
    # random weights and random data: a loose bound; the accuracy claims are made on the trained example
    assert cosine_of(fp_cls, q_cls) > 0.95 and cosine_of(fp_seg, q_seg) > 0.98, result.output_snr_db


@pytest.mark.parametrize("mode,channels", [("RGB", 3), ("L", 1)])
def test_imagefolder_calibration(tmp_path, mode, channels):
    root = write_images(tmp_path / "images", mode, size=(20, 14))
    shapes = {"input": [4, channels, 8, 8]}
    batches = imagefolder_calibset(root, shapes, limit=22)
    assert len(batches) == 5  # 22 images -> 5 full batches of 4
    for batch in batches:
        assert batch["input"].shape == (4, channels, 8, 8) and batch["input"].dtype == torch.float32
    # normalisation: ToTensor in [0, 1], then (x - mean) / std with the ImageNet defaults
    lo, hi = (0 - 0.485) / 0.229, (1 - 0.406) / 0.225
    assert all(lo - 1e-5 <= float(b["input"].min()) and float(b["input"].max()) <= hi + 1e-5 for b in batches)


def test_imagefolder_grayscale_model_quantizes(tmp_path, mapsave, tiny_onnx):
    root = write_images(tmp_path / "images", "RGB", size=(8, 8), per_class=16)
    # a 3-channel model calibrated from RGB images, through quantize
    calib = imagefolder_calibset(root, {"input": [4, 3, 8, 8]})
    result = quantize({"input": [4, 3, 8, 8]}, "cpu", tiny_onnx, mapname="tiny", calibset=calib,
                      calib_steps=8, bit_width=4, mapsave_dir=mapsave)
    info = read_quantinfo("tiny", mapsave)
    assert set(info) >= {"conv", "fc"} and info["conv"].weight_bits == 4
    assert result.output_snr_db["out"] > 5


@pytest.mark.slow
def test_same_seed_same_artifacts(tiny_onnx, tmp_path):
    """Byte-identical artifacts from two processes with different string hashing (PPQ iterates sets of names:
    quant_model.onnx's initializers came out in another order in each process before they were sorted)."""
    outputs = []
    for run in range(2):
        env = {**os.environ, "PYTHONHASHSEED": str(run + 1)}
        subprocess.run([sys.executable, "-m", "maptools", "quantize", str(tiny_onnx), "--input", "input:2,3,8,8",
                        "--mapname", "rep", "--bits", "4", "--seed", "5", "--calib-steps", "8",
                        "--mapsave-dir", str(tmp_path / f"m{run}")], env=env, check=True, capture_output=True)
        outputs.append({name: (tmp_path / f"m{run}" / "rep" / name).read_bytes()
                        for name in ("quantparams.pkl", "quantinfo.pkl", "quant_model.onnx")})
    assert outputs[0] == outputs[1]
    other = quantize({"input": [2, 3, 8, 8]}, "cpu", tiny_onnx, mapname="rep", calib_steps=8, bit_width=4, seed=6,
                     mapsave_dir=tmp_path / "m2")
    assert other.quantinfo_path.read_bytes() != outputs[0]["quantinfo.pkl"]


def test_per_tensor_weights(tiny_onnx, mapsave):
    quantize({"input": [2, 3, 8, 8]}, "cpu", tiny_onnx, mapname="pt", calib_steps=8, bit_width=4, per_channel=False,
             mapsave_dir=mapsave)
    info, params = read_quantinfo("pt", mapsave), read_quantparams("pt", mapsave)
    conv = info["conv"]
    assert conv.weight_scale.shape == (1,) and conv.weight_axis is None
    assert params["conv_conv_weight"].min() >= -8 and params["conv_conv_weight"].max() <= 7
    np.testing.assert_allclose(conv.bias_scale, conv.input_scale * conv.weight_scale, rtol=1e-6)


def test_layer_bits_override_reaches_the_fused_activation(tiny_onnx, mapsave):
    quantize({"input": [2, 3, 8, 8]}, "cpu", tiny_onnx, mapname="lb", calib_steps=8, bit_width=4,
             layer_bits={"conv": 8}, mapsave_dir=mapsave)
    info = read_quantinfo("lb", mapsave)
    assert (info["conv"].weight_bits, info["conv"].output_bits, info["relu"].output_bits) == (8, 8, 8)
    assert (info["fc"].weight_bits, info["fc"].output_bits) == (4, 8)  # default keeps the outputs at 8-bit activations


def test_exports_at_opset13(tmp_path, tiny_onnx, mapsave):
    """quant_model.onnx is at opset 13 whatever the float model's: newer ones are brought down to the opset PPQ
    executes, older ones up to the first with per-channel QuantizeLinear (successive exports, one process)."""
    for name, opset in (("o17", 17), ("o11", 11), ("o13", 13)):
        model = onnx.load(str(tiny_onnx))
        model.opset_import[0].version = opset
        path = tmp_path / f"{name}.onnx"
        onnx.save(model, str(path))
        result = quantize({"input": [2, 3, 8, 8]}, "cpu", path, mapname=name, calib_steps=8, mapsave_dir=mapsave)
        assert onnx.load(str(result.model_path)).opset_import[0].version == 13, name


@pytest.mark.slow
def test_threads_change_no_artifact_byte_and_are_restored(tmp_path):
    """quantize(threads=...) sets torch's CPU threads for its own work only; the map does not depend on it."""
    torch.set_num_threads(2)
    maps = {}
    for threads in (1, 2):
        result = quantize({"input": list(digits.INPUT_SHAPE)}, "cpu", digits.MODEL_PATH, mapname=f"t{threads}",
                          calib_steps=8, bit_width=4, mapsave_dir=tmp_path, threads=threads)
        assert torch.get_num_threads() == 2
        assert json.loads(result.manifest_path.read_text())["settings"]["threads"] == threads
        maps[threads] = [path.read_bytes() for path in (result.quantinfo_path, result.quantparams_path,
                                                        result.model_path)]
    assert maps[1] == maps[2]
    with pytest.raises(InvalidArgumentError, match=r"threads: expected an int >= 1, got 0"):
        quantize({"input": list(digits.INPUT_SHAPE)}, "cpu", digits.MODEL_PATH, mapname="t0", mapsave_dir=tmp_path,
                 threads=0)


def test_power_of_two_scales_are_bit_true(tmp_path):
    """power_of_two=True: every scale is a power of two, and onnxruntime and the integer executor compute what
    PPQ simulated, as for any map."""
    from maptools.quantization import simulate, verify

    result = quantize({"input": list(digits.INPUT_SHAPE)}, "cpu", digits.MODEL_PATH, mapname="p2", calib_steps=8,
                      bit_width=4, mapsave_dir=tmp_path, power_of_two=True)
    info = read_quantinfo("p2", tmp_path)
    scales = [t.scale for r in info.values() for t in [*r.inputs, *r.outputs] if t is not None]
    scales += [float(s) for r in info.values() for s in (r.weight_scale if r.weight_scale is not None else [])]
    scales += [float(s) for r in info.values() for s in (r.bias_scale if r.bias_scale is not None else [])]
    exponents = np.log2(np.asarray(scales, np.float64))
    assert len(scales) > 100 and np.array_equal(exponents, np.round(exponents))
    assert json.loads(result.manifest_path.read_text())["settings"]["power_of_two"] is True
    images, _ = digits.load_split("test")
    report = verify("p2", {"input": images[:64]}, mapsave_dir=tmp_path)
    assert report.get("onnxruntime", "integer").snr_db == float("inf")
    assert report.get("ppq", "onnxruntime").within_one_step == 1.0
    assert simulate("p2", {"input": images[:4]}, mapsave_dir=tmp_path)["logits"].shape == (4, 10)


def test_held_out_error_on_enough_samples_or_says_how_few(tiny_onnx, tmp_path):
    """Batch-1 maps measured the error on 4 samples (a recognizer read 14.3 dB on 4, 9.8 dB on 32): by default
    the analysis takes 32 samples (at least 4 batches); with fewer held out, the summary says how few."""
    from maptools.quantization.calibration import default_analysis_steps
    from maptools.quantization.records import ANALYSIS_SAMPLES

    assert ANALYSIS_SAMPLES == 32
    assert [default_analysis_steps({"x": [b, 3, 8, 8]}) for b in (1, 2, 3, 8, 16, 64)] == [32, 16, 11, 4, 4, 4]
    shapes = {"input": [1, 3, 8, 8]}
    result = quantize(shapes, "cpu", tiny_onnx, mapname="r", calib_steps=8, mapsave_dir=tmp_path, recipe="fast")
    report = json.loads(result.report_path.read_text())
    assert report["analysis"] == {"data": "random (held-out)", "batches": 32, "samples": 32}
    assert result.analysis_samples == 32 and "(random (held-out) data, 32 samples)" in result.summary()
    assert "NOTE" not in result.summary()
    calib = [{"input": torch.randn(1, 3, 8, 8)} for _ in range(11)]  # 8 to calibrate, 3 held out
    result = quantize(shapes, "cpu", tiny_onnx, mapname="u", calibset=calib, calib_steps=8, mapsave_dir=tmp_path,
                      recipe="fast")
    assert result.analysis_samples == 3
    assert "\n  NOTE: the error was measured on only 3 samples; the SNR of so few" in result.summary()
    assert json.loads(result.report_path.read_text())["analysis"]["samples"] == 3
