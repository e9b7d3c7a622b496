"""The analog device model: exact when off, each effect by the amount its equation predicts, reproducible chips."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest

from maptools.errors import InvalidArgumentError, InvalidTypeError
from maptools.examples import digits
from maptools.quantization.cim import AnalogMac, CIMSpec, DeviceModel, cim_accumulate, tile_layout
from maptools.quantization.cimmap.montecarlo import Top1Agreement, monte_carlo
from maptools.quantization.reference import ReferenceExecutor, simulate

SPEC = CIMSpec(rows=256, cols=256, cell_bits=2)
MAP = "digits_w4a4"


def _acc(weights: np.ndarray, columns: np.ndarray, spec: CIMSpec, analog: AnalogMac | None,
         input_bits: int = 4) -> np.ndarray:
    return cim_accumulate(weights, columns, input_bits=input_bits, input_signed=False, weight_bits=4, spec=spec,
                          analog=analog)


def _ones_layer(m: int, k: int) -> tuple[np.ndarray, np.ndarray]:
    """Every weight 1 (differential: level 1 in slice 0, level 0 elsewhere), every input 15 (all planes 1)."""
    return np.ones((m, k), np.int64), np.full((k, 1), 15, np.int64)


# -- off: exact ---------------------------------------------------------------------------------------------------
def test_default_model_is_ideal_and_every_effect_turns_it_off() -> None:
    assert DeviceModel().ideal
    for change in ({"on_off_ratio": 10.0}, {"prog_sigma_abs": 0.1}, {"prog_sigma_rel": 0.01},
                   {"read_sigma_abs": 0.1}, {"read_sigma_rel": 0.01}, {"ir_drop": 1e-3}, {"stuck_off_rate": 0.01},
                   {"stuck_on_rate": 0.01}, {"drift_nu": 0.05, "time": 100.0}):
        assert not DeviceModel(**change).ideal, change
    assert DeviceModel(drift_nu=0.05).ideal  # no read time: no drift


def test_noiseless_analog_cells_equal_the_exact_arithmetic() -> None:
    rng = np.random.default_rng(0)
    w, x = rng.integers(-8, 8, size=(24, 600)), rng.integers(0, 16, size=(600, 50))
    for spec in (SPEC, SPEC.replace(adc_bits=6), SPEC.replace(weight_encoding="offset", adc_bits=7, rows=128)):
        expected = _acc(w, x, spec, None)
        # a finite on/off ratio goes through the analog path, the reference current removes the off state
        analog = AnalogMac(DeviceModel(on_off_ratio=10.0), spec, seed=0)
        assert np.array_equal(_acc(w, x, spec, analog), expected), spec


# -- each effect alone ----------------------------------------------------------------------------------------------
def test_programming_error_statistics() -> None:
    """Level-1 cells with a relative error s: acc - exact = 15 * sum_k (g_k - 1) ~ N(0, 15 * sqrt(K) * s)."""
    m, k, s = 4000, 64, 0.02
    w, x = _ones_layer(m, k)
    analog = AnalogMac(DeviceModel(prog_sigma_rel=s), SPEC, seed=1)
    error = (_acc(w, x, SPEC, analog) - w @ x).ravel()
    predicted = math.sqrt((15 * math.sqrt(k) * s) ** 2 + 1 / 12)  # plus the final rounding
    assert abs(error.std() / predicted - 1) < 0.05, (error.std(), predicted)
    assert abs(error.mean()) < 4 * predicted / math.sqrt(m)
    # programmed once: a second read of the same chip gives the same (no read noise)
    assert np.array_equal(_acc(w, x, SPEC, analog) - w @ x, error[:, None])


def test_read_noise_std() -> None:
    """2-bit DACs, u = 15: planes u_0 = u_1 = 3; plane p's column sum gets N(0, s sqrt(K) u_p), acc = psum_0 +
    4 psum_1: std s sqrt(K * 9 * 17)."""
    m, k, s = 4000, 64, 0.02
    w, x = _ones_layer(m, k)
    spec = SPEC.replace(dac_bits=2)
    analog = AnalogMac(DeviceModel(read_sigma_rel=s), spec, seed=2)
    first = (_acc(w, x, spec, analog) - w @ x).ravel()
    second = (_acc(w, x, spec, analog) - w @ x).ravel()
    predicted = math.sqrt(s * s * k * 9 * (1 + 16) + 1 / 12)
    for error in (first, second):
        assert abs(error.std() / predicted - 1) < 0.05, (error.std(), predicted)
    assert not np.array_equal(first, second)  # fresh noise at every read
    assert abs(np.corrcoef(first, second)[0, 1]) < 0.1


def test_drift_factor_and_global_compensation() -> None:
    """G(t) = G_p (t / t0)^-nu: every partial sum times 10^-0.2 at t = 10^4 t0; compensation divides it out."""
    rng = np.random.default_rng(3)
    w, x = rng.integers(-8, 8, size=(16, 300)), rng.integers(0, 16, size=(300, 40))
    device = DeviceModel(drift_nu=0.05, time=20.0 * 1e4)
    factor = 1e4 ** -0.05
    drifted = _acc(w, x, SPEC, AnalogMac(device, SPEC, seed=0))
    assert np.array_equal(drifted, np.floor(factor * (w @ x) + 0.5))
    compensated = _acc(w, x, SPEC, AnalogMac(device.replace(drift_compensation=True), SPEC, seed=0))
    assert np.array_equal(compensated, w @ x)
    # with a cell-to-cell spread of nu the compensation restores the mean, not every value
    spread = device.replace(drift_nu_std=0.02, drift_compensation=True)
    acc = _acc(w, x, SPEC, AnalogMac(spread, SPEC, seed=0))
    assert abs((acc.astype(float).sum() / (w @ x).sum()) - 1) < 0.02
    assert not np.array_equal(acc, w @ x)


def test_ir_drop_attenuation() -> None:
    """One cell per slice: G / (1 + rho (G / g_max) n), n = (column + 1) + (rows - row) wire segments."""
    spec = CIMSpec(rows=16, cols=8, cell_bits=2)
    rho, row, weight, inp = 0.01, 5, 7, 15
    w = np.zeros((2, 16), np.int64)
    w[1, row] = weight  # channel 1: the second channel of the array (2 per array of 8 columns)
    x = np.zeros((16, 1), np.int64)
    x[row] = inp
    layout = tile_layout((2, 16), "Gemm", 1, 4, spec, trans_b=True)
    predicted = 0.0
    for s, digit in enumerate((weight & 3, weight >> 2)):  # 7 = 3 + 4 * 1
        column = layout.column_of(1, s, 0)[1]
        segments = (column + 1) + (spec.rows - row)
        predicted += 4**s * digit / (1 + rho * (digit / 3) * segments) * inp
    acc = _acc(w, x, spec, AnalogMac(DeviceModel(ir_drop=rho), spec, seed=0))
    assert acc[0, 0] == 0
    assert acc[1, 0] == math.floor(predicted + 0.5) and acc[1, 0] < weight * inp, (acc, predicted)


def test_stuck_at_rates() -> None:
    """w = 1 on 4 cells (levels 1, 0 | 0, 0): acc = 1 iff the level-1 cell is not stuck and no 0-cell is stuck on."""
    m, off, on = 20000, 0.1, 0.05
    w, x = np.ones((m, 1), np.int64), np.ones((1, 1), np.int64)
    acc = _acc(w, x, SPEC, AnalogMac(DeviceModel(stuck_off_rate=off, stuck_on_rate=on), SPEC, seed=4),
               input_bits=1).ravel()
    for value, p in ((1, (1 - off - on) * (1 - on) ** 3), (0, off * (1 - on) ** 3)):
        tolerance = 4 * math.sqrt(p * (1 - p) / m)
        assert abs(np.mean(acc == value) - p) < tolerance, (value, np.mean(acc == value), p)


def test_seeded_chips_are_reproducible_and_distinct() -> None:
    rng = np.random.default_rng(5)
    w, x = rng.integers(-8, 8, size=(8, 100)), rng.integers(0, 16, size=(100, 20))
    device = DeviceModel(prog_sigma_rel=0.05, read_sigma_rel=0.02, stuck_on_rate=0.01)
    runs = [_acc(w, x, SPEC, AnalogMac(device, SPEC, seed)) for seed in (7, 7, 8)]
    assert np.array_equal(runs[0], runs[1]) and not np.array_equal(runs[0], runs[2])


# -- the map: simulate and monte_carlo ------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def mapsave(digits_w4a4_mapsave: Path) -> Path:
    """The session's digits W4A4 map (``conftest.digits_w4a4_mapsave``)."""
    return digits_w4a4_mapsave


