"""Each fact of a map stored once: records refer to cim.json, the format version follows the files a map holds."""

from __future__ import annotations

import dataclasses
import json
import os
import subprocess
import sys
import tarfile
import textwrap
from pathlib import Path

import numpy as np
import pytest

from maptools import ArtifactError, InvalidArgumentError
from maptools.examples import digits
from maptools.quantization import (
    CIMSpec,
    OperatorQuantConfig,
    TensorQuant,
    quantize,
    read_map,
    read_quantinfo,
    simulate,
)
from maptools.quantization.artifacts import MANIFEST, dump_pickle, read_manifest, read_pickle
from maptools.quantization.cim import MapCalibration, read_map_calibration
from maptools.quantization.cimmap import write_map_calibration
from maptools.quantization.cimmap.content import resolve_record_cim
from maptools.quantization.format import CIM_FILE, CIM_FORMAT_VERSION, FORMAT_VERSION
from maptools.quantization.mapdir import add_map_file
from maptools.quantization.placement import AdcGains, CrossbarLayout, CrossbarPlacement, RequantKeys
from maptools.quantization.schemas import check_quantinfo

ROOT = Path(__file__).resolve().parents[1]
#: main's last commit before the records stopped copying the CIM spec and the ADC ranges.
OLD_WRITER = "1350933"
SHAPES = {"input": list(digits.INPUT_SHAPE)}
SPEC_TEXT = "rows=64,cell_bits=2,adc_bits=6,adc_range=calibrated"
SPEC = CIMSpec.parse(SPEC_TEXT)


def test_adding_cim_json_makes_the_map_format_2_1(tiny_onnx, tmp_path):
    quantize({"input": [2, 3, 8, 8]}, "cpu", tiny_onnx, mapname="m", calib_steps=8, analysis_steps=1,
             mapsave_dir=tmp_path, recipe="fast")
    assert json.loads((tmp_path / "m" / MANIFEST).read_text())["format_version"] == FORMAT_VERSION == "2.0"
    write_map_calibration("m", MapCalibration(spec=CIMSpec(adc_bits=6), adc={}), mapsave_dir=tmp_path)
    manifest = json.loads((tmp_path / "m" / MANIFEST).read_text())
    assert manifest["format_version"] == CIM_FORMAT_VERSION == "2.1" and "cim.json" in manifest["files"]
    assert read_map("m", tmp_path).cim["spec"]["adc_bits"] == 6


def test_records_hold_the_first_input_once():
    first = TensorQuant("x", 4, 0.5, 3, 0, 15)
    record = OperatorQuantConfig("add", "Add", inputs=[None, first, TensorQuant("y", 8, 0.1, 0, -128, 127)])
    assert (record.input_bits, record.input_scale, record.input_zero_point) == (4, 0.5, 3)
    assert not {"input_bits", "input_scale", "input_zero_point"} & set(record.__getstate__())
    older = {**record.__getstate__(), "input_bits": 4, "input_scale": 0.5, "input_zero_point": 3}
    restored = OperatorQuantConfig.__new__(OperatorQuantConfig)
    restored.__setstate__(older)  # as the unpickler does with a record of an older map
    assert restored == record and restored.__getstate__() == record.__getstate__()
    assert OperatorQuantConfig("relu", "Relu").input_bits is None


def _old_maptools(target: Path) -> Path:
    """The package as main's code at :data:`OLD_WRITER` wrote maps, unpacked under ``target``."""
    probe = subprocess.run(["git", "-C", str(ROOT), "cat-file", "-e", f"{OLD_WRITER}^{{commit}}"],
                           capture_output=True, check=False)
    if probe.returncode != 0:
        pytest.skip(f"needs the repository's history (commit {OLD_WRITER}) to write a map with the old code")
    target.mkdir(parents=True)
    archive = target / "old.tar"
    subprocess.run(["git", "-C", str(ROOT), "archive", "-o", str(archive), OLD_WRITER, "maptools"], check=True)
    with tarfile.open(archive) as tar:
        tar.extractall(target, filter="data")
    return target


