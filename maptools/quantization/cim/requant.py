"""Integer-only requantization of a MAC's accumulator.

The executor requantizes in float: ``q = clip(round_half_even(acc * m) + zp_out, qmin, qmax)`` with the
per-channel multiplier ``m = s_in * s_w[c] / s_out`` (:func:`requant_multipliers`). A chip without a float
unit uses an integer multiplier and a shift instead:

``'fixed_point'`` (:func:`fixed_point_multiplier`)
    TFLite's ``QuantizeMultiplier`` representation: ``m ~ M * 2^-31 * 2^-shift`` with an int32 ``M`` in
    ``[2^30, 2^31)`` (a Q0.31 fraction in ``[0.5, 1)``) and ``shift`` the exponent: a right shift, ``0 ..
    31`` for ``2^-32 <= m < 1``, and a left shift (``shift < 0``, down to ``-31``) for ``1 <= m < 2^31``.
    ``M = round_half_even(f * 2^31)`` from ``m = f * 2^e``, ``f`` in ``[0.5, 1)`` (``shift = -e``; ``M = 2^31``
    carries into the exponent). Below ``2^-32`` the shift stays at 31 and ``M = round(m * 2^62) < 2^30``.
    The relative error of ``M * 2^-(31 + shift)`` is at most ``2^-31``.
``'power_of_two'`` (:func:`power_of_two_multiplier`)
    The nearest power of two, ``2^k`` with ``k = e`` if ``f >= 3/4`` else ``e - 1`` (nearest in value, ties
    upward; the relative error is at most 1/3), in the same representation (``M = 2^30``,
    ``shift = -1 - k``): the product is a pure shift.

Both are applied by :func:`requantize_fixed` with a single rounding, exactly in int64:

``y = (acc * M + 2^(T-1)) >> T`` with ``T = 31 + shift`` (``0 .. 62``; no rounding term when ``T = 0``),
``q = clip(y + zp_out, qmin, qmax)``.

``>>`` is the arithmetic (flooring) shift, so ``y = floor(acc * M / 2^T + 1/2)``: **round half up** (toward
``+inf``). It is the rounding of one adder and one shifter; it differs from round half to even only on an
exact tie (``acc * M`` an odd multiple of ``2^(T-1)``), by one step. gemmlowp and TFLite instead round twice
(the doubling high multiply, then the rounding shift), each half away from zero; the result here is the
exactly rounded ``acc * M * 2^-T``, within one step of theirs.

Bound: for ``m >= 2^-32``, ``|acc * M * 2^-T - acc * m| <= |acc * m| * 2^-31``, so for any int32 ``acc``
whose output is not clipped (``|acc * m| < 2^31``) the fixed-point result is within one integer step of the
float one (tested over ``m`` in ``1e-6 .. 1e2``). For outputs of realistic width (``|acc * m| < 2^16``) the
real values differ by less than ``2^-15``, so the results are equal unless ``acc * m`` lies that close to a
rounding tie. ``acc`` must lie in the int32 range (``acc * M`` then fits int64 with room for the rounding
term).
"""

from __future__ import annotations

import numpy as np

from maptools.errors import InvalidArgumentError
from maptools.quantization.intmath import INT32_MAX, INT32_MIN, as_integers, round_half_even

__all__ = [
    "fixed_point_multiplier",
    "power_of_two_multiplier",
    "requant_multiplier",
    "requant_multipliers",
    "requantize",
    "requantize_fixed",
]

#: The range of the chip's 32-bit accumulator and of the fixed-point multiplier.


def requant_multipliers(s_in: float, s_w: np.ndarray | float, s_out: float) -> np.ndarray:
    """The float multipliers ``m = s_in * s_w / s_out`` (float64, one per weight scale)."""
    return np.asarray(float(s_in) * np.asarray(s_w, dtype=np.float64) / float(s_out), dtype=np.float64)


