"""The torch path of a static chip (:mod:`maptools.quantization.cimmap.staticchip`) against the numpy analog path."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from maptools.errors import InvalidArgumentError
from maptools.examples import digits
from maptools.quantization.cim import AnalogMac, CIMSpec, DeviceModel, calibrate_adc, cim_accumulate
from maptools.quantization.cimmap import calibrate_map
from maptools.quantization.cimmap.montecarlo import Top1Agreement, monte_carlo
from maptools.quantization.cimmap.staticchip import StaticChipBackend, StaticMac
from maptools.quantization.reference import ReferenceExecutor, simulate
from maptools.quantization.reference.crossbar import CimMode, MacOperands

MAP = "digits_w4a4"
SPEC = CIMSpec(rows=64, cell_bits=2, adc_bits=6, adc_range="calibrated")
#: One device per effect a static chip has (no read noise), each at a setting that changes the outputs (but the
#: on/off ratio alone: the reference current removes the off state exactly).
EFFECTS = {
    "on/off ratio": DeviceModel(on_off_ratio=10.0),
    "relative programming error": DeviceModel(prog_sigma_rel=0.05),
    "absolute programming error": DeviceModel(prog_sigma_abs=2.0, on_off_ratio=20.0),
    "drift, compensated": DeviceModel(prog_sigma_rel=0.02, drift_nu=0.06, drift_nu_std=0.02, time=86400.0,
                                      drift_compensation=True),
    "stuck-at": DeviceModel(stuck_off_rate=0.01, stuck_on_rate=0.01),
    "IR drop": DeviceModel(ir_drop=1e-3),
}
LAYERS = {  # (operands, weights, centred columns): a signed input with a zero point, an unsigned depthwise layer
    "signed": (MacOperands("n", "MatMul", 8, True, 3, 8, None), (40, 300), (-131, 125), (300, 70)),
    "grouped": (MacOperands("n", "Conv", 6, False, 0, 4, -7), (5, 3, 9), (0, 64), (2, 5, 9, 33)),
}


def _layer(name: str, seed: int = 0) -> tuple[MacOperands, np.ndarray, np.ndarray]:
    operands, w_shape, (low, high), x_shape = LAYERS[name]
    rng = np.random.default_rng(seed)
    w_min = -(2 ** (operands.weight_bits - 1)) if operands.weight_min is None else operands.weight_min
    return operands, rng.integers(w_min, 2 ** (operands.weight_bits - 1), size=w_shape), \
        rng.integers(low, high, size=x_shape)


def _mode(operands: MacOperands, w: np.ndarray, x: np.ndarray, spec: CIMSpec) -> CimMode:
    """The spec with the layer's ADC ranges calibrated on its own columns (when the spec is calibrated)."""
    if spec.adc_range != "calibrated" or spec.adc_bits is None:
        return CimMode(spec, {})
    return CimMode(spec, {"n": calibrate_adc(w, x, spec=spec, **operands.kwargs())})


def _numpy(operands: MacOperands, w: np.ndarray, x: np.ndarray, mode: CimMode,
           analog: AnalogMac | None) -> np.ndarray:
    return cim_accumulate(w, x, spec=mode.spec, adc=mode.adc.get("n"), analog=analog, **operands.kwargs())


def _quantize_cells(analog: AnalogMac, operands: MacOperands, w: np.ndarray, x: np.ndarray, mode: CimMode) -> None:
    """Program ``analog`` and round its conductances to multiples of 2^-6: float32 sums of them are exact."""
    _numpy(operands, w, x, mode, analog)
    for g in analog.conductances():
        g[...] = np.round(g * 64) / 64


@pytest.mark.parametrize("layer", sorted(LAYERS))
@pytest.mark.parametrize("spec", [SPEC, SPEC.replace(adc_bits=None, adc_range="full"),
                                  SPEC.replace(adc_range="full", weight_encoding="offset", cell_bits=1, dac_bits=2)],
                         ids=["calibrated", "ideal-adc", "full-offset"])
def test_exact_cells_are_the_numpy_arithmetic_bit_for_bit(layer: str, spec: CIMSpec) -> None:
    operands, w, x = _layer(layer)
    mode = _mode(operands, w, x, spec)
    static = StaticMac(operands, mode, None)
    expected = _numpy(operands, w, x, mode, None)
    assert np.array_equal(static(w, x), expected)
    assert np.array_equal(static(w, x[..., :7]), expected[..., :7])  # a second call reuses the set-up cells
    if spec.adc_bits is None:
        assert np.array_equal(expected, np.matmul(w, x))


