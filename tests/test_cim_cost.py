"""The crossbar cost model: counts against hand-counted layers, the estimates' formulas, and whole maps.

The hand counts below are worked out on paper from the layout rules of docs/cim.rst (row tiles, column tiles,
slices and signs), not from the code's formulas; each layer is also run through the arithmetic model, whose
partial sums are exactly the ADC conversions.
"""

from __future__ import annotations

import contextlib
import io
import json
import math

import numpy as np
import onnx
import pytest

from maptools.cli import main
from maptools.errors import InvalidArgumentError, InvalidTypeError
from maptools.examples import digits
from maptools.quantization import quantize
from maptools.quantization.cim import (
    CIMCostParams,
    CIMSpec,
    adc_area,
    adc_energy,
    adc_latency,
    layer_cost,
    mac_matrix,
    partial_sums,
    tile_layout,
)
from maptools.quantization.cim.cost import COUNT_FIELDS, ENERGY_PARTS
from maptools.quantization.cimmap import map_cost
from maptools.quantization.inspection import inspect_map, listing_json

SPEC = CIMSpec(rows=64, cols=32, cell_bits=2, dac_bits=1)  # 4-bit weights: 2 signs x 2 slices = 4 columns

# name: (weight shape, op type, group, trans_b, spec, input bits, positions, output bits, hand counts)
# hand counts: arrays, weight_cells, adc_conversions, array_cycles, dac_drives, cell_reads, shift_adds, buffer_bits
CASES = {
    # K = 72 -> 2 row tiles; 20 channels, 8 per array -> 3 column tiles; 4 planes; 25 positions
    "conv": ((20, 8, 3, 3), "Conv", 1, False, SPEC, 4, 25, 4,
             (6, 5760, 16000, 600, 21600, 576000, 16000, 9200)),
    # 16 groups of one channel, K = 9
    "depthwise": ((16, 1, 3, 3), "Conv", 16, False, SPEC, 4, 25, 4,
                  (16, 576, 6400, 1600, 14400, 57600, 6400, 16000)),
    # 4 groups of 2 channels, K = 18, 8-bit inputs (8 planes)
    "grouped": ((8, 2, 3, 3), "Conv", 4, False, SPEC, 8, 25, 8,
                (4, 576, 6400, 800, 14400, 115200, 6400, 16000)),
    # K = 100 -> 2 row tiles, 10 channels -> 2 column tiles, one position
    "gemm_transb": ((10, 100), "Gemm", 1, True, SPEC, 4, 1, 4, (4, 4000, 320, 16, 800, 16000, 320, 440)),
    "gemm": ((100, 10), "Gemm", 1, False, SPEC, 4, 1, 4, (4, 4000, 320, 16, 800, 16000, 320, 440)),
    "matmul": ((100, 10), "MatMul", 1, False, SPEC, 4, 1, 4, (4, 4000, 320, 16, 800, 16000, 320, 440)),
    # three weight matrices (a batched MatMul weight)
    "matmul_batched": ((3, 100, 10), "MatMul", 1, False, SPEC, 4, 1, 4,
                       (12, 12000, 960, 48, 2400, 48000, 960, 1320)),
    # 8 input channels x 9 taps = 72 rows, 4 output channels
    "conv_transpose": ((8, 4, 3, 3), "ConvTranspose", 1, False, SPEC, 4, 25, 4,
                       (2, 1152, 3200, 200, 7200, 115200, 3200, 7600)),
    # offset encoding: 1 sign x 2 slices = 2 columns, 16 channels per array -> 2 column tiles
    "conv_offset": ((20, 8, 3, 3), "Conv", 1, False, SPEC.replace(weight_encoding="offset"), 4, 25, 4,
                    (4, 2880, 8000, 400, 14400, 288000, 8000, 9200)),
    # 2-bit DACs: 2 planes of 4-bit inputs
    "conv_dac2": ((20, 8, 3, 3), "Conv", 1, False, SPEC.replace(dac_bits=2), 4, 25, 4,
                  (6, 5760, 8000, 300, 10800, 288000, 8000, 9200)),
}


def _layout(case):
    shape, op_type, group, trans_b, spec = case[:5]
    return tile_layout(shape, op_type, group, 4, spec, trans_b=trans_b)


def _cost(case, params=None):
    input_bits, positions, output_bits = case[5:8]
    return layer_cost(_layout(case), input_bits=input_bits, positions=positions, output_bits=output_bits,
                      params=params)


@pytest.mark.parametrize("name", list(CASES))
def test_counts_equal_the_hand_counts(name) -> None:
    cost = _cost(CASES[name])
    assert tuple(getattr(cost, field) for field in COUNT_FIELDS) == CASES[name][8]


