"""The CIM mode of the integer reference executor: every crossbar MAC through the crossbar model.

:class:`~maptools.quantization.reference.executor.ReferenceExecutor` runs exact MACs by default. Given a
:class:`~maptools.quantization.cim.spec.CIMSpec` (``ReferenceExecutor.load(mapname, cim=spec)``,
``simulate(mapname, inputs, cim=spec)``) it hands the accumulation step of every MAC with a constant,
quantized weight to :func:`~maptools.quantization.cim.arithmetic.cim_accumulate` instead of
:func:`~maptools.quantization.reference.mac.accumulate`, with the operands of the node's quantinfo record
(:func:`mac_operands`), and requantizes in the spec's ``requant`` arithmetic (:func:`requant_integer`).

What goes through the crossbar
------------------------------

* ``Conv``: the im2col columns of its centred input, one weight matrix per group. Padding enters as
  centred zeros (the input zero point), i.e. as real crossbar rows whose DAC code is the input offset.
* ``ConvTranspose``: the Conv of its zero-inserted input with the flipped kernel (the matrix of
  :func:`~maptools.quantization.cim.tiles.mac_matrix`); the inserted zeros are centred zeros like the
  padding, applied to the crossbar like any other input (a chip that skips them computes the same exact
  sum, and partial sums that are no larger).
* ``Gemm`` with a constant ``B`` and ``MatMul`` with a constant 2-D weight: their input rows are the columns.
* ``Gemm`` and ``MatMul`` of two activations are **not** crossbar operations (their "weight" changes with
  every input and would have to be written into the array at run time): they stay exact digital MACs in
  CIM mode.

Operands of the crossbar model (from the record, :func:`mac_operands`): ``input_bits`` is the bit width of
the MAC's input ``TensorQuant`` (``record.inputs[0]``), signed when its ``qmin < 0``, with its zero point
``zp_in``; ``weight_bits`` and ``weight_min`` are the record's. The columns handed to the crossbar are
centred, ``x = q - zp_in``; the DACs apply ``u = x + o`` with ``o = zp_in`` (``+ 2^(a-1)`` for a signed input),
and the chip removes ``o * sum_k w_k`` digitally (see :mod:`~maptools.quantization.cim.arithmetic`), so the
input zero point costs no accuracy.

Bias and requantization
-----------------------

The int32 bias of ``quantparams.pkl`` (scale ``s_in * s_w[c]``) is added to the int64 accumulator the
crossbar returns, digitally and exactly, before requantization -- as in the exact executor:
``acc = cim_acc + bias[c]``. Then, with ``m[c] = s_in * s_w[c] / s_out``:

* ``requant='float'``: the exact executor's arithmetic, unchanged (``real = acc * (s_in * s_w[c])``, then
  ``q = clip(round_half_even(real / s_out) + zp_out, qmin, qmax)``), so an ideal ADC with float
  requantization is bit-identical to the exact executor;
* ``requant='fixed_point'`` / ``'power_of_two'``: integer only, :func:`~maptools.quantization.cim.requant.requantize`
  with the int32 multiplier and shift of ``m[c]``:
  ``q = clip(((acc * M[c] + 2^(T[c]-1)) >> T[c]) + zp_out, qmin, qmax)``.

The float path is kept, in any requant mode, where no integer requantization exists: a MAC whose output
has no record (a fused activation such as ``Sigmoid`` or ``HardSwish`` reads the real accumulator), a bias
the map left in float, and a ``Gemm`` with ``alpha`` or ``beta`` other than 1 (their real factors apply to
the real values). Such nodes are logged at DEBUG level.

Analog cells
------------

With a :class:`~maptools.quantization.cim.device.DeviceModel` (``simulate(..., cim=spec, device=model,
seed=s)``) every crossbar MAC gets its own :class:`~maptools.quantization.cim.analog.AnalogMac`, seeded with
``child_seed(s, i)`` for the ``i``-th crossbar node in graph order: its cells are programmed on the first run
and read with noise on every run (see :doc:`/cim`, "Device non-idealities").

The calibration hook
--------------------

A :data:`MacHook` set on the executor (:meth:`ReferenceExecutor.with_cim
<maptools.quantization.reference.executor.ReferenceExecutor.with_cim>`) is called with the operands, the
weights and the columns of every crossbar MAC before it is accumulated; it sees the columns and changes no
result. :func:`~maptools.quantization.cimmap.mapcal.calibrate_map` uses it to collect partial sums.
"""

