"""How a ``b``-bit integer weight is split into cell-sized digits: :func:`slice_weights` and its inverse.

The encodings (``'offset'`` and ``'differential'``) are described in :mod:`~maptools.quantization.cim.tiles`,
under "Slices and signs". Numpy only.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from maptools.errors import InvalidArgumentError, InvalidTypeError
from maptools.quantization.cim.spec import CIMSpec
from maptools.quantization.intmath import as_integers

__all__ = ["WeightFormat", "as_int_weights", "combine_slices", "slice_weights", "weight_digits", "weight_format"]


@dataclass(frozen=True)
class WeightFormat:
    """How a ``b``-bit weight is stored: signs, slices and, for the offset encoding, the offset.

    Attributes:
        bits: The weight bit width ``b``.
        weight_min: The smallest weight integer (``-2^(b-1)`` unless the quantization is symmetric).
        weight_max: The largest weight integer, ``2^(b-1) - 1``.
        encoding: ``'differential'`` or ``'offset'``.
        signs: Columns per slice: 2 (differential) or 1 (offset).
        slices: Slices per weight and sign, ``S``.
        cell_bits: Bits per cell ``c``.
        offset: The offset ``2^(b-1)`` added before slicing (0 for differential).
    """

    bits: int
    weight_min: int
    weight_max: int
    encoding: str
    signs: int
    slices: int
    cell_bits: int
    offset: int

    @property
    def columns_per_weight(self) -> int:
        """Columns one output channel occupies, ``signs * slices``."""
        return self.signs * self.slices


def weight_format(weight_bits: int, spec: CIMSpec, weight_min: int | None = None) -> WeightFormat:
    """The slicing of ``weight_bits``-bit weights under ``spec`` (see the module docstring).

    Args:
        weight_bits: Weight bit width ``b`` (1..16), the record's ``weight_bits``.
        spec: The crossbar.
        weight_min: The smallest weight integer, the record's ``weight_min``; None for ``-2^(b-1)``.

    Raises:
        InvalidArgumentError: ``weight_bits`` outside 1..16 or ``weight_min`` outside ``-2^(b-1) .. 0``.
    """
    _check_spec(spec)
    if isinstance(weight_bits, bool) or not isinstance(weight_bits, int | np.integer) or not 1 <= weight_bits <= 16:
        raise InvalidArgumentError(f"weight_bits: got {weight_bits!r}, expected an integer in 1..16")
    bits = int(weight_bits)
    low, high = -(2 ** (bits - 1)), 2 ** (bits - 1) - 1
    if weight_min is None:
        weight_min = low
    if isinstance(weight_min, bool) or not isinstance(weight_min, int | np.integer) or not low <= weight_min <= 0:
        raise InvalidArgumentError(f"weight_min: got {weight_min!r}, expected an integer in {low}..0 for "
                                   f"{bits}-bit weights")
    c = spec.cell_bits
    if spec.weight_encoding == "offset":
        return WeightFormat(bits, int(weight_min), high, "offset", 1, math.ceil(bits / c), c, 2 ** (bits - 1))
    magnitude_bits = max(-int(weight_min), high).bit_length()
    return WeightFormat(bits, int(weight_min), high, "differential", 2, max(1, math.ceil(magnitude_bits / c)), c, 0)


def _check_spec(spec: CIMSpec) -> None:
    if not isinstance(spec, CIMSpec):
        raise InvalidTypeError(f"spec: got {type(spec).__name__}, expected a CIMSpec")


def as_int_weights(weights: np.ndarray, fmt: WeightFormat, name: str = "weights") -> np.ndarray:
    """``weights`` as int64, checked to be integers in ``fmt``'s range.

    Raises:
        InvalidArgumentError: Non-integer values, or values outside ``weight_min .. weight_max``.
    """
    w = as_integers(weights, name)
    if w.size and (int(w.min()) < fmt.weight_min or int(w.max()) > fmt.weight_max):
        raise InvalidArgumentError(
            f"{name}: values {int(w.min())}..{int(w.max())} outside the {fmt.bits}-bit weight range "
            f"{fmt.weight_min}..{fmt.weight_max}"
        )
    return w


def weight_digits(w: np.ndarray, fmt: WeightFormat) -> np.ndarray:
    """The cell digits of int64 weights, shape ``(signs, S, *w.shape)``, int64 (see :func:`slice_weights`)."""
    mask = 2**fmt.cell_bits - 1
    parts = [w + fmt.offset] if fmt.encoding == "offset" else [np.maximum(w, 0), np.maximum(-w, 0)]
    out = np.empty((fmt.signs, fmt.slices, *w.shape), dtype=np.int64)
    for sign, part in enumerate(parts):
        for s in range(fmt.slices):
            out[sign, s] = (part >> (fmt.cell_bits * s)) & mask
    return out


def slice_weights(w_int: np.ndarray, weight_bits: int, spec: CIMSpec, *, weight_min: int | None = None) -> np.ndarray:
    """Split integer weights into the ``c``-bit digits the cells store.

    This is what a map would store as ``<node>_conv_weight_slices``: the digits in the ONNX layout of the
    weight, one leading axis for the sign and one for the slice.

    Args:
        w_int: Integer weights (any shape, e.g. the ONNX weight of quantparams), in
            ``weight_min .. 2^(b-1) - 1``.
        weight_bits: Weight bit width ``b``.
        spec: The crossbar (``cell_bits`` and ``weight_encoding`` are used).
        weight_min: The smallest weight integer; None for ``-2^(b-1)``.

    Returns:
        uint8 digits ``D`` of shape ``(signs, S, *w_int.shape)`` in ``0 .. 2^c - 1``: for ``'differential'``
        ``w = sum_s 2^(c*s) * (D[0, s] - D[1, s])``; for ``'offset'`` ``w = sum_s 2^(c*s) * D[0, s] - 2^(b-1)``.

    Raises:
        InvalidArgumentError: Non-integer weights or weights outside the range.
    """
    fmt = weight_format(weight_bits, spec, weight_min)
    return weight_digits(as_int_weights(w_int, fmt, "w_int"), fmt).astype(np.uint8)


def combine_slices(slices: np.ndarray, weight_bits: int, spec: CIMSpec) -> np.ndarray:
    """The integer weights of :func:`slice_weights`' digits (its inverse), int64 of shape ``slices.shape[2:]``.

    Raises:
        InvalidArgumentError: ``slices`` does not have the ``(signs, S, ...)`` shape of the encoding.
    """
    fmt = weight_format(weight_bits, spec)
    d = np.asarray(slices).astype(np.int64)
    if d.ndim < 2 or d.shape[:2] != (fmt.signs, fmt.slices):
        raise InvalidArgumentError(f"slices: got shape {list(d.shape)}, expected ({fmt.signs}, {fmt.slices}, ...) "
                                   f"for {weight_bits}-bit {fmt.encoding} weights in {fmt.cell_bits}-bit cells")
    powers = (2 ** (fmt.cell_bits * np.arange(fmt.slices, dtype=np.int64))).reshape((-1,) + (1,) * (d.ndim - 2))
    values = [(d[sign] * powers).sum(axis=0) for sign in range(fmt.signs)]
    return values[0] - fmt.offset if fmt.encoding == "offset" else values[0] - values[1]