@pytest.mark.parametrize("name", list(CASES))
def test_adc_conversions_are_the_partial_sums_the_arithmetic_digitizes(name) -> None:
    shape, op_type, group, trans_b, spec, input_bits, positions = CASES[name][:7]
    rng = np.random.default_rng(0)
    matrices = mac_matrix(rng.integers(-8, 8, size=shape), op_type, group, trans_b=trans_b)  # (G, M, K)
    columns = rng.integers(0, 2**input_bits, size=(matrices.shape[0], matrices.shape[2], positions))
    digitized = sum(part.values.size for part in partial_sums(matrices, columns, input_bits=input_bits,
                                                              input_signed=False, weight_bits=4, spec=spec))
    assert digitized == _cost(CASES[name]).adc_conversions


def test_a_wrong_count_is_caught() -> None:
    """A layout one row tile short (as if K were cut at 128 rows) changes the counts the test compares."""
    case = CASES["conv"]
    wrong = layer_cost(tile_layout(case[0], "Conv", 1, 4, SPEC.replace(rows=128)), input_bits=4, positions=25)
    assert tuple(getattr(wrong, f) for f in COUNT_FIELDS) != case[8]


@pytest.mark.parametrize("name", list(CASES))
def test_energy_latency_area_follow_the_documented_formulas(name) -> None:
    case = CASES[name]
    spec, positions = case[4], case[6]
    params = CIMCostParams()
    cost = _cost(case, params)
    bits = spec.lossless_adc_bits  # an ideal ADC is costed at the lossless width
    assert cost.adc_bits == bits == int(spec.full_scale).bit_length()
    assert cost.energy_j["adc"] == pytest.approx(cost.adc_conversions * adc_energy(bits, params), rel=1e-12)
    assert cost.energy_j["cell"] == pytest.approx(
        cost.cell_reads * 0.072341 * (1 / 6e3 + 1 / 9e5) / 2 * (bits + 1) * 1e-9, rel=1e-12)
    assert cost.energy_j["dac"] == pytest.approx(cost.dac_drives * 20e-15 * (2**spec.dac_bits - 1), rel=1e-12)
    assert cost.energy_j["shift_add"] == pytest.approx(cost.shift_adds * 0.1e-12, rel=1e-12)
    assert cost.energy_j["buffer"] == pytest.approx(cost.buffer_bits * 10e-12 / 64, rel=1e-12)
    assert cost.total_energy_j == pytest.approx(sum(cost.energy_j[p] for p in ENERGY_PARTS), rel=1e-12)
    assert cost.latency_s == pytest.approx(positions * cost.input_planes * (10e-9 + 8 * (bits + 1) * 1e-9), rel=1e-12)
    assert cost.area_m2 == pytest.approx(cost.arrays * (spec.rows * spec.cols * 48 * 40e-9**2
                                                        + math.ceil(spec.cols / 8) * adc_area(bits, params)))


def test_adc_energy_grows_with_bits_in_both_models() -> None:
    sar = [adc_energy(bits) for bits in range(1, 17)]
    assert all(a < b for a, b in zip(sar, sar[1:], strict=False))
    # NeuroSim's 22 nm SAR fit: (0.538 A + 4.3753) uW for (A + 1) ns; 5 bits: 42.4 fJ
    assert adc_energy(5) == pytest.approx((0.538 * 5 + 4.3753) * 1e-6 * 6e-9, rel=1e-12)
    assert adc_energy(5) == pytest.approx(42.39e-15, rel=1e-3)
    walden = CIMCostParams(adc_walden_fom_j=5e-15)
    energies = [adc_energy(bits, walden) for bits in range(1, 17)]
    assert all(b == pytest.approx(2 * a) for a, b in zip(energies, energies[1:], strict=False))
    assert adc_energy(8, walden) == pytest.approx(5e-15 * 256)
    assert [adc_latency(b) for b in (1, 8)] == pytest.approx([2e-9, 9e-9])
    assert adc_area(1) < adc_area(8)
    # a wider ADC costs more energy in a layer, everything else equal
    layout = tile_layout((20, 8, 3, 3), "Conv", 1, 4, SPEC)
    by_bits = [layer_cost(tile_layout((20, 8, 3, 3), "Conv", 1, 4, SPEC.replace(adc_bits=b)), input_bits=4,
                          positions=25).total_energy_j for b in (3, 5, 8)]
    assert by_bits[0] < by_bits[1] < by_bits[2]
    assert layer_cost(layout, input_bits=4, positions=25).adc_bits == 8  # ideal: 64 x 3 = 192 needs 8 bits