from __future__ import annotations

import hashlib
import logging
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from typing import Any

import numpy as np
import onnx

from maptools.errors import ArtifactError, InvalidArgumentError, InvalidTypeError
from maptools.quantization.cim.adc import AdcCalibration
from maptools.quantization.cim.analog import AnalogMac
from maptools.quantization.cim.arithmetic import adc_grid, cim_accumulate
from maptools.quantization.cim.requant import requant_multipliers, requantize
from maptools.quantization.cim.spec import CIMSpec
from maptools.quantization.intmath import INT32_MAX, INT32_MIN
from maptools.quantization.records import OperatorQuantConfig, TensorQuant
from maptools.quantization.reference.registry import describe
from maptools.quantization.reference.values import Ints, exact_matmul

__all__ = ["CimMode", "MacAccumulator", "MacHook", "MacOperands", "crossbar_fingerprint", "fold_batch", "mac_operands",
           "record_multipliers", "requant_integer"]

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class MacOperands:
    """What the crossbar model needs to know about one MAC node, read from its quantinfo record.

    Attributes:
        node: The node name (the key of ``quantinfo.pkl``).
        op_type: ``Conv``, ``ConvTranspose``, ``Gemm`` or ``MatMul``.
        input_bits: Bit width of the input ``TensorQuant`` ``a``.
        input_signed: Whether the input integers are signed (the input record's ``qmin < 0``).
        input_zero_point: The input zero point.
        weight_bits: The record's ``weight_bits``.
        weight_min: The record's ``weight_min`` (None for ``-2^(b-1)``).
    """

    node: str
    op_type: str
    input_bits: int
    input_signed: bool
    input_zero_point: int
    weight_bits: int
    weight_min: int | None

    def kwargs(self) -> dict[str, Any]:
        """The keyword arguments of :func:`~maptools.quantization.cim.arithmetic.cim_accumulate` (without ``spec``)."""
        return {"input_bits": self.input_bits, "input_signed": self.input_signed,
                "input_zero_point": self.input_zero_point, "weight_bits": self.weight_bits,
                "weight_min": self.weight_min}


def mac_operands(node: onnx.NodeProto, record: OperatorQuantConfig) -> MacOperands:
    """The crossbar operands of a MAC node with a constant weight, from its record.

    Raises:
        ArtifactError: The record has no input quantization or no weight bit width.
    """
    tq: TensorQuant | None = record.inputs[0] if record.inputs else None
    if tq is None or record.weight_bits is None:
        raise ArtifactError(f"quantinfo.pkl: {describe(node)} has no input quantization or weight bit width")
    weight_min = None if record.weight_min is None else int(record.weight_min)
    # a per-channel input (a depthwise Conv's, never on a crossbar: the executor refuses it with cim) is
    # accumulated exactly from its centred integers, where the zero point plays no part
    zero_point = int(tq.zero_point) if tq.axis is None else 0
    return MacOperands(node=node.name, op_type=node.op_type, input_bits=int(tq.bits), input_signed=int(tq.qmin) < 0,
                       input_zero_point=zero_point, weight_bits=int(record.weight_bits),
                       weight_min=weight_min)


#: Called with a crossbar MAC's operands, integer weights ``(..., M, K)`` and centred columns ``(..., K, P)``
#: before they are accumulated (must not modify them).
MacHook = Callable[[MacOperands, np.ndarray, np.ndarray], None]


