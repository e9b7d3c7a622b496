"""The CIM crossbar arithmetic (maptools.quantization.cim): numpy only, no PPQ, fast.

The reference computations here are written independently of the package, with explicit Python loops over
row tiles, weight slices, signs, input bit planes and the ADC's rounding and clipping.
"""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from maptools.errors import ArtifactError, InvalidArgumentError, InvalidTypeError
from maptools.quantization.cim import (
    AdcCalibration,
    CIMSpec,
    adc_grid,
    calibrate_adc,
    cim_accumulate,
    combine_slices,
    fixed_point_multiplier,
    mac_matrix,
    partial_sums,
    power_of_two_multiplier,
    requantize,
    requantize_fixed,
    slice_weights,
    tile_layout,
)
from maptools.quantization.cim import arithmetic as cim_arithmetic

REPO = Path(__file__).resolve().parent.parent


# -- independent reference -------------------------------------------------------------------------------
def reference_cim(w: np.ndarray, x: np.ndarray, *, a: int, signed: bool, zp: int, b: int, spec: CIMSpec,
                  ranges: np.ndarray | None) -> np.ndarray:
    """The crossbar accumulator of ``w (M, K) @ x (K, P)`` (x centred), with plain Python loops."""
    m_out, k_len = w.shape
    positions = x.shape[1]
    c, d, rows = spec.cell_bits, spec.dac_bits, spec.rows
    half = 2 ** (b - 1)
    if spec.weight_encoding == "offset":
        n_slices, signs = math.ceil(b / c), (1,)
    else:
        n_slices, signs = math.ceil(b / c), (1, -1)  # the full range -2^(b-1) needs b magnitude bits
    n_planes = math.ceil(a / d)
    offset = zp + (2 ** (a - 1) if signed else 0)
    levels = None if spec.adc_bits is None else 2**spec.adc_bits - 1

    def digit(weight: int, s: int, sign: int) -> int:
        if spec.weight_encoding == "offset":
            return ((weight + half) // 2 ** (c * s)) % 2**c
        stored = max(weight, 0) if sign == 1 else max(-weight, 0)
        return (stored // 2 ** (c * s)) % 2**c

    out = np.zeros((m_out, positions), dtype=np.int64)
    for m in range(m_out):
        for pos in range(positions):
            u = [int(x[k, pos]) + offset for k in range(k_len)]
            assert all(0 <= v < 2**a for v in u)
            total = 0  # the ideal sum, or the fixed-point sum of code * gain (16 fractional bits)
            for t in range(math.ceil(k_len / rows)):
                tile = range(t * rows, min(k_len, (t + 1) * rows))
                for s in range(n_slices):
                    for sign in signs:
                        for p in range(n_planes):
                            psum = sum(digit(int(w[m, k]), s, sign) * ((u[k] >> (d * p)) % 2**d) for k in tile)
                            if levels is not None:
                                step = float(ranges[t, s, p]) / levels
                                code = round(psum / step)  # Python's round: half to even
                                code = min(max(code, 0), levels)
                                psum = code * round(step * 2**16)
                            total += sign * 2 ** (c * s) * 2 ** (d * p) * psum
            if levels is not None:
                total = (total + 2**15) >> 16  # one rounding, half up
            if spec.weight_encoding == "offset":
                total -= half * sum(u)
            total -= offset * sum(int(w[m, k]) for k in range(k_len))
            out[m, pos] = total
    return out


def im2col_loops(x: np.ndarray, kernel: int, pad: int) -> np.ndarray:
    """Columns of one (C, H, W) image for a stride-1 square kernel: rows (c, i, j), columns (oy, ox)."""
    ch, h, wd = x.shape
    xp = np.zeros((ch, h + 2 * pad, wd + 2 * pad), dtype=x.dtype)
    xp[:, pad:pad + h, pad:pad + wd] = x
    oh, ow = h + 2 * pad - kernel + 1, wd + 2 * pad - kernel + 1
    cols = np.zeros((ch * kernel * kernel, oh * ow), dtype=np.int64)
    for c in range(ch):
        for i in range(kernel):
            for j in range(kernel):
                for oy in range(oh):
                    for ox in range(ow):
                        cols[(c * kernel + i) * kernel + j, oy * ow + ox] = xp[c, oy + i, ox + j]
    return cols


def relu_inputs(rng: np.random.Generator, shape: tuple[int, ...], bits: int = 4) -> np.ndarray:
    """ReLU-like unsigned activations: half zeros, the rest a clipped half-Gaussian on 0..2^bits-1."""
    z = np.maximum(rng.standard_normal(shape), 0.0)
    return np.clip(np.rint(z / 3.0 * (2**bits - 1)), 0, 2**bits - 1).astype(np.int64)


def gaussian_weights(rng: np.random.Generator, shape: tuple[int, ...], bits: int = 4) -> np.ndarray:
    """Gaussian-ish symmetric integer weights in the signed b-bit range."""
    half = 2 ** (bits - 1)
    return np.clip(np.rint(rng.standard_normal(shape) * half / 3.0), -half, half - 1).astype(np.int64)


def calibrated_spec(spec: CIMSpec) -> CIMSpec:
    return spec.replace(adc_range="calibrated")


def fixed_ranges(spec: CIMSpec, grid: tuple[int, int, int], rng: np.random.Generator, bits: int = 4) -> AdcCalibration:
    """Arbitrary (non-integer, often clipping) ranges in L .. full_scale, for ``bits``-bit weights and inputs."""
    levels = spec.adc_levels
    ranges = levels + rng.random(grid) * (spec.full_scale - levels) * 0.6
    return AdcCalibration(ranges=ranges, spec=calibrated_spec(spec), weight_bits=bits, input_bits=bits)


# -- (a) ideal ADC ------------------------------------------------------------------------------------------
@pytest.mark.parametrize("encoding", ["differential", "offset"])
@pytest.mark.parametrize("cell_bits,dac_bits", [(1, 1), (2, 1), (2, 2), (3, 2), (4, 3), (8, 8)])
@pytest.mark.parametrize("signed", [False, True])
def test_ideal_adc_is_exact(encoding, cell_bits, dac_bits, signed):
    rng = np.random.default_rng(cell_bits * 10 + dac_bits)
    spec = CIMSpec(rows=37, cell_bits=cell_bits, dac_bits=dac_bits, weight_encoding=encoding)  # K % rows != 0
    for a, b in [(4, 4), (8, 8), (3, 5)]:
        w = rng.integers(-(2 ** (b - 1)), 2 ** (b - 1), size=(3, 6, 100))  # (groups, M, K)
        low, high = (-(2 ** (a - 1)), 2 ** (a - 1)) if signed else (0, 2**a)
        x = rng.integers(low, high, size=(2, 3, 100, 9))  # (N, groups, K, P)
        acc = cim_accumulate(w, x, input_bits=a, input_signed=signed, weight_bits=b, spec=spec)
        assert acc.dtype == np.int64 and acc.shape == (2, 3, 6, 9)
        np.testing.assert_array_equal(acc, w @ x)


@pytest.mark.parametrize("encoding", ["differential", "offset"])
def test_ideal_adc_zero_point_and_symmetric_weights(encoding):
    rng = np.random.default_rng(1)
    spec = CIMSpec(rows=64, cell_bits=2, weight_encoding=encoding)
    w = rng.integers(-7, 8, size=(5, 150))  # symmetric 4-bit weights: 3 magnitude bits
    q = rng.integers(0, 16, size=(150, 11))
    for zp in (0, 3):
        acc = cim_accumulate(w, q - zp, input_bits=4, input_signed=False, input_zero_point=zp, weight_bits=4,
                             weight_min=-7, spec=spec)
        np.testing.assert_array_equal(acc, w @ (q - zp))
    acc = cim_accumulate(w, rng.integers(-8, 8, size=(150, 4)) * 0, input_bits=4, input_signed=True, weight_bits=4,
                         spec=spec)
    np.testing.assert_array_equal(acc, 0)


def test_ideal_adc_matches_the_executor_accumulate():
    from maptools.quantization.reference.mac import accumulate

    rng = np.random.default_rng(2)
    w = rng.integers(-8, 8, size=(2, 4, 45))
    x = rng.integers(0, 16, size=(3, 2, 45, 10))
    acc = cim_accumulate(w, x, input_bits=4, input_signed=False, weight_bits=4, spec=CIMSpec(rows=16))
    np.testing.assert_array_equal(acc, accumulate(w, x))


def test_blocks_of_positions_do_not_change_the_result(monkeypatch):
    rng = np.random.default_rng(3)
    spec = CIMSpec(rows=32, cell_bits=2, adc_bits=5)
    w, x = gaussian_weights(rng, (8, 70)), relu_inputs(rng, (2, 70, 300))
    whole = cim_accumulate(w, x, input_bits=4, input_signed=False, weight_bits=4, spec=spec)
    monkeypatch.setattr(cim_arithmetic, "BLOCK_ELEMENTS", 500)
    assert len(list(cim_arithmetic._blocks(cim_arithmetic.prepare_mac(w, x, 4, False, 0, 4, None, spec)))) > 10
    np.testing.assert_array_equal(cim_accumulate(w, x, input_bits=4, input_signed=False, weight_bits=4, spec=spec),
                                  whole)


# -- (b) against the loop reference -------------------------------------------------------------------------
CONV_CASES = [(enc, d, adc) for enc in ("differential", "offset") for d in (1, 2) for adc in (3, 4, 6, 8)]


@pytest.mark.parametrize("encoding,dac_bits,adc_bits", CONV_CASES)
def test_conv_matches_loop_reference(encoding, dac_bits, adc_bits):
    rng = np.random.default_rng(adc_bits * 4 + dac_bits)
    image = relu_inputs(rng, (3, 5, 5))
    weight = gaussian_weights(rng, (4, 3, 3, 3))
    cols = im2col_loops(image, 3, 1)  # K = 27, P = 25
    spec = CIMSpec(rows=10, cell_bits=2, dac_bits=dac_bits, adc_bits=adc_bits, weight_encoding=encoding)
    w = mac_matrix(weight, "Conv", 1)[0]
    # the matrix view is the im2col order: the ideal result is the convolution
    conv = np.array([[sum(int(weight[m, c, i, j]) * int(cols[(c * 3 + i) * 3 + j, p]) for c in range(3)
                      for i in range(3) for j in range(3)) for p in range(25)] for m in range(4)])
    np.testing.assert_array_equal(w @ cols, conv)
    grid = adc_grid(27, 4, 4, spec)
    assert grid == (3, 2, math.ceil(4 / dac_bits))
    full = cim_accumulate(w, cols, input_bits=4, input_signed=False, weight_bits=4, spec=spec)
    full_range = np.full(grid, float(max(spec.full_scale, spec.adc_levels)))
    np.testing.assert_array_equal(full, reference_cim(w, cols, a=4, signed=False, zp=0, b=4, spec=spec,
                                                      ranges=full_range))
    cal = fixed_ranges(spec, grid, rng)
    acc = cim_accumulate(w, cols, input_bits=4, input_signed=False, weight_bits=4, spec=calibrated_spec(spec), adc=cal)
    np.testing.assert_array_equal(acc, reference_cim(w, cols, a=4, signed=False, zp=0, b=4, spec=spec,
                                                     ranges=cal.ranges))
    # lossy exactly when the ADC has fewer levels than the largest possible partial sum
    assert np.array_equal(full, conv) == (adc_bits >= spec.lossless_adc_bits)


@pytest.mark.parametrize("encoding", ["differential", "offset"])
@pytest.mark.parametrize("dac_bits", [1, 2])
@pytest.mark.parametrize("adc_bits", [3, 4, 6, 8])
def test_gemm_matches_loop_reference(encoding, dac_bits, adc_bits):
    rng = np.random.default_rng(100 + adc_bits)
    # Gemm with transB=1: weight (N=5, K=23); signed 5-bit inputs (3 planes of 2 bits: the top plane 1 bit)
    weight = rng.integers(-16, 16, size=(5, 23))
    a_rows = rng.integers(-16, 16, size=(6, 23))  # the Gemm's A: 6 rows of 23
    w = mac_matrix(weight, "Gemm", trans_b=True)[0]
    cols = a_rows.T
    spec = CIMSpec(rows=8, cell_bits=3, dac_bits=dac_bits, adc_bits=adc_bits, weight_encoding=encoding)
    grid = adc_grid(23, 5, 5, spec)
    for cal in (None, fixed_ranges(spec, grid, rng, bits=5)):
        use = spec if cal is None else calibrated_spec(spec)
        ranges = np.full(grid, float(max(spec.full_scale, spec.adc_levels))) if cal is None else cal.ranges
        acc = cim_accumulate(w, cols, input_bits=5, input_signed=True, weight_bits=5, spec=use, adc=cal)
        np.testing.assert_array_equal(acc, reference_cim(w, cols, a=5, signed=True, zp=0, b=5, spec=spec,
                                                         ranges=ranges))
    # an unsigned input with a zero point, ranges from calibrate_adc
    q = rng.integers(0, 32, size=(23, 6))
    cal = calibrate_adc(w, q - 4, input_bits=5, input_signed=False, input_zero_point=4, weight_bits=5,
                        spec=calibrated_spec(spec))
    acc = cim_accumulate(w, q - 4, input_bits=5, input_signed=False, input_zero_point=4, weight_bits=5,
                         spec=calibrated_spec(spec), adc=cal)
    np.testing.assert_array_equal(acc, reference_cim(w, q - 4, a=5, signed=False, zp=4, b=5, spec=spec,
                                                     ranges=cal.ranges))


# -- (c), (d) calibration on realistic data -----------------------------------------------------------------
@pytest.fixture(scope="module")
def realistic():
    """A 3x3 conv layer, 64 -> 32 channels (K = 576), ReLU-like 4-bit inputs, Gaussian-ish 4-bit weights."""
    rng = np.random.default_rng(7)
    w = gaussian_weights(rng, (32, 576))
    calib = [relu_inputs(rng, (576, 400)) for _ in range(3)]
    held_out = relu_inputs(rng, (576, 600))
    return w, calib, held_out, w @ held_out


def _rms_error(w, calib, x, exact, spec, method="mse"):
    cal = None
    if spec.adc_range == "calibrated":
        cal = calibrate_adc(w, calib, input_bits=4, input_signed=False, weight_bits=4, spec=spec, method=method)
    acc = cim_accumulate(w, x, input_bits=4, input_signed=False, weight_bits=4, spec=spec, adc=cal)
    return float(np.sqrt(np.mean((acc - exact).astype(np.float64) ** 2)))


@pytest.mark.parametrize("encoding", ["differential", "offset"])
def test_calibrated_ranges_beat_full_range(realistic, encoding):
    w, calib, x, exact = realistic
    for adc_bits in (4, 5, 6, 7):
        spec = CIMSpec(rows=256, cell_bits=2, dac_bits=1, adc_bits=adc_bits, weight_encoding=encoding)
        full = _rms_error(w, calib, x, exact, spec)
        mse = _rms_error(w, calib, x, exact, calibrated_spec(spec), "mse")
        pct = _rms_error(w, calib, x, exact, calibrated_spec(spec), "percentile")
        assert mse < 0.5 * full, (adc_bits, mse, full)
        assert pct < full, (adc_bits, pct, full)


@pytest.mark.parametrize("encoding", ["differential", "offset"])
@pytest.mark.parametrize("adc_range", ["full", "calibrated"])
def test_error_non_increasing_in_adc_bits_and_exact_at_enough_bits(realistic, adc_range, encoding):
    w, calib, x, exact = realistic
    base = CIMSpec(rows=256, cell_bits=2, dac_bits=1, adc_range=adc_range, weight_encoding=encoding)
    assert base.full_scale == 768 and base.lossless_adc_bits == 10
    errors = [_rms_error(w, calib, x, exact, base.replace(adc_bits=bits)) for bits in range(2, 11)]
    # a full-range ADC of 2 or 3 bits (steps 256, 110) reads nearly every partial sum (mostly below 100) as 0:
    # its error is about the accumulator's RMS, and not monotone there; from 4 bits on it decreases
    first = 0 if adc_range == "calibrated" else 2
    assert all(b <= a for a, b in zip(errors[first:], errors[first + 1:], strict=False)), errors
    if adc_range == "full":
        assert errors[-1] == 0.0  # 10 bits: step 768 / 1023 < 1
    else:
        # calibrated at the bits that hold the largest partial sum seen: exact on the calibration data
        spec = base.replace(adc_bits=6)
        seen = calibrate_adc(w, calib, input_bits=4, input_signed=False, weight_bits=4, spec=spec).max_seen.max()
        bits = int(seen).bit_length()
        spec = base.replace(adc_bits=bits)
        cal = calibrate_adc(w, calib, input_bits=4, input_signed=False, weight_bits=4, spec=spec)
        assert np.all(cal.ranges == spec.adc_levels) and np.all(cal.mse == 0) and np.all(cal.clipped == 0)
        for x_cal in calib:
            acc = cim_accumulate(w, x_cal, input_bits=4, input_signed=False, weight_bits=4, spec=spec, adc=cal)
            np.testing.assert_array_equal(acc, w @ x_cal)
        assert bits < base.lossless_adc_bits


def test_calibration_details():
    rng = np.random.default_rng(8)
    spec = CIMSpec(rows=64, cell_bits=2, adc_bits=4, adc_range="calibrated")
    w = gaussian_weights(rng, (8, 100))
    # all-zero inputs: nothing to fit, every range at L (step 1)
    cal = calibrate_adc(w, [np.zeros((100, 20), np.int64)], input_bits=4, input_signed=False, weight_bits=4,
                        spec=spec)
    assert cal.shape == adc_grid(100, 4, 4, spec) == (2, 2, 4)
    assert np.all(cal.ranges == 15) and np.all(cal.samples == 2 * 8 * 20) and np.all(cal.max_seen == 0)
    x = relu_inputs(rng, (100, 50))
    for method in ("mse", "percentile"):
        cal = calibrate_adc(w, iter([x]), input_bits=4, input_signed=False, weight_bits=4, spec=spec, method=method)
        assert np.all(cal.ranges >= 15) and np.all(cal.ranges <= np.maximum(cal.max_seen, 15))
        assert cal.method == method
    # the MSE choice is at least as good as the percentile one on the calibration data itself
    mse = calibrate_adc(w, x, input_bits=4, input_signed=False, weight_bits=4, spec=spec).mse
    pct = calibrate_adc(w, x, input_bits=4, input_signed=False, weight_bits=4, spec=spec, method="percentile").mse
    assert np.all(mse <= pct + 1e-9)
    # wide partial sums: histogram bins of several integers
    wide = CIMSpec(rows=512, cell_bits=8, dac_bits=1, adc_bits=6, adc_range="calibrated")
    assert wide.full_scale + 1 > 2**16
    cal = calibrate_adc(gaussian_weights(rng, (4, 600), bits=8), relu_inputs(rng, (600, 30)), input_bits=4,
                        input_signed=False, weight_bits=8, spec=wide)
    assert cal.shape == (2, 1, 4) and np.all(cal.ranges >= 63)
    with pytest.raises(InvalidArgumentError, match="adc_bits"):
        calibrate_adc(w, x, input_bits=4, input_signed=False, weight_bits=4, spec=spec.replace(adc_bits=None))
    with pytest.raises(InvalidArgumentError, match="method"):
        calibrate_adc(w, x, input_bits=4, input_signed=False, weight_bits=4, spec=spec, method="kl")
    with pytest.raises(InvalidArgumentError, match="percentile"):
        calibrate_adc(w, x, input_bits=4, input_signed=False, weight_bits=4, spec=spec, method="percentile",
                      percentile=0)
    with pytest.raises(InvalidArgumentError, match="column_batches"):
        calibrate_adc(w, [], input_bits=4, input_signed=False, weight_bits=4, spec=spec)


def test_adc_calibration_serialization(tmp_path):
    rng = np.random.default_rng(9)
    spec = CIMSpec(rows=64, cell_bits=2, adc_bits=5, adc_range="calibrated", weight_encoding="offset")
    w, x = gaussian_weights(rng, (8, 100)), relu_inputs(rng, (100, 40))
    cal = calibrate_adc(w, x, input_bits=4, input_signed=False, weight_bits=4, spec=spec)
    for back in (AdcCalibration.from_dict(json.loads(json.dumps(cal.to_dict()))),
                 AdcCalibration.load(cal.save(tmp_path / "adc.npz"))):
        assert back.spec == cal.spec and back.method == cal.method and back.weight_bits == 4
        for name in ("ranges", "samples", "clipped", "mse", "max_seen"):
            np.testing.assert_array_equal(getattr(back, name), getattr(cal, name))
    with np.load(tmp_path / "adc.npz", allow_pickle=False) as arrays:
        assert all(arrays[name].dtype != object for name in arrays.files)
    with pytest.raises(ArtifactError):
        AdcCalibration.from_dict({"ranges": [[[1.0]]]})
    # the calibration must fit the spec and the MAC
    with pytest.raises(InvalidArgumentError, match="cell_bits"):
        cal.check(spec.replace(cell_bits=1), cal.shape)
    with pytest.raises(InvalidArgumentError, match="input_bits=4 .the MAC has 3."):
        cim_accumulate(w, x // 2, input_bits=3, input_signed=False, weight_bits=4, spec=spec, adc=cal)
    with pytest.raises(InvalidArgumentError, match=r"^adc: "):
        cim_accumulate(w[:, :50], x[:50], input_bits=4, input_signed=False, weight_bits=4, spec=spec, adc=cal)
    with pytest.raises(InvalidArgumentError, match=r"^adc: None, but spec\.adc_range"):
        cim_accumulate(w, x, input_bits=4, input_signed=False, weight_bits=4, spec=spec)
    with pytest.raises(InvalidArgumentError, match=r"^adc: "):
        cim_accumulate(w, x, input_bits=4, input_signed=False, weight_bits=4, spec=spec.replace(adc_range="full"),
                       adc=cal)
    with pytest.raises(InvalidArgumentError, match=r"^AdcCalibration\.ranges: "):
        AdcCalibration(ranges=np.zeros((1, 1, 1)), spec=spec, weight_bits=4, input_bits=4)


def test_partial_sums_stay_in_the_full_scale():
    rng = np.random.default_rng(10)
    spec = CIMSpec(rows=50, cell_bits=3, dac_bits=2)
    w, x = rng.integers(-8, 8, size=(6, 120)), rng.integers(-8, 8, size=(120, 30))
    parts = list(partial_sums(w, x, input_bits=4, input_signed=True, weight_bits=4, spec=spec))
    assert [p.tile for p in parts] == [0, 1, 2]
    for part in parts:
        assert part.values.shape == (2, 2, 6, 2, 30)  # signs, slices, M, planes, positions
        assert part.values.min() >= 0 and part.values.max() <= spec.full_scale


def test_operand_errors():
    spec = CIMSpec(rows=16)
    w = np.ones((2, 20), np.int64)
    kwargs = {"input_bits": 4, "input_signed": False, "weight_bits": 4, "spec": spec}
    with pytest.raises(InvalidArgumentError, match=r"^columns: DAC codes"):
        cim_accumulate(w, np.full((20, 3), 16), **kwargs)
    with pytest.raises(InvalidArgumentError, match=r"^columns: DAC codes"):
        cim_accumulate(w, np.full((20, 3), -1), **kwargs)
    with pytest.raises(InvalidArgumentError, match=r"^weights: "):
        cim_accumulate(w * 8, np.ones((20, 3)), **kwargs)
    with pytest.raises(InvalidArgumentError, match=r"^columns: expected integer"):
        cim_accumulate(w, np.full((20, 3), 0.5), **kwargs)
    with pytest.raises(InvalidArgumentError, match=r"\(\.\.\., K, P\)"):
        cim_accumulate(w, np.ones((19, 3)), **kwargs)
    with pytest.raises(InvalidArgumentError, match="input_bits"):
        cim_accumulate(w, np.ones((20, 3)), **{**kwargs, "input_bits": 0})
    with pytest.raises(InvalidArgumentError, match="weight_min"):
        cim_accumulate(w, np.ones((20, 3)), **kwargs, weight_min=1)
    with pytest.raises(InvalidTypeError, match="spec"):
        cim_accumulate(w, np.ones((20, 3)), **{**kwargs, "spec": "rows=16"})
    with pytest.raises(InvalidArgumentError, match=r"^adc: "):
        cal = AdcCalibration(ranges=np.full((2, 2, 4), 20.0), spec=spec.replace(adc_bits=4, adc_range="calibrated"),
                             weight_bits=4, input_bits=4)
        cim_accumulate(w, np.ones((20, 3)), **kwargs, adc=cal)


def test_speed_of_a_resnet_layer():
    """A ResNet-18 layer at 56x56 (64 -> 64 channels, 3x3: K = 576, P = 3136) well under a second."""
    rng = np.random.default_rng(11)
    spec = CIMSpec.parse("rows=256,cell_bits=2,dac_bits=1,adc_bits=6")
    w, x = gaussian_weights(rng, (1, 64, 576)), relu_inputs(rng, (1, 1, 576, 3136))
    cim_accumulate(w, x, input_bits=4, input_signed=False, weight_bits=4, spec=spec)  # warm up BLAS
    start = time.perf_counter()
    cim_accumulate(w, x, input_bits=4, input_signed=False, weight_bits=4, spec=spec)
    assert time.perf_counter() - start < 2.0  # ~0.2 s on one core; generous for a loaded machine


# -- (e) requantization --------------------------------------------------------------------------------------
def test_fixed_point_requant_within_one_step_of_float():
    rng = np.random.default_rng(12)
    m = np.exp(rng.uniform(np.log(1e-6), np.log(1e2), size=4000))
    mult, shift = fixed_point_multiplier(m)
    assert mult.dtype == np.int32 and shift.dtype == np.int32
    assert np.all(mult >= 2**30) and np.all(mult.astype(np.int64) < 2**31)
    assert np.all((shift >= 0) & (shift <= 31) | (m >= 1)) and np.all((shift < 0) == (m >= 1))
    assert np.all(shift >= -31)
    approx = mult.astype(np.float64) * 2.0 ** (-31.0 - shift)
    assert np.all(np.abs(approx / m - 1) <= 2.0**-31)
    for qmin, qmax, zp in ((0, 15, 0), (-128, 127, 0), (0, 255, 7), (-(2**31), 2**31 - 1, 0)):
        # accumulators that land inside the output range, and arbitrary int32 ones
        target = rng.uniform(qmin - zp - 2, qmax - zp + 2, size=m.size)
        acc = np.clip(np.rint(target / m), -(2**31), 2**31 - 1).astype(np.int64)
        acc = np.concatenate([acc, rng.integers(-(2**31), 2**31, size=m.size)])
        mm, mu, sh = np.concatenate([m, m]), np.concatenate([mult, mult]), np.concatenate([shift, shift])
        fixed = requantize_fixed(acc, mu, sh, zp, qmin, qmax)
        exact = np.clip(np.rint(acc * mm) + zp, qmin, qmax)
        assert np.all(np.abs(fixed - exact) <= 1)
        if qmax < 2**16:  # |acc * m| < 2^16 unclipped: the results differ only within 2^-15 of a rounding tie
            assert np.mean(fixed == exact) > 0.999
        np.testing.assert_array_equal(requantize(acc, mm, zp, qmin, qmax, mode="fixed_point"), fixed)
        np.testing.assert_array_equal(requantize(acc, mm, zp, qmin, qmax, mode="float"), exact)


def test_requant_rounding_per_channel_and_errors():
    # round half up: 0.5 -> 1, -0.5 -> 0, 1.5 -> 2, 2.5 -> 3 (float rounds half to even: 0, -0, 2, 2)
    mult, shift = fixed_point_multiplier(0.5)
    assert (int(mult), int(shift)) == (2**30, 0)
    np.testing.assert_array_equal(requantize_fixed(np.array([1, -1, 3, 5]), mult, shift, 0, -128, 127), [1, 0, 2, 3])
    np.testing.assert_array_equal(requantize(np.array([1, -1, 3, 5]), 0.5, 0, -128, 127), [0, 0, 2, 2])
    # per-channel multipliers along axis 1
    acc = np.arange(-30, 30).reshape(2, 3, 10) * 1000
    m = np.array([1e-3, 2e-2, 3.7])
    out = requantize(acc, m, 3, 0, 255, mode="fixed_point", channel_axis=1)
    expected = np.clip(np.rint(acc * m[None, :, None]) + 3, 0, 255)
    assert np.all(np.abs(out - expected) <= 1)
    # tiny multipliers: shift capped at 31
    mult, shift = fixed_point_multiplier(np.array([2.0**-33, 1e-12]))
    assert np.all(shift == 31) and np.all(mult < 2**30)
    for bad in (0.0, -1.0, np.nan, 2.0**31):
        with pytest.raises(InvalidArgumentError, match=r"^m: got"):
            fixed_point_multiplier(bad)
    with pytest.raises(InvalidArgumentError, match=r"^acc: "):
        requantize_fixed(np.array([2**31]), 2**30, 0, 0, 0, 255)
    with pytest.raises(InvalidArgumentError, match="mode"):
        requantize(np.array([1]), 0.5, 0, 0, 255, mode="double")


def test_power_of_two_requant():
    rng = np.random.default_rng(13)
    m = np.exp(rng.uniform(np.log(1e-6), np.log(1e2), size=2000))
    mult, shift = power_of_two_multiplier(m)
    assert np.all(mult == 2**30)
    k = -1 - shift.astype(np.int64)
    ratio = m / 2.0**k
    assert np.all((ratio >= 0.75) & (ratio < 1.5))  # the nearest power of two in value
    np.testing.assert_array_equal(power_of_two_multiplier(np.array([0.75, 0.7499, 1.5, 1.0]))[1], [-1, 0, -2, -1])
    acc = rng.integers(-(2**20), 2**20, size=m.size)
    out = requantize(acc, m, 0, -(2**31), 2**31 - 1, mode="power_of_two")
    assert np.all(np.abs(out - np.rint(acc * 2.0**k)) <= 1)


# -- (f) CIMSpec ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize("field,value,expected", [
    ("rows", 0, "1..65536"), ("cols", -3, "1..65536"), ("cell_bits", 9, "1..8"), ("cell_bits", 0, "1..8"),
    ("dac_bits", 9, "1..8"), ("adc_bits", 0, "1..16"), ("adc_bits", 17, "1..16"),
    ("weight_encoding", "twos", "'differential', 'offset'"), ("adc_range", "auto", "'calibrated', 'full'"),
    ("requant", "int", "'float', 'fixed_point', 'power_of_two'"),
])
def test_spec_invalid_values(field, value, expected):
    with pytest.raises(InvalidArgumentError) as info:
        CIMSpec(**{field: value})
    message = str(info.value)
    assert f"CIMSpec.{field}" in message and repr(value).strip("'") in message and expected in message


@pytest.mark.parametrize("field,value", [("rows", 256.0), ("rows", "256"), ("cell_bits", True), ("adc_bits", 6.0)])
def test_spec_invalid_types(field, value):
    with pytest.raises(InvalidTypeError, match=f"CIMSpec.{field}"):
        CIMSpec(**{field: value})


def test_spec_parse_and_round_trips():
    spec = CIMSpec.parse(" rows=256, cell_bits=2,adc_bits=6,dac_bits=1 ,weight_encoding=offset")
    assert spec == CIMSpec(rows=256, cell_bits=2, adc_bits=6, dac_bits=1, weight_encoding="offset")
    assert spec.full_scale == 768 and spec.adc_levels == 63 and spec.lossless_adc_bits == 10
    assert CIMSpec.parse(str(spec)) == spec
    assert CIMSpec.from_dict(json.loads(json.dumps(spec.to_dict()))) == spec
    assert CIMSpec.parse("") == CIMSpec() and CIMSpec.parse("adc_bits=none").adc_bits is None
    assert CIMSpec.parse("adc_bits=IDEAL").adc_bits is None
    with pytest.raises(AttributeError):
        spec.rows = 3  # frozen
    for text, match in [("rowz=256", "unknown field 'rowz'"), ("rows", "expected field=value"),
                        ("rows=1,rows=2", "given twice"), ("rows=2x", "rows must be an integer"),
                        ("adc_bits=six", "or 'none'"), ("cell_bits=9", "CIMSpec.cell_bits: got 9"),
                        ("weight_encoding=twos", "CIMSpec.weight_encoding")]:
        with pytest.raises(InvalidArgumentError, match=match):
            CIMSpec.parse(text)
    with pytest.raises(InvalidTypeError):
        CIMSpec.parse(256)
    with pytest.raises(InvalidArgumentError, match=r"^CIMSpec\.from_dict: unknown field\(s\) 'banks'"):
        CIMSpec.from_dict({"rows": 4, "banks": 2})


# -- (g) layout ----------------------------------------------------------------------------------------------
LAYOUT_CASES = [
    ((20, 3, 3, 3), "Conv", 1, {}),
    ((12, 2, 3, 3), "Conv", 3, {}),         # grouped
    ((8, 1, 3, 3), "Conv", 8, {}),          # depthwise
    ((9, 4, 5), "Conv", 1, {}),             # 1-D
    ((6, 5, 3, 3), "ConvTranspose", 2, {}),  # Cin 6, 5 outputs per group
    ((40, 7), "Gemm", 1, {}),               # (K, N)
    ((7, 40), "Gemm", 1, {"trans_b": True}),
    ((40, 7), "MatMul", 1, {}),
    ((2, 40, 7), "MatMul", 1, {}),
]


@pytest.mark.parametrize("encoding", ["differential", "offset"])
@pytest.mark.parametrize("shape,op_type,group,kw", LAYOUT_CASES)
def test_layout_places_every_weight_once(shape, op_type, group, kw, encoding):
    rng = np.random.default_rng(14)
    spec = CIMSpec(rows=16, cols=22, cell_bits=2, weight_encoding=encoding)  # 22 % 4 != 0 for differential
    layout = tile_layout(shape, op_type, group, 4, spec, **kw)
    fmt = layout.format
    assert layout.source_index.shape == (layout.groups, layout.out_channels, layout.depth)
    assert np.array_equal(np.sort(layout.source_index.ravel()), np.arange(math.prod(shape)))
    assert layout.row_tiles == math.ceil(layout.depth / 16)
    assert layout.channels_per_array == 22 // fmt.columns_per_weight
    assert layout.col_tiles == math.ceil(layout.out_channels / layout.channels_per_array)
    arrays = layout.arrays
    assert len(arrays) == layout.num_arrays == layout.groups * layout.row_tiles * layout.col_tiles
    weight = rng.integers(-8, 8, size=shape)
    slices = slice_weights(weight, 4, spec)
    assert slices.dtype == np.uint8 and slices.shape == (fmt.signs, fmt.slices, *shape)
    np.testing.assert_array_equal(combine_slices(slices, 4, spec), weight)
    # rebuild the matrices from the programmed arrays: every (g, m, k, slice, sign) cell exactly once
    seen = np.zeros((layout.groups, layout.out_channels, layout.depth, fmt.slices, fmt.signs), dtype=np.int64)
    rebuilt = np.zeros((fmt.signs, fmt.slices, layout.groups, layout.out_channels, layout.depth), dtype=np.int64)
    for tile in arrays:
        cells = layout.crossbar(slices, tile)
        assert cells.shape[0] <= spec.rows and cells.shape[1] <= spec.cols
        for r, k in enumerate(tile.rows):
            assert layout.row_of(int(k)) == (tile.row_tile, r)
            for j, (m, s, sign) in enumerate(zip(tile.column_channel, tile.column_slice, tile.column_sign,
                                                 strict=True)):
                assert layout.column_of(int(m), int(s), int(sign)) == (tile.col_tile, j)
                seen[tile.group, m, k, s, sign] += 1
                rebuilt[sign, s, tile.group, m, k] = cells[r, j]
    assert np.all(seen == 1)
    np.testing.assert_array_equal(combine_slices(rebuilt, 4, spec), mac_matrix(weight, op_type, group, **kw))


def test_layout_matrix_view_and_counts():
    # ConvTranspose: entry (g, m, (c*kh + i)*kw + j) is weight[g*Cin/G + c, m, kh-1-i, kw-1-j]
    weight = np.arange(6 * 5 * 3 * 2).reshape(6, 5, 3, 2)
    mat = mac_matrix(weight, "ConvTranspose", 2)
    for g in range(2):
        for m in range(5):
            for c in range(3):
                for i in range(3):
                    for j in range(2):
                        assert mat[g, m, (c * 3 + i) * 2 + j] == weight[g * 3 + c, m, 2 - i, 1 - j]
    # ResNet layer: 64 x 576 on 256 x 256 arrays
    spec = CIMSpec(rows=256, cols=256, cell_bits=2)
    layout = tile_layout((64, 64, 3, 3), "Conv", 1, 4, spec)
    assert (layout.row_tiles, layout.col_tiles, layout.num_arrays, layout.columns_per_weight) == (3, 1, 3, 4)
    assert layout.col_tiles == math.ceil(64 * 4 / 256)
    assert "3 arrays of 256 x 256" in str(layout)
    assert tile_layout((64, 64, 3, 3), "Conv", 1, 4, spec, weight_min=-7).columns_per_weight == 4
    assert tile_layout((64, 64, 3, 3), "Conv", 1, 4, spec.replace(cell_bits=1), weight_min=-7).columns_per_weight == 6
    assert tile_layout((64, 64, 3, 3), "Conv", 1, 4, spec.replace(cell_bits=1)).columns_per_weight == 8
    assert tile_layout((64, 64, 3, 3), "Conv", 1, 4, spec.replace(weight_encoding="offset")).columns_per_weight == 2
    with pytest.raises(InvalidArgumentError, match="cols"):
        tile_layout((4, 4), "Gemm", 1, 8, spec.replace(cols=7, cell_bits=1))
    with pytest.raises(InvalidArgumentError, match="op_type"):
        tile_layout((4, 4), "Add", 1, 8, spec)
    with pytest.raises(InvalidArgumentError, match="group"):
        tile_layout((6, 4, 3, 3), "Conv", 4, 8, spec)
    with pytest.raises(InvalidArgumentError, match="w_int"):
        slice_weights(np.array([8]), 4, spec)


# -- packaging -----------------------------------------------------------------------------------------------
def test_package_imports_numpy_only():
    """The package needs neither torch nor PPQ nor onnx (its parent package is stubbed here: it imports PPQ)."""
    code = (
        "import sys, types, maptools\n"
        "pkg = types.ModuleType('maptools.quantization')\n"
        f"pkg.__path__ = [{str(REPO / 'maptools' / 'quantization')!r}]\n"
        "sys.modules['maptools.quantization'] = pkg\n"
        "import maptools.quantization.cim\n"
        "heavy = sorted(m for m in ('torch', 'ppq', 'onnx', 'onnxruntime') if m in sys.modules)\n"
        "assert not heavy, heavy\n"
    )
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")]))
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, env=env)
    assert proc.returncode == 0, proc.stderr