@pytest.mark.parametrize("effect", sorted(EFFECTS))
@pytest.mark.parametrize("layer", sorted(LAYERS))
def test_each_effect_is_the_numpy_analog_path(layer: str, effect: str) -> None:
    """The same cells give the same accumulators: bit for bit where the partial sums are exact in float32, else
    equal but for the rare ADC code on a rounding boundary of a partial sum rounded in another order."""
    operands, w, x = _layer(layer, seed=1)
    mode = _mode(operands, w, x, SPEC)
    device = EFFECTS[effect]
    exact = _numpy(operands, w, x, mode, None)
    analog = AnalogMac(device, SPEC, seed=5)
    _quantize_cells(analog, operands, w, x, mode)
    numpy_acc = _numpy(operands, w, x, mode, analog)
    assert np.array_equal(StaticMac(operands, mode, analog)(w, x), numpy_acc)
    if layer == "signed":  # the effect acts on this layer (a 9-term dot product hides the small ones in its ADC)
        assert np.array_equal(numpy_acc, exact) == (effect == "on/off ratio")
    # the raw draws: a fresh chip of the same seed on each side, programmed independently
    numpy_acc = _numpy(operands, w, x, mode, AnalogMac(device, SPEC, seed=5))
    static_acc = StaticMac(operands, mode, AnalogMac(device, SPEC, seed=5))(w, x)
    assert np.mean(static_acc == numpy_acc) >= 0.99


def test_a_device_with_read_noise_is_refused() -> None:
    with pytest.raises(InvalidArgumentError, match="read_sigma_rel=0.01.*expected 0"):
        StaticChipBackend(SPEC.replace(adc_range="full"), device=DeviceModel(read_sigma_rel=0.01))
    operands, w, x = _layer("signed")
    analog = AnalogMac(DeviceModel(prog_sigma_rel=0.01, read_sigma_abs=0.1), SPEC, seed=0)
    mode = _mode(operands, w, x, SPEC)
    with pytest.raises(InvalidArgumentError, match=r"^device: has read noise"):
        StaticMac(operands, mode, analog)(w, x)


# -- the map -------------------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def mapsave(digits_w4a4_mapsave: Path) -> Path:
    """The session's digits W4A4 map (``conftest.digits_w4a4_mapsave``)."""
    return digits_w4a4_mapsave


@pytest.fixture(scope="module")
def images() -> np.ndarray:
    return digits.load_split("test")[0][:48]


def test_zero_noise_is_the_exact_executor_bit_for_bit(mapsave: Path, images: np.ndarray) -> None:
    base = ReferenceExecutor.load(MAP, mapsave)
    exact, exact_ints = base.run(images, return_integers=True)
    spec = CIMSpec(rows=256, cell_bits=2)
    for device in (None, DeviceModel(), DeviceModel(on_off_ratio=20.0)):
        out, ints = base.with_backend(StaticChipBackend(spec, device=device, seed=3)).run(images, return_integers=True)
        assert np.array_equal(out["logits"], exact["logits"])
        assert ints.keys() == exact_ints.keys() and all(np.array_equal(ints[n], exact_ints[n]) for n in ints)


@pytest.mark.slow  # 9 chips of the digits map, 2 worker processes importing torch
def test_static_monte_carlo_is_the_numpy_one(mapsave: Path, images: np.ndarray) -> None:
    """The same chips for a seed, serially and with the process pool, as the numpy analog path."""
    spec = SPEC.replace(rows=128)
    calibration = calibrate_map(MAP, images[:16], spec, mapsave_dir=mapsave)
    exact = simulate(MAP, images, mapsave_dir=mapsave)["logits"]
    device = DeviceModel(prog_sigma_rel=0.12, drift_nu=0.05, drift_nu_std=0.02, time=3600.0, drift_compensation=True)
    kwargs = {"cim": spec, "adc": calibration, "device": device, "chips": 3, "metric": Top1Agreement(exact),
              "seed": 4, "mapsave_dir": mapsave}
    reference = monte_carlo(MAP, images, **kwargs)
    static = monte_carlo(MAP, images, static=True, **kwargs)
    assert len(set(reference.values.tolist())) > 1 and reference.mean < 1
    assert np.array_equal(static.values, reference.values)
    assert np.array_equal(monte_carlo(MAP, images, static=True, jobs=2, **kwargs).values, reference.values)
    with pytest.raises(InvalidArgumentError, match="read_sigma"):
        monte_carlo(MAP, images, static=True, **{**kwargs, "device": device.replace(read_sigma_rel=0.01)})
