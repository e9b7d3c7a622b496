"""``quantize(..., cim=CIMSpec(...))`` and ``maptools quantize --cim``: the crossbar content written with the map.

The bundled digits CNN at W4A4 (``recipe='fast'``, 8 calibration batches of 16 training digits), quantized three
times with the same data and seed: without ``cim``, for a calibrated differential crossbar with fixed-point
requantization, and for a full-range offset crossbar with power-of-two requantization.
"""

from __future__ import annotations

import contextlib
import dataclasses
import io
import json
from pathlib import Path

import numpy as np
import pytest

from maptools.cli import main
from maptools.errors import InvalidArgumentError, InvalidTypeError
from maptools.examples import digits
from maptools.quantization import artifacts as artifacts_module
from maptools.quantization import quantize, read_quantinfo, read_quantparams, simulate
from maptools.quantization.artifacts import (
    CIM_FILE,
    MANIFEST,
    PPQSTATE,
    QUANTINFO,
    QUANTMODEL,
    QUANTPARAMS,
    dump_pickle,
    read_manifest,
    sha256_of,
)
from maptools.quantization.cim import (
    CIMSpec,
    MapCalibration,
    adc_gain,
    full_scale_ranges,
    read_map_calibration,
    requant_multiplier,
    requant_multipliers,
    tile_layout,
)
from maptools.quantization.cimmap import calibrate_map, map_weight_slices
from maptools.quantization.cimmap.content import resolve_record_cim
from maptools.quantization.format import (
    CIM_FORMAT_VERSION,
    FORMAT_VERSION,
    requant_multiplier_key,
    requant_shift_key,
    weight_key,
    weight_slices_key,
)
from maptools.quantization.placement import RequantKeys
from maptools.quantization.reference import ReferenceExecutor

CALIBRATED = CIMSpec.parse("rows=64,cols=128,cell_bits=2,adc_bits=5,dac_bits=1,weight_encoding=differential,"
                           "adc_range=calibrated,requant=fixed_point")
FULL = CIMSpec.parse("rows=48,cell_bits=3,adc_bits=6,dac_bits=2,weight_encoding=offset,adc_range=full,"
                     "requant=power_of_two")
SPECS = {"plain": None, "calibrated": CALIBRATED, "full": FULL}


@pytest.fixture(scope="module")
def data() -> dict[str, object]:
    train, _ = digits.load_split("train")
    test, labels = digits.load_split("test")
    return {"calib": [train[i:i + 16] for i in range(0, 160, 16)], "test": test[:128], "labels": labels[:128]}


@pytest.fixture(scope="module")
def maps(tmp_path_factory: pytest.TempPathFactory, data) -> dict[str, object]:
    """The three maps, and the files each ``write_map`` call was given."""
    mapsave = tmp_path_factory.mktemp("cimq_mapsave")
    writes: list[tuple[str, list[str]]] = []
    write_map = artifacts_module.write_map

    def counting(target, files, manifest, *args, **kwargs):
        writes.append((target.name, sorted(files)))
        return write_map(target, files, manifest, *args, **kwargs)

    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(artifacts_module, "write_map", counting)
        for name, spec in SPECS.items():
            result = quantize({"input": list(digits.INPUT_SHAPE)}, "cpu", digits.MODEL_PATH, mapname=name,
                     calibset=data["calib"], calib_steps=8, bit_width=4, mapsave_dir=mapsave, recipe="fast",
                     analysis_steps=1, cim=spec)
            assert (result.cim_path is None) == (spec is None)
            assert (CIM_FILE in {p.name for p in result.files}) == (spec is not None)
            assert all(p.is_file() for p in result.files)
    return {"mapsave": mapsave, "writes": writes}


def _crossbar_records(name: str, mapsave: Path):
    executor = ReferenceExecutor.load(name, mapsave)
    return executor, [(node, executor.record(node)) for node in executor.crossbar_nodes]


def test_cim_json_written_in_the_one_atomic_write_and_listed(maps) -> None:
    mapsave = maps["mapsave"]
    assert maps["writes"] == [(name, sorted([QUANTINFO, QUANTPARAMS, QUANTMODEL, PPQSTATE, "report.json", "report.png"]
                                            + ([CIM_FILE] if spec is not None else [])))
                              for name, spec in SPECS.items()]
    for name in ("calibrated", "full"):
        directory = mapsave / name
        manifest = read_manifest(directory)
        data = (directory / CIM_FILE).read_bytes()
        assert manifest["files"][CIM_FILE] == {"sha256": sha256_of(data), "bytes": len(data)}
        assert manifest["format_version"] == CIM_FORMAT_VERSION == "2.1"
        assert manifest["settings"]["cim"] == SPECS[name].to_dict()
        assert CIMSpec.from_dict(manifest["settings"]["cim"]) == SPECS[name]
        report = json.loads((directory / "report.json").read_text())
        assert report["settings"]["cim"] == SPECS[name].to_dict() and "cim" in report["timings_seconds"]
        assert sorted(p.name for p in mapsave.iterdir() if p.name.startswith(f".{name}.tmp")) == []
    calibration = read_map_calibration("calibrated", maps["mapsave"])
    assert calibration.spec == CALIBRATED and calibration.batches == 8 and calibration.method == "mse"
    assert read_manifest(mapsave / "calibrated")["settings"]["cim_calib_batches"] == 8
    full = read_map_calibration("full", maps["mapsave"])
    assert full.spec == FULL and full.adc == {} and full.batches == 0
    assert read_manifest(mapsave / "full")["settings"]["cim_calib_batches"] == 0


