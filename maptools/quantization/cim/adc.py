"""The column ADC: how one partial sum is digitized, and the ranges an ADC is given.

An ``A``-bit ADC with range ``[0, r]`` has ``L = 2^A - 1`` steps of ``step = r / L``. A column partial sum
``p`` (a non-negative integer, see :mod:`~maptools.quantization.cim.arithmetic`) becomes the code

``code = clip(round(p / step), 0, L)``    (:func:`adc_codes`)

with ``round`` half to even, computed in float64 as written (``step = r / L`` first, then ``p / step``), so
that any implementation doing the same two divisions gets the same codes. The digital side holds the ADC's
step as a fixed-point gain with :data:`ADC_FRACTION_BITS` (16) fractional bits,

``g = round(step * 2^16)``    (an integer; :func:`adc_gain`)

and reconstructs ``code * g * 2^-16``, the centre of the code's bin (:func:`adc_convert`). The shift-and-add
sums the integers ``code * g`` exactly and rounds once, at the end (see
:mod:`~maptools.quantization.cim.arithmetic`). Reconstructing each partial sum as a rounded integer instead
would bias the accumulator whenever ``step`` is not an integer (at ``step = 1.5``, every third integer reads
one too high), and that bias adds up coherently over slices, planes and tiles.

Properties:

* an ideal ADC (``adc_bits=None``) passes ``p`` unchanged;
* ``step = 1`` (``r = L``) gives ``code = p`` and ``g = 2^16``: exact up to ``p = L``. A range below ``L``
  cannot help (the partial sums are integers), so calibrated ranges are at least ``L`` and the ``'full'``
  range is ``max(full_scale, L)`` (:func:`full_scale_ranges`): an ADC of
  :attr:`CIMSpec.lossless_adc_bits <maptools.quantization.cim.spec.CIMSpec.lossless_adc_bits>` bits or more
  is exact;
* otherwise an unclipped ``p`` is off by at most ``step / 2`` (plus ``L * 2^-17`` from the gain's rounding),
  and a clipped one reads as ``L * g * 2^-16 ~ r``.

Ranges are held per (row tile, weight slice, input plane) in an array of shape ``(T, S, P)``: the
``'full'`` range is the same everywhere; calibrated ranges come in an :class:`AdcCalibration`
(:func:`~maptools.quantization.cim.calibrate.calibrate_adc`), which is stored as JSON or ``.npz`` without
pickle.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from maptools.errors import ArtifactError, InvalidArgumentError, InvalidTypeError
from maptools.quantization.cim.spec import CIMSpec
from maptools.quantization.intmath import round_half_even

__all__ = ["ADC_FRACTION_BITS", "AdcCalibration", "adc_codes", "adc_convert", "adc_gain", "full_scale_ranges"]

#: Fractional bits of the fixed-point ADC gain and of the shift-and-add before its final rounding.
ADC_FRACTION_BITS = 16

# the spec fields an ADC calibration depends on (cols, adc_range and requant do not change any partial sum)
_SPEC_KEYS = ("rows", "cell_bits", "dac_bits", "adc_bits", "weight_encoding")
_ARRAY_FIELDS = ("ranges", "samples", "clipped", "mse", "max_seen")


def adc_codes(psum: np.ndarray, adc_max: np.ndarray | float, levels: int) -> np.ndarray:
    """The ADC codes of partial sums: ``clip(round(p / step), 0, L)`` with ``step = r / L``, round half to even.

    Args:
        psum: Partial sums (integer-valued, any shape).
        adc_max: The ADC range ``r > 0``, broadcastable to ``psum``.
        levels: ``L = 2^A - 1``.

    Returns:
        The codes, float64 (integers in ``0 .. L``), of the broadcast shape.
    """
    step = np.asarray(adc_max, dtype=np.float64) / float(levels)
    psum = np.asarray(psum)
    out = np.empty(np.broadcast_shapes(psum.shape, step.shape), dtype=np.float64)
    np.divide(psum, step, out=out)  # float64 division (float32 partial sums are cast exactly in the loop)
    round_half_even(out, out=out)
    return np.clip(out, 0.0, float(levels), out=out)


def adc_gain(adc_max: np.ndarray | float, levels: int) -> np.ndarray:
    """The fixed-point step ``g = round(step * 2^16)`` (round half to even; int64, shape of ``adc_max``)."""
    step = np.asarray(adc_max, dtype=np.float64) / float(levels)
    return round_half_even(np.ldexp(step, ADC_FRACTION_BITS)).astype(np.int64)


def adc_convert(psum: np.ndarray, adc_max: np.ndarray | float, levels: int) -> np.ndarray:
    """Digitize partial sums and reconstruct them: ``code * g * 2^-16`` (see the module docstring).

    Args:
        psum: Partial sums (integer-valued, any shape).
        adc_max: The ADC range ``r > 0``, broadcastable to ``psum``.
        levels: ``L = 2^A - 1``.

    Returns:
        The reconstructed values, float64 (exact: multiples of ``2^-16``).
    """
    codes = adc_codes(psum, adc_max, levels)
    return np.ldexp(codes * adc_gain(adc_max, levels), -ADC_FRACTION_BITS)


def full_scale_ranges(spec: CIMSpec, shape: tuple[int, int, int]) -> np.ndarray:
    """The ``'full'`` ADC ranges: ``max(full_scale, L)`` everywhere (``step = 1`` once the ADC is lossless).

    Args:
        spec: The crossbar (with ``adc_bits`` set).
        shape: ``(T, S, P)``: row tiles, weight slices, input planes.
    """
    return np.full(shape, float(max(spec.full_scale, spec.adc_levels or 0)))


@dataclass(frozen=True)
class AdcCalibration:
    """Calibrated ADC ranges of one MAC, per (row tile, weight slice, input plane).

    Every array has shape ``(T, S, P)``. Partial sums of the positive and negative columns of a
    differential pair, of every output channel and (for grouped convolutions) every group share the range of
    their (row tile, slice, plane).

    Attributes:
        ranges: The ADC range ``r`` (full-scale partial sum) of each entry, float64, at least ``2^a - 1``.
        spec: The crossbar the ranges were chosen for.
        weight_bits: Weight bit width of the MAC.
        input_bits: Input bit width of the MAC.
        method: How the ranges were chosen (``'mse'`` or ``'percentile'``).
        samples: Partial sums observed per entry.
        clipped: Fraction of the observed partial sums above the range.
        mse: Mean squared error of the ADC on the observed partial sums (reconstruction minus exact).
        max_seen: Largest observed partial sum.
    """

    ranges: np.ndarray
    spec: CIMSpec
    weight_bits: int
    input_bits: int
    method: str = "mse"
    samples: np.ndarray = field(default_factory=lambda: np.zeros((0, 0, 0), np.int64))
    clipped: np.ndarray = field(default_factory=lambda: np.zeros((0, 0, 0)))
    mse: np.ndarray = field(default_factory=lambda: np.zeros((0, 0, 0)))
    max_seen: np.ndarray = field(default_factory=lambda: np.zeros((0, 0, 0)))

    def __post_init__(self) -> None:
        if not isinstance(self.spec, CIMSpec):
            raise InvalidTypeError(f"AdcCalibration.spec: got {type(self.spec).__name__}, expected a CIMSpec")
        if self.spec.adc_bits is None:
            raise InvalidArgumentError("AdcCalibration.spec: adc_bits is None (an ideal ADC has no range)")
        ranges = np.asarray(self.ranges, dtype=np.float64)
        if ranges.ndim != 3 or not np.all(np.isfinite(ranges)) or (ranges.size and ranges.min() <= 0):
            raise InvalidArgumentError(f"AdcCalibration.ranges: got shape {list(ranges.shape)}, expected a "
                                       f"(row tiles, slices, planes) array of positive finite ranges")
        object.__setattr__(self, "ranges", ranges)
        for name in _ARRAY_FIELDS[1:]:
            value = np.asarray(getattr(self, name))
            if value.size == 0:
                value = np.zeros(ranges.shape, np.int64 if name == "samples" else np.float64)
            if value.shape != ranges.shape:
                raise InvalidArgumentError(f"AdcCalibration.{name}: got shape {list(value.shape)}, expected "
                                           f"{list(ranges.shape)} (the shape of ranges)")
            object.__setattr__(self, name, value)

    @property
    def shape(self) -> tuple[int, int, int]:
        """``(T, S, P)``: row tiles, weight slices, input planes."""
        return tuple(self.ranges.shape)  # type: ignore[return-value]

    def check(self, spec: CIMSpec, shape: tuple[int, int, int], *, weight_bits: int | None = None,
              input_bits: int | None = None) -> np.ndarray:
        """The ranges, after checking that they were calibrated for ``spec`` and this MAC.

        Args:
            spec: The crossbar of the call.
            shape: The ``(T, S, P)`` grid of the MAC.
            weight_bits: The MAC's weight bit width (not checked when None).
            input_bits: The MAC's input bit width (not checked when None).

        Raises:
            InvalidArgumentError: Another array size, cell, DAC, ADC or encoding, other bit widths, or another
                grid of row tiles, slices and planes.
        """
        mine, theirs = self.spec.to_dict(), spec.to_dict()
        diff = [f"{k}={mine[k]!r} (spec has {theirs[k]!r})" for k in _SPEC_KEYS if mine[k] != theirs[k]]
        for name, value in (("weight_bits", weight_bits), ("input_bits", input_bits)):
            if value is not None and int(value) != getattr(self, name):
                diff.append(f"{name}={getattr(self, name)} (the MAC has {value})")
        if diff:
            raise InvalidArgumentError(f"adc: calibrated for another crossbar or MAC: {', '.join(diff)}")
        if self.shape != tuple(shape):
            raise InvalidArgumentError(f"adc: ranges of shape {list(self.shape)} (row tiles, slices, planes), the "
                                       f"MAC needs {list(shape)}")
        return self.ranges

    # -- serialization (no pickle) ---------------------------------------------------------------------------
    def to_dict(self) -> dict[str, Any]:
        """A JSON-serializable dict (arrays as nested lists)."""
        data: dict[str, Any] = {name: getattr(self, name).tolist() for name in _ARRAY_FIELDS}
        data.update(spec=self.spec.to_dict(), weight_bits=self.weight_bits, input_bits=self.input_bits,
                    method=self.method)
        return data

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> AdcCalibration:
        """The calibration of :meth:`to_dict`'s form.

        Raises:
            ArtifactError: A missing key or malformed values.
        """
        try:
            return cls(
                ranges=np.asarray(data["ranges"], dtype=np.float64),
                spec=CIMSpec.from_dict(dict(data["spec"])),
                weight_bits=int(data["weight_bits"]),
                input_bits=int(data["input_bits"]),
                method=str(data.get("method", "mse")),
                samples=np.asarray(data.get("samples", []), dtype=np.int64),
                clipped=np.asarray(data.get("clipped", []), dtype=np.float64),
                mse=np.asarray(data.get("mse", []), dtype=np.float64),
                max_seen=np.asarray(data.get("max_seen", []), dtype=np.float64),
            )
        except (KeyError, TypeError, ValueError) as exc:
            raise ArtifactError(f"ADC calibration: malformed data ({exc})") from exc

    def to_arrays(self) -> dict[str, np.ndarray]:
        """Plain numpy arrays (no object arrays) for ``numpy.savez``; read back with :meth:`from_arrays`."""
        arrays = {name: getattr(self, name) for name in _ARRAY_FIELDS}
        meta = {"spec": self.spec.to_dict(), "weight_bits": self.weight_bits, "input_bits": self.input_bits,
                "method": self.method}
        arrays["meta"] = np.array(json.dumps(meta))
        return arrays

    @classmethod
    def from_arrays(cls, arrays: Any) -> AdcCalibration:
        """The calibration of :meth:`to_arrays`' arrays (a dict, or an ``np.load`` of an ``.npz``)."""
        try:
            data = json.loads(str(arrays["meta"][()]))
            data.update({name: np.asarray(arrays[name]) for name in _ARRAY_FIELDS})
        except (KeyError, TypeError, ValueError) as exc:
            raise ArtifactError(f"ADC calibration: malformed arrays ({exc})") from exc
        return cls.from_dict(data)

    def save(self, path: str | os.PathLike[str]) -> Path:
        """Write an ``.npz`` file (no pickle); returns its path."""
        path = Path(path)
        with open(path, "wb") as handle:
            np.savez(handle, **self.to_arrays())
        return path

    @classmethod
    def load(cls, path: str | os.PathLike[str]) -> AdcCalibration:
        """Read :meth:`save`'s ``.npz`` file (with ``allow_pickle=False``)."""
        with np.load(Path(path), allow_pickle=False) as arrays:
            return cls.from_arrays(arrays)
