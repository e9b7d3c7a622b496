"""The arithmetic of a CIM crossbar: :func:`cim_accumulate`, a drop-in for the executor's exact MAC.

:func:`cim_accumulate` takes the same ``weights (..., M, K)`` and centred ``columns (..., K, P)`` as
:func:`maptools.quantization.reference.mac.accumulate` and returns the int64 accumulator ``(..., M, P)``
that the chip's digital periphery produces. With an ideal ADC (``spec.adc_bits=None``) that is exactly
``weights @ columns``; otherwise every column partial sum is digitized.

The model
---------

Notation: weights ``w`` of ``b`` bits, inputs of ``a`` bits, cells of ``c`` bits, DACs of ``d`` bits, ADCs of
``A`` bits (``L = 2^A - 1``), arrays of ``R`` rows. Sums over ``k`` run over the dot product.

1. **Inputs.** The executor's columns are centred, ``x = q - zp``. The DACs apply the non-negative code
   ``u = x + o``, ``0 <= u < 2^a``, with ``o = zp`` for an unsigned input (``u = q``) and
   ``o = zp + 2^(a-1)`` for a signed one (``u = q + 2^(a-1)``: the two's-complement bits of ``q`` with the
   top bit inverted, so every DAC level is non-negative). The offset is removed digitally, exactly:
   ``sum_k w_k x_k = sum_k w_k u_k - o * sum_k w_k``, where ``sum_k w_k`` is a per-channel constant.
2. **Bit planes.** ``u = sum_p 2^(d*p) * u_p`` with ``u_p = (u >> d*p) & (2^d - 1)``,
   ``p = 0 .. ceil(a / d) - 1``: one input cycle per plane.
3. **Weight slices** (:mod:`~maptools.quantization.cim.tiles`). Differential:
   ``w = sum_s 2^(c*s) * (w+_s - w-_s)``; offset: ``w + 2^(b-1) = sum_s 2^(c*s) * v_s`` and
   ``sum_k w_k u_k = sum_k (w_k + 2^(b-1)) u_k - 2^(b-1) * sum_k u_k``, the last sum computed digitally
   from the applied codes.
4. **Row tiles.** ``k`` is cut into tiles of ``R`` consecutive indices, ``t = 0 .. ceil(K / R) - 1``.
5. **Column partial sums.** For each tile ``t``, slice ``s``, sign (differential: ``+``, ``-``) and plane
   ``p`` the column of output channel ``m`` carries ``psum = sum_{k in t} D[m, k] * u_p[k]`` (``D`` the cell
   digits), a non-negative integer of at most ``R * (2^c - 1) * (2^d - 1)``
   (:attr:`~maptools.quantization.cim.spec.CIMSpec.full_scale`). Because every cell digit and DAC level is
   non-negative, the ADC range is ``[0, r]``, never symmetric.
6. **ADC** (:mod:`~maptools.quantization.cim.adc`): ``code = clip(round(psum / step), 0, L)`` with
   ``step = r / L`` and round half to even, where ``r`` is the ``'full'`` range ``max(full_scale, L)`` or the
   calibrated range of ``(t, s, p)``; the digital side scales the code by the fixed-point gain
   ``g = round(step * 2^16)``. An ideal ADC passes ``psum`` itself.
7. **Shift and add** (digital, exact): ``acc_fx = sum_{t, s, p} 2^(c*s) * 2^(d*p) * (code+ * g - code- * g)``
   (differential; offset: ``code * g`` alone), then one rounding, ``acc' = floor(acc_fx * 2^-16 + 1/2)``
   (round half up, an add and an arithmetic shift). With an ideal ADC ``acc'`` is the same sum of the
   ``psum`` without scaling.
8. **Corrections** (digital, exact): offset weights ``acc' -= 2^(b-1) * sum_k u_k``; then
   ``acc = acc' - o * sum_k w_k``.

With an ideal ADC the steps compose to ``sum_k w_k x_k`` exactly. The result is int64; in the executor the
bias is added and the accumulator requantized afterwards, as for the exact MAC.

With ``analog=`` (an :class:`~maptools.quantization.cim.analog.AnalogMac`) step 5 reads the partial sums from
programmed, noisy cells (:mod:`~maptools.quantization.cim.device`), steps 6 and 7 run on them in float64, the
sum is divided by the drift compensation factor and rounded once, ``floor(x + 1/2)``.

Numerics: partial sums are computed by BLAS in float32 when ``full_scale < 2^24`` (else float64), which
is exact; the ADC works in float64; the shift-and-add is exact in float64 (checked) or int64. Only the
loops over row tiles and blocks of output positions are in Python.

Wiring it into the executor is a replacement of ``accumulate(weights, columns)`` with:

.. code-block:: python

    cim_accumulate(weights, columns, input_bits=tq_in.bits, input_signed=tq_in.qmin < 0,
                   input_zero_point=tq_in.zero_point, weight_bits=record.weight_bits,
                   weight_min=record.weight_min, spec=spec, adc=calibrations.get(node.name))

where ``tq_in`` is the MAC's input record (``record.inputs[0]``).
"""