def test_simulate_cim_true_is_the_independently_calibrated_crossbar(maps, data) -> None:
    mapsave, images = maps["mapsave"], data["test"]
    independent = calibrate_map("calibrated", data["calib"][:8], CALIBRATED, mapsave_dir=mapsave)
    assert independent == read_map_calibration("calibrated", mapsave)
    # the plain map holds the same crossbar weights and operands: its calibration is the same too
    assert calibrate_map("plain", data["calib"][:8], CALIBRATED, mapsave_dir=mapsave) == independent
    stored, stored_ints = simulate("calibrated", images, mapsave_dir=mapsave, cim=True, return_integers=True)
    given, given_ints = simulate("calibrated", images, mapsave_dir=mapsave, cim=CALIBRATED, adc=independent,
                                 return_integers=True)
    np.testing.assert_array_equal(stored["logits"], given["logits"])
    assert stored_ints.keys() == given_ints.keys()
    for node in stored_ints:
        np.testing.assert_array_equal(stored_ints[node], given_ints[node], err_msg=node)
    exact = simulate("calibrated", images, mapsave_dir=mapsave)["logits"]
    assert not np.array_equal(stored["logits"], exact)  # a 5-bit ADC changes some results...
    top1 = float(np.mean(stored["logits"].argmax(1) == data["labels"]))
    assert top1 > 0.8, top1  # ...but keeps the digits recognisable
    # a full-range spec needs no calibration: cim=True is the stored spec itself
    np.testing.assert_array_equal(simulate("full", images, mapsave_dir=mapsave, cim=True)["logits"],
                                  simulate("full", images, mapsave_dir=mapsave, cim=FULL)["logits"])


@pytest.mark.parametrize("name", ["calibrated", "full"])
def test_weight_slices_recombine_to_the_integer_weights(maps, name) -> None:
    mapsave, spec = maps["mapsave"], SPECS[name]
    params = read_quantparams(name, mapsave)
    _, records = _crossbar_records(name, mapsave)
    assert len(records) == 9
    assert set(map_weight_slices(name, spec, mapsave_dir=mapsave)) == {
        weight_slices_key(node.name, node.op_type) for node, _ in records}
    c = spec.cell_bits
    for node, record in records:
        key = weight_slices_key(node.name, node.op_type)
        assert key == weight_key(node.name, node.op_type) + "_slices" == record.cim.weight_slices
        weight, digits_ = params[weight_key(node.name, node.op_type)].astype(np.int64), params[key]
        assert digits_.dtype == np.uint8 and int(digits_.max()) < 2**c
        slices = digits_.shape[1]
        powers = [2 ** (c * i) for i in range(slices)]
        if spec.weight_encoding == "differential":
            assert digits_.shape == (2, 2, *weight.shape)  # 4-bit magnitudes in two 2-bit slices, + and -
            rebuilt = sum(powers[i] * (digits_[0, i].astype(np.int64) - digits_[1, i]) for i in range(slices))
            assert not np.any((digits_[0] > 0) & (digits_[1] > 0))  # one of w+ and w- is zero
        else:
            assert digits_.shape == (1, 2, *weight.shape)  # w + 8 in 0..15: two 3-bit slices
            rebuilt = sum(powers[i] * digits_[0, i].astype(np.int64) for i in range(slices)) - 2 ** (4 - 1)
        np.testing.assert_array_equal(rebuilt, weight, err_msg=node.name)