@pytest.mark.slow
def test_a_map_written_by_the_old_code_still_loads_and_resolves_the_same(tmp_path):
    old = _old_maptools(tmp_path / "old_code")
    mapsave = tmp_path / "mapsave"
    script = textwrap.dedent(f"""
        from maptools.examples import digits
        from maptools.quantization import quantize
        from maptools.quantization.cim import CIMSpec
        quantize({SHAPES!r}, "cpu", digits.MODEL_PATH, mapname="old", calib_steps=8, analysis_steps=1,
                 bit_width=4, recipe="fast", mapsave_dir={str(mapsave)!r}, cim=CIMSpec.parse({SPEC_TEXT!r}))
    """)
    env = {**os.environ, "PYTHONPATH": str(old)}
    subprocess.run([sys.executable, "-c", script], check=True, env=env, cwd=old, timeout=300)
    quantize(SHAPES, "cpu", digits.MODEL_PATH, mapname="new", calib_steps=8, analysis_steps=1, bit_width=4,
             recipe="fast", mapsave_dir=mapsave, cim=SPEC)
    old_info, new_info = read_quantinfo("old", mapsave), read_quantinfo("new", mapsave)
    calibration = read_map_calibration("new", mapsave)
    assert read_map_calibration("old", mapsave).spec == calibration.spec == SPEC
    crossbar = [name for name, record in new_info.items() if record.cim is not None]
    assert crossbar and crossbar == [name for name, record in old_info.items() if record.cim is not None]
    assert list(old_info) == list(new_info)
    for name, record in new_info.items():  # input_* read from inputs, as older maps copied them
        old_record = old_info[name]
        assert (record.input_bits, record.input_scale, record.input_zero_point) == (
            old_record.input_bits, old_record.input_scale, old_record.input_zero_point)
        assert "input_scale" not in old_record.__dict__ and "input_scale" not in record.__getstate__()
    for name in crossbar:
        assert old_info[name].cim.spec is not None and new_info[name].cim.spec is None  # copied before, once now
        assert "spec" in old_info[name].cim.to_dict() and "spec" not in new_info[name].cim.to_dict()
        assert resolve_record_cim(old_info[name], calibration) is old_info[name].cim  # old entries as they are
        assert resolve_record_cim(new_info[name], calibration) == old_info[name].cim
    batch = {"input": digits.load_split("test")[0][:16]}
    old_out = simulate("old", batch, mapsave_dir=mapsave, cim=True)
    new_out = simulate("new", batch, mapsave_dir=mapsave, cim=True)
    for key in new_out:
        np.testing.assert_array_equal(old_out[key], new_out[key])



def test_cim_means_the_same_in_quantize_and_simulate(tiny_onnx, tmp_path):
    """A CIMSpec or a mapping of its fields, in both; True is simulate's only (the map's own cim.json)."""
    fields = {"rows": 16, "cell_bits": 2, "adc_bits": 5}
    quantize({"input": [2, 3, 8, 8]}, "cpu", tiny_onnx, mapname="m", calib_steps=8, analysis_steps=1,
             mapsave_dir=tmp_path, recipe="fast", cim=fields)
    assert read_map_calibration("m", tmp_path).spec == CIMSpec(**fields)
    x = {"input": np.random.default_rng(0).normal(size=(2, 3, 8, 8)).astype(np.float32)}
    by_mapping = simulate("m", x, mapsave_dir=tmp_path, cim=fields)
    by_spec = simulate("m", x, mapsave_dir=tmp_path, cim=CIMSpec(**fields))
    own = simulate("m", x, mapsave_dir=tmp_path, cim=True)
    for name, value in by_spec.items():
        np.testing.assert_array_equal(by_mapping[name], value)
        np.testing.assert_array_equal(own[name], value)
    with pytest.raises(InvalidArgumentError, match=r"^CIMSpec.from_dict: unknown field\(s\) 'cels'"):
        simulate("m", x, mapsave_dir=tmp_path, cim={"cels": 2})


def _placement(**changes) -> CrossbarPlacement:
    layout = CrossbarLayout(op_type="Conv", weight_shape=(4, 3, 3, 3), trans_b=False, weight_bits=4, weight_min=-7,
                            encoding="differential", signs=2, slices=2, cell_bits=2, offset=0, columns_per_weight=4,
                            groups=1, out_channels=4, depth=27, row_tiles=2, channels_per_array=4, col_tiles=1,
                            arrays=2, utilization=0.42)
    fields = {"file": "cim.json", "input_planes": 4, "layout": layout,
              "adc": AdcGains(bits=6, range="calibrated", levels=63, fraction_bits=16,
                              gains=tuple(tuple((1 << 16, 3 << 15, 5, 7) for _ in range(2)) for _ in range(2))),
              "weight_slices": "conv_conv_weight_slices",
              "requant": RequantKeys("fixed_point", "conv_conv_requant_multiplier", "conv_conv_requant_shift")}
    return CrossbarPlacement(**{**fields, **changes})