@dataclass(frozen=True)
class CimMode:
    """The crossbar an executor simulates, with the ADC ranges of its MACs.

    Attributes:
        spec: The crossbar.
        adc: Node name -> the MAC's calibrated ADC ranges; used when ``spec.adc_bits`` is set and
            ``spec.adc_range == 'calibrated'``, ignored otherwise.
    """

    spec: CIMSpec
    adc: Mapping[str, AdcCalibration]

    def __post_init__(self) -> None:
        if not isinstance(self.spec, CIMSpec):
            raise InvalidTypeError(f"cim: got {type(self.spec).__name__}, expected a CIMSpec")

    @property
    def calibrated(self) -> bool:
        """Whether the MACs use calibrated ADC ranges (a real ADC with ``adc_range='calibrated'``)."""
        return self.spec.adc_bits is not None and self.spec.adc_range == "calibrated"

    def calibration(self, operands: MacOperands, depth: int) -> AdcCalibration | None:
        """The ADC calibration of one MAC (None unless :attr:`calibrated`), checked against it.

        Args:
            operands: The MAC.
            depth: Its dot-product length ``K``.

        Raises:
            InvalidArgumentError: No calibration for the node, or one made for another crossbar or MAC.
        """
        if not self.calibrated:
            return None
        adc = self.adc.get(operands.node)
        if adc is None:
            raise InvalidArgumentError(
                f"cim: spec {self.spec} has adc_range='calibrated' but the ADC calibration has no entry for node "
                f"{operands.node!r}; calibrate the map (maptools.quantization.cimmap.calibrate_map) or use "
                "adc_range='full'")
        grid = adc_grid(depth, operands.input_bits, operands.weight_bits, self.spec, weight_min=operands.weight_min)
        adc.check(self.spec, grid, weight_bits=operands.weight_bits, input_bits=operands.input_bits)
        return adc


class MacAccumulator:
    """The accumulation step of one MAC node in CIM mode or under a hook: ``(weights, columns) -> acc``.

    Args:
        operands: The node's crossbar operands.
        mode: The crossbar, or None for the exact accumulation.
        hook: Called before accumulating (see :data:`MacHook`), or None.
        analog: The node's cells on a simulated chip (see :mod:`~maptools.quantization.cim.analog`), or None
            for exact cells.
    """

    def __init__(self, operands: MacOperands, mode: CimMode | None, hook: MacHook | None,
                 analog: AnalogMac | None = None) -> None:
        self.operands = operands
        self.mode = mode
        self.hook = hook
        self.analog = analog

    def __call__(self, weights: np.ndarray, columns: np.ndarray) -> np.ndarray:
        """The int64 accumulator ``(..., M, P)`` of ``weights (..., M, K)`` and ``columns (..., K, P)``."""
        if self.mode is None and self.hook is None:
            return exact_matmul(weights, columns)
        folded, unfold = fold_batch(weights, columns)
        if self.hook is not None:
            self.hook(self.operands, weights, folded)
        if self.mode is None:
            return exact_matmul(weights, columns)
        adc = self.mode.calibration(self.operands, int(np.shape(weights)[-1]))
        return unfold(cim_accumulate(weights, folded, spec=self.mode.spec, adc=adc, analog=self.analog,
                                     **self.operands.kwargs()))