def test_requant_multipliers_and_shifts(maps) -> None:
    mapsave = maps["mapsave"]
    for name in ("calibrated", "full"):
        spec = SPECS[name]
        params = read_quantparams(name, mapsave)
        _, records = _crossbar_records(name, mapsave)
        stored = 0
        for node, record in records:
            m_key, s_key = requant_multiplier_key(node.name, node.op_type), requant_shift_key(node.name, node.op_type)
            assert record.cim.requant == RequantKeys(mode=spec.requant, multiplier=m_key, shift=s_key)
            multiplier, shift = params[m_key], params[s_key]
            assert multiplier.dtype == np.int32 and shift.dtype == np.int32
            assert multiplier.shape == shift.shape == record.weight_scale.reshape(-1).shape == (
                params[weight_key(node.name, node.op_type)].shape[0],)
            assert shift.min() >= 0 and shift.max() <= 31
            m = requant_multipliers(record.inputs[0].scale, record.weight_scale, record.outputs[0].scale)
            expected_m, expected_s = requant_multiplier(m, spec.requant)
            np.testing.assert_array_equal(multiplier, expected_m)
            np.testing.assert_array_equal(shift, expected_s)
            if spec.requant == "fixed_point":
                assert multiplier.min() >= 2**30  # Q0.31 in [0.5, 1)
                rel = np.abs(multiplier.astype(np.float64) * 2.0 ** (-31 - shift.astype(np.float64)) - m) / m
                assert rel.max() <= 2.0**-31
            else:
                assert set(multiplier.tolist()) == {2**30}
            stored += 1
        assert stored == 9
    plain_params = read_quantparams("plain", mapsave)
    assert not any(key.endswith(("_slices", "_requant_multiplier", "_requant_shift")) for key in plain_params)


