"""Collecting the partial-sum histograms of every crossbar MAC of a map, and the ranges chosen from them."""

from __future__ import annotations

import logging
import os
from collections.abc import Iterable, Iterator, Mapping
from typing import Any

import numpy as np

from maptools.errors import InvalidArgumentError, InvalidTypeError
from maptools.quantization.cim.analog import AnalogMac, SeedLike, check_device, child_seed
from maptools.quantization.cim.calibrate import CALIBRATION_METHODS, AdcHistogram
from maptools.quantization.cim.device import DeviceModel
from maptools.quantization.cim.mapcalibration import MapCalibration
from maptools.quantization.cim.spec import CIMSpec
from maptools.quantization.reference.crossbar import MacOperands
from maptools.quantization.reference.executor import ReferenceExecutor

__all__ = ["MapHistograms", "MapSource", "calibrate_map", "collect_histograms"]

logger = logging.getLogger("maptools.quantization.cimmap.mapcal")

#: A map given by name, or an executor built from artifacts in memory.
MapSource = str | ReferenceExecutor


class MapHistograms:
    """The partial-sum histograms of every crossbar MAC of a map, from which ranges for any ADC width follow.

    The partial sums depend on ``rows``, ``cell_bits``, ``dac_bits`` and ``weight_encoding``, not on
    ``adc_bits``: one pass over the calibration data (:func:`collect_histograms`) serves every ADC width.

    Attributes:
        spec: The crossbar the partial sums were collected for.
        histograms: Node name -> its :class:`~maptools.quantization.cim.calibrate.AdcHistogram`.
        batches: Calibration batches run.
        fingerprint: The executor's fingerprint.
    """

    def __init__(self, spec: CIMSpec, histograms: dict[str, AdcHistogram], batches: int, fingerprint: str) -> None:
        self.spec = spec
        self.histograms = histograms
        self.batches = batches
        self.fingerprint = fingerprint

    def calibration(self, adc_bits: int | None = None, *, method: str = "mse",
                    percentile: float = 99.99) -> MapCalibration:
        """The ranges of every MAC for an ADC of ``adc_bits`` (None: the spec's).

        Raises:
            InvalidArgumentError: No ADC width, an unknown method or a bad percentile.
        """
        spec = self.spec if adc_bits is None else self.spec.replace(adc_bits=adc_bits)
        if spec.adc_bits is None:
            raise InvalidArgumentError("spec.adc_bits: None (an ideal ADC has no range to calibrate)")
        adc = {node: hist.calibration(spec.adc_bits, method=method, percentile=percentile)
               for node, hist in self.histograms.items()}
        return MapCalibration(spec=spec.replace(adc_range="calibrated"), adc=adc, method=method,
                              batches=self.batches, fingerprint=self.fingerprint)


def _executor(source: MapSource, mapsave_dir: str | os.PathLike | None) -> ReferenceExecutor:
    if isinstance(source, ReferenceExecutor):
        return source
    if isinstance(source, str):
        return ReferenceExecutor.load(source, mapsave_dir)
    raise InvalidTypeError(f"map: got {type(source).__name__}, expected a map name or a ReferenceExecutor")


def _batches(calibset: Any) -> Iterator[Any]:
    """The batches of a calibration set: a batch (dict or array) or an iterable of them."""
    if isinstance(calibset, (Mapping, np.ndarray)) or hasattr(calibset, "detach"):
        yield calibset
        return
    if isinstance(calibset, (str, bytes)) or not isinstance(calibset, Iterable):
        raise InvalidTypeError(f"calibset: got {type(calibset).__name__}, expected a batch (dict input name -> "
                               "array, or an array) or an iterable of batches")
    yield from calibset