@pytest.fixture(scope="module")
def images() -> np.ndarray:
    return digits.load_split("test")[0][:48]


def test_simulate_with_an_ideal_device_is_the_exact_executor(mapsave: Path, images: np.ndarray) -> None:
    exact, exact_ints = simulate(MAP, images, mapsave_dir=mapsave, return_integers=True)
    for device in (DeviceModel(), DeviceModel(on_off_ratio=20.0)):
        out, ints = simulate(MAP, images, mapsave_dir=mapsave, return_integers=True, cim=SPEC, device=device, seed=9)
        assert np.array_equal(out["logits"], exact["logits"])
        assert ints.keys() == exact_ints.keys() and all(np.array_equal(ints[n], exact_ints[n]) for n in ints)


def test_simulate_seed(mapsave: Path, images: np.ndarray) -> None:
    device = DeviceModel(prog_sigma_rel=0.1, read_sigma_rel=0.05)
    runs = [simulate(MAP, images, mapsave_dir=mapsave, cim=SPEC, device=device, seed=s)["logits"] for s in (1, 1, 2)]
    assert np.array_equal(runs[0], runs[1]) and not np.array_equal(runs[0], runs[2])
    exact = simulate(MAP, images, mapsave_dir=mapsave)["logits"]
    assert not np.array_equal(runs[0], exact)
    # one chip: its cells are programmed on the first run; a second run reads the same cells with new noise
    chip = ReferenceExecutor.load(MAP, mapsave, cim=SPEC, device=DeviceModel(prog_sigma_rel=0.1), seed=1)
    assert np.array_equal(chip.run(images)["logits"], chip.run(images)["logits"])


