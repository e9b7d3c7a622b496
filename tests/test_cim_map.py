"""A whole quantized map on crossbars: the executor's CIM mode, map calibration, its storage, ``cim-sweep``.

The maps are the bundled digits CNN and mobile CNN quantized here (``recipe='fast'``, 8 calibration batches of
training digits), a small model of the remaining MAC kinds (grouped and 1-D Conv, ConvTranspose, Gemm, a
MatMul of two activations, asymmetric activations) and torchvision's ResNet-18 (random weights).
"""

from __future__ import annotations

import contextlib
import io
import json
from pathlib import Path

import numpy as np
import onnx
import pytest
import torch

from maptools.cli import main
from maptools.errors import ArtifactError, InvalidArgumentError, InvalidTypeError
from maptools.examples import digits, mobile
from maptools.quantization import quantize, read_quantinfo, read_quantparams, simulate
from maptools.quantization.artifacts import QUANTMODEL, map_directory, read_artifact_bytes, read_manifest, sha256_of
from maptools.quantization.cim import CIMSpec, MapCalibration, combine_slices, read_map_calibration
from maptools.quantization.cimmap import calibrate_map, cim_sweep, map_weight_slices, write_map_calibration
from maptools.quantization.format import CIM_FILE
from maptools.quantization.reference import ReferenceExecutor
from maptools.quantization.reference import mac as reference_mac
from maptools.quantization.reference.crossbar import requant_integer

EVAL_IMAGES = 256
CALIB_IMAGES = 256
# W8A8 and W4A4 of the residual digits CNN, W4A4 of the mobile CNN (fused HardSwish/Sigmoid, ReLU6)
MAPS = {"digits_w8a8": (digits.MODEL_PATH, 8), "digits_w4a4": (digits.MODEL_PATH, 4),
        "mobile_w8a8": (mobile.MODEL_PATH, 8), "mobile_w4a4": (mobile.MODEL_PATH, 4)}
# crossbars whose ideal-ADC results must equal the exact executor's: tiles, slices, planes, both encodings
IDEAL_SPECS = [CIMSpec(rows=64, cell_bits=2, dac_bits=1),
               CIMSpec(rows=37, cell_bits=3, dac_bits=2, weight_encoding="offset"),
               CIMSpec(rows=512, cell_bits=1, dac_bits=4)]