from __future__ import annotations

import logging
import math
from collections.abc import Iterator
from dataclasses import dataclass

import numpy as np

from maptools.errors import InvalidArgumentError, InvalidTypeError
from maptools.quantization.cim.adc import ADC_FRACTION_BITS, AdcCalibration, adc_codes, adc_gain, full_scale_ranges
from maptools.quantization.cim.analog import AnalogMac
from maptools.quantization.cim.slicing import WeightFormat, as_int_weights, weight_digits, weight_format
from maptools.quantization.cim.spec import CIMSpec
from maptools.quantization.intmath import as_integers

__all__ = ["InputFormat", "PartialSums", "ShiftAdd", "adc_grid", "cim_accumulate", "dac_codes", "input_format",
           "offset_corrections", "partial_sums", "prepare_mac", "shift_add"]

logger = logging.getLogger(__name__)

#: Elements of one block of partial sums (one row tile, a block of output positions); bounds the memory.
BLOCK_ELEMENTS = 1 << 22
_EXACT_FLOAT32 = 1 << 24
_EXACT_FLOAT64 = 1 << 53


@dataclass(frozen=True)
class InputFormat:
    """How an ``a``-bit input is applied: its DAC offset and bit planes.

    Attributes:
        bits: Input bit width ``a``.
        signed: Whether the input integers are signed (``qmin < 0``).
        zero_point: The input zero point.
        offset: ``o``: the DAC code is ``u = x + o`` for a centred input ``x = q - zero_point``
            (``zero_point``, plus ``2^(a-1)`` when signed).
        dac_bits: Bits per plane ``d``.
        planes: Input planes ``ceil(a / d)``.
    """

    bits: int
    signed: bool
    zero_point: int
    offset: int
    dac_bits: int
    planes: int


def input_format(input_bits: int, input_signed: bool, spec: CIMSpec, input_zero_point: int = 0) -> InputFormat:
    """The DAC offset and planes of an input (see the module docstring, step 1 and 2).

    Raises:
        InvalidArgumentError: ``input_bits`` outside 1..16 or a non-integer zero point.
    """
    if isinstance(input_bits, bool) or not isinstance(input_bits, int | np.integer) or not 1 <= input_bits <= 16:
        raise InvalidArgumentError(f"input_bits: got {input_bits!r}, expected an integer in 1..16")
    if isinstance(input_zero_point, bool) or not isinstance(input_zero_point, int | np.integer):
        raise InvalidArgumentError(f"input_zero_point: got {input_zero_point!r}, expected an integer")
    bits = int(input_bits)
    offset = int(input_zero_point) + (2 ** (bits - 1) if input_signed else 0)
    return InputFormat(bits, bool(input_signed), int(input_zero_point), offset, spec.dac_bits,
                       math.ceil(bits / spec.dac_bits))


