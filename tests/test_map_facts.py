"""Each fact of a map stored once: records refer to cim.json, the format version follows the files a map holds."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tarfile
import textwrap
from pathlib import Path

import numpy as np
import pytest

from maptools import InvalidArgumentError
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
from maptools.quantization.artifacts import MANIFEST
from maptools.quantization.cim import MapCalibration, read_map_calibration
from maptools.quantization.cimmap import write_map_calibration
from maptools.quantization.cimmap.content import resolve_record_cim
from maptools.quantization.format import CIM_FORMAT_VERSION, FORMAT_VERSION

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
        assert "spec" in old_info[name].cim and "spec" not in new_info[name].cim  # copied before, once now
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
