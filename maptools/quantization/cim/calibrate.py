"""Calibration of the ADC ranges of one MAC from data: :func:`calibrate_adc`.

The MAC is run on calibration inputs (the im2col columns the executor builds for it) and every column
partial sum is collected, before the ADC, into one histogram per (row tile, weight slice, input plane) --
the granularity at which the ranges are set (:class:`~maptools.quantization.cim.adc.AdcCalibration`).
Partial sums are integers in ``0 .. full_scale``; the histograms have one bin per integer while
``full_scale < 2^16`` and bins of ``ceil((full_scale + 1) / 2^16)`` integers above (each bin then stands for
its centre).

Each range ``r`` is then chosen on its histogram ``n(p)``, over ``L <= r <= max(L, p_max)`` (``L = 2^A - 1``;
a smaller range can only clip more, see :mod:`~maptools.quantization.cim.adc`; ``p_max`` is the largest
partial sum seen):

* ``method='mse'``: the ``r`` minimizing ``sum_p n(p) * (adc(p; r) - p)^2`` -- rounding error inside the
  range and clipping error above it, measured with the ADC's exact reconstruction
  (:func:`~maptools.quantization.cim.adc.adc_convert`) -- among 256 evenly spaced candidates and ``p_max``;
  ties go to the largest range (the most headroom for unseen data). When ``p_max <= L`` that is
  ``r = L``: step 1, every partial sum exact.
* ``method='percentile'``: ``r`` = the ``percentile``-th percentile of the partial sums (at least ``L``).

.. code-block:: python

    cal = calibrate_adc(weights, [columns_1, columns_2], input_bits=4, input_signed=False,
                        weight_bits=4, spec=spec)          # spec.adc_range == 'calibrated'
    acc = cim_accumulate(weights, columns, input_bits=4, input_signed=False, weight_bits=4,
                         spec=spec, adc=cal)
    cal.save('conv1_adc.npz')
"""

from __future__ import annotations

import logging
import math
from collections.abc import Iterable

import numpy as np

from maptools.errors import InvalidArgumentError
from maptools.quantization.cim.adc import AdcCalibration, adc_convert
from maptools.quantization.cim.analog import AnalogMac
from maptools.quantization.cim.arithmetic import adc_grid, partial_sums
from maptools.quantization.cim.spec import CIMSpec
from maptools.quantization.intmath import round_half_even

__all__ = ["CALIBRATION_METHODS", "AdcHistogram", "calibrate_adc", "choose_range"]

logger = logging.getLogger(__name__)

#: Methods of :func:`calibrate_adc`.
CALIBRATION_METHODS: tuple[str, ...] = ("mse", "percentile")
#: Most histogram bins per (row tile, slice, plane).
MAX_BINS = 1 << 16
#: Candidate ranges evaluated by the MSE search (plus the largest partial sum seen).
MSE_CANDIDATES = 256