def _builtins_only(value) -> bool:
    if isinstance(value, dict):
        return all(isinstance(k, str) and _builtins_only(v) for k, v in value.items())
    if isinstance(value, list):
        return all(_builtins_only(v) for v in value)
    return value is None or type(value) in (bool, int, float, str)


@pytest.mark.parametrize("placement", [_placement(), _placement(adc=None, requant=None)], ids=["adc", "ideal"])
def test_a_placement_pickles_as_the_plain_data_it_reads_back_from(placement):
    """The typed field pickles as the dicts and lists maps hold (same bytes), and reads back typed."""
    data = placement.to_dict()
    assert _builtins_only(data) and list(data) == ["file", "input_planes", "layout", "adc", "weight_slices", "requant"]
    assert CrossbarPlacement.from_dict(data) == placement
    typed = OperatorQuantConfig("conv", "Conv", cim=placement)
    plain = OperatorQuantConfig("conv", "Conv", cim=data)  # what the records held before the type
    assert dump_pickle({"conv": typed}) == dump_pickle({"conv": plain})
    back = read_pickle(dump_pickle({"conv": typed}), "quantinfo.pkl")["conv"]
    assert type(back.cim) is CrossbarPlacement and back == typed


def test_a_12_maps_copies_read_back_in_their_places():
    """The spec and the ranges 1.2 maps copied into every record: typed, and written back in the same key order."""
    ranges = tuple(tuple((63.0, 94.5, 1.0, 2.0) for _ in range(2)) for _ in range(2))
    old = _placement(spec={"rows": 64, "adc_bits": 6, "adc_range": "calibrated"},
                     adc=dataclasses.replace(_placement().adc, ranges=ranges))
    data = old.to_dict()
    assert list(data) == ["spec", "file", "input_planes", "layout", "adc", "weight_slices", "requant"]
    assert list(data["adc"]) == ["bits", "range", "levels", "fraction_bits", "ranges", "gains"]
    assert CrossbarPlacement.from_dict(data) == old


def _broken(path: tuple, value) -> dict:
    data = _placement().to_dict()
    target = data
    for key in path[:-1]:
        target = target[key]
    if value is KeyError:
        del target[path[-1]]
    else:
        target[path[-1]] = value
    return data


@pytest.mark.parametrize(("path", "value", "named"), [
    (("layout", "depth"), "27", r"cim\.layout\.depth is str 27, expected int"),
    (("layout", "trans_b"), 1, r"cim\.layout\.trans_b is int 1, expected bool"),
    (("layout", "weight_shape"), 4, r"cim\.layout\.weight_shape is int 4, expected a list"),
    (("layout", "utilization"), float("nan"), r"cim\.layout\.utilization is float nan, expected float"),
    (("adc", "gains"), [[[1, 2.5]]], r"cim\.adc\.gains\[0\]\[0\]\[1\] is float 2\.5, expected int"),
    (("adc", "levels"), 1 << 40, r"cim\.adc\.levels is int \d+, expected int"),
    (("adc", "bits"), True, r"cim\.adc\.bits is bool True, expected int"),
    (("requant",), "fixed_point", r"cim\.requant is str fixed_point, expected a mapping of RequantKeys"),
    (("weight_slices",), KeyError, r"cim: key 'weight_slices' is missing"),
    (("layout", "rows"), 64, r"cim\.layout: unknown key\(s\) \['rows'\]"),
    (("spec",), {"rows": [64]}, r"cim\.spec is dict .*, expected a flat mapping"),
])
def test_a_placement_from_bad_data_names_the_key(path, value, named):
    with pytest.raises(ArtifactError, match=f"^{named}"):
        CrossbarPlacement.from_dict(_broken(path, value))