def fold_batch(weights: np.ndarray, columns: np.ndarray) -> tuple[np.ndarray, Callable[[np.ndarray], np.ndarray]]:
    """Move the batch axes of ``columns`` into its positions, so that one crossbar product covers the batch.

    A Conv hands ``weights (G, M, K)`` and ``columns (N, G, K, P)``: the leading axes the weights do not have
    (``N``) are independent inputs, which a crossbar processes like more output positions. Folding them
    into the last axis (``(G, K, N * P)``) gives the same accumulator (every position is computed on its
    own, the ADC ranges are shared by all of them) from a few large matrix products instead of many small ones.

    Returns:
        The folded columns and the function that unfolds an accumulator ``(..., M, N * P)`` back to
        ``(N, ..., M, P)`` (the identity when there is nothing to fold).
    """
    extra = columns.ndim - weights.ndim
    if extra <= 0 or tuple(columns.shape[extra:-2]) != tuple(weights.shape[:-2]):
        return columns, lambda acc: acc
    batch = columns.shape[:extra]
    lead, (k, p) = weights.shape[:-2], columns.shape[-2:]
    count = int(np.prod(batch))
    folded = np.moveaxis(columns.reshape(count, *lead, k, p), 0, -2).reshape(*lead, k, count * p)

    def unfold(acc: np.ndarray) -> np.ndarray:
        m = acc.shape[-2]
        return np.moveaxis(acc.reshape(*lead, m, count, p), -2, 0).reshape(*batch, *lead, m, p)

    return folded, unfold


def record_multipliers(s_in: float, record: OperatorQuantConfig, w_scale: np.ndarray | None = None) -> np.ndarray:
    """The real requantization multipliers ``m = s_in * s_w / s_out`` of a MAC, one per weight scale.

    Args:
        s_in: The input scale.
        record: The MAC's record (its ``outputs[0]`` is the target).
        w_scale: The weight scales (default: the record's ``weight_scale``).
    """
    scales = record.weight_scale if w_scale is None else w_scale
    return requant_multipliers(s_in, np.asarray(scales, np.float64).reshape(-1), record.outputs[0].scale)


def requant_integer(acc: np.ndarray, s_in: float, record: OperatorQuantConfig, channel_axis: int,
                    w_scale: np.ndarray, mode: str) -> Ints:
    """Integer-only requantization of an integer accumulator (bias included) to the output record.

    The accumulator is first saturated to int32, as a chip's 32-bit accumulator does: a channel whose bias
    saturated at quantization (tiny weights, a large bias: EfficientNet-Lite1's stem) plus a partial sum of
    the same sign can pass ``-2^31``, which the int32 x int32 multiplier cannot take.

    Args:
        acc: The int64 accumulator, bias added.
        s_in: The input scale.
        record: The node's record (its ``outputs[0]`` is the target).
        channel_axis: The output-channel axis of ``acc``.
        w_scale: The weight scale per output channel (one entry per channel of ``acc``, or one in all).
        mode: ``'fixed_point'`` or ``'power_of_two'``.

    Returns:
        The output integers at the record's quantization.
    """
    tq = record.outputs[0]
    saturated = np.clip(acc, INT32_MIN, INT32_MAX)
    if not np.array_equal(saturated, acc):
        logger.debug("%s: %d accumulator values saturated to int32", record.name, int((saturated != acc).sum()))
    acc = saturated
    m = record_multipliers(s_in, record, w_scale)
    axis: int | None = channel_axis % acc.ndim
    if m.size == 1:
        m, axis = m.reshape(()), None
    q = requantize(acc, m, int(tq.zero_point), int(tq.qmin), int(tq.qmax), mode=mode, channel_axis=axis)
    return Ints(q=q, scale=float(tq.scale), zero_point=int(tq.zero_point), qmin=int(tq.qmin), qmax=int(tq.qmax))



def crossbar_fingerprint(macs: Iterable[tuple[MacOperands, np.ndarray]]) -> str:
    """A SHA-256 of what the crossbars of a map hold: every crossbar MAC's operands and integer weights.

    Two executors with the same fingerprint give the same partial sums on the same inputs, so an ADC
    calibration made on one fits the other; it does not depend on how the map was stored.

    Args:
        macs: ``(operands, integer weight)`` of every crossbar MAC, in graph order.
    """
    digest = hashlib.sha256()
    for operands, weight in macs:
        w = np.ascontiguousarray(weight, dtype=np.int64)
        digest.update(repr((operands, w.shape)).encode())
        digest.update(w.tobytes())
    return digest.hexdigest()
