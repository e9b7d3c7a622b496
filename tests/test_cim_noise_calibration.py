"""Noise-aware ADC calibration: histograms of the partial sums a simulated chip's ADCs see."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pytest

from maptools.errors import InvalidArgumentError, InvalidTypeError
from maptools.examples import digits
from maptools.quantization.cim import AdcHistogram, AnalogMac, CIMSpec, DeviceModel
from maptools.quantization.cimmap import calibrate_map
from maptools.quantization.cimmap.mapcal import collect_histograms

SPEC = CIMSpec(rows=256, cols=256, cell_bits=2, adc_bits=6, adc_range="calibrated")
MAP = "digits_w4a4"


def test_histogram_of_noisy_sums_has_the_programming_error_spread() -> None:
    """Weights 1, inputs 15 (1-bit planes all 1): the + column of slice 0 sums 64 level-1 cells, each
    ``N(1, s)``: a chip's sums ``N(64, 8 s)``, counted rounded (plus 1/12 of variance)."""
    m, k, s = 3000, 64, 0.05
    weights, columns = np.ones((m, k), np.int64), np.full((k, 1), 15, np.int64)
    kwargs = {"input_bits": 4, "input_signed": False, "weight_bits": 4, "spec": SPEC}
    exact = AdcHistogram(weights, **kwargs)
    noisy = AdcHistogram(weights, analog=AnalogMac(DeviceModel(prog_sigma_rel=s), SPEC, seed=3), **kwargs)
    for histogram in (exact, noisy):
        histogram.add(columns)
    assert exact.seen == noisy.seen and exact.counts.sum() == noisy.counts.sum()
    values = np.arange(noisy.bins)
    ones = noisy.counts[0, 0, 0]  # tile 0, slice 0, plane 0: the + columns (64) and the - columns (0)
    assert exact.counts[0, 0, 0, 64] == m and exact.counts[0, 0, 0, 0] == m
    assert ones[0] == m  # off cells are exact
    near = ones * (values >= 32)
    mean = float((near * values).sum() / near.sum())
    std = math.sqrt(float((near * (values - mean) ** 2).sum() / near.sum()))
    predicted = math.sqrt((8 * s) ** 2 + 1 / 12)
    assert near.sum() == m and abs(mean - 64) < 0.05 and abs(std / predicted - 1) < 0.1, (mean, std, predicted)
    # a percentile-100 range covers the noisy sums' maximum, above the exact 64
    assert noisy.calibration(method="percentile", percentile=100).ranges[0, 0, 0] > 64
    assert exact.calibration(method="percentile", percentile=100).ranges[0, 0, 0] == 64


@pytest.fixture(scope="module")
def mapsave(digits_w4a4_mapsave: Path) -> Path:
    """The session's digits W4A4 map (``conftest.digits_w4a4_mapsave``)."""
    return digits_w4a4_mapsave


def test_calibrate_map_on_a_noisy_chip(mapsave: Path) -> None:
    calib = [digits.load_split("train")[0][:64]]
    exact = calibrate_map(MAP, calib, SPEC, mapsave_dir=mapsave)
    assert calibrate_map(MAP, calib, SPEC, mapsave_dir=mapsave, device=DeviceModel(), seed=4) == exact
    device = DeviceModel(prog_sigma_rel=0.1, read_sigma_rel=0.05)
    noisy = [calibrate_map(MAP, calib, SPEC, mapsave_dir=mapsave, device=device, seed=s) for s in (4, 4, 5)]
    assert noisy[0] == noisy[1] and noisy[0] != noisy[2] and noisy[0] != exact
    assert noisy[0].adc.keys() == exact.adc.keys() and noisy[0].spec == exact.spec
    # the same partial sums are counted, only their values move
    plain = collect_histograms(MAP, calib, SPEC, mapsave_dir=mapsave)
    moved = collect_histograms(MAP, calib, SPEC, mapsave_dir=mapsave, device=device, seed=4)
    for node, histogram in plain.histograms.items():
        assert np.array_equal(histogram.counts.sum(-1), moved.histograms[node].counts.sum(-1))
    with pytest.raises(InvalidTypeError, match="device"):
        calibrate_map(MAP, calib, SPEC, mapsave_dir=mapsave, device="pcm")
    with pytest.raises(InvalidArgumentError, match="prog_sigma_abs"):
        calibrate_map(MAP, calib, SPEC, mapsave_dir=mapsave, device=DeviceModel(prog_sigma_abs=(0.1, 0.2)))
    with pytest.raises(InvalidArgumentError, match="seed"):
        calibrate_map(MAP, calib, SPEC, mapsave_dir=mapsave, device=device, seed=-1)
