"""The manifest records the settings a run applied: observer, unsigned ranges, recipe with a custom PPQ setting."""

from __future__ import annotations

import json
import logging
from pathlib import Path

import pytest

from maptools import InvalidArgumentError, InvalidTypeError
from maptools.examples import digits
from maptools.quantization import quantize, read_quantinfo
from maptools.quantization.artifacts import MANIFEST, QUANTINFO, QUANTPARAMS
from maptools.quantization.engine.recipes import build_setting

SHAPES = {"input": list(digits.INPUT_SHAPE)}


def _quantize(root: Path, mapname: str, model: Path = digits.MODEL_PATH, **kwargs) -> dict:
    shapes = SHAPES if model == digits.MODEL_PATH else {"input": [2, 3, 8, 8]}
    quantize(shapes, "cpu", model, mapname=mapname, calib_steps=8, analysis_steps=1, mapsave_dir=root, **kwargs)
    return json.loads((root / mapname / MANIFEST).read_text())["settings"]


def _unsigned_tensors(root: Path, mapname: str) -> set[str]:
    return {tq.name for record in read_quantinfo(mapname, root).values() for tq in record.outputs
            if tq is not None and tq.qmin == 0}


@pytest.mark.parametrize(("kwargs", "reason"), [
    ({"observer": "kl"}, "with the kl observer (PPQ calibrates it on signed ranges only)"),
    ({"symmetrical": False}, "with symmetrical=False (asymmetric activations use 0..2^b-1 with a zero point)"),
])
def test_recipe_unsigned_ranges_turned_off_are_recorded_off(tmp_path, caplog, tiny_onnx, kwargs, reason):
    with caplog.at_level(logging.INFO, logger="maptools.quantization"):
        settings = _quantize(tmp_path, "m", tiny_onnx, bit_width=8, **kwargs)
    assert settings["recipe"] == "default" and settings["unsigned_nonnegative"] is False
    assert settings["observer"] == kwargs.get("observer", "mse")
    assert f"unsigned_nonnegative: the 'default' recipe's unsigned ranges for non-negative activations are off " \
           f"{reason}" in caplog.messages
    if "observer" in kwargs:  # signed ranges everywhere (asymmetric ones all start at 0)
        assert _unsigned_tensors(tmp_path, "m") == set()


def test_default_recipe_records_unsigned_on(tmp_path, tiny_onnx):
    settings = _quantize(tmp_path, "m", tiny_onnx, bit_width=8)
    assert (settings["observer"], settings["unsigned_nonnegative"], settings["weight_observer"]) == ("mse", True,
                                                                                                      "minmax")
    assert settings["ppq_setting"] == "recipe" and _unsigned_tensors(tmp_path, "m")


@pytest.mark.parametrize(("kwargs", "message"), [
    ({"symmetrical": False}, "unsigned_nonnegative: True needs symmetric activations, but symmetrical=False was "
                             "given"),
    ({"observer": "kl"}, "unsigned_nonnegative: True cannot be used with observer='kl'"),
    ({"setting": "kl"}, "unsigned_nonnegative: True cannot be used with "
                        "setting.quantize_activation_setting.calib_algorithm='kl'"),
])
def test_explicit_unsigned_that_cannot_apply_is_an_error(tmp_path, kwargs, message):
    if kwargs.get("setting") == "kl":
        kwargs["setting"] = build_setting("fast", "cpu", 8, observer="kl")
    with pytest.raises(InvalidArgumentError, match=message.replace("(", r"\(").replace(")", r"\)")):
        _quantize(tmp_path, "m", unsigned_nonnegative=True, **kwargs)
    assert not (tmp_path / "m").exists()


def test_setting_alone_records_its_calibration_algorithm(tmp_path, tiny_onnx):
    settings = _quantize(tmp_path, "m", tiny_onnx, bit_width=8, setting=build_setting("default", "cpu", 8))
    assert settings["recipe"] == "custom" and settings["ppq_setting"] == "custom"
    assert (settings["observer"], settings["unsigned_nonnegative"], settings["weight_observer"]) == ("mse", False,
                                                                                                      "ppq")
    assert _unsigned_tensors(tmp_path, "m") == set()
    plain = _quantize(tmp_path, "plain", tiny_onnx, bit_width=8, setting=build_setting("fast", "cpu", 8))
    assert (plain["recipe"], plain["observer"], plain["unsigned_nonnegative"]) == ("custom", "percentile", False)


def test_setting_with_a_recipe_behaves_like_the_recipe(tmp_path):
    recipe = _quantize(tmp_path, "recipe", bit_width=8)
    custom = _quantize(tmp_path, "custom", bit_width=8, recipe="default", setting=build_setting("default", "cpu", 8))
    assert custom["recipe"] == "default" and custom["ppq_setting"] == "custom"
    for key in ("observer", "unsigned_nonnegative", "weight_observer"):
        assert custom[key] == recipe[key], key
    for filename in (QUANTINFO, QUANTPARAMS):  # the same setting through both routes: the same map
        assert (tmp_path / "custom" / filename).read_bytes() == (tmp_path / "recipe" / filename).read_bytes()


def test_setting_arguments_are_checked(tmp_path):
    with pytest.raises(InvalidArgumentError, match="observer: 'minmax' given, but setting.quantize_activation_setting."
                                                   "calib_algorithm is 'mse'"):
        _quantize(tmp_path, "m", observer="minmax", setting=build_setting("default", "cpu", 8))
    with pytest.raises(InvalidTypeError, match="setting: expected a PPQ QuantizationSetting .* got dict"):
        _quantize(tmp_path, "m", setting={"equalization": True})
    with pytest.raises(InvalidArgumentError, match=r"recipe: expected one of \['fast', 'default', 'best'\] or None, "
                                                   "got 'slow'"):
        _quantize(tmp_path, "m", recipe="slow", setting=build_setting("default", "cpu", 8))
    assert not (tmp_path / "m").exists()