def test_one_integer_check_for_weights_columns_and_accumulators():
    """Weights, crossbar columns and accumulators are checked by one rule (intmath.holds_integers): integer
    dtypes and whole floats pass; fractions, NaN, infinities and booleans are refused, naming the argument."""
    from maptools.quantization.intmath import holds_integers

    assert [holds_integers(np.array(v)) for v in ([1, -2], [1.0, -2.0], [0.5], [np.nan], [np.inf], [True])] == [
        True, True, False, False, False, False]
    spec = CIMSpec(rows=8, cell_bits=2)
    for bad in (np.array([[0.5]]), np.array([[np.nan]]), np.array([[True]])):
        with pytest.raises(InvalidArgumentError, match="^weights"):
            cim_accumulate(bad, np.ones((1, 1)), input_bits=4, input_signed=False, weight_bits=4, spec=spec)
        with pytest.raises(InvalidArgumentError, match="^columns"):
            cim_accumulate(np.ones((1, 1)), bad, input_bits=4, input_signed=False, weight_bits=4, spec=spec)
        with pytest.raises(InvalidArgumentError, match="^acc"):
            requantize_fixed(bad, 1 << 30, 0, 0, -128, 127)
    assert cim_accumulate(np.full((1, 2), 3.0), np.array([[2.0], [1.0]]), input_bits=4, input_signed=False,
                          weight_bits=4, spec=spec).tolist() == [[9]]