def test_records_hold_the_tile_layout_and_per_tile_adc(maps) -> None:
    mapsave = maps["mapsave"]
    calibration = read_map_calibration("calibrated", mapsave)
    for name in ("calibrated", "full"):
        spec = SPECS[name]
        executor, records = _crossbar_records(name, mapsave)
        info = read_quantinfo(name, mapsave)
        assert [n for n, r in info.items() if r.cim is not None] == [node.name for node, _ in records]
        map_calibration = read_map_calibration(name, mapsave)
        for node, record in records:
            # each fact once: the spec and the ADC ranges live in cim.json, the reader resolves them
            assert record.cim.spec is None and record.cim.adc.ranges is None
            assert "spec" not in record.cim.to_dict() and "ranges" not in record.cim.to_dict()["adc"]
            entry = resolve_record_cim(record, map_calibration)
            assert entry.spec == spec.to_dict() and entry.file == CIM_FILE
            weight = executor.mac_weights(node).weight
            trans_b = any(a.name == "transB" and a.i == 1 for a in node.attribute)
            assert entry.layout.trans_b == trans_b
            layout = tile_layout(weight.shape, node.op_type, 1, record.weight_bits, spec, trans_b=trans_b,
                                 weight_min=record.weight_min)
            expected = {"op_type": node.op_type, "weight_shape": tuple(weight.shape), "groups": layout.groups,
                        "out_channels": layout.out_channels, "depth": layout.depth, "row_tiles": layout.row_tiles,
                        "col_tiles": layout.col_tiles, "channels_per_array": layout.channels_per_array,
                        "arrays": layout.num_arrays, "slices": layout.format.slices, "signs": layout.format.signs}
            assert {k: getattr(entry.layout, k) for k in expected} == expected
            planes = -(-record.inputs[0].bits // spec.dac_bits)
            assert entry.input_planes == planes
            adc = entry.adc
            assert (adc.bits, adc.range, adc.levels) == (spec.adc_bits, spec.adc_range, 2**spec.adc_bits - 1)
            ranges = np.asarray(adc.ranges)
            assert ranges.shape == (layout.row_tiles, layout.format.slices, planes)
            if name == "calibrated":
                np.testing.assert_array_equal(ranges, calibration.adc[node.name].ranges)
            else:
                np.testing.assert_array_equal(ranges, full_scale_ranges(spec, ranges.shape))
            np.testing.assert_array_equal(np.asarray(adc.gains), adc_gain(ranges, adc.levels))
        # a 576-deep conv on 64 rows: nine row tiles
        assert max(r.cim.layout.row_tiles for _, r in records) == -(-max(
            r.cim.layout.depth for _, r in records) // spec.rows) > 1


def test_without_cim_the_artifacts_are_unchanged(maps) -> None:
    mapsave = maps["mapsave"]
    plain, with_cim = mapsave / "plain", mapsave / "calibrated"
    manifest = read_manifest(plain)
    assert manifest["format_version"] == FORMAT_VERSION == "2.0"
    assert "cim" not in manifest["settings"] and "cim_calib_batches" not in manifest["settings"]
    assert CIM_FILE not in manifest["files"] and not (plain / CIM_FILE).exists()
    assert "cim" not in json.loads((plain / "report.json").read_text())["timings_seconds"]
    assert "cim_cost" not in json.loads((plain / "report.json").read_text())
    assert "cim_cost" in json.loads((with_cim / "report.json").read_text())
    # the QDQ model and PPQ's state are the same bytes either way
    for name in (QUANTMODEL, PPQSTATE):
        assert (plain / name).read_bytes() == (with_cim / name).read_bytes(), name
    # the records without their cim field pickle to the plain map's bytes: no trace of the new field
    info = read_quantinfo("calibrated", mapsave)
    stripped = {name: dataclasses.replace(record, cim=None) for name, record in info.items()}
    assert dump_pickle(stripped) == (plain / QUANTINFO).read_bytes()
    assert b"cim" not in (plain / QUANTINFO).read_bytes()
    assert all(record.cim is None for record in read_quantinfo("plain", mapsave).values())
    # the integers of the plain map are those of the CIM map without the added keys
    params = read_quantparams("calibrated", mapsave)
    base = {k: v for k, v in params.items() if not k.endswith(("_slices", "_requant_multiplier", "_requant_shift"))}
    assert dump_pickle(base) == (plain / QUANTPARAMS).read_bytes()


def test_bad_cim_argument_is_refused_before_anything_is_written(tmp_path) -> None:
    mapsave = tmp_path / "mapsave"
    cases = [("rows=256,adc_bits=6", InvalidTypeError, r"cim: got str .*expected None or a .*CIMSpec"),
             ({"rows": 256, "cels": 2}, InvalidArgumentError, r"cim: CIMSpec.from_dict: unknown field\(s\) 'cels'"),
             ({"rows": 256, "adc_range": "calibrated"}, InvalidArgumentError,  # a mapping is checked as a CIMSpec
              r"cim: got adc_range='calibrated' with adc_bits=None"),
             (CIMSpec(adc_range="calibrated"), InvalidArgumentError,
              r"cim: got adc_range='calibrated' with adc_bits=None .*expected adc_bits set"),
             (CIMSpec(cols=3, cell_bits=1), InvalidArgumentError, r"cim: got cols=3, expected at least 8")]
    for cim, error, message in cases:
        with pytest.raises(error, match=message):
            quantize({"input": list(digits.INPUT_SHAPE)}, "cpu", digits.MODEL_PATH, mapname="bad", calib_steps=8,
                     bit_width=4, mapsave_dir=mapsave, recipe="fast", analysis_steps=1, cim=cim)
        assert not (mapsave / "bad").exists()
    assert not mapsave.exists() or not any(mapsave.iterdir())


def _cli(argv: list[str]) -> tuple[int, str, str]:
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        code = main(argv)
    return code, out.getvalue(), err.getvalue()


def test_cli_cim(tmp_path) -> None:
    mapsave = tmp_path / "mapsave"
    shape = ",".join(map(str, digits.INPUT_SHAPE))
    base = ["quantize", str(digits.MODEL_PATH), "--input", f"input:{shape}", "--mapname", "cli", "--bits", "4",
            "--calib-steps", "8", "--analysis-steps", "1", "--recipe", "fast", "--mapsave-dir", str(mapsave)]
    for value, named in (("rows=abc", "'rows=abc'"), ("size=3", "'size'"), ("rows", "'rows'"),
                         ("cell_bits=9", "cell_bits"), ("weight_encoding=twos", "'twos'"),
                         ("adc_range=calibrated", "adc_bits")):
        code, _, err = _cli([*base, "--cim", value])
        assert code == 2, (value, err)
        assert "--cim" in err and named in err and "valid keys: rows, cols, cell_bits, dac_bits, adc_bits" in err, err
        assert len(err.strip().splitlines()) == 1 and not (mapsave / "cli").exists()
    spec_text = "rows=256,cell_bits=2,adc_bits=6,dac_bits=1,weight_encoding=differential,requant=fixed_point"
    code, out, err = _cli([*base, "--cim", spec_text + ",adc_range=calibrated"])
    assert code == 0, err
    manifest = read_manifest(mapsave / "cli")
    assert manifest["settings"]["cim"] == CIMSpec.parse(spec_text).replace(adc_range="calibrated").to_dict()
    assert manifest["files"][CIM_FILE]["sha256"] == sha256_of((mapsave / "cli" / CIM_FILE).read_bytes())
    assert isinstance(read_map_calibration("cli", mapsave), MapCalibration)
    code, out, err = _cli(["inspect", "cli", "--mapsave-dir", str(mapsave)])
    assert code == 0, err
    assert f"CIM crossbar: {CIMSpec.parse(spec_text).replace(adc_range='calibrated')}" in out
    assert "ADC ranges of 9 MACs calibrated on 8 batches (mse)" in out
    code, out, _ = _cli(["inspect", "cli", "--json", "--mapsave-dir", str(mapsave)])
    listing = json.loads(out)
    assert listing["cim"]["spec"]["adc_bits"] == 6 and listing["cim"]["calibrated_macs"] == 9
    assert sum(row.get("crossbar_arrays", 0) for row in listing["operators"]) >= 9
    assert MANIFEST in {p.name for p in (mapsave / "cli").iterdir()}
