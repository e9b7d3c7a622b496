"""Mapping weight bits to noisy cells: exact without noise under every mapping, errors as the equations predict."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from maptools.errors import InvalidArgumentError
from maptools.examples import digits
from maptools.quantization.cim import AnalogMac, CIMSpec, DeviceModel, cim_accumulate
from maptools.quantization.cim.cellerror import mapping_error_table, programming_error_variance
from maptools.quantization.cim.spec import WEIGHT_ENCODINGS
from maptools.quantization.reference import simulate

MAPPINGS = [(encoding, c) for encoding in WEIGHT_ENCODINGS for c in (1, 2, 3, 4, 8)]


def _acc(w: np.ndarray, x: np.ndarray, spec: CIMSpec, analog: AnalogMac | None, weight_bits: int = 4) -> np.ndarray:
    return cim_accumulate(w, x, input_bits=4, input_signed=False, weight_bits=weight_bits, spec=spec, analog=analog)


@pytest.mark.parametrize(("encoding", "cell_bits"), MAPPINGS)
def test_noiseless_cells_are_exact_under_every_mapping(encoding: str, cell_bits: int) -> None:
    rng = np.random.default_rng(cell_bits)
    w, x = rng.integers(-128, 128, size=(16, 300)), rng.integers(0, 16, size=(300, 20))
    for adc_bits in (None, 7):
        spec = CIMSpec(rows=128, cell_bits=cell_bits, weight_encoding=encoding, adc_bits=adc_bits)
        # a finite on/off ratio alone takes the analog path; the reference current removes the off state
        analog = AnalogMac(DeviceModel(on_off_ratio=10.0), spec, seed=0)
        assert np.array_equal(_acc(w, x, spec, analog, 8), _acc(w, x, spec, None, 8)), spec


def test_noiseless_chip_runs_the_digits_map_bit_exactly_under_every_mapping(digits_w4a4_mapsave: Path) -> None:
    images = digits.load_split("test")[0][:32]
    for encoding in WEIGHT_ENCODINGS:
        for cell_bits in (1, 4):
            spec = CIMSpec(rows=128, cell_bits=cell_bits, weight_encoding=encoding, adc_bits=6)
            ideal = simulate("digits_w4a4", images, mapsave_dir=digits_w4a4_mapsave, cim=spec,
                             return_integers=True)[1]
            chip = simulate("digits_w4a4", images, mapsave_dir=digits_w4a4_mapsave, cim=spec,
                            device=DeviceModel(on_off_ratio=10.0), seed=3, return_integers=True)[1]
            assert ideal.keys() == chip.keys()
            for name in ideal:
                assert np.array_equal(ideal[name], chip[name]), (spec, name)


def test_differential_pair_cancels_the_common_drift_of_the_off_state() -> None:
    """Every cell drifts by ``r = (t / t0)^-nu``, the off state ``G_min`` too (no compensation, ideal ADC).

    A pair's column difference ``r (D+ - D-) + (r - 1) G_min/dG - (r - 1) G_min/dG`` keeps a pure gain,
    ``acc = r w.u``; the offset code keeps ``(r - 1)(2^(b-1) + G_min/dG * sum_s 2^(c s)) * sum_k u_k`` as well.
    """
    rng = np.random.default_rng(4)
    w, x = rng.integers(-8, 8, size=(40, 64)), rng.integers(0, 16, size=(64, 30))
    nu, time, ratio = 0.05, 20.0 * 1e4, 10.0
    r = 1e4 ** -nu
    device = DeviceModel(on_off_ratio=ratio, drift_nu=nu, time=time)
    exact = (w @ x).astype(np.float64)
    differential = CIMSpec(rows=64, cell_bits=2)
    acc = _acc(w, x, differential, AnalogMac(device, differential, seed=0))
    assert np.abs(acc - r * exact).max() <= 0.5 + 1e-3
    offset = differential.replace(weight_encoding="offset")
    g0 = (1 / ratio) / (1 - 1 / ratio) * 3  # G_min / dG of 2-bit cells
    predicted = r * exact + (r - 1) * (8 + g0 * (1 + 4)) * x.sum(axis=0)
    acc = _acc(w, x, offset, AnalogMac(device, offset, seed=0))
    assert np.abs(acc - predicted).max() <= 0.5 + 1e-3
    assert np.abs(acc - r * exact).mean() > 50  # the common drift the pair cancels: far beyond rounding
    # without an off-state conductance, global drift compensation undoes the common drift under both codes
    compensated = DeviceModel(drift_nu=nu, time=time, drift_compensation=True)
    for spec in (differential, offset):
        assert np.array_equal(_acc(w, x, spec, AnalogMac(compensated, spec, seed=0)), w @ x), spec


def test_programming_error_variance_by_hand() -> None:
    """w = 5 at 10 % relative error, no off-state conductance: only the non-zero digits' cells err."""
    device = DeviceModel(prog_sigma_rel=0.1)
    five = np.array([5])
    variance = {(e, c): programming_error_variance(five, 4, CIMSpec(cell_bits=c, weight_encoding=e), device)[0]
                for e, c in (("differential", 1), ("differential", 4), ("offset", 1))}
    assert variance["differential", 1] == pytest.approx(0.01 * (1 + 4**2))  # 0101: slices 0 and 2
    assert variance["differential", 4] == pytest.approx(0.01 * 5**2)        # one cell at level 5
    assert variance["offset", 1] == pytest.approx(0.01 * (1 + 4**2 + 8**2))  # 5 + 8 = 1101


