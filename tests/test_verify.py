"""verify(): FP32, PPQ's simulation, onnxruntime and the integer executor on the same inputs."""

from __future__ import annotations

import numpy as np
import pytest

from maptools import ArtifactError
from maptools.cli import main
from maptools.examples import digits
from maptools.quantization import quantize, verify


@pytest.fixture(scope="module")
def digits_map(tmp_path_factory):
    root = tmp_path_factory.mktemp("mapsave")
    train, _ = digits.load_split("train")
    calib = [{"input": train[i:i + 16]} for i in range(0, 16 * 16, 16)]
    quantize({"input": list(digits.INPUT_SHAPE)}, "cpu", digits.MODEL_PATH, mapname="d4", calibset=calib,
             calib_steps=16, bit_width=4, mapsave_dir=root, recipe="fast")
    return root


def test_verify_on_held_out_digits(digits_map, digits_test):
    images, _ = digits_test
    report = verify("d4", [{"input": images[i:i + 64]} for i in range(0, 256, 64)], mapsave_dir=digits_map)
    assert report.samples == 256
    ppq_ort = report.get("ppq", "onnxruntime")
    ppq_int = report.get("ppq", "integer")
    for pair in (ppq_ort, ppq_int):
        assert pair.within_one_step >= 0.995 and pair.snr_db >= 35 and pair.top1_agreement >= 0.995, pair
    assert report.get("fp32", "ppq").top1_agreement >= 0.95
    assert len(report.pairs) == 6 and "ppq" in report.table()


def test_verify_default_random_inputs_and_cli(digits_map, capsys):
    report = verify("d4", mapsave_dir=digits_map, batches=2)
    assert report.samples == 32
    assert main(["verify", "d4", "--mapsave-dir", str(digits_map)]) == 0
    assert "onnxruntime" in capsys.readouterr().out


def test_verify_needs_the_original_model(tmp_path, tiny_onnx):
    model = tmp_path / "model.onnx"
    model.write_bytes(tiny_onnx.read_bytes())
    quantize({"input": [2, 3, 8, 8]}, "cpu", model, mapname="t", calib_steps=8, mapsave_dir=tmp_path, recipe="fast")
    model.write_bytes(model.read_bytes() + b"\0")
    with pytest.raises(ArtifactError, match="changed since map 't' was made"):
        verify("t", mapsave_dir=tmp_path)
    model.unlink()
    with pytest.raises(ArtifactError, match="is gone"):
        verify("t", mapsave_dir=tmp_path)


def test_top1_only_for_class_scores():
    from maptools.quantization.verify import compare

    scores = np.array([[0.1, 0.9, 0.0], [0.8, 0.1, 0.1], [0.2, 0.3, 0.5], [0.0, 0.0, 1.0]])
    flipped = scores.copy()
    flipped[1] = [0.1, 0.8, 0.1]  # one of four rows changes its argmax
    assert compare(scores, flipped)["top1"] == 0.75
    assert compare(scores[:, :1], flipped[:, :1])["top1"] is None  # [N, 1]: a single score, no class
    rng = np.random.default_rng(0)
    detections = rng.normal(size=(1, 22, 2100))  # a detector's [1, 22, 2100] output
    assert compare(detections, detections + 0.01)["top1"] is None
    segmentation = rng.normal(size=(2, 4, 8, 8))
    metrics = compare(segmentation, segmentation)
    assert metrics["top1"] is None and metrics["snr_db"] == float("inf") and metrics["cosine"] == 1.0
