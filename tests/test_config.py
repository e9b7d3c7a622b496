"""The option table (maptools.quantization.config): one descriptor per option drives the checks, the API, the CLI and
the manifest."""

from __future__ import annotations

import argparse
import json

import pytest

from maptools import InvalidArgumentError, InvalidTypeError
from maptools.cli import _build_parser, main
from maptools.quantization import CIMSpec, QuantizeConfig, quantize
from maptools.quantization.artifacts import MANIFEST, QUANTINFO, QUANTPARAMS
from maptools.quantization.config import GROUPS, OPTIONS, RECIPES, parse_layer_bits

SHAPES = {"input": [2, 3, 8, 8]}


def _quantize_parser() -> argparse.ArgumentParser:
    parser = _build_parser()
    return next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction)).choices["quantize"]


def test_every_option_has_a_flag_a_valid_default_and_help():
    parser = _quantize_parser()
    flags = {s: a for a in parser._actions for s in a.option_strings}
    assert {opt.group for opt in OPTIONS} == {*GROUPS, "cim"} and len(OPTIONS) == len({o.name for o in OPTIONS})
    for opt in OPTIONS:
        assert opt.flag in flags and flags[opt.flag].dest == opt.name, opt.name
        assert all(flags[alias].dest == opt.name for alias in opt.aliases), opt.name
        assert opt.help and (opt.cli_required or "default" in flags[opt.flag].help), opt.name
        default = opt.check(opt.default, opt.name)  # layer_bits: None -> {}
        assert opt.check(default, opt.name) == default and default == (opt.default or default), opt.name
        if opt.choices:
            assert all(opt.check(choice, opt.name) == choice for choice in opt.choices), opt.name
    assert QuantizeConfig().as_options() == {opt.name: opt.check(opt.default, opt.name) for opt in OPTIONS}


def test_manifest_settings_round_trip():
    config = QuantizeConfig.from_options(bit_width=4, activation_bits=6, layer_bits={"conv": (3, 5)}, recipe="best",
                                         symmetrical=False, calib_steps=9, weight_observer="mse", threads=2,
                                         cim={"rows": 128, "adc_bits": 6})
    settings = json.loads(json.dumps(config.settings()))  # as the manifest stores it
    assert settings["layer_bits"] == {"conv": [3, 5]} and settings["cim"]["rows"] == 128
    assert "mapname" not in settings and "first_last_bits" not in settings
    assert QuantizeConfig.from_settings(settings) == config
    assert "cim" not in QuantizeConfig().settings()


@pytest.mark.parametrize(("options", "error", "argument"), [
    ({"bit_width": 9}, InvalidArgumentError, "bit_width"),
    ({"weight_observer": "median"}, InvalidArgumentError, "weight_observer"),
    ({"recipe": "slow"}, InvalidArgumentError, "recipe"),
    ({"cim": {"rows": 128, "nope": 1}}, InvalidArgumentError, "cim"),
    ({"cim": True}, InvalidTypeError, "cim"),
    ({"time_budget": -1}, InvalidArgumentError, "time_budget"),
    ({"layer_bits": {"conv": (4, 9)}}, InvalidArgumentError, "layer_bits['conv'][1]"),
    ({"bits": 4}, InvalidArgumentError, "bits"),
])
def test_bad_option_names_itself(options, error, argument):
    with pytest.raises(error) as caught:
        QuantizeConfig.from_options(**options)
    assert str(caught.value).startswith(f"{argument}: ")


def test_cim_accepts_a_spec_or_a_mapping():
    spec = CIMSpec(rows=128, adc_bits=6)
    assert QuantizeConfig.from_options(cim={"rows": 128, "adc_bits": 6}).cim == spec
    assert QuantizeConfig.from_options(cim=spec).cim is spec


@pytest.mark.parametrize(("old", "new"), [
    (["--bits", "4"], ["--bit-width", "4"]),
    (["--act-bits", "6"], ["--activation-bits", "6"]),
    (["--asymmetric"], ["--no-symmetrical"]),
    (["--per-tensor"], ["--no-per-channel"]),
])
def test_old_flags_are_aliases(old, new):
    parser = _quantize_parser()
    common = ["m.onnx", "--input", "input:2,3,8,8", "--mapname", "m"]
    assert vars(parser.parse_args(common + old)) == vars(parser.parse_args(common + new))


def test_layer_bits_flag():
    assert parse_layer_bits("conv=4,fc=6:8") == {"conv": 4, "fc": (6, 8)}
    args = _quantize_parser().parse_args(["m.onnx", "--input", "x:1", "--mapname", "m", "--layer-bits", "a=4,b=3:8"])
    assert args.layer_bits == {"a": (4, 4), "b": (3, 8)}


def test_bad_layer_bits_flag_exits_2(tiny_onnx, tmp_path, capsys):
    code = main(["quantize", str(tiny_onnx), "--input", "input:2,3,8,8", "--mapname", "m", "--layer-bits", "a=9",
                 "--mapsave-dir", str(tmp_path)])
    assert code == 2 and "argument --layer-bits: layer_bits['a']: expected a bit width" in capsys.readouterr().err


def test_recipes_defined_once():
    assert _quantize_parser()._option_string_actions["--recipe"].metavar == "{" + ",".join(RECIPES) + "}"


def test_new_option_through_the_table_api_config_cli_manifest(tiny_onnx, tmp_path, capsys):
    """weight_observer, added through the table: the API's keyword, a config, the CLI flag and the manifest agree."""
    root = tmp_path / "mapsave"
    common = {"calib_steps": 8, "analysis_steps": 1, "mapsave_dir": root, "bit_width": 3}
    quantize(SHAPES, "cpu", tiny_onnx, mapname="kw", weight_observer="mse", **common)
    config = QuantizeConfig.from_options(weight_observer="mse", **common)
    quantize(SHAPES, "cpu", tiny_onnx, mapname="cfg", config=config)
    quantize(SHAPES, "cpu", tiny_onnx, mapname="default", **common)
    assert main(["quantize", str(tiny_onnx), "--input", "input:2,3,8,8", "--mapname", "cli", "--calib-steps", "8",
                 "--analysis-steps", "1", "--bits", "3", "--weight-observer", "mse", "--mapsave-dir", str(root)]) == 0
    assert "--weight-observer" in _quantize_parser().format_help()
    capsys.readouterr()

    def settings(name):
        return json.loads((root / name / MANIFEST).read_text())["settings"]

    assert [settings(n)["weight_observer"] for n in ("kw", "cfg", "cli", "default")] == ["mse"] * 3 + ["minmax"]
    for name in ("cfg", "cli"):
        for file in (QUANTINFO, QUANTPARAMS):
            assert (root / name / file).read_bytes() == (root / "kw" / file).read_bytes(), (name, file)
    assert (root / "default" / QUANTPARAMS).read_bytes() != (root / "kw" / QUANTPARAMS).read_bytes()
