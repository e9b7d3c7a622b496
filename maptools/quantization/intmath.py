"""The integer arithmetic of a map, defined once: ranges, rounding, containers and the error measures.

Everything here is numpy only (no torch, no PPQ), so the engine, the exporter, the integer reference
executor, ``verify``, the command line, the benchmarks and the tests agree by construction:

* integer ranges: :func:`int_range` (signed ``-2^(b-1) .. 2^(b-1)-1`` or unsigned ``0 .. 2^b-1``),
  :func:`unsigned_range`, and :func:`bias_range` (the 32-bit bias, symmetric: ``-(2^31 - 1) .. 2^31 - 1``);
* the int32 accumulator: :data:`INT32_MIN` .. :data:`INT32_MAX`;
* rounding: half to even (:data:`ROUNDING`, recorded in the manifest), :func:`round_half_even`, and
  :func:`holds_integers`, whether an array holds whole numbers (:func:`as_integers` refuses one that does not);
* containers: :func:`container_dtype`, the dtype a quantized tensor is stored in (``quantparams.pkl`` and the
  QDQ model), and :func:`smallest_int_dtype`, the narrowest dtype holding a range (for computing);
* error measures: :func:`snr_db` and :func:`cosine` from accumulated sums (:func:`error_sums`), and
  :func:`snr_db_of` / :func:`cosine_of` on two arrays.
"""

from __future__ import annotations

from collections.abc import Iterable

import numpy as np

from maptools.errors import InvalidArgumentError

__all__ = [
    "BIAS_BITS",
    "INT32_MAX",
    "INT32_MIN",
    "ROUNDING",
    "as_integers",
    "bias_range",
    "container_dtype",
    "cosine",
    "cosine_of",
    "error_sums",
    "holds_integers",
    "int_range",
    "round_half_even",
    "smallest_int_dtype",
    "snr_db",
    "snr_db_of",
    "unsigned_range",
]

#: The rounding rule of every quantization maptools makes or checks: round half to even (PPQ's
#: ``RoundingPolicy.ROUND_HALF_EVEN``, numpy's :func:`numpy.rint`, ONNX ``QuantizeLinear``). The manifest
#: records it as ``rounding``.
ROUNDING = "half_even"
#: Bit width of Conv/ConvTranspose/Gemm biases (added to the int32 accumulator).
BIAS_BITS = 32
#: The range of the int32 accumulator of a MAC.
INT32_MIN, INT32_MAX = -(2**31), 2**31 - 1
#: Smallest denominator of :func:`cosine` (two all-zero tensors have cosine 0).
_COSINE_FLOOR = 1e-30


def int_range(bits: int, symmetric: bool = True) -> tuple[int, int]:
    """Integer range of a ``bits``-bit tensor: signed when ``symmetric``, else unsigned (:func:`unsigned_range`)."""
    if symmetric:
        return -(2 ** (bits - 1)), 2 ** (bits - 1) - 1
    return unsigned_range(bits)


def unsigned_range(bits: int) -> tuple[int, int]:
    """``(0, 2^bits - 1)``: asymmetric activations, and never-negative ones with ``unsigned_nonnegative``."""
    return 0, 2**bits - 1


def bias_range(bits: int = BIAS_BITS) -> tuple[int, int]:
    """Integer range of a bias: symmetric about 0, ``-(2^(b-1) - 1) .. 2^(b-1) - 1``."""
    return -(2 ** (bits - 1)) + 1, 2 ** (bits - 1) - 1


def round_half_even(values: np.ndarray, out: np.ndarray | None = None) -> np.ndarray:
    """Round to the nearest integer, ties to even (:data:`ROUNDING`); the dtype is kept (into ``out`` if given)."""
    return np.rint(values, out=out)


def holds_integers(values: np.ndarray) -> bool:
    """Whether an array holds integers: an integer dtype, or floats that are all whole numbers (no NaN, no inf)."""
    if values.dtype.kind in "iu":
        return True
    return values.dtype.kind == "f" and bool(np.isfinite(values).all() and np.array_equal(values, np.rint(values)))