def adc_grid(depth: int, input_bits: int, weight_bits: int, spec: CIMSpec, *,
             weight_min: int | None = None) -> tuple[int, int, int]:
    """``(T, S, P)``: the row tiles, weight slices and input planes of a MAC, the shape of its ADC ranges.

    Args:
        depth: The dot-product length ``K``.
        input_bits: Input bit width.
        weight_bits: Weight bit width.
        spec: The crossbar.
        weight_min: The smallest weight integer; None for ``-2^(b-1)``.
    """
    fmt = weight_format(weight_bits, spec, weight_min)
    return math.ceil(depth / spec.rows), fmt.slices, math.ceil(input_bits / spec.dac_bits)


def dac_codes(columns: np.ndarray, inp: InputFormat) -> np.ndarray:
    """The DAC codes ``u = x + o`` of centred integer columns, int64 (step 1 of the module docstring).

    Raises:
        InvalidArgumentError: codes outside ``0 .. 2^a - 1``.
    """
    u = np.asarray(columns).astype(np.int64) + inp.offset
    if u.size and (int(u.min()) < 0 or int(u.max()) >= 2**inp.bits):
        kind = "signed" if inp.signed else "unsigned"
        raise InvalidArgumentError(
            f"columns: DAC codes columns + {inp.offset} span {int(u.min())}..{int(u.max())}, outside 0.."
            f"{2**inp.bits - 1} of {inp.bits}-bit {kind} inputs with zero point {inp.zero_point}"
        )
    return u


@dataclass(frozen=True)
class PartialSums:
    """The column partial sums of one row tile for a block of output positions.

    Attributes:
        tile: The row tile ``t``.
        positions: The block of output positions (a slice of the last axis of ``columns``).
        values: ``(..., signs, S, M, planes, positions)`` non-negative integers (float32 or float64), before
            the ADC; ``signs`` is 2 (``+``, ``-``) for differential weights, 1 for offset weights.
    """

    tile: int
    positions: slice
    values: np.ndarray


@dataclass
class PreparedMac:
    """Checked operands of one MAC (:func:`prepare_mac`)."""

    w: np.ndarray  # (..., M, K) int64
    u: np.ndarray  # (..., K, P) int64 DAC codes
    fmt: WeightFormat
    inp: InputFormat
    lead: tuple[int, ...]
    tiles: list[np.ndarray]  # per row tile: (..., signs*S*M, rows_t) cell digits
    dtype: type


def prepare_mac(weights: np.ndarray, columns: np.ndarray, input_bits: int, input_signed: bool, input_zero_point: int,
                weight_bits: int, weight_min: int | None, spec: CIMSpec) -> PreparedMac:
    """The checked operands of one MAC: weights, DAC codes, formats and each row tile's cell digits.

    Raises:
        InvalidArgumentError: as :func:`cim_accumulate`.
    """
    if not isinstance(spec, CIMSpec):
        raise InvalidTypeError(f"spec: got {type(spec).__name__}, expected a CIMSpec")
    fmt = weight_format(weight_bits, spec, weight_min)
    inp = input_format(input_bits, input_signed, spec, input_zero_point)
    w = as_int_weights(weights, fmt)
    x = as_integers(columns, "columns")
    if w.ndim < 2 or x.ndim < 2 or w.shape[-1] != x.shape[-2]:
        raise InvalidArgumentError(f"weights {list(w.shape)} and columns {list(x.shape)}: expected (..., M, K) and "
                                   f"(..., K, P)")
    try:
        lead = np.broadcast_shapes(w.shape[:-2], x.shape[:-2])
    except ValueError:
        raise InvalidArgumentError(f"weights {list(w.shape)} and columns {list(x.shape)}: leading axes do not "
                                   f"broadcast") from None
    u = dac_codes(x, inp)
    dtype = np.float32 if spec.full_scale < _EXACT_FLOAT32 else np.float64
    digits = weight_digits(w, fmt)  # (signs, S, ..., M, K)
    stacked = np.moveaxis(digits, (0, 1), (-4, -3))  # (..., signs, S, M, K)
    stacked = stacked.reshape(*w.shape[:-2], -1, w.shape[-1]).astype(dtype)
    k, rows = w.shape[-1], spec.rows
    tiles = [np.ascontiguousarray(stacked[..., t * rows:min(k, (t + 1) * rows)]) for t in range(math.ceil(k / rows))]
    return PreparedMac(w, u, fmt, inp, tuple(lead), tiles, dtype)