@pytest.fixture(scope="module")
def mapsave(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("cim_mapsave")


@pytest.fixture(scope="module")
def data() -> dict[str, np.ndarray]:
    train, _ = digits.load_split("train")
    test, labels = digits.load_split("test")
    return {"train": train[:CALIB_IMAGES], "test": test[:EVAL_IMAGES], "labels": labels[:EVAL_IMAGES],
            "calib": [train[i:i + 16] for i in range(0, 160, 16)]}


@pytest.fixture(scope="module")
def maps(mapsave: Path, data: dict[str, np.ndarray]) -> dict[str, str]:
    for name, (model, bits) in MAPS.items():
        quantize({"input": list(digits.INPUT_SHAPE)}, "cpu", model, mapname=name, calibset=data["calib"],
                 calib_steps=8, bit_width=bits, mapsave_dir=mapsave, recipe="fast", analysis_steps=1)
    return {name: name for name in MAPS}


def _integers(executor: ReferenceExecutor, images: np.ndarray) -> dict[str, np.ndarray]:
    return executor.run(images, return_integers=True)[1]


# -- (a) ideal ADC and float requantization: bit for bit the exact executor -----------------------------------
@pytest.mark.parametrize("mapname", list(MAPS))
def test_ideal_adc_with_float_requant_is_the_exact_executor(maps, mapsave, data, mapname) -> None:
    images = data["test"][:64]
    exact = ReferenceExecutor.load(mapname, mapsave)
    expected = _integers(exact, images)
    for spec in IDEAL_SPECS:
        got = _integers(exact.with_cim(spec), images)
        assert got.keys() == expected.keys()
        for name in expected:
            np.testing.assert_array_equal(got[name], expected[name], err_msg=f"{mapname} {spec}: {name}")
    via_simulate = simulate(mapname, images, mapsave_dir=mapsave, cim=IDEAL_SPECS[0])
    np.testing.assert_array_equal(via_simulate["logits"], exact.run(images)["logits"])


def test_crossbar_nodes_and_operands(maps, mapsave) -> None:
    executor = ReferenceExecutor.load("digits_w4a4", mapsave)
    info = read_quantinfo("digits_w4a4", mapsave)
    nodes = executor.crossbar_nodes
    assert [n.name for n in nodes] == [name for name, cfg in info.items() if cfg.weight_bits is not None]
    for node, operands in executor.crossbar_operands():
        tq = info[node.name].inputs[0]
        assert (operands.input_bits, operands.input_signed, operands.input_zero_point) == \
            (tq.bits, tq.qmin < 0, tq.zero_point)
        assert (operands.weight_bits, operands.weight_min) == (info[node.name].weight_bits, info[node.name].weight_min)


# -- (e) fixed-point requantization within one step --------------------------------------------------------------
@pytest.mark.parametrize("mapname", list(MAPS))
def test_fixed_point_requant_within_one_step_on_every_tensor(maps, mapsave, data, mapname, monkeypatch) -> None:
    images = data["test"]
    exact = ReferenceExecutor.load(mapname, mapsave)
    expected = _integers(exact, images)
    got = _integers(exact.with_cim(CIMSpec(requant="fixed_point")), images)
    assert got.keys() == expected.keys()
    worst = {name: int(np.abs(got[name].astype(np.int64) - expected[name].astype(np.int64)).max()) for name in got}
    assert max(worst.values()) <= 1, {k: v for k, v in worst.items() if v > 1}

    # and on the very same accumulators: every MAC requantized both ways
    float_requant = reference_mac.requant_acc
    steps: dict[str, int] = {}

    def both(acc, s_in, record, channel_axis, real_bias=None, mode="float"):
        result = float_requant(acc, s_in, record, channel_axis, real_bias, "float")
        if record.outputs and record.outputs[0] is not None and real_bias is None and acc.dtype.kind in "iu":
            w_scale = reference_mac._channel_scale(record, acc.shape[channel_axis], 1, 0)
            fixed = requant_integer(acc, s_in, record, channel_axis, w_scale, "fixed_point")
            steps[record.name] = int(np.abs(fixed.q - result.q).max())
        return result

    monkeypatch.setattr(reference_mac, "requant_acc", both)
    exact.run(images)
    assert steps and max(steps.values()) <= 1, steps


def test_power_of_two_requant_runs_and_fused_activations_keep_float(maps, mapsave, data) -> None:
    images = data["test"][:64]
    executor = ReferenceExecutor.load("mobile_w4a4", mapsave)
    records = [executor.record(n) for n in executor.crossbar_nodes]
    fused = [r.name for r in records if not r.outputs or r.outputs[0] is None]
    assert fused  # MACs feeding HardSwish / Sigmoid: their accumulators are read in float in every requant mode
    out = executor.with_cim(CIMSpec(requant="power_of_two")).run(images)["logits"]
    assert out.shape == (64, 10) and np.isfinite(out).all()


# -- ADC calibration of a map, its storage -----------------------------------------------------------------------
def test_calibrate_map_in_memory_stored_and_refused_elsewhere(maps, mapsave, data, tmp_path) -> None:
    spec = CIMSpec.parse("rows=64,cell_bits=2,adc_bits=5")
    images = data["test"][:32]
    calibration = calibrate_map("digits_w4a4", [data["train"][:128], data["train"][128:]], spec, mapsave_dir=mapsave)
    assert calibration.spec == spec.replace(adc_range="calibrated") and calibration.batches == 2
    executor = ReferenceExecutor.load("digits_w4a4", mapsave)
    assert set(calibration.adc) == {n.name for n in executor.crossbar_nodes}

    # the same from in-memory artifacts (what quantize(..., cim=) will do before writing the map)
    model = onnx.load_from_string(read_artifact_bytes("digits_w4a4", QUANTMODEL, mapsave))
    in_memory = ReferenceExecutor(model, read_quantinfo("digits_w4a4", mapsave),
                                  read_quantparams("digits_w4a4", mapsave))
    assert calibrate_map(in_memory, [data["train"][:128], data["train"][128:]], spec) == calibration

    in_memory_out = simulate("digits_w4a4", images, mapsave_dir=mapsave, cim=calibration.spec, adc=calibration)
    # a JSON file of the caller's choosing
    path = calibration.save(tmp_path / "adc.json")
    assert MapCalibration.load(path) == calibration
    assert "pickle" not in path.read_text()

    # stored in the map: cim.json listed in the manifest with its hash, the other files untouched
    before = read_manifest(map_directory("digits_w4a4", mapsave))["files"]
    stored = write_map_calibration("digits_w4a4", calibration, mapsave_dir=mapsave)
    manifest = read_manifest(map_directory("digits_w4a4", mapsave))
    assert stored.name == CIM_FILE and manifest["files"][CIM_FILE]["sha256"] == sha256_of(stored.read_bytes())
    assert {k: v for k, v in manifest["files"].items() if k != CIM_FILE} == before
    assert read_map_calibration("digits_w4a4", mapsave) == calibration
    from_map = simulate("digits_w4a4", images, mapsave_dir=mapsave, cim=True)
    spec_only = simulate("digits_w4a4", images, mapsave_dir=mapsave, cim=calibration.spec)
    np.testing.assert_array_equal(from_map["logits"], in_memory_out["logits"])
    np.testing.assert_array_equal(spec_only["logits"], in_memory_out["logits"])
    # a second write replaces it; a modified cim.json is refused
    write_map_calibration("digits_w4a4", calibration, mapsave_dir=mapsave)
    stored.write_bytes(stored.read_bytes().replace(b'"mse"', b'"MSE"', 1))
    with pytest.raises(ArtifactError, match=r"cim\.json was modified"):
        simulate("digits_w4a4", images, mapsave_dir=mapsave, cim=True)
    write_map_calibration("digits_w4a4", calibration, mapsave_dir=mapsave)

    # another map refuses it; a calibrated spec needs a calibration
    with pytest.raises(InvalidArgumentError, match=r"^adc: .*another map"):
        simulate("digits_w8a8", images, mapsave_dir=mapsave, cim=calibration.spec, adc=calibration)
    with pytest.raises(InvalidArgumentError, match=r"^calibration: .*another map"):
        write_map_calibration("digits_w8a8", calibration, mapsave_dir=mapsave)
    with pytest.raises(ArtifactError, match=r"map 'digits_w8a8' has no CIM calibration \(cim\.json\)"):
        simulate("digits_w8a8", images, mapsave_dir=mapsave, cim=True)
    with pytest.raises(InvalidArgumentError, match="adc_range='calibrated'"):
        simulate("digits_w8a8", images, mapsave_dir=mapsave, cim=calibration.spec)
    with pytest.raises(InvalidArgumentError, match=r"^adc: .*adc_bits=5"):
        simulate("digits_w4a4", images, mapsave_dir=mapsave, cim=calibration.spec.replace(adc_bits=6), adc=calibration)
    with pytest.raises(InvalidTypeError, match="cim=True"):
        ReferenceExecutor(model, read_quantinfo("digits_w4a4", mapsave), read_quantparams("digits_w4a4", mapsave),
                          cim=True)  # type: ignore[arg-type]


def test_map_weight_slices(maps, mapsave) -> None:
    spec = CIMSpec(cell_bits=3, weight_encoding="offset")
    slices = map_weight_slices("digits_w8a8", spec, mapsave_dir=mapsave)
    params = read_quantparams("digits_w8a8", mapsave)
    weights = {k: v for k, v in params.items() if k.endswith("_weight")}
    assert set(slices) == {f"{k}_slices" for k in weights}
    for key, weight in weights.items():
        digits_ = slices[f"{key}_slices"]
        assert digits_.dtype == np.uint8 and digits_.shape == (1, 3, *weight.shape)
        np.testing.assert_array_equal(combine_slices(digits_, 8, spec), weight)


# -- (b), (c): calibrated against full range, monotone in ADC bits, exact at the lossless count --------------
@pytest.fixture(scope="module")
def sweep(maps, mapsave, data):
    return cim_sweep("digits_w4a4", [data["test"]], calib=[data["train"]], labels=data["labels"], adc_bits=range(3, 8),
                     rows=[64], cell_bits=[1], jobs=1, mapsave_dir=mapsave)


def test_calibrated_ranges_beat_full_range(sweep) -> None:
    for bits in (4, 5):
        calibrated = sweep.point(64, 1, bits, "calibrated").metric("integer", "top1")
        full = sweep.point(64, 1, bits, "full").metric("integer", "top1")
        assert calibrated >= full + 0.2, (bits, calibrated, full)
        assert sweep.point(64, 1, bits, "calibrated").metric("fp32", "top1") > \
            sweep.point(64, 1, bits, "full").metric("fp32", "top1")


def test_agreement_non_decreasing_in_adc_bits_and_exact_at_the_lossless_count(sweep, mapsave, data) -> None:
    lossless = CIMSpec(rows=64, cell_bits=1).lossless_adc_bits
    assert lossless == 7
    for kind in ("calibrated", "full"):
        if kind == "full":
            values = [sweep.point(64, 1, bits, kind).metric("integer", "top1") for bits in range(5, 8)]
        else:  # a full-range ADC of 3 or 4 bits reads nearly everything as 0: chance level, not monotone
            values = [sweep.point(64, 1, bits, kind).metric("integer", "top1") for bits in range(3, 8)]
        assert all(b >= a - 0.01 for a, b in zip(values, values[1:], strict=False)), (kind, values)
        point = sweep.point(64, 1, lossless, kind)
        assert point.metric("integer", "equal") == 1.0 and point.metric("integer", "snr_db") == float("inf")
        assert sweep.ideal_from(64, 1, kind) <= lossless
    # every tensor, not only the output, at the lossless count
    executor = ReferenceExecutor.load("digits_w4a4", mapsave)
    expected = _integers(executor, data["test"][:64])
    spec = CIMSpec(rows=64, cell_bits=1, adc_bits=lossless)
    calibration = calibrate_map(executor, [data["train"]], spec)
    for cim, adc in ((spec, None), (calibration.spec, calibration)):
        got = _integers(executor.with_cim(cim, adc), data["test"][:64])
        for name in expected:
            np.testing.assert_array_equal(got[name], expected[name], err_msg=f"{cim}: {name}")
    assert sweep.reference["labels"]["integer"] > 0.8
    assert sweep.point(64, 1, lossless, "calibrated").top1_labels == sweep.reference["labels"]["integer"]


# -- (d) the command line ------------------------------------------------------------------------------------
def _cli(argv: list[str]) -> tuple[int, str, str]:
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        code = main(argv)
    return code, out.getvalue(), err.getvalue()


def test_cim_sweep_cli(maps, mapsave, data, tmp_path) -> None:
    folder = tmp_path / "inputs"
    folder.mkdir()
    np.save(folder / "batch0.npy", data["test"][:16])  # batches of the map's input shape [16, 1, 8, 8]
    np.save(folder / "batch1.npy", data["test"][16:32])
    result, plot = tmp_path / "sweep.json", tmp_path / "sweep.png"
    code, out, err = _cli(["cim-sweep", "digits_w4a4", "--mapsave-dir", str(mapsave), "--adc-bits", "4-5", "--rows",
                           "64", "--cell-bits", "1,2", "--inputs", str(folder), "--jobs", "2", "--out", str(result),
                           "--plot", str(plot)])
    assert code == 0, err
    assert "vs exact integer" in out and "vs FP32" in out and "calibrated" in out
    saved = json.loads(result.read_text())
    assert saved["mapname"] == "digits_w4a4" and saved["samples"] == 32
    assert "jobs" not in saved and "seconds" not in saved  # where it ran: not in the JSON
    assert all("seconds" not in p for p in saved["points"])
    assert saved["calibration_data"] == "inputs (in-sample)"
    assert len(saved["points"]) == 2 * 2 * 2
    assert {(p["cell_bits"], p["adc_bits"], p["adc_range"]) for p in saved["points"]} == {
        (c, b, k) for c in (1, 2) for b in (4, 5) for k in ("calibrated", "full")}
    for p in saved["points"]:
        logits = p["outputs"]["logits"]
        assert 0 <= logits["vs_integer"]["top1"] <= 1 and 0 <= logits["vs_fp32"]["top1"] <= 1
        assert p["rows"] == 64 and p["dac_bits"] == 1 and p["lossless_adc_bits"] == CIMSpec(
            rows=64, cell_bits=p["cell_bits"]).lossless_adc_bits
    assert 0 < saved["reference"]["logits"]["top1"] <= 1
    assert plot.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"

    for argv, message in ((["--adc-bits", "0-3"], "--adc-bits"), (["--rows", "x"], "--rows"),
                          (["--inputs", str(tmp_path / "missing")], "--inputs")):
        code, _, err = _cli(["cim-sweep", "digits_w4a4", "--mapsave-dir", str(mapsave), *argv])
        assert code == 2 and message in err, err
    code, _, err = _cli(["cim-sweep", "no_such_map", "--mapsave-dir", str(mapsave)])
    assert code == 2 and "no map" in err
    code, _, err = _cli(["cim-sweep", "digits_w4a4", "--encoding", "twos"])
    assert code == 2


# -- the other MAC kinds -------------------------------------------------------------------------------------
class _MacKinds(torch.nn.Module):
    """A grouped strided Conv, a strided ConvTranspose, a 1-D Conv, a Gemm and a MatMul of two activations."""

    def __init__(self) -> None:
        super().__init__()
        nn = torch.nn
        self.stem = nn.Conv2d(3, 8, 3, padding=1)
        self.grouped = nn.Conv2d(8, 8, 3, stride=2, padding=1, groups=2)
        self.up = nn.ConvTranspose2d(8, 6, 3, stride=2, padding=1, output_padding=1)  # PPQ: no grouped ones
        self.conv1d = nn.Conv1d(6, 4, 3, padding=1)
        self.fc = nn.Linear(64, 5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        a = torch.relu(self.stem(x))
        b = self.up(torch.relu(self.grouped(a)))                # (N, 6, 16, 16)
        c = self.conv1d(b.mean(dim=2))                          # (N, 4, 16)
        d = torch.matmul(c, c.transpose(1, 2))                  # (N, 4, 4): two activations
        return self.fc(torch.cat([d.flatten(1), c.flatten(1)[:, :48]], 1))


def test_every_mac_kind_in_cim_mode(mapsave, tmp_path) -> None:
    torch.manual_seed(0)
    path = tmp_path / "kinds.onnx"
    torch.onnx.export(_MacKinds().eval(), torch.randn(2, 3, 16, 16), str(path), input_names=["input"],
                      output_names=["output"], opset_version=13, dynamo=False)
    quantize({"input": [2, 3, 16, 16]}, "cpu", path, mapname="kinds", calibset=None, calib_steps=8, bit_width=4,
             symmetrical=False, mapsave_dir=mapsave, recipe="fast", analysis_steps=1)
    executor = ReferenceExecutor.load("kinds", mapsave)
    assert {n.op_type for n in executor.crossbar_nodes} == {"Conv", "ConvTranspose", "Gemm"}
    assert "MatMul" in {n.op_type for n in executor.model.graph.node}  # of two activations: exact, digital
    assert any(ops.input_zero_point != 0 for _, ops in executor.crossbar_operands())  # asymmetric: DAC offsets
    batch = np.random.default_rng(3).standard_normal((2, 3, 16, 16)).astype(np.float32)
    expected = _integers(executor, batch)
    for spec in IDEAL_SPECS:
        got = _integers(executor.with_cim(spec), batch)
        for name in expected:
            np.testing.assert_array_equal(got[name], expected[name], err_msg=f"{spec}: {name}")
    fixed = _integers(executor.with_cim(CIMSpec(requant="fixed_point")), batch)
    assert max(int(np.abs(fixed[k].astype(int) - expected[k].astype(int)).max()) for k in expected) <= 1
    spec = CIMSpec(rows=32, cell_bits=2, adc_bits=4)
    calibration = calibrate_map(executor, batch, spec)
    assert set(calibration.adc) == {n.name for n in executor.crossbar_nodes}
    for cim, adc in ((spec, None), (calibration.spec, calibration)):
        out = executor.with_cim(cim, adc).run(batch)["output"]
        assert out.shape == (2, 5) and np.isfinite(out).all()


# -- ResNet-18 -----------------------------------------------------------------------------------------------
def test_resnet18_ideal_adc_is_the_exact_executor(resnet18_maps) -> None:
    result = resnet18_maps(4)  # fast, 8 random batches: shared with the other tests of resnet18
    executor = ReferenceExecutor.load(result.mapname, result.directory.parent)
    image = np.random.default_rng(0).standard_normal((1, 3, 224, 224)).astype(np.float32)
    expected = _integers(executor, image)
    got = _integers(executor.with_cim(CIMSpec(rows=256, cell_bits=2)), image)
    assert got.keys() == expected.keys() and len(got) > 40
    for name in expected:
        np.testing.assert_array_equal(got[name], expected[name], err_msg=name)


def test_integer_requant_saturates_the_accumulator_to_int32() -> None:
    """A chip's 32-bit accumulator saturates: a bias clipped to -2^31 at quantization plus a negative partial sum
    (EfficientNet-Lite1's stem, near-zero filters with large biases) passes the int32 range; fixed-point
    requantization then refused the whole map. The saturated accumulator requantizes as int32 extremes do."""
    from maptools.quantization.cim.requant import INT32_MAX, INT32_MIN, fixed_point_multiplier, requantize_fixed
    from maptools.quantization.records import OperatorQuantConfig, TensorQuant
    from maptools.quantization.reference.crossbar import requant_integer

    out = TensorQuant(name="y", bits=8, scale=0.05, zero_point=3, qmin=-128, qmax=127)
    record = OperatorQuantConfig(name="conv", op_type="Conv", outputs=[out], weight_scale=np.array([2e-4, 5e-9]))
    acc = np.array([[INT32_MIN - 89_039, 12_345], [INT32_MAX + 7, -4_000_000]], np.int64)  # (channels, positions)
    got = requant_integer(acc, 0.02, record, 0, record.weight_scale, "fixed_point")
    m = 0.02 * record.weight_scale / out.scale
    mult, shift = fixed_point_multiplier(m)
    expected = requantize_fixed(np.clip(acc, INT32_MIN, INT32_MAX), mult, shift, out.zero_point, out.qmin, out.qmax,
                                channel_axis=0)
    np.testing.assert_array_equal(got.q, expected)
    assert got.q.tolist() == [[-128, 4], [7, 3]]  # 2^31 * 0.02 * 5e-9 / 0.05 = 4.29 -> 4, + zero point 3
