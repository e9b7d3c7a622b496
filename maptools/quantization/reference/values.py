"""The values flowing through the integer reference executor, and the arithmetic on them.

A tensor between two operators is one of:

* :class:`Ints`, an integer activation ``real = scale * (q - zero_point)`` with its integer range;
* :class:`Param`, a DequantizeLinear'd integer initializer (a weight, a bias, a quantized constant);
* a plain :class:`numpy.ndarray`: a float tensor (an operator's output without a quantinfo record, a MAC
  accumulator handed to a fused activation) or an integer/bool tensor (shapes, indices, masks).

The helpers here quantize and requantize (round half to even, clip) and choose the dtype that makes a
matrix product of integers exact; the rounding rule and the integer dtypes are those of
:mod:`maptools.quantization.intmath`.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any

import numpy as np

from maptools.quantization.intmath import round_half_even, smallest_int_dtype
from maptools.quantization.records import TensorQuant

__all__ = [
    "EXACT_FLOAT32",
    "EXACT_FLOAT64",
    "Ints",
    "Param",
    "Value",
    "along",
    "describe_scale",
    "exact_dtype",
    "exact_matmul",
    "quantize",
    "real",
    "requantize",
    "same_scale",
    "same_zero_point",
]

logger = logging.getLogger(__name__)

#: Integer sums stay exact in float32 below this magnitude (read at each call, so tests may lower it).
EXACT_FLOAT32 = float(2**24)
#: Integer sums stay exact in float64 below this magnitude.
EXACT_FLOAT64 = float(2**53)
#: Two scales are the same quantization when they agree to this relative tolerance.
SCALE_RTOL = 1e-5


def same_scale(a: float | np.ndarray, b: float | np.ndarray) -> bool:
    """Whether two scales (or two per-channel scale arrays) are equal up to :data:`SCALE_RTOL`."""
    if np.ndim(a) == 0 and np.ndim(b) == 0:
        a, b = float(a), float(b)
        return abs(a - b) <= SCALE_RTOL * max(abs(a), abs(b), 1e-30)
    x, y = np.asarray(a, np.float64).reshape(-1), np.asarray(b, np.float64).reshape(-1)
    return x.size == y.size and bool(np.all(np.abs(x - y) <= SCALE_RTOL * np.maximum(np.maximum(np.abs(x), np.abs(y)),
                                                                                      1e-30)))


def same_zero_point(a: int | np.ndarray, b: int | np.ndarray) -> bool:
    """Whether two zero points (or per-channel zero point arrays) are equal."""
    x, y = np.asarray(a).reshape(-1), np.asarray(b).reshape(-1)
    return x.size == y.size and bool(np.array_equal(x.astype(np.int64), y.astype(np.int64)))


def along(value: float | int | np.ndarray, ndim: int, axis: int | None) -> float | int | np.ndarray:
    """A per-channel scale or zero point shaped to broadcast along ``axis`` of an ``ndim`` array (a number
    as it is)."""
    if axis is None or np.ndim(value) == 0:
        return value
    shape = [1] * ndim
    shape[axis] = -1
    return np.asarray(value).reshape(shape)


def describe_scale(scale: float | np.ndarray) -> str:
    """A scale for a message: the number, or the range of a per-channel array."""
    if np.ndim(scale) == 0:
        return f"{float(scale):.6g}"
    arr = np.asarray(scale, np.float64)
    return f"[{arr.size} per channel, {arr.min():.4g}..{arr.max():.4g}]"


@dataclass
class Ints:
    """An integer tensor: ``real = scale * (q - zero_point)``, ``q`` in ``[qmin, qmax]``.

    Attributes:
        q: The integers (int64).
        scale: Quantization step (with ``axis``, an array of one step per channel).
        zero_point: Integer zero point (with ``axis``, an array like ``scale``).
        qmin: Smallest integer the tensor may hold.
        qmax: Largest integer the tensor may hold.
        raw: True for integers between a QuantizeLinear and its DequantizeLinear (not yet an activation).
        axis: The axis ``scale`` and ``zero_point`` run along; None for one per tensor.
    """

    q: np.ndarray
    scale: float | np.ndarray
    zero_point: int | np.ndarray
    qmin: int
    qmax: int
    raw: bool = False
    axis: int | None = None

    def real(self) -> np.ndarray:
        """The real (float64) values."""
        scale = along(np.asarray(self.scale, np.float64) if self.axis is not None else self.scale, self.q.ndim,
                      self.axis)
        return scale * self.centred()

    def centred(self) -> np.ndarray:
        """``q - zero_point`` as float64 (exact)."""
        return (self.q - along(self.zero_point, self.q.ndim, self.axis)).astype(np.float64)

    def centred_int(self) -> np.ndarray:
        """``q - zero_point`` in the smallest integer dtype holding its range (exact)."""
        zp = np.asarray(self.zero_point, np.int64)
        dtype = smallest_int_dtype(self.qmin - int(zp.max()), self.qmax - int(zp.min()))
        return (self.q - along(self.zero_point, self.q.ndim, self.axis)).astype(dtype)

    def same_grid(self, tq: TensorQuant) -> bool:
        """Whether this tensor is already quantized like ``tq`` (same scale and zero point, same axis)."""
        return self.axis == tq.axis and same_scale(self.scale, tq.scale) and same_zero_point(self.zero_point,
                                                                                              tq.zero_point)

    def with_q(self, q: np.ndarray, **changes: Any) -> Ints:
        """A copy holding other integers (same quantization unless ``changes`` say otherwise)."""
        fields = {"scale": self.scale, "zero_point": self.zero_point, "qmin": self.qmin, "qmax": self.qmax,
                  "raw": self.raw, "axis": self.axis}
        fields.update(changes)
        return Ints(q=q, **fields)


@dataclass
class Param:
    """A DequantizeLinear'd integer initializer: ``real = scale * (q - zero_point)`` along ``axis``.

    Attributes:
        name: The initializer's name.
        q: The integers (int64).
        scale: One scale, or one per index of ``axis``.
        zero_point: Zero points, like ``scale``.
        axis: The per-channel axis (None for a per-tensor scale).
    """

    name: str
    q: np.ndarray
    scale: np.ndarray
    zero_point: np.ndarray
    axis: int | None

    def real(self) -> np.ndarray:
        """The real (float64) values."""
        scale = self.scale.astype(np.float64)
        zp = self.zero_point.astype(np.float64)
        if self.axis is not None and scale.size > 1:
            shape = [1] * self.q.ndim
            shape[self.axis] = -1
            scale, zp = scale.reshape(shape), zp.reshape(shape)
        return scale * (self.q.astype(np.float64) - zp)


#: Anything a tensor of the graph can be while the executor runs.
Value = np.ndarray | Ints | Param


def real(value: Value) -> np.ndarray:
    """The real values of a tensor: dequantized for :class:`Ints`/:class:`Param`, else the array itself."""
    if isinstance(value, (Ints, Param)):
        return value.real()
    return np.asarray(value)


def quantize(values: np.ndarray, tq: TensorQuant) -> np.ndarray:
    """``clip(round_half_even(values / scale) + zero_point, qmin, qmax)`` as int64.

    float32 input is divided in float32 (as ONNX QuantizeLinear), anything else in float64.
    """
    values = np.asarray(values)
    single = values.dtype == np.float32
    if tq.axis is not None:  # one scale and zero point per channel along the record's axis
        scale = along(np.asarray(tq.scale, np.float32 if single else np.float64), values.ndim, tq.axis)
        zero_point = along(np.asarray(tq.zero_point, np.int64), values.ndim, tq.axis)
        scaled = values / scale if single else values.astype(np.float64) / scale
        return np.clip(round_half_even(scaled).astype(np.int64) + zero_point, tq.qmin, tq.qmax)
    scaled = values / np.float32(tq.scale) if single else values.astype(np.float64) / float(tq.scale)
    q = round_half_even(scaled).astype(np.int64) + int(tq.zero_point)
    return np.clip(q, tq.qmin, tq.qmax)


def requantize(value: Value, tq: TensorQuant) -> Ints:
    """Hold ``value`` at the quantization ``tq`` (exact when it already is)."""
    if isinstance(value, Ints) and value.same_grid(tq):
        q = value.q if value.qmin >= tq.qmin and value.qmax <= tq.qmax else np.clip(value.q, tq.qmin, tq.qmax)
    else:
        q = quantize(real(value), tq)
    if tq.axis is not None:
        return Ints(q=q, scale=np.asarray(tq.scale, np.float64).reshape(-1),
                    zero_point=np.asarray(tq.zero_point, np.int64).reshape(-1), qmin=int(tq.qmin), qmax=int(tq.qmax),
                    axis=int(tq.axis))
    return Ints(q=q, scale=float(tq.scale), zero_point=int(tq.zero_point), qmin=int(tq.qmin), qmax=int(tq.qmax))


def exact_dtype(bound: float) -> np.dtype:
    """The fastest dtype whose matmul is exact when every partial sum stays below ``bound`` in magnitude.

    Sums of integer products are exact in float32 below 2**24 and in float64 below 2**53 (every
    intermediate value is then a representable integer); beyond that, int64.
    """
    if bound < EXACT_FLOAT32:
        return np.dtype(np.float32)
    if bound < EXACT_FLOAT64:
        return np.dtype(np.float64)
    logger.debug("accumulator bound %.3g exceeds 2**53: int64 matmul", bound)
    return np.dtype(np.int64)


def _max_abs(a: np.ndarray) -> float:
    if a.size == 0:
        return 0.0
    return float(max(abs(float(a.max())), abs(float(a.min()))))


def exact_matmul(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """``a @ b`` of integer-valued arrays (numpy broadcasting), exactly, as int64.

    Every partial sum is bounded by ``max|a| * max|b| * K`` (``K = a.shape[-1]``), which picks the dtype
    (:func:`exact_dtype`).
    """
    bound = _max_abs(a) * _max_abs(b) * (a.shape[-1] if a.ndim else 1)
    dtype = exact_dtype(bound)
    acc = np.matmul(a.astype(dtype, copy=False), b.astype(dtype, copy=False))
    return acc if dtype == np.int64 else acc.astype(np.int64)