def _blocks(prep: PreparedMac) -> Iterator[slice]:
    """Blocks of output positions whose partial sums of one tile hold about :data:`BLOCK_ELEMENTS`."""
    positions = prep.u.shape[-1]
    per_position = max(1, math.prod(prep.lead) * prep.fmt.columns_per_weight * prep.w.shape[-2] * prep.inp.planes)
    step = max(1, BLOCK_ELEMENTS // per_position)
    for start in range(0, positions, step):
        yield slice(start, min(positions, start + step))


def _tile_psums(prep: PreparedMac, t: int, planes: np.ndarray, rows: int) -> np.ndarray:
    """Partial sums of tile ``t`` from the input planes ``(..., K, planes, n)``: ``(..., signs, S, M, planes, n)``."""
    k0 = t * rows
    k1 = k0 + prep.tiles[t].shape[-1]
    block = planes[..., k0:k1, :, :]
    n_planes, n = block.shape[-2:]
    psum = np.matmul(prep.tiles[t], block.reshape(*block.shape[:-2], n_planes * n))
    fmt = prep.fmt
    return psum.reshape(*psum.shape[:-2], fmt.signs, fmt.slices, prep.w.shape[-2], n_planes, n)


def _input_planes(prep: PreparedMac, block: slice) -> np.ndarray:
    """The DAC planes of a block of positions, ``(..., K, planes, n)`` in the partial-sum dtype."""
    u = prep.u[..., block].astype(np.uint16)  # 0 <= u < 2^16: shifts on 2 bytes, not 8
    d, mask = prep.inp.dac_bits, 2**prep.inp.dac_bits - 1
    planes = np.empty((*u.shape[:-1], prep.inp.planes, u.shape[-1]), dtype=prep.dtype)
    for p in range(prep.inp.planes):
        planes[..., p, :] = (u >> (d * p)) & mask
    return planes


def partial_sums(weights: np.ndarray, columns: np.ndarray, *, input_bits: int, input_signed: bool, weight_bits: int,
                 spec: CIMSpec, input_zero_point: int = 0, weight_min: int | None = None,
                 analog: AnalogMac | None = None) -> Iterator[PartialSums]:
    """The column partial sums (before the ADC), one row tile and block of positions at a time.

    Takes :func:`cim_accumulate`'s arguments (without ``adc``); the ADC calibration reads its partial sums
    from here. Exact integers, or with ``analog`` the sums the ADC of that chip sees (programmed cells, read
    noise; real-valued).

    Yields:
        :class:`PartialSums`, for each block of output positions every row tile in order.
    """
    prep = prepare_mac(weights, columns, input_bits, input_signed, input_zero_point, weight_bits, weight_min, spec)
    if analog is not None:
        analog.program(prep)
    for block in _blocks(prep):
        planes = _input_planes(prep, block)
        for t in range(len(prep.tiles)):
            values = _tile_psums(prep, t, planes, spec.rows) if analog is None else analog.partial_sums(prep, t, planes)
            yield PartialSums(t, block, values)


def _adc_ranges(spec: CIMSpec, adc: AdcCalibration | None, grid: tuple[int, int, int], weight_bits: int,
                input_bits: int) -> np.ndarray | None:
    """The ``(T, S, P)`` ADC ranges of a call, None for an ideal ADC."""
    if spec.adc_bits is None:
        if adc is not None:
            raise InvalidArgumentError("adc: given, but spec.adc_bits is None (an ideal ADC has no range)")
        return None
    if spec.adc_range == "full":
        if adc is not None:
            raise InvalidArgumentError("adc: given, but spec.adc_range is 'full' (use adc_range='calibrated')")
        return full_scale_ranges(spec, grid)
    if adc is None:
        raise InvalidArgumentError("adc: None, but spec.adc_range is 'calibrated': pass the MAC's AdcCalibration "
                                   "(calibrate_adc) or use adc_range='full'")
    if not isinstance(adc, AdcCalibration):
        raise InvalidTypeError(f"adc: got {type(adc).__name__}, expected an AdcCalibration")
    return adc.check(spec, grid, weight_bits=weight_bits, input_bits=input_bits)


@dataclass(frozen=True)
class ShiftAdd:
    """How a MAC's partial sums are digitized and combined (steps 6 and 7 of the module docstring).

    Attributes:
        ranges: The ``(T, S, P)`` ADC ranges, None for an ideal ADC.
        gains: The ``(T, S, P)`` fixed-point gains ``round(step * 2^16)`` (float64), None for an ideal ADC.
        coef: ``(signs, S, P)``: the sign times ``2^(c*s) * 2^(d*p)`` of each partial sum.
        tile_bound: The largest magnitude one row tile adds to the shift-and-add.
    """

    ranges: np.ndarray | None
    gains: np.ndarray | None
    coef: np.ndarray
    tile_bound: float


def shift_add(prep: PreparedMac, spec: CIMSpec, adc: AdcCalibration | None) -> ShiftAdd:
    """The ADC ranges, gains and shift-and-add coefficients of a prepared MAC.

    Raises:
        InvalidArgumentError: an ``adc`` that does not fit the spec and the MAC, or a shift-and-add that would
            overflow int64.
    """
    fmt, inp = prep.fmt, prep.inp
    ranges = _adc_ranges(spec, adc, (len(prep.tiles), fmt.slices, inp.planes), fmt.bits, inp.bits)
    levels = spec.adc_levels
    sign = np.array([1.0, -1.0][: fmt.signs]).reshape(-1, 1, 1)
    coef = sign * (2.0 ** (fmt.cell_bits * np.arange(fmt.slices))).reshape(1, -1, 1) \
        * (2.0 ** (inp.dac_bits * np.arange(inp.planes))).reshape(1, 1, -1)
    if ranges is None:  # ideal ADC: the partial sums themselves
        gains, top = None, float(spec.full_scale)
    else:  # ADC codes times the fixed-point gains, summed exactly, rounded once at the end
        assert levels is not None
        gains = adc_gain(ranges, levels).astype(np.float64)
        top = float(levels) * float(gains.max(initial=0.0))
    tile_bound = top * float(np.abs(coef).sum())
    if tile_bound * max(1, len(prep.tiles)) >= 2.0**62:
        raise InvalidArgumentError(f"spec {spec}: the shift-and-add of {inp.bits}-bit inputs and {fmt.bits}-bit "
                                   f"weights would overflow int64")
    return ShiftAdd(ranges, gains, coef, tile_bound)


def cim_accumulate(weights: np.ndarray, columns: np.ndarray, *, input_bits: int, input_signed: bool,
                   weight_bits: int, spec: CIMSpec, adc: AdcCalibration | None = None, input_zero_point: int = 0,
                   weight_min: int | None = None, analog: AnalogMac | None = None) -> np.ndarray:
    """The accumulator a CIM crossbar computes for ``weights @ columns`` (see the module docstring).

    Args:
        weights: Integer weights ``(..., M, K)``, in ``weight_min .. 2^(b-1) - 1``.
        columns: Centred integer inputs ``q - zero_point``, ``(..., K, P)``.
        input_bits: Input bit width ``a`` (the input record's ``bits``).
        input_signed: Whether the input integers are signed (the input record's ``qmin < 0``).
        weight_bits: Weight bit width ``b`` (the record's ``weight_bits``).
        spec: The crossbar.
        adc: The MAC's calibrated ADC ranges when ``spec.adc_range == 'calibrated'`` (and ``adc_bits`` is
            set), else None.
        input_zero_point: The input zero point (``columns + input_zero_point`` are the input integers).
        weight_min: The smallest weight integer (the record's ``weight_min``); None for ``-2^(b-1)``.
        analog: The MAC's cells on a simulated chip (:class:`~maptools.quantization.cim.analog.AnalogMac`):
            partial sums are read from its programmed, noisy conductances; None for exact cells.

    Returns:
        int64 ``(..., M, P)`` (leading axes broadcast like ``numpy.matmul``); equal to
        ``weights @ columns`` when ``spec.adc_bits`` is None and ``analog`` is None.

    Raises:
        InvalidArgumentError: Shapes that do not multiply, non-integer values, weights or inputs outside
            their bit widths, or an ``adc`` that does not match the spec and the MAC.
    """
    prep = prepare_mac(weights, columns, input_bits, input_signed, input_zero_point, weight_bits, weight_min, spec)
    fmt, inp = prep.fmt, prep.inp
    m, positions = prep.w.shape[-2], prep.u.shape[-1]
    plan = shift_add(prep, spec, adc)
    ranges, gains, coef, levels = plan.ranges, plan.gains, plan.coef, spec.adc_levels
    if analog is not None:
        acc = _analog_accumulate(prep, analog, ranges, gains, coef, levels)
        return offset_corrections(acc, prep)
    tile_bound = plan.tile_bound
    exact_float = tile_bound < _EXACT_FLOAT64  # else sum in int64
    if not exact_float:
        coef = coef.astype(np.int64)

    acc = np.zeros((*prep.lead, m, positions), dtype=np.int64)
    for block in _blocks(prep):
        planes = _input_planes(prep, block)
        for t in range(len(prep.tiles)):
            values = _tile_psums(prep, t, planes, spec.rows)
            if gains is not None:
                values = adc_codes(values, ranges[t][:, None, :, None], levels)
                values *= gains[t][:, None, :, None]
            if not exact_float:
                values = values.astype(np.int64)
            acc[..., block] += np.einsum("...jsmpn,jsp->...mn", values, coef).astype(np.int64)
    if gains is not None:  # round half up: floor(acc_fx / 2^16 + 1/2)
        acc = (acc + (1 << (ADC_FRACTION_BITS - 1))) >> ADC_FRACTION_BITS
    logger.debug("cim_accumulate: %s x %s, %d row tiles, %d slices, %d planes, ADC %s", list(prep.w.shape),
                 list(prep.u.shape), len(prep.tiles), fmt.slices, inp.planes, spec.adc_bits)
    return offset_corrections(acc, prep)


def offset_corrections(acc: np.ndarray, prep: PreparedMac) -> np.ndarray:
    """Step 8 of the module docstring: the digital offset corrections of the shift-and-add's result."""
    if prep.fmt.encoding == "offset":
        acc -= prep.fmt.offset * prep.u.sum(axis=-2, keepdims=True)
    if prep.inp.offset:
        acc -= prep.inp.offset * prep.w.sum(axis=-1, keepdims=True)
    return acc


def _analog_accumulate(prep: PreparedMac, analog: AnalogMac, ranges: np.ndarray | None, gains: np.ndarray | None,
                       coef: np.ndarray, levels: int | None) -> np.ndarray:
    """The shift-and-add of analog partial sums (float64), scaled by the drift compensation, rounded once.

    The same steps as the exact path (ADC codes times gains, or the partial sums themselves for an ideal
    ADC), summed in float64: with noiseless cells every term is the exact path's integer.
    """
    m, positions = prep.w.shape[-2], prep.u.shape[-1]
    analog.program(prep)  # once per call: programs the cells, or checks that they hold these weights
    acc = np.zeros((*prep.lead, m, positions), dtype=np.float64)
    for block in _blocks(prep):
        planes = _input_planes(prep, block)
        for t in range(len(prep.tiles)):
            values = analog.partial_sums(prep, t, planes)
            if gains is None:  # the partial sums themselves, summed in float64
                values = values.astype(np.float64)
            else:
                assert ranges is not None and levels is not None
                values = adc_codes(values, ranges[t][:, None, :, None], levels)
                values *= gains[t][:, None, :, None]
            acc[..., block] += np.einsum("...jsmpn,jsp->...mn", values, coef)
    if analog.compensation != 1.0:
        acc *= analog.compensation
    if gains is not None:
        acc = np.ldexp(acc, -ADC_FRACTION_BITS)
    return np.floor(acc + 0.5).astype(np.int64)
