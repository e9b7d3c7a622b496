"""Bit splits, per-layer precision, observers and recipes, measured on the two bundled digits models.

Every accuracy figure is top-1 of ``quant_model.onnx`` through onnxruntime on the 540 held-out digits;
calibration uses batches of 16 training digits (the arrays ``write_imagefolder`` + ``imagefolder_calibset``
would produce, built directly from ``load_split('train')`` to save time).
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

from maptools.examples import digits, mobile
from maptools.quantization import OBSERVERS, RECIPES, quantize, read_quantinfo, read_quantparams
from maptools.quantization.engine.recipes import build_setting

SHAPES = {digits.INPUT_NAME: list(digits.INPUT_SHAPE)}
FIRST_CONV = "/stem/stem.0/Conv"
LAST_GEMM = "/fc/Gemm"
WEIGHTED = ("Conv", "Gemm")


@pytest.fixture(scope="module")
def calib32() -> list[dict[str, torch.Tensor]]:
    """32 batches of 16 training digits, shuffled with a fixed seed (as ``imagefolder_calibset`` does)."""
    images, _ = digits.load_split("train")
    order = np.random.default_rng(0).permutation(len(images))[: 32 * 16]
    return [{digits.INPUT_NAME: torch.from_numpy(images[order[i : i + 16]])} for i in range(0, len(order), 16)]


@pytest.fixture(scope="module")
def fp32_top1(digits_test) -> dict[str, float]:
    images, labels = digits_test
    return {"digits": digits.onnx_top1(digits.MODEL_PATH, images, labels),
            "mobile": digits.onnx_top1(mobile.MODEL_PATH, images, labels)}


def _quantize(model, mapsave, name, calib, steps=8, **kwargs):
    kwargs.setdefault("recipe", "fast")
    return quantize(SHAPES, "cpu", model, mapname=name, calibset=calib[:steps], calib_steps=steps,
                    mapsave_dir=mapsave, **kwargs)


def _top1(result, digits_test) -> float:
    images, labels = digits_test
    return digits.onnx_top1(result.model_path, images, labels)


def _weight_key(name: str, op_type: str) -> str:
    return f"{name}_{'conv' if op_type == 'Conv' else 'gemm'}_weight"


@pytest.mark.parametrize(("w_bits", "a_bits"), [(4, 8), (2, 4)])
def test_bit_split_in_quantinfo_and_quantparams(mapsave, calib32, w_bits, a_bits):
    name = f"split_w{w_bits}a{a_bits}"
    _quantize(digits.MODEL_PATH, mapsave, name, calib32, weight_bits=w_bits, activation_bits=a_bits)
    info, params = read_quantinfo(name, mapsave), read_quantparams(name, mapsave)
    w_low, w_high = -(2 ** (w_bits - 1)), 2 ** (w_bits - 1) - 1
    a_low, a_high = -(2 ** (a_bits - 1)), 2 ** (a_bits - 1) - 1
    weighted = [cfg for cfg in info.values() if cfg.op_type in WEIGHTED]
    assert len(weighted) == 9  # 8 Conv + 1 Gemm
    for cfg in info.values():
        assert cfg.output_bits == a_bits and (cfg.io_min, cfg.io_max) == (a_low, a_high), cfg
        if cfg.input_bits is not None:
            assert cfg.input_bits == a_bits, cfg
    for cfg in weighted:
        assert (cfg.weight_bits, cfg.input_bits) == (w_bits, a_bits), cfg
        assert (cfg.weight_min, cfg.weight_max) == (w_low, w_high)
        weight = params[_weight_key(cfg.name, cfg.op_type)]
        assert np.issubdtype(weight.dtype, np.integer)
        assert weight.min() == w_low or weight.max() == w_high  # min-max weights reach the range end
        assert w_low <= weight.min() and weight.max() <= w_high
        assert cfg.bias_bits == 32


def test_layer_bits_first_conv_and_last_gemm_at_8_bits(mapsave, calib32, digits_test):
    name = "layer_bits"
    result = _quantize(digits.MODEL_PATH, mapsave, name, calib32, bit_width=4,
                       layer_bits={FIRST_CONV: 8, LAST_GEMM: 8})
    info, params = read_quantinfo(name, mapsave), read_quantparams(name, mapsave)
    for node in (FIRST_CONV, LAST_GEMM):
        cfg = info[node]
        assert (cfg.weight_bits, cfg.input_bits, cfg.weight_min, cfg.weight_max) == (8, 8, -128, 127), cfg
        weight = params[_weight_key(node, cfg.op_type)]
        assert weight.min() < -8 or weight.max() > 7  # really 8-bit integers, not 4-bit ones
    assert info[LAST_GEMM].output_bits == 8
    others = [cfg for cfg in info.values() if cfg.op_type in WEIGHTED and cfg.name not in (FIRST_CONV, LAST_GEMM)]
    assert len(others) == 7
    for cfg in others:
        assert (cfg.weight_bits, cfg.input_bits, cfg.output_bits) == (4, 4, 4), cfg
        weight = params[_weight_key(cfg.name, cfg.op_type)]
        assert weight.min() >= -8 and weight.max() <= 7
    assert result.operators[FIRST_CONV].weight_bits == 8
    assert _top1(result, digits_test) >= 90.0


@pytest.mark.parametrize("observer", OBSERVERS)
def test_observer_runs_at_8_and_4_bits(mapsave, calib32, digits_test, fp32_top1, observer):
    result = _quantize(digits.MODEL_PATH, mapsave, f"obs_{observer}_8", calib32, bit_width=8, observer=observer)
    assert _top1(result, digits_test) >= fp32_top1["digits"] - 0.5
    assert result.output_snr_db[digits.OUTPUT_NAME] > 25.0
    if observer == "kl":
        return  # PPQ 0.6.6's KL search is degenerate below 5 activation bits (see the docs)
    result = _quantize(digits.MODEL_PATH, mapsave, f"obs_{observer}_4", calib32, bit_width=4, observer=observer)
    assert _top1(result, digits_test) >= fp32_top1["digits"] - 3.0
    assert result.output_snr_db[digits.OUTPUT_NAME] > 7.0


def test_recipes_build_distinct_settings():
    fast, default, best = (build_setting(recipe, "cpu", 32) for recipe in RECIPES)
    assert not (fast.bias_correct or fast.lsq_optimization or fast.equalization)
    assert best.lsq_optimization and best.lsq_optimization_setting.collecting_device == "cpu"


def test_default_recipe_digits_w4a4_within_1_point(mapsave, calib32, digits_test, fp32_top1):
    result = _quantize(digits.MODEL_PATH, mapsave, "default_w4a4", calib32, steps=32, bit_width=4,
                       recipe="default")
    assert _top1(result, digits_test) >= fp32_top1["digits"] - 1.0