def test_monte_carlo_is_reproducible_across_processes(mapsave: Path, images: np.ndarray) -> None:
    exact = simulate(MAP, images, mapsave_dir=mapsave)["logits"]
    device = DeviceModel(prog_sigma_rel=0.15, read_sigma_rel=0.05)
    kwargs = {"cim": SPEC, "device": device, "chips": 4, "metric": Top1Agreement(exact), "seed": 11,
              "mapsave_dir": mapsave}
    serial = monte_carlo(MAP, images, **kwargs)
    assert serial.values.shape == (4,) and len(set(serial.values.tolist())) > 1
    assert 0 <= serial.worst <= serial.mean <= 1 and serial.worst == serial.values.min()
    assert serial.std == pytest.approx(np.std(serial.values, ddof=1))
    pooled = monte_carlo(MAP, images, jobs=2, **kwargs)
    assert np.array_equal(pooled.values, serial.values)
    loaded = ReferenceExecutor.load(MAP, mapsave)
    in_memory = monte_carlo(loaded, images, **{k: v for k, v in kwargs.items() if k != "mapsave_dir"})
    assert np.array_equal(in_memory.values, serial.values)
    record = json.loads(json.dumps(serial.to_dict()))
    assert record["values"] == serial.values.tolist() and record["worst"] == serial.worst
    assert DeviceModel.from_dict(record["device"]) == device and CIMSpec.from_dict(record["spec"]) == SPEC
    # chip i is simulate(..., seed=child_seed(seed, i))
    from maptools.quantization.cim import child_seed

    third = simulate(MAP, images, mapsave_dir=mapsave, cim=SPEC, device=device, seed=child_seed(11, 2))["logits"]
    assert Top1Agreement(exact)({"logits": third}) == serial.values[2]