def _check_m(m: np.ndarray | float) -> np.ndarray:
    arr = np.asarray(m, dtype=np.float64)
    if not np.all(np.isfinite(arr)) or np.any(arr <= 0):
        raise InvalidArgumentError(f"m: got {arr.min(initial=np.inf)}..{arr.max(initial=-np.inf)}, expected finite "
                                   f"multipliers > 0")
    if np.any(arr >= 2.0**31):
        raise InvalidArgumentError(f"m: got {arr.max()}, expected multipliers below 2^31 (a left shift of at most 31)")
    return arr


def fixed_point_multiplier(m: np.ndarray | float) -> tuple[np.ndarray, np.ndarray]:
    """The int32 multiplier and shift of ``m`` (``m ~ M * 2^-31 * 2^-shift``, see the module docstring).

    Args:
        m: Positive multipliers below ``2^31`` (scalar or array).

    Returns:
        ``(M, shift)``, int32 arrays of the shape of ``m``: ``M`` in ``[2^30, 2^31)`` for ``m >= 2^-32``;
        ``shift`` in ``0 .. 31`` for ``m < 1``, ``-31 .. -1`` (a left shift) for ``m >= 1``.

    Raises:
        InvalidArgumentError: ``m`` not finite, not positive, or ``>= 2^31``.
    """
    arr = _check_m(m)
    f, e = np.frexp(arr)  # arr = f * 2^e, f in [0.5, 1)
    e = e.astype(np.int64)
    mult = round_half_even(np.ldexp(f, 31)).astype(np.int64)
    carry = mult == 2**31
    mult = np.where(carry, 2**30, mult)
    e = e + carry
    shift = -e
    tiny = shift > 31  # m < 2^-32: denormal multiplier at the largest shift
    if np.any(tiny):
        mult = np.where(tiny, round_half_even(np.ldexp(arr, 62)).astype(np.int64), mult)
        shift = np.where(tiny, 31, shift)
    return mult.astype(np.int32), shift.astype(np.int32)


def power_of_two_multiplier(m: np.ndarray | float) -> tuple[np.ndarray, np.ndarray]:
    """The nearest power of two ``2^k`` of ``m`` as ``(M, shift)`` with ``M = 2^30``, ``shift = -1 - k``.

    "Nearest" is in value (``2^e`` when ``m >= 0.75 * 2^e``, else ``2^(e-1)``, for ``m`` in ``[2^(e-1), 2^e)``).
    Below ``2^-32`` the shift stays at 31 and ``M = 2^(k + 62)`` (0 below ``2^-62``).

    Raises:
        InvalidArgumentError: ``m`` not finite, not positive, or ``>= 2^31``.
    """
    arr = _check_m(m)
    f, e = np.frexp(arr)
    k = np.where(f >= 0.75, e, e - 1).astype(np.int64)
    shift = -1 - k
    mult = np.full(arr.shape, 2**30, dtype=np.int64)
    tiny = shift > 31
    if np.any(tiny):
        mult = np.where(tiny, np.where(k + 62 >= 0, np.left_shift(1, np.maximum(k + 62, 0)), 0), mult)
        shift = np.where(tiny, 31, shift)
    if np.any(shift < -31):
        raise InvalidArgumentError(f"m: got {arr.max()}, rounds to 2^31 or more (expected multipliers below 2^31)")
    return mult.astype(np.int32), shift.astype(np.int32)


def requant_multiplier(m: np.ndarray | float, mode: str) -> tuple[np.ndarray, np.ndarray]:
    """``(M, shift)`` of ``m`` for ``mode`` ``'fixed_point'`` or ``'power_of_two'`` (a CIMSpec's ``requant``).

    Raises:
        InvalidArgumentError: Another mode (``'float'`` has no integer multiplier) or an invalid ``m``.
    """
    if mode == "fixed_point":
        return fixed_point_multiplier(m)
    if mode == "power_of_two":
        return power_of_two_multiplier(m)
    raise InvalidArgumentError(f"mode: got {mode!r}, expected 'fixed_point' or 'power_of_two'")