@pytest.mark.parametrize(("encoding", "cell_bits"), [("differential", 1), ("differential", 2), ("offset", 2),
                                                     ("offset", 4)])
def test_programming_error_matches_its_equation_on_a_hand_checkable_layer(encoding: str, cell_bits: int) -> None:
    """One row, u = 15: each output is 15 (w + e), e the weight's programming error; variances within 6 %."""
    rng = np.random.default_rng(7)
    w = rng.integers(-8, 8, size=(40000, 1))
    x = np.full((1, 1), 15, np.int64)
    spec = CIMSpec(rows=1, cell_bits=cell_bits, weight_encoding=encoding)
    device = DeviceModel(on_off_ratio=10.0, prog_sigma_abs=0.1, prog_sigma_rel=0.03)
    error = (_acc(w, x, spec, AnalogMac(device, spec, seed=5)) - 15 * w).ravel()
    predicted = 15**2 * programming_error_variance(w, 4, spec, device).mean() + 1 / 12  # plus the final rounding
    assert abs(error.mean()) < 0.1
    assert np.mean(error.astype(np.float64) ** 2) == pytest.approx(predicted, rel=0.06)


def test_mapping_table_orders_the_mappings_as_the_equations_do() -> None:
    w = np.clip(np.rint(np.random.default_rng(0).normal(0, 20, 5000)), -128, 127).astype(np.int64)
    relative = mapping_error_table(w, 8, DeviceModel(prog_sigma_rel=0.05))
    absolute = mapping_error_table(w, 8, DeviceModel(prog_sigma_abs=1.0))
    # relative error: small weights are small conductances in a pair, large ones under the offset code
    assert all(relative["differential", c] < relative["offset", c] / 10 for c in (1, 2, 4, 8))
    # absolute error: two cells per slice double the variance of the pair; fewer bits per cell always help
    assert all(absolute["differential", c] == pytest.approx(2 * absolute["offset", c]) for c in (1, 2, 4, 8))
    for table in (relative, absolute):
        for e in WEIGHT_ENCODINGS:
            assert table[e, 1] < table[e, 2] < table[e, 4] < table[e, 8]
    pcm = mapping_error_table(w, 8, lambda c: DeviceModel.pcm(c))
    assert min(pcm, key=pcm.__getitem__) == ("differential", 1)


def test_mapping_options_are_validated() -> None:
    w = np.arange(-8, 8)
    with pytest.raises(InvalidArgumentError, match="cell_bits.*9"):
        mapping_error_table(w, 4, DeviceModel(), cell_bits=(2, 9))
    with pytest.raises(InvalidArgumentError, match="encodings.*'pair'"):
        mapping_error_table(w, 4, DeviceModel(), encodings=("pair",))
    with pytest.raises(InvalidArgumentError, match="weight_encoding.*'pair'"):
        CIMSpec(weight_encoding="pair")
    with pytest.raises(InvalidArgumentError, match="prog_sigma_abs"):
        programming_error_variance(w, 4, CIMSpec(cell_bits=1), DeviceModel.pcm(2))
    with pytest.raises(InvalidArgumentError, match="w_int"):
        programming_error_variance(np.array([9]), 4, CIMSpec(), DeviceModel())
    with pytest.raises(InvalidArgumentError, match="w_int"):
        mapping_error_table(np.zeros(4, np.int64), 4, DeviceModel())