def as_integers(values: object, name: str, what: str = "integer values") -> np.ndarray:
    """``values`` as an int64 array, refused unless it holds integers (:func:`holds_integers`).

    Raises:
        InvalidArgumentError: naming ``name``, when ``values`` holds anything but whole numbers.
    """
    array = np.asarray(values)
    if not holds_integers(array):
        raise InvalidArgumentError(f"{name}: expected {what}, got dtype {array.dtype}")
    return array.astype(np.int64, copy=False)


def container_dtype(bits: int, signed: bool = True) -> np.dtype:
    """The dtype a quantized tensor is stored in: int32 above 8 bits (biases), else int8, or uint8 if unsigned.

    Used for the integers of ``quantparams.pkl`` and of ``quant_model.onnx`` (QuantizeLinear outputs, integer
    initializers, the bounds of their Clip).
    """
    if bits > 8:
        return np.dtype(np.int32)
    return np.dtype(np.int8 if signed else np.uint8)


def smallest_int_dtype(qmin: int, qmax: int) -> np.dtype:
    """The smallest numpy integer dtype holding ``[qmin, qmax]`` (int64 beyond 32 bits)."""
    for dtype in (np.int8, np.uint8, np.int16, np.uint16, np.int32):
        info = np.iinfo(dtype)
        if info.min <= qmin and qmax <= info.max:
            return np.dtype(dtype)
    return np.dtype(np.int64)


def error_sums(reference: np.ndarray | Iterable[np.ndarray],
               candidate: np.ndarray | Iterable[np.ndarray]) -> np.ndarray:
    """``[sum r^2, sum (r - c)^2, sum r*c, sum c^2]`` in float64: what :func:`snr_db` and :func:`cosine` need.

    Sums of several batches (or of several outputs: give sequences of arrays) add up.
    """
    pairs = ([(reference, candidate)] if isinstance(reference, np.ndarray) or np.isscalar(reference)
             else zip(reference, candidate, strict=True))
    sums = np.zeros(4)
    for ref, cand in pairs:
        r = np.asarray(ref, dtype=np.float64)
        c = np.asarray(cand, dtype=np.float64)
        sums += (np.sum(r * r), np.sum((r - c) ** 2), np.sum(r * c), np.sum(c * c))
    return sums


def snr_db(signal: float, noise: float) -> float:
    """Signal-to-noise ratio in dB, ``10 log10(signal / noise)`` of two energies.

    ``inf`` without noise (the two tensors are equal), ``-inf`` without signal (and some noise).
    """
    if noise <= 0.0:
        return float("inf")
    if signal <= 0.0:
        return float("-inf")
    return float(10.0 * np.log10(signal / noise))


def cosine(dot: float, reference_power: float, candidate_power: float) -> float:
    """Cosine similarity ``dot / sqrt(reference_power * candidate_power)`` of accumulated sums.

    Not clipped to ``[-1, 1]``; 0 when either tensor is all zeros.
    """
    return float(dot / max(np.sqrt(reference_power * candidate_power), _COSINE_FLOOR))


def snr_db_of(reference: np.ndarray | Iterable[np.ndarray], candidate: np.ndarray | Iterable[np.ndarray]) -> float:
    """:func:`snr_db` of two arrays (or sequences of arrays, summed): ``10 log10(sum r^2 / sum (r - c)^2)``."""
    signal, noise, _, _ = error_sums(reference, candidate)
    return snr_db(signal, noise)


def cosine_of(reference: np.ndarray | Iterable[np.ndarray], candidate: np.ndarray | Iterable[np.ndarray]) -> float:
    """:func:`cosine` of two arrays (or sequences of arrays, summed), all elements flattened."""
    signal, _, dot, power = error_sums(reference, candidate)
    return cosine(dot, signal, power)