def _per_channel(values: np.ndarray, ndim: int, channel_axis: int | None, name: str) -> np.ndarray:
    arr = np.asarray(values, dtype=np.int64)
    if channel_axis is None or arr.ndim == 0:
        return arr
    if arr.ndim != 1:
        raise InvalidArgumentError(f"{name}: got shape {list(arr.shape)}, expected one value per channel (1-D) "
                                   f"with channel_axis")
    shape = [1] * ndim
    shape[channel_axis] = -1
    return arr.reshape(shape)


def requantize_fixed(acc: np.ndarray, multiplier: np.ndarray | int, shift: np.ndarray | int, zero_point: int,
                     qmin: int, qmax: int, *, channel_axis: int | None = None) -> np.ndarray:
    """``clip(((acc * M + 2^(T-1)) >> T) + zero_point, qmin, qmax)`` with ``T = 31 + shift``, in int64.

    Args:
        acc: Integer accumulators (bias included), in the int32 range.
        multiplier: ``M`` (:func:`fixed_point_multiplier`), scalar or per channel.
        shift: ``shift``, scalar or per channel, in ``-31 .. 31``.
        zero_point: Output zero point.
        qmin: Smallest output integer.
        qmax: Largest output integer.
        channel_axis: The axis of ``acc`` that 1-D ``multiplier`` and ``shift`` run along; None when they
            already broadcast against ``acc``.

    Returns:
        The output integers, int64, rounded half up (see the module docstring).

    Raises:
        InvalidArgumentError: ``acc`` outside the int32 range, non-integer ``acc``, or a multiplier or shift
            out of range.
    """
    a = as_integers(acc, "acc", "integer accumulators")
    if a.size and (int(a.min()) < INT32_MIN or int(a.max()) > INT32_MAX):
        raise InvalidArgumentError(f"acc: got {int(a.min())}..{int(a.max())}, expected the int32 range")
    if channel_axis is not None:
        channel_axis = channel_axis % a.ndim
    mult = _per_channel(multiplier, a.ndim, channel_axis, "multiplier")
    sh = _per_channel(shift, a.ndim, channel_axis, "shift")
    if np.any(mult < 0) or np.any(mult > INT32_MAX) or np.any(sh < -31) or np.any(sh > 31):
        raise InvalidArgumentError("multiplier/shift: expected multipliers in 0 .. 2^31 - 1 and shifts in -31 .. 31")
    total = 31 + sh
    rounding = np.where(total > 0, np.left_shift(np.int64(1), np.maximum(total - 1, 0)), 0)
    y = np.right_shift(a * mult + rounding, total)
    return np.clip(y + int(zero_point), int(qmin), int(qmax))


def requantize(acc: np.ndarray, m: np.ndarray | float, zero_point: int, qmin: int, qmax: int, *, mode: str = "float",
               channel_axis: int | None = None) -> np.ndarray:
    """Requantize accumulators with multipliers ``m`` in one of a CIMSpec's ``requant`` modes.

    ``'float'``: ``clip(round_half_even(acc * m) + zero_point, qmin, qmax)`` in float64; ``'fixed_point'``
    and ``'power_of_two'``: :func:`requantize_fixed` with :func:`requant_multiplier`'s ``(M, shift)``.

    Args:
        acc: Integer accumulators (bias included).
        m: Multipliers ``s_in * s_w / s_out``, scalar or per channel.
        zero_point: Output zero point.
        qmin: Smallest output integer.
        qmax: Largest output integer.
        mode: ``'float'``, ``'fixed_point'`` or ``'power_of_two'``.
        channel_axis: The axis of ``acc`` a 1-D ``m`` runs along; None when ``m`` broadcasts as is.

    Returns:
        int64 output integers.
    """
    if mode == "float":
        mult = np.asarray(_check_m(m))
        if channel_axis is not None and mult.ndim == 1:
            shape = [1] * np.ndim(acc)
            shape[channel_axis] = -1
            mult = mult.reshape(shape)
        y = round_half_even(np.asarray(acc, dtype=np.float64) * mult)
        return np.clip(y + int(zero_point), int(qmin), int(qmax)).astype(np.int64)
    multiplier, shift = requant_multiplier(m, mode)
    return requantize_fixed(acc, multiplier, shift, zero_point, qmin, qmax, channel_axis=channel_axis)
