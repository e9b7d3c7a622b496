"""How weight scales are chosen (maptools.quantization.engine.quantizer.weight_scales) and what it changes."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from maptools.examples import digits
from maptools.quantization import quantize, read_quantinfo, read_quantparams
from maptools.quantization.engine.quantizer import MSE_WEIGHT_GRID, weight_scales

#: A trained depthwise filter (EfficientNet-Lite1's first depthwise Conv, channel 1): a difference of nearly
#: equal large weights whose sum, its response to a flat input, is almost 0.
EDGE_FILTER = np.array([4.414, 9.385, 0.6, -0.909, 0.182, 0.166, -3.609, -9.466, -0.734], np.float64)


def _rounded(weight: np.ndarray, scale: float, low: int, high: int) -> np.ndarray:
    return np.clip(np.round(weight / scale), low, high) * scale


def test_minmax_fits_both_extremes_and_keeps_a_filters_sum() -> None:
    (scale,) = weight_scales(torch.from_numpy(EDGE_FILTER), None, -128, 127, "minmax").tolist()
    rounded = _rounded(EDGE_FILTER, scale, -128, 127)
    assert np.abs(rounded - EDGE_FILTER).max() <= scale / 2 + 1e-12  # nothing clipped
    ppq_scale = np.abs(EDGE_FILTER).max() / 127.5  # PPQ's symmetric min-max
    ppq = _rounded(EDGE_FILTER, ppq_scale, -128, 127)
    # the sum moves by 0.03 here, by 0.10 with PPQ's scale: the shift that broke EfficientNet-Lite1
    assert abs(rounded.sum() - EDGE_FILTER.sum()) < 0.04
    assert abs(ppq.sum() - EDGE_FILTER.sum()) > 0.08


def test_mse_scale_never_rounds_worse_than_minmax() -> None:
    rng = np.random.default_rng(0)
    weight = torch.from_numpy(rng.standard_t(3, (16, 8, 3, 3)))
    for low, high in ((-8, 7), (-2, 1), (-128, 127)):
        minmax = weight_scales(weight, 0, low, high, "minmax")
        mse = weight_scales(weight, 0, low, high, "mse")
        w = weight.numpy().reshape(16, -1)
        for channel in range(16):
            error = ((w[channel] - _rounded(w[channel], float(mse[channel]), low, high)) ** 2).sum()
            baseline = ((w[channel] - _rounded(w[channel], float(minmax[channel]), low, high)) ** 2).sum()
            assert error <= baseline + 1e-12
            assert min(MSE_WEIGHT_GRID) * minmax[channel] - 1e-12 <= mse[channel] <= minmax[channel] + 1e-12
    assert bool((weight_scales(weight, 0, -2, 1, "mse") < weight_scales(weight, 0, -2, 1, "minmax")).any())


def test_all_zero_channel_scale_is_zero_for_the_caller() -> None:
    weight = torch.zeros(2, 3)
    weight[0] = torch.tensor([1.0, -2.0, 0.5])
    assert weight_scales(weight, 0, -8, 7, "minmax").tolist() == [pytest.approx(2.0 / 8), 0.0]


@pytest.mark.slow
@pytest.mark.parametrize(("recipe", "observer"), [("fast", "ppq"), ("default", "minmax"), ("best", "mse")])
def test_each_recipe_records_and_applies_its_weight_observer(tmp_path, recipe: str, observer: str) -> None:
    images, _ = digits.load_split("train")
    calib = [{"input": torch.from_numpy(images[i:i + 16])} for i in range(0, 16 * 8, 16)]
    # nearest rounding: best's learned rounding (tested in test_learned_rounding) does not choose the weight scales
    result = quantize({"input": list(digits.INPUT_SHAPE)}, "cpu", digits.MODEL_PATH, mapname=recipe, calibset=calib,
                      calib_steps=8, bit_width=4, recipe=recipe, mapsave_dir=tmp_path, rounding="nearest")
    import json

    assert json.loads(result.manifest_path.read_text())["settings"]["weight_observer"] == observer
    info, params = read_quantinfo(recipe, tmp_path), read_quantparams(recipe, tmp_path)
    conv = info["/stem/stem.0/Conv"]
    integers = params["/stem/stem.0/Conv_conv_weight"].reshape(conv.weight_scale.size, -1)
    if observer == "minmax":  # each channel reaches one of its range's ends exactly, the other is never passed
        reach = np.maximum(integers.max(axis=1) / 7, integers.min(axis=1) / -8)
        assert np.allclose(reach[integers.any(axis=1)], 1.0, atol=1 / 8)


def test_minmax_observer_keeps_ppqs_scales_for_2_bit_weights(tmp_path) -> None:
    """``default`` (minmax weights) at 2-bit weights: PPQ's clipped scale ``max|w| / 1.5``, not the unclipped one."""
    images, _ = digits.load_split("train")
    calib = [{"input": torch.from_numpy(images[i:i + 16])} for i in range(0, 16 * 8, 16)]
    quantize({"input": list(digits.INPUT_SHAPE)}, "cpu", digits.MODEL_PATH, mapname="w2", calibset=calib,
             calib_steps=8, weight_bits=2, activation_bits=4, recipe="default", layer_bits={"/stem/stem.0/Conv": 4},
             mapsave_dir=tmp_path)
    info, params = read_quantinfo("w2", tmp_path), read_quantparams("w2", tmp_path)
    import onnx
    from onnx import numpy_helper

    graph = onnx.load(str(digits.MODEL_PATH)).graph
    weights = {t.name: numpy_helper.to_array(t) for t in graph.initializer}
    nodes = {n.name: n for n in graph.node}
    checked = 0
    for name, record in info.items():
        key = f"{name}_conv_weight"
        if key not in params or record.weight_bits is None:
            continue
        node = nodes[name]
        w = weights[node.input[1]].reshape(record.weight_scale.size, -1).astype(np.float64)
        live = np.abs(w).max(axis=1) > 0
        if record.weight_bits == 2:  # PPQ's rule: max|w| over (qmax - qmin) / 2
            expected = np.abs(w).max(axis=1) / 1.5
        else:  # the 4-bit stem: minmax, both extremes fit
            expected = np.maximum(w.max(axis=1) / 7, -w.min(axis=1) / 8)
        assert np.allclose(record.weight_scale[live], expected[live], rtol=1e-5), name
        checked += 1
    assert checked >= 3