def choose_range(values: np.ndarray, counts: np.ndarray, levels: int, *, method: str = "mse",
                 percentile: float = 99.99, upper: float | None = None) -> tuple[float, float, float]:
    """The ADC range of one histogram of partial sums.

    Args:
        values: The partial-sum values (bin centres), ascending.
        counts: How often each occurs.
        levels: ``L = 2^A - 1``.
        method: ``'mse'`` or ``'percentile'`` (see the module docstring).
        percentile: The percentile of ``'percentile'``, in ``(0, 100]``.
        upper: The largest range allowed (the full scale); None for no limit.

    Returns:
        ``(range, mse, clipped fraction)`` of the chosen range on this histogram.
    """
    values = np.asarray(values, dtype=np.float64)
    counts = np.asarray(counts, dtype=np.float64)
    keep = counts > 0
    values, counts = values[keep], counts[keep]
    total = counts.sum()
    high = float(values.max()) if values.size else 0.0
    if upper is not None:
        high = min(high, float(upper))
    high = max(high, float(levels))
    if total == 0:
        return float(levels), 0.0, 0.0
    if method == "percentile":
        cumulative = np.cumsum(counts)
        index = int(np.searchsorted(cumulative, percentile / 100.0 * total, side="left"))
        r = min(max(float(values[min(index, values.size - 1)]), float(levels)), high)
        candidates = np.array([r])
    else:
        candidates = np.unique(np.append(np.linspace(float(levels), high, MSE_CANDIDATES), high))
    errors = np.empty(candidates.size)
    chunk = max(1, (1 << 22) // max(1, values.size))
    for start in range(0, candidates.size, chunk):
        cand = candidates[start:start + chunk, None]
        errors[start:start + chunk] = ((adc_convert(values[None, :], cand, levels) - values) ** 2 * counts).sum(1)
    best = errors.min()
    chosen = int(np.flatnonzero(errors <= best * (1 + 1e-12) + 1e-12)[-1])  # ties: the largest range
    r = float(candidates[chosen])
    step = r / levels
    clipped = float(counts[round_half_even(values / step) > levels].sum() / total)
    return r, float(errors[chosen] / total), clipped


class AdcHistogram:
    """The histograms of one MAC's column partial sums, filled batch by batch; the ranges come at the end.

    :func:`calibrate_adc` is one :meth:`add` per batch and one :meth:`calibration`. Filled on its own, a
    histogram lets a caller feed columns as they appear (the executor's hook at the accumulate step, see
    :func:`~maptools.quantization.cimmap.mapcal.calibrate_map`) and choose ranges for several ADC widths from
    one pass: the partial sums, and so the histograms, do not depend on ``adc_bits``.

    Args:
        weights: Integer weights ``(..., M, K)``, as for
            :func:`~maptools.quantization.cim.arithmetic.cim_accumulate`.
        input_bits: Input bit width.
        input_signed: Whether the input integers are signed.
        weight_bits: Weight bit width.
        spec: The crossbar (``adc_bits`` and ``adc_range`` are not used: any value, None included).
        input_zero_point: The input zero point.
        weight_min: The smallest weight integer; None for ``-2^(b-1)``.
        analog: The MAC's cells on a simulated chip: the noisy partial sums it reads are counted (rounded to
            the nearest integer and clipped to ``0 .. full_scale``), None for the exact sums.

    Raises:
        InvalidArgumentError: Invalid bit widths or weights (as
            :func:`~maptools.quantization.cim.arithmetic.cim_accumulate`).
    """

    def __init__(self, weights: np.ndarray, *, input_bits: int, input_signed: bool, weight_bits: int,
                 spec: CIMSpec, input_zero_point: int = 0, weight_min: int | None = None,
                 analog: AnalogMac | None = None) -> None:
        self.weights = np.asarray(weights)
        self.analog = analog
        self.operands = {"input_bits": input_bits, "input_signed": input_signed, "weight_bits": weight_bits,
                         "spec": spec, "input_zero_point": input_zero_point, "weight_min": weight_min}
        self.spec = spec
        self.weight_bits = int(weight_bits)
        self.input_bits = int(input_bits)
        #: ``(T, S, P)``: row tiles, weight slices, input planes.
        self.grid = adc_grid(self.weights.shape[-1], input_bits, weight_bits, spec, weight_min=weight_min)
        n_tiles, n_slices, n_planes = self.grid
        #: Integers per histogram bin (1 while ``full_scale < 2^16``).
        self.width = max(1, math.ceil((spec.full_scale + 1) / MAX_BINS))
        self.bins = spec.full_scale // self.width + 1
        self._hist = np.zeros((n_tiles, n_slices * n_planes * self.bins), dtype=np.int64)
        self._set_index = (np.arange(n_slices)[:, None, None, None] * n_planes
                           + np.arange(n_planes)[None, None, :, None]) * self.bins  # broadcasts on the psums
        #: Partial sums counted so far.
        self.seen = 0

    def add(self, columns: np.ndarray) -> None:
        """Count the partial sums of one batch of centred input columns ``(..., K, P)``."""
        for part in partial_sums(self.weights, columns, analog=self.analog, **self.operands):
            values = part.values
            if self.analog is not None:  # real-valued, may leave 0 .. full_scale
                values = np.clip(round_half_even(values), 0, self.spec.full_scale)
            index = self._set_index + (values.astype(np.int64) // self.width)
            self._hist[part.tile] += np.bincount(index.ravel(), minlength=self._hist.shape[1])
            self.seen += part.values.size

    @property
    def counts(self) -> np.ndarray:
        """The histograms, ``(T, S, P, bins)`` int64 (bin ``i`` counts ``i * width .. (i + 1) * width - 1``)."""
        return self._hist.reshape(*self.grid, self.bins)

    def calibration(self, adc_bits: int | None = None, *, method: str = "mse",
                    percentile: float = 99.99) -> AdcCalibration:
        """Choose the ranges from the partial sums counted so far.

        Args:
            adc_bits: The ADC width to choose ranges for; None for the spec's ``adc_bits``.
            method: ``'mse'`` or ``'percentile'`` (see the module docstring).
            percentile: The percentile of ``method='percentile'``, in ``(0, 100]``.

        Returns:
            The ranges, for the histogram's spec with ``adc_bits`` set.

        Raises:
            InvalidArgumentError: No ADC width (``adc_bits`` and the spec's both None), an unknown method, a
                percentile outside ``(0, 100]``, or no partial sums counted.
        """
        spec = self.spec if adc_bits is None else self.spec.replace(adc_bits=adc_bits)
        if spec.adc_bits is None:
            raise InvalidArgumentError("spec.adc_bits: None (an ideal ADC has no range to calibrate)")
        _check_method(method, percentile)
        if self.seen == 0:
            raise InvalidArgumentError("column_batches: no partial sums (no batches, or batches without columns)")
        grid, levels = self.grid, spec.adc_levels
        hist = self.counts
        centres = np.arange(self.bins) * self.width + (self.width - 1) / 2.0
        ranges, mse, clipped = np.empty(grid), np.empty(grid), np.empty(grid)
        max_seen = np.zeros(grid)
        for index in np.ndindex(*grid):
            counts = hist[index]
            nonzero = np.flatnonzero(counts)
            if nonzero.size:
                max_seen[index] = centres[nonzero[-1]]
            ranges[index], mse[index], clipped[index] = choose_range(
                centres[nonzero], counts[nonzero], levels, method=method, percentile=percentile,
                upper=max(spec.full_scale, levels))
        logger.debug("calibrate_adc: %s ranges by %s, %.3g %% of partial sums clipped", grid, method,
                     100 * float((clipped * hist.sum(-1)).sum() / max(1, hist.sum())))
        return AdcCalibration(ranges=ranges, spec=spec, weight_bits=self.weight_bits, input_bits=self.input_bits,
                              method=method, samples=hist.sum(-1), clipped=clipped, mse=mse, max_seen=max_seen)


def _check_method(method: str, percentile: float) -> None:
    if method not in CALIBRATION_METHODS:
        raise InvalidArgumentError(f"method: got {method!r}, expected one of {', '.join(CALIBRATION_METHODS)}")
    if not 0 < percentile <= 100:
        raise InvalidArgumentError(f"percentile: got {percentile!r}, expected a number in (0, 100]")


def calibrate_adc(weights: np.ndarray, column_batches: np.ndarray | Iterable[np.ndarray], *, input_bits: int,
                  input_signed: bool, weight_bits: int, spec: CIMSpec, input_zero_point: int = 0,
                  weight_min: int | None = None, method: str = "mse", percentile: float = 99.99) -> AdcCalibration:
    """Choose the ADC range of every (row tile, weight slice, input plane) of one MAC from data.

    Args:
        weights: Integer weights ``(..., M, K)``, as for
            :func:`~maptools.quantization.cim.arithmetic.cim_accumulate`.
        column_batches: The MAC's centred input columns ``(..., K, P)`` on calibration data: one array or
            an iterable of arrays (batches), read once.
        input_bits: Input bit width.
        input_signed: Whether the input integers are signed.
        weight_bits: Weight bit width.
        spec: The crossbar; ``adc_bits`` must be set.
        input_zero_point: The input zero point.
        weight_min: The smallest weight integer; None for ``-2^(b-1)``.
        method: ``'mse'`` or ``'percentile'``.
        percentile: The percentile of ``method='percentile'``, in ``(0, 100]``.

    Returns:
        The ranges and, per entry, the partial sums seen, the clipped fraction and the ADC's MSE on them.

    Raises:
        InvalidArgumentError: An ideal ADC, an unknown method, a percentile outside ``(0, 100]``, no columns,
            or invalid operands (as :func:`~maptools.quantization.cim.arithmetic.cim_accumulate`).
    """
    if spec.adc_bits is None:
        raise InvalidArgumentError("spec.adc_bits: None (an ideal ADC has no range to calibrate)")
    _check_method(method, percentile)
    batches = [column_batches] if isinstance(column_batches, np.ndarray) else column_batches
    histogram = AdcHistogram(weights, input_bits=input_bits, input_signed=input_signed, weight_bits=weight_bits,
                             spec=spec, input_zero_point=input_zero_point, weight_min=weight_min)
    for columns in batches:
        histogram.add(columns)
    return histogram.calibration(method=method, percentile=percentile)
