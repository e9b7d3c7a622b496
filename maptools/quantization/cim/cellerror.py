"""How noisy cells corrupt a weight under each mapping of its bits to cells: expected error variances.

A signed ``b``-bit weight reaches the cells through the spec's ``weight_encoding`` (a differential pair of
magnitude digits, ``w = sum_s 2^(c*s) * (D+_s - D-_s)``, or the offset code ``w + 2^(b-1)`` in unsigned
digits) and its ``cell_bits`` (``S`` slices of ``c`` bits). A programming error of a cell is read with the
weight of its slice, ``2^(c*s)``, so the same device corrupts a weight differently under each mapping; this
module gives the expected variance, and :doc:`/cim` ("Mapping weight bits to noisy cells") the equations and
the measured agreement that pick a mapping per noise level.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable

import numpy as np

from maptools.errors import InvalidArgumentError, InvalidTypeError
from maptools.quantization.cim.device import DeviceModel
from maptools.quantization.cim.slicing import as_int_weights, weight_digits, weight_format
from maptools.quantization.cim.spec import INT_RANGES, WEIGHT_ENCODINGS, CIMSpec

__all__ = ["mapping_error_table", "programming_error_variance"]


def programming_error_variance(w_int: np.ndarray, weight_bits: int, spec: CIMSpec, device: DeviceModel, *,
                               weight_min: int | None = None) -> np.ndarray:
    """The expected variance of each weight's programming error, in weight units (float64, ``w_int``'s shape).

    ``var(w) = sum_{sign, s} 4^(c*s) * ((a_p[D] + r_p[D] * G_T(D)) / dG)^2`` over every cell of the weight
    (both cells of a differential pair, the off one included), ``D`` the cell's digit; the clip of a
    conductance at 0 is neglected (exact while ``G_T`` is several sigmas above 0).

    Raises:
        InvalidTypeError: ``device`` is not a DeviceModel.
        InvalidArgumentError: weights outside the range, or per-level parameters that do not fit ``spec``.
    """
    if not isinstance(device, DeviceModel):
        raise InvalidTypeError(f"device: got {type(device).__name__}, expected a DeviceModel")
    fmt = weight_format(weight_bits, spec, weight_min)
    digits = weight_digits(as_int_weights(w_int, fmt, "w_int"), fmt)  # (signs, S, ...)
    cells = spec.cell_bits
    device.check(cells)
    step = (device.g_max - device.g_min) / (2**cells - 1)
    target = device.target_conductance(cells)
    sigma = (device.per_level("prog_sigma_abs", cells) + device.per_level("prog_sigma_rel", cells) * target) / step
    powers = (4.0 ** (cells * np.arange(fmt.slices))).reshape((1, -1) + (1,) * (digits.ndim - 2))
    return (sigma[digits] ** 2 * powers).sum(axis=(0, 1))


def mapping_error_table(w_int: np.ndarray, weight_bits: int, device: DeviceModel | Callable[[int], DeviceModel], *,
                        cell_bits: Iterable[int] = (1, 2, 4, 8), encodings: Iterable[str] = WEIGHT_ENCODINGS,
                        weight_min: int | None = None) -> dict[tuple[str, int], float]:
    """The relative programming error ``mean var(w) / mean w^2`` of ``w_int`` under each (encoding, cell bits).

    Args:
        w_int: Integer weights (e.g. one MAC's, or all of a map's).
        weight_bits: Their bit width ``b``.
        device: One model for every cell size (scalar per-level fields), or ``cell_bits -> DeviceModel``
            (e.g. ``lambda c: DeviceModel.pcm(c)``).
        cell_bits: The cell sizes to compare (each in 1..8).
        encodings: The weight encodings to compare (``'differential'``, ``'offset'``).
        weight_min: The smallest weight integer; None for ``-2^(b-1)``.

    Raises:
        InvalidArgumentError: an unknown encoding, a cell size outside 1..8, or all-zero weights.
    """
    low, high = INT_RANGES["cell_bits"]
    sizes = list(cell_bits)
    bad = [c for c in sizes if isinstance(c, bool) or not isinstance(c, int) or not low <= c <= high]
    if bad or not sizes:
        raise InvalidArgumentError(f"cell_bits: got {sizes!r}, expected integers in {low}..{high}")
    kinds = list(encodings)
    unknown = [e for e in kinds if e not in WEIGHT_ENCODINGS]
    if unknown or not kinds:
        raise InvalidArgumentError(f"encodings: got {kinds!r}, expected some of {', '.join(WEIGHT_ENCODINGS)}")
    w = np.asarray(w_int)
    power = float(np.mean(np.square(w, dtype=np.float64))) if w.size else 0.0
    if power == 0:
        raise InvalidArgumentError("w_int: got no non-zero weight, expected weights to compare the mappings on")
    table = {}
    for c in sizes:
        model = device if isinstance(device, DeviceModel) else device(c)
        for encoding in kinds:
            spec = CIMSpec(cell_bits=c, weight_encoding=encoding)
            variance = programming_error_variance(w, weight_bits, spec, model, weight_min=weight_min)
            table[encoding, c] = float(variance.mean()) / power
    return table