def test_a_record_with_a_bad_placement_is_refused_naming_it():
    plain = OperatorQuantConfig("conv", "Conv", cim=_broken(("adc", "fraction_bits"), None))
    with pytest.raises(ArtifactError, match=r"^quantinfo\.pkl: record 'conv': field 'cim'\.adc\.fraction_bits is "
                                            "null, expected int"):
        read_pickle(dump_pickle({"conv": plain}), "quantinfo.pkl")


@pytest.fixture
def calibrated_map(tiny_onnx, tmp_path) -> Path:
    quantize({"input": [2, 3, 8, 8]}, "cpu", tiny_onnx, mapname="m", calib_steps=8, analysis_steps=1,
             mapsave_dir=tmp_path, recipe="fast", cim={"rows": 16, "cell_bits": 2, "adc_bits": 5,
                                                       "adc_range": "calibrated"})
    return tmp_path


def _doubled(calibration: MapCalibration) -> MapCalibration:
    adc = {name: dataclasses.replace(entry, ranges=entry.ranges * 2) for name, entry in calibration.adc.items()}
    return dataclasses.replace(calibration, adc=adc)


def test_records_gains_are_checked_against_cim_json_when_the_map_runs(calibrated_map):
    """The records' ADC gains are derived from cim.json (for the converter): a cim.json they disagree with is an
    ArtifactError naming the record when the map is run on its crossbar, not a silently different chip."""
    mapsave = calibrated_map
    x = {"input": np.random.default_rng(0).normal(size=(2, 3, 8, 8)).astype(np.float32)}
    simulate("m", x, mapsave_dir=mapsave, cim=True)  # as written: they agree
    directory = mapsave / "m"
    # another cim.json put in place behind maptools' back (as write_map_calibration let one do before)
    add_map_file(directory, CIM_FILE, _doubled(read_map_calibration("m", mapsave)).to_json(), read_manifest(directory))
    with pytest.raises(ArtifactError, match=r"^quantinfo\.pkl: record '[^']+': field 'cim\.adc'\.gains differ"):
        simulate("m", x, mapsave_dir=mapsave, cim=True)


def test_write_map_calibration_keeps_a_cim_maps_crossbar(calibrated_map):
    """A map quantized with cim= holds its crossbar's layout and gains in its records: storing its calibration again
    is fine, another spec or other ranges are refused before anything is written."""
    mapsave = calibrated_map
    calibration = read_map_calibration("m", mapsave)
    before = (mapsave / "m" / CIM_FILE).read_bytes()
    write_map_calibration("m", calibration, mapsave_dir=mapsave)
    with pytest.raises(InvalidArgumentError, match=r"^calibration: its ADC ranges differ"):
        write_map_calibration("m", _doubled(calibration), mapsave_dir=mapsave)
    with pytest.raises(InvalidArgumentError, match=r"^calibration: for crossbar rows=32"):
        write_map_calibration("m", MapCalibration(spec=calibration.spec.replace(rows=32), adc={}), mapsave_dir=mapsave)
    assert (mapsave / "m" / CIM_FILE).read_bytes() == before


def test_manifest_settings_cim_is_checked_against_cim_json(calibrated_map):
    """``settings.cim`` records the spec quantize ran with, which is cim.json's: a manifest saying otherwise is an
    ArtifactError naming the field when the map runs on its crossbar."""
    manifest_path = calibrated_map / "m" / MANIFEST
    manifest = json.loads(manifest_path.read_text())
    assert manifest["settings"]["cim"] == read_map_calibration("m", calibrated_map).spec.to_dict()
    manifest["settings"]["cim"]["rows"] = 32
    manifest_path.write_text(json.dumps(manifest))
    x = {"input": np.zeros((2, 3, 8, 8), np.float32)}
    with pytest.raises(ArtifactError, match=r"^manifest\.json: field 'settings\.cim' is .*'rows': 32"):
        simulate("m", x, mapsave_dir=calibrated_map, cim=True)


def test_the_schema_wants_a_typed_placement_in_memory():
    """A record built in memory with the plain dict instead of the type is refused by the record schema."""
    check_quantinfo({"conv": OperatorQuantConfig("conv", "Conv", cim=_placement())})
    with pytest.raises(ArtifactError, match=r"^quantinfo\.pkl: record 'conv': field 'cim' is dict .*, expected "
                                            r"CrossbarPlacement \| None$"):
        check_quantinfo({"conv": OperatorQuantConfig("conv", "Conv", cim=_placement().to_dict())})
