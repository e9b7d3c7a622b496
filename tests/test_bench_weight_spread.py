"""The weight-spread benchmark: the rounding SNR and tails of each MAC layer's weights."""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import onnx
import torch
from onnx import numpy_helper

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "bench"))

import weight_spread  # noqa: E402

from maptools.examples import digits  # noqa: E402


def _gaussian(rows: int = 64, columns: int = 512) -> torch.Tensor:
    return torch.from_numpy(np.random.default_rng(0).normal(size=(rows, columns)))


def test_gaussian_weights_round_at_the_uniform_grids_snr_and_have_no_tails():
    """A Gaussian channel on its MSE-optimal 16-level grid: about 20 dB (the optimal uniform quantizer's
    20.2 dB), kurtosis near 0; at 8 bits each extra bit adds about 6 dB."""
    snr4, kurtosis = weight_spread.layer_spread(_gaussian(), 0, 4)
    snr8, _ = weight_spread.layer_spread(_gaussian(), 0, 8)
    assert 19.0 < snr4 < 21.5
    assert abs(kurtosis) < 0.3
    assert snr8 - snr4 > 20.0


def test_a_few_large_weights_per_channel_cost_decibels_and_show_in_the_kurtosis():
    """Two weights of 12 sigma in each channel (the recognizer's fourth-stage Convs have such tails): the grid
    either clips them or coarsens for all others, so the SNR falls by more than 3 dB and the kurtosis exceeds 10."""
    heavy = _gaussian().clone()
    heavy[:, :2] = 12.0
    snr_plain, _ = weight_spread.layer_spread(_gaussian(), 0, 4)
    snr_heavy, kurtosis = weight_spread.layer_spread(heavy, 0, 4)
    assert snr_plain - snr_heavy > 3.0
    assert kurtosis > 10.0


def test_the_channel_axis_is_the_one_given():
    """One output channel scaled by 100 is no tail per channel along its axis (its scale follows), in the
    (out, in) layout and in a MatMul's (in, out) one; read along the other axis it is one 100x weight in each row."""
    w = _gaussian(32, 256)
    w[0] *= 100.0
    for weight, axis in ((w, 0), (w.T.contiguous(), 1)):
        snr, kurtosis = weight_spread.layer_spread(weight, axis, 4)
        assert snr > 19.0 and abs(kurtosis) < 0.5
    assert weight_spread.layer_spread(w.T.contiguous(), 0, 4)[1] > 20.0


def test_every_mac_of_the_bundled_mobile_cnn_is_listed_by_kind():
    """The mobile digits CNN: 16 MACs (12 ungrouped Convs, 3 depthwise, 1 Gemm) with all their weights, each at
    a 4-bit SNR of its trained weights between 15 and 30 dB."""
    path = digits.MODEL_PATH.parent / "digits_mobile.onnx"
    rows = weight_spread.model_spread(path, {"input": list(digits.INPUT_SHAPE)}, 4)
    proto = onnx.load(str(path))
    weights = {init.name: numpy_helper.to_array(init) for init in proto.graph.initializer}
    macs = [node for node in proto.graph.node if node.op_type in weight_spread.MACS]
    assert len(rows) == len(macs) == 16
    assert sum(row["weights"] for row in rows) == sum(weights[node.input[1]].size for node in macs)
    summary = weight_spread.summary(rows)
    assert {kind: figures["layers"] for kind, figures in summary.items()} == {"conv": 12, "depthwise": 3, "matmul": 1}
    # 32 + 48 + 72 depthwise 3x3 filters; the 10 x 64 classifier; the first Conv (16 x 1 x 3 x 3) is ungrouped
    assert {kind: figures["weights"] for kind, figures in summary.items()} == {
        "conv": 11824, "depthwise": 1368, "matmul": 640}
    assert all(15.0 < row["snr_db"] < 30.0 for row in rows)


def test_sensitivity_rounds_one_layer_at_a_time_then_each_kind_then_all():
    """On the mobile digits CNN with 16 test digits: one row per MAC (its weight alone rounded, the output still
    close to float), one per kind and one for every MAC, which costs the output more than any single layer; at
    8 bits every row is more than 15 dB closer to float than at 4; the metric sees the same outputs."""
    path = digits.MODEL_PATH.parent / "digits_mobile.onnx"
    images, _ = digits.load_split("test")
    feeds = [{"input": images[i:i + 1]} for i in range(16)]
    seen: list[int] = []

    def metric(reference, outputs):
        seen.append(len(outputs))
        agree = [np.argmax(r[0]) == np.argmax(o[0]) for r, o in zip(reference, outputs, strict=True)]
        return {"top1_agreement": float(np.mean(agree)), "note": "not a number"}

    shapes = {"input": [1, *digits.INPUT_SHAPE[1:]]}
    rows4 = weight_spread.sensitivity(path, shapes, 4, feeds, metric)
    rows8 = weight_spread.sensitivity(path, shapes, 8, feeds)
    labels = [row["layers"] for row in rows4]
    assert len(rows4) == 16 + 3 + 1 and labels[-3:] == ["every depthwise (3)", "every matmul (1)", "every MAC (16)"]
    singles = [row["output_snr_db"] for row in rows4[:16]]
    assert len(singles) == 16 and all(12.0 < snr < 60.0 for snr in singles)
    assert rows4[-1]["output_snr_db"] < min(singles)
    assert all(r8["output_snr_db"] > r4["output_snr_db"] + 15.0 for r4, r8 in zip(rows4, rows8, strict=True))
    assert seen == [16] * 20 and set(rows4[0]["metric"]) == {"top1_agreement"}
    assert rows4[-1]["metric"]["top1_agreement"] >= 0.75 and "metric" not in rows8[0]


def test_along_follows_every_mac_output_of_a_map_and_of_the_rounded_graph(tmp_path):
    """A W8A8 map of the mobile digits CNN against FP32 along the network: each of the 16 MAC outputs has a row; the
    map (8-bit weights) is above 20 dB at every one, the graph with every weight rounded at 4 bits is lower than
    the map at every one, and lower at the last MAC than at the first (the error adds up)."""
    from maptools.quantization import quantize

    path = digits.MODEL_PATH.parent / "digits_mobile.onnx"
    shapes = {"input": [1, *digits.INPUT_SHAPE[1:]]}
    images, _ = digits.load_split("test")
    quantize(shapes, "cpu", str(path), mapname="mobile", calibset=None, calib_steps=8, bit_width=8,
             mapsave_dir=str(tmp_path))
    feeds = [{"input": images[i:i + 1]} for i in range(16)]
    rows = weight_spread.along(path, shapes, 4, feeds, tmp_path / "mobile" / "quant_model.onnx")
    assert len(rows) == 16 and len({row["tensor"] for row in rows}) == 16
    assert all(row["map_snr_db"] > 20.0 for row in rows)
    assert all(row["nearest_snr_db"] < row["map_snr_db"] for row in rows)
    assert rows[-1]["nearest_snr_db"] < rows[0]["nearest_snr_db"]