def collect_histograms(source: MapSource, calibset: Any, spec: CIMSpec, *,
                       mapsave_dir: str | os.PathLike | None = None, device: DeviceModel | None = None,
                       seed: SeedLike = 0) -> MapHistograms:
    """Run the exact integer executor on ``calibset`` and histogram every crossbar MAC's partial sums.

    With ``device`` the partial sums are those of one simulated chip (``seed``, crossbar MAC ``i`` seeded
    ``child_seed(seed, i)`` as in :func:`~maptools.quantization.simulate`): its programmed, noisy cells read
    the exact executor's activations, and the histograms count the sums its ADCs would see.

    Args:
        source: A map name, or a :class:`~maptools.quantization.reference.executor.ReferenceExecutor` (e.g.
            built from in-memory artifacts ``ReferenceExecutor(model, quantinfo, quantparams)``).
        calibset: A batch (dict input name -> array, or an array for a single-input map) or an iterable
            of batches (numpy arrays or torch tensors).
        spec: The crossbar (its ``adc_bits``, ``adc_range`` and ``requant`` are not used).
        mapsave_dir: The mapsave directory of a map name.
        device: The analog cells (:class:`~maptools.quantization.cim.device.DeviceModel`); None (or an ideal
            model) for the exact partial sums.
        seed: The simulated chip's seed (with ``device``).

    Returns:
        The histograms, one per crossbar MAC.

    Raises:
        InvalidArgumentError: No batch, a map without crossbar MACs, inputs the map does not take, or a device
            whose per-level parameters do not fit the cells.
        InvalidTypeError: ``spec`` is not a CIMSpec, ``calibset`` is not batches, or a bad ``device`` or ``seed``.
    """
    if not isinstance(spec, CIMSpec):
        raise InvalidTypeError(f"spec: got {type(spec).__name__}, expected a CIMSpec")
    chip = check_device(device, seed, spec)
    executor = _executor(source, mapsave_dir)
    histograms: dict[str, AdcHistogram] = {}
    macs = {node.name: index for index, node in enumerate(executor.crossbar_nodes)}

    def hook(operands: MacOperands, weights: np.ndarray, columns: np.ndarray) -> None:
        histogram = histograms.get(operands.node)
        if histogram is None:
            analog = None if chip is None else AnalogMac(chip, spec, child_seed(seed, macs[operands.node]))
            histogram = histograms[operands.node] = AdcHistogram(weights, spec=spec, analog=analog,
                                                                 **operands.kwargs())
        histogram.add(columns)

    hooked = executor.with_cim(None, mac_hook=hook)
    if not hooked.crossbar_nodes:
        raise InvalidArgumentError("map: has no MAC with a constant, quantized weight (nothing runs on crossbars)")
    batches = 0
    for batch in _batches(calibset):
        hooked.run(batch)
        batches += 1
    if batches == 0:
        raise InvalidArgumentError("calibset: holds no batch; expected at least one batch of the map's inputs")
    logger.info("collected the partial sums of %d crossbar MACs on %d batches (%s)", len(histograms), batches,
                spec)
    return MapHistograms(spec, histograms, batches, executor.fingerprint)


def calibrate_map(source: MapSource, calibset: Any, spec: CIMSpec, *, mapsave_dir: str | os.PathLike | None = None,
                  method: str = "mse", percentile: float = 99.99, device: DeviceModel | None = None,
                  seed: SeedLike = 0) -> MapCalibration:
    """Calibrate the ADC ranges of every crossbar MAC of a map on calibration data.

    Runs the exact integer executor on ``calibset``; the partial sums of each MAC's columns (before any
    ADC) are histogrammed per (row tile, weight slice, input plane) and each range chosen as
    :func:`~maptools.quantization.cim.calibrate.calibrate_adc` does.

    Args:
        source: A map name, or a :class:`~maptools.quantization.reference.executor.ReferenceExecutor` built from
            in-memory artifacts.
        calibset: A batch or an iterable of batches (see :func:`collect_histograms`).
        spec: The crossbar; ``adc_bits`` must be set (``adc_range`` is stored as ``'calibrated'``).
        mapsave_dir: The mapsave directory of a map name.
        method: ``'mse'`` or ``'percentile'``.
        percentile: The percentile of ``method='percentile'``, in ``(0, 100]``.
        device: Noise-aware calibration: the ranges are chosen for the partial sums of a chip of this device
            (:func:`collect_histograms`); None for the exact sums.
        seed: The seed of that chip.

    Returns:
        The per-node calibrations with the spec, ready for ``simulate(..., cim=calibration.spec,
        adc=calibration)``, :meth:`MapCalibration.save` or :func:`write_map_calibration`.

    Raises:
        MapNotFoundError: no such map.
        InvalidArgumentError: An ideal ADC, an unknown method, a bad percentile, no batch, or inputs the map
            does not take.
    """
    if not isinstance(spec, CIMSpec):
        raise InvalidTypeError(f"spec: got {type(spec).__name__}, expected a CIMSpec")
    if spec.adc_bits is None:
        raise InvalidArgumentError("spec.adc_bits: None (an ideal ADC has no range to calibrate)")
    if method not in CALIBRATION_METHODS:
        raise InvalidArgumentError(f"method: got {method!r}, expected one of {', '.join(CALIBRATION_METHODS)}")
    if not 0 < percentile <= 100:
        raise InvalidArgumentError(f"percentile: got {percentile!r}, expected a number in (0, 100]")
    return collect_histograms(source, calibset, spec, mapsave_dir=mapsave_dir, device=device, seed=seed).calibration(
        method=method, percentile=percentile)