def _neurosim_column_energy(column_ohm: float, adc_bits: int, read_voltage: float = 0.5, temp_k: float = 300) -> float:
    """DNN+NeuroSim V1.3 ``SarADC::GetColumnPower`` (22 nm LSTP) times its conversion time: one column converted."""
    column_ohm *= 0.5 / read_voltage
    power = (0.538 * adc_bits + 4.3753) * 1e-6 + 0.072341 * math.exp(-2.303 * math.log10(column_ohm))
    return power * (1 + 1.3e-3 * (temp_k - 300)) * (adc_bits + 1) * 1e-9


def test_neurosim_default_layer_counts_and_adc_energy() -> None:
    """docs/cim.rst "Against NeuroSim": ResNet-18's 3 x 3 conv of 256 channels at 14 x 14 on NeuroSim's subarrays."""
    spec = CIMSpec.parse("rows=128,cols=128,cell_bits=2,adc_bits=5,weight_encoding=offset")
    cost = layer_cost(tile_layout((256, 256, 3, 3), "Conv", 1, 8, spec), input_bits=8, positions=196)
    # NeuroSim (Param.cpp: numRowSubArray = numColSubArray = 128, cellBit 2, 8-bit weights and inputs):
    # ceil(2304 / 128) x ceil(256 x 4 / 128) subarrays, each read numReadPulse = 8 times per input vector,
    # every read converting all 128 columns
    subarrays = math.ceil(2304 / 128) * math.ceil(256 * 4 / 128)
    assert (cost.arrays, subarrays) == (144, 144)
    assert cost.adc_conversions == 196 * 8 * subarrays * 128 == 28_901_376
    assert cost.weight_cells == 2304 * 256 * 4 == 2_359_296
    assert cost.array_cycles == 196 * 8 * subarrays == 225_792
    # NeuroSim books the SAR logic and the column current under its ADC: per conversion
    # (p(A) + 0.072341 / R_col) * (A + 1) ns. Under this model's assumptions (every row driven on every plane,
    # every cell at the mean of G_on and G_off, no access transistor) R_col = 1 / (128 * G_mean); the two
    # models then agree to NeuroSim's fitted exponent (-2.303 / ln 10 = -1.00018: 0.08 % at 93 Ohm).
    g_mean = (1 / 6e3 + 1 / (6e3 * 150)) / 2
    neurosim = cost.adc_conversions * _neurosim_column_energy(1 / (128 * g_mean), 5)
    ours = cost.energy_j["adc"] + cost.energy_j["cell"]
    assert ours == pytest.approx(neurosim, rel=1e-3)
    assert ours == pytest.approx(135.93e-6, rel=1e-4) and neurosim == pytest.approx(135.82e-6, rel=1e-4)
    # NeuroSim's 1T1R access transistor (resistanceOn x IR_DROP_TOLERANCE 0.25 in series) lowers its column
    # current: this model is then an upper bound, 25 % above
    g_access = (1 / (6e3 * 1.25) + 1 / (6e3 * 150 + 1.5e3)) / 2
    with_access = cost.adc_conversions * _neurosim_column_energy(1 / (128 * g_access), 5)
    assert 1.2 < ours / with_access < 1.3


def test_bad_arguments_are_refused_naming_them() -> None:
    layout = _layout(CASES["conv"])
    with pytest.raises(InvalidArgumentError, match="positions: got 0"):
        layer_cost(layout, input_bits=4, positions=0)
    with pytest.raises(InvalidArgumentError, match="input_bits: got 17"):
        layer_cost(layout, input_bits=17, positions=1)
    with pytest.raises(InvalidArgumentError, match="output_bits: got 0"):
        layer_cost(layout, input_bits=4, positions=1, output_bits=0)
    with pytest.raises(InvalidTypeError, match="layout: got dict"):
        layer_cost({}, input_bits=4, positions=1)
    with pytest.raises(InvalidArgumentError, match=r"CIMCostParams.columns_per_adc: got 0, expected an integer >= 1"):
        CIMCostParams(columns_per_adc=0)
    with pytest.raises(InvalidArgumentError, match=r"CIMCostParams.dac_j: got -1.0, expected a positive"):
        CIMCostParams(dac_j=-1.0)
    with pytest.raises(InvalidTypeError, match=r"CIMCostParams.read_voltage_v: got '0.5' \(str\)"):
        CIMCostParams(read_voltage_v="0.5")
    with pytest.raises(InvalidArgumentError, match="adc_bits: got 0"):
        adc_energy(0)


# -- whole maps ----------------------------------------------------------------------------------------------
CIM = CIMSpec.parse("rows=64,cols=128,cell_bits=2,adc_bits=5,adc_range=calibrated")