# -- bad arguments ----------------------------------------------------------------------------------------------------
def test_bad_arguments_are_refused_naming_them(mapsave: Path, images: np.ndarray) -> None:
    with pytest.raises(InvalidArgumentError, match="stuck_on_rate"):
        DeviceModel(stuck_on_rate=1.5)
    with pytest.raises(InvalidArgumentError, match="on_off_ratio"):
        DeviceModel(on_off_ratio=0.5)
    with pytest.raises(InvalidArgumentError, match="DeviceModel.from_dict: unknown field.*'sigma'"):
        DeviceModel.from_dict({"sigma": 0.1})
    with pytest.raises(InvalidTypeError, match="prog_sigma_abs"):
        DeviceModel(prog_sigma_abs="big")
    with pytest.raises(InvalidArgumentError, match="read_sigma_rel.*expected values >= 0"):
        DeviceModel(read_sigma_rel=(0.1, -0.1, 0.0, 0.0))
    with pytest.raises(InvalidArgumentError, match=r"device\.prog_sigma_abs: got 3 values, expected one per level"):
        simulate(MAP, images, mapsave_dir=mapsave, cim=SPEC, device=DeviceModel(prog_sigma_abs=(0.1, 0.2, 0.3)))
    with pytest.raises(InvalidArgumentError, match="device: given with cim=None"):
        simulate(MAP, images, mapsave_dir=mapsave, device=DeviceModel(prog_sigma_rel=0.1))
    with pytest.raises(InvalidTypeError, match="device: got dict"):
        simulate(MAP, images, mapsave_dir=mapsave, cim=SPEC, device={"prog_sigma_rel": 0.1})
    with pytest.raises(InvalidArgumentError, match="seed: got -1"):
        simulate(MAP, images, mapsave_dir=mapsave, cim=SPEC, device=DeviceModel(prog_sigma_rel=0.1), seed=-1)
    with pytest.raises(InvalidTypeError, match="seed: got 1.5"):
        AnalogMac(DeviceModel(), SPEC, 1.5)  # type: ignore[arg-type]
    with pytest.raises(InvalidArgumentError, match="chips: got 0"):
        monte_carlo(MAP, images, cim=SPEC, device=DeviceModel(), chips=0, metric=len, mapsave_dir=mapsave)
    rng = np.random.default_rng(0)
    analog = AnalogMac(DeviceModel(prog_sigma_rel=0.1), SPEC, 0)
    _acc(rng.integers(-8, 8, size=(4, 10)), rng.integers(0, 16, size=(10, 3)), SPEC, analog)
    with pytest.raises(InvalidArgumentError, match=r"^analog: "):
        _acc(rng.integers(-8, 8, size=(4, 10)), rng.integers(0, 16, size=(10, 3)), SPEC, analog)


def test_pcm_preset_figures() -> None:
    """aihwkit's PCM model at 2-bit levels g_T = 0, 1/3, 2/3, 1 (Nandakumar et al. 2019)."""
    pcm = DeviceModel.pcm(2, time=3600.0)
    assert pcm.g_max == 25.0 and pcm.drift_t0 == 20.0 and pcm.drift_compensation
    assert pcm.prog_sigma_abs[0] == pytest.approx(0.2635) and pcm.prog_sigma_abs[3] == pytest.approx(1.0554)
    assert pcm.drift_nu[3] == pytest.approx(0.049) and pcm.drift_nu[0] == pytest.approx(0.1)
    read = 0.0088 * math.sqrt(math.log((3600 + 250e-9) / 500e-9))
    assert pcm.read_sigma_rel[3] == pytest.approx(read)
    assert DeviceModel.from_dict(pcm.to_dict()) == pcm