@pytest.fixture(scope="module")
def cim_map(tmp_path_factory):
    mapsave = tmp_path_factory.mktemp("cimcost_mapsave")
    train, _ = digits.load_split("train")
    quantize({"input": list(digits.INPUT_SHAPE)}, "cpu", digits.MODEL_PATH, mapname="digits", bit_width=4,
             calibset=[train[i:i + 16] for i in range(0, 128, 16)], calib_steps=8, recipe="fast", analysis_steps=1,
             mapsave_dir=mapsave, cim=CIM)
    return mapsave


def _positions_from_shape_inference(mapsave) -> dict[str, int]:
    """Output positions per sample from ONNX shape inference (independent of the executor)."""
    model = onnx.shape_inference.infer_shapes(onnx.load(str(mapsave / "digits" / "quant_model.onnx")))
    shapes = {vi.name: [d.dim_value for d in vi.type.tensor_type.shape.dim]
              for vi in [*model.graph.value_info, *model.graph.output]}
    out = {}
    for node in model.graph.node:
        if node.op_type in ("Conv", "Gemm"):
            shape = shapes[node.output[0]]
            out[node.name] = math.prod(shape[2:]) if node.op_type == "Conv" else 1
    return out


def test_map_cost_positions_and_totals(cim_map) -> None:
    cost = map_cost("digits", mapsave_dir=cim_map)
    assert cost.spec == CIM and cost.samples == 1
    assert {layer.node: layer.positions for layer in cost.layers} == _positions_from_shape_inference(cim_map)
    for name in (*COUNT_FIELDS, "latency_s", "area_m2", "energy_j", *ENERGY_PARTS):
        per_layer = [layer.total_energy_j if name == "energy_j" else
                     layer.energy_j[name] if name in ENERGY_PARTS else getattr(layer, name) for layer in cost.layers]
        assert cost.total(name) == pytest.approx(sum(per_layer), rel=1e-12), name
    assert cost.total("arrays") == 27  # the arrays the records' layouts hold (inspect's summary line)
    # counted on the map's batch of 16 samples, per sample the same
    batch = {"input": np.zeros(digits.INPUT_SHAPE, np.float32)}
    from maptools.quantization.reference import ReferenceExecutor

    on_batch = map_cost(ReferenceExecutor.load("digits", cim_map), CIM, batch=batch)
    assert on_batch.samples == 16 and on_batch.to_dict() == {**cost.to_dict(), "samples": 16}
    with pytest.raises(InvalidTypeError, match="spec: got str"):
        map_cost("digits", "rows=64", mapsave_dir=cim_map)
    with pytest.raises(InvalidArgumentError, match=r"^map_cost: .*\bbatch="):
        map_cost(ReferenceExecutor.load("digits", cim_map), CIM)


def test_report_json_holds_the_cost_of_the_quantize_run(cim_map) -> None:
    report = json.loads((cim_map / "digits" / "report.json").read_text())
    expected = map_cost("digits", mapsave_dir=cim_map).to_dict()
    assert report["cim_cost"] == {**json.loads(json.dumps(expected)), "samples": 16}
    assert report["cim_cost"]["totals"]["adc_conversions"] == sum(
        layer["adc_conversions"] for layer in report["cim_cost"]["layers"])


def test_inspect_shows_the_cost_per_layer(cim_map) -> None:
    listing = inspect_map("digits", cim_map)
    cost = listing.cost
    assert cost is not None and cost.spec == CIM
    rows = {row["node"]: row for row in listing.operators}
    for layer in cost.layers:
        assert rows[layer.node]["cim_cost"]["adc_conversions"] == layer.adc_conversions
    data = json.loads(listing_json(listing))
    assert data["cim_cost"]["totals"]["adc_conversions"] == cost.total("adc_conversions")
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        assert main(["inspect", "digits", "--mapsave-dir", str(cim_map)]) == 0
    text = out.getvalue()
    assert "CIM cost per input sample" in text
    total = next(line for line in text.splitlines() if line.startswith("total "))
    assert str(cost.total("adc_conversions")) in total.split()
    # another crossbar given on the command line: 256 rows need fewer row tiles, so fewer conversions
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        assert main(["inspect", "digits", "--mapsave-dir", str(cim_map), "--json", "--cim",
                     "rows=256,cell_bits=2,adc_bits=5"]) == 0
    other = json.loads(out.getvalue())["cim_cost"]
    assert other["spec"]["rows"] == 256
    assert other["totals"]["adc_conversions"] < cost.total("adc_conversions")
    assert other["totals"]["adc_conversions"] == map_cost(
        "digits", CIMSpec(rows=256, adc_bits=5), mapsave_dir=cim_map).total("adc_conversions")
