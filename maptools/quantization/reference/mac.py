"""Multiply-accumulate operators: ``Conv``, ``ConvTranspose``, ``Gemm``, ``MatMul``.

Each computes the exact integer accumulator ``acc = sum((x - x_zp) * w) + bias`` and requantizes it with the
recorded scales (``real = acc * (s_in * s_w[channel])``). All four reduce to one step, :func:`accumulate`,
the product of an integer weight matrix (a crossbar of M columns of K rows) with columns of centred
integer inputs: a Conv builds its columns by im2col, a ConvTranspose runs as the Conv of its zero-inserted
input with the flipped kernel, Gemm and MatMul hand their input rows directly. A model of the
compute-in-memory array (row tiles, weight bit slices, ADC rounding) replaces :func:`accumulate` only: in
the executor's CIM mode (see :mod:`~maptools.quantization.reference.crossbar`) the handlers take the node's
accumulation step from :meth:`ReferenceExecutor.mac_accumulator
<maptools.quantization.reference.executor.ReferenceExecutor.mac_accumulator>` and requantize in the spec's
arithmetic (``requant_acc(..., mode=)``).
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np
import onnx

from maptools.errors import ArtifactError, UnsupportedOperatorError
from maptools.quantization.artifacts import QUANTMODEL
from maptools.quantization.format import bias_key, weight_key
from maptools.quantization.records import OperatorQuantConfig, TensorQuant
from maptools.quantization.reference import values
from maptools.quantization.reference.crossbar import requant_integer
from maptools.quantization.reference.registry import Executor, attrs, describe, register, string_attr
from maptools.quantization.reference.spatial import spatial_pads, window_slices
from maptools.quantization.reference.values import Ints, Value, along, describe_scale, real, requantize

__all__ = ["MacWeights", "accumulate", "conv", "conv_accumulator", "conv_transpose", "gemm", "im2col", "matmul"]

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class MacWeights:
    """The integer weight and bias of a MAC operator (from ``quantparams.pkl``, checked at load time).

    Attributes:
        weight: Integer weight (int64), in the ONNX layout of the operator.
        bias: Integer bias (int64, one per output channel), None without one.
    """

    weight: np.ndarray
    bias: np.ndarray | None


# -- the accumulation step -------------------------------------------------------------------------------
def accumulate(weights: np.ndarray, columns: np.ndarray) -> np.ndarray:
    """The exact integer accumulator of a MAC: ``weights @ columns`` as int64.

    This is the one step of the executor where products are summed; everything around it (im2col, bias,
    requantization) stays the same when it is replaced by a model of the hardware.

    Args:
        weights: Integer weights, shape ``(..., M, K)``: M output channels, each a dot product of length K
            (for a Conv, K = input channels per group x kernel taps).
        columns: Centred integer inputs ``q - zero_point``, shape ``(..., K, P)``: one column per output
            position (im2col of a Conv, the transposed input rows of a Gemm/MatMul).

    Returns:
        The sums, shape ``(..., M, P)`` (numpy broadcasting over the leading axes), int64, exact.
    """
    return values.exact_matmul(weights, columns)


#: An accumulation step ``(weights, columns) -> acc``: :func:`accumulate` or the crossbar's
#: (:class:`~maptools.quantization.reference.crossbar.MacAccumulator`).
Accumulate = Callable[[np.ndarray, np.ndarray], np.ndarray]


def _matmul_acc(a: np.ndarray, b: np.ndarray, accumulate_fn: Accumulate | None = None) -> np.ndarray:
    """``a @ b`` (ONNX MatMul broadcasting) through :func:`accumulate` (or ``accumulate_fn``), ``b`` the weights."""
    fn = accumulate if accumulate_fn is None else accumulate_fn
    squeeze_a, squeeze_b = a.ndim == 1, b.ndim == 1
    a = a[None, :] if squeeze_a else a
    b = b[:, None] if squeeze_b else b
    acc = np.swapaxes(fn(np.swapaxes(b, -1, -2), np.swapaxes(a, -1, -2)), -1, -2)
    if squeeze_a:
        acc = acc[..., 0, :]
    return acc[..., 0] if squeeze_b else acc


def im2col(xp: np.ndarray, kernel: list[int], strides: list[int], dilations: list[int], out_sizes: list[int],
           group: int) -> np.ndarray:
    """Columns of a padded ``(N, C, *spatial)`` input, shape ``(N, group, C / group * taps, prod(out_sizes))``.

    Row ``c * taps + t`` holds input channel ``c`` (within its group) at kernel tap ``t`` (taps in C order).
    """
    n, c = xp.shape[:2]
    cg, taps, positions = c // group, int(np.prod(kernel)), int(np.prod(out_sizes))
    cols = np.empty((n, group, cg, taps, positions), dtype=xp.dtype)
    for tap, (_, slices) in enumerate(window_slices(kernel, strides, dilations, out_sizes)):
        cols[:, :, :, tap, :] = xp[(slice(None), slice(None)) + slices].reshape(n, group, cg, -1)
    return cols.reshape(n, group, cg * taps, positions)


def conv_accumulator(xc: np.ndarray, weight: np.ndarray, strides: list[int], dilations: list[int],
                     pads: list[int], group: int, node: onnx.NodeProto,
                     accumulate_fn: Accumulate | None = None) -> np.ndarray:
    """The integer accumulator (without bias) of a 1-D or 2-D Conv of centred integers ``xc``: ``(N, M, *out)``.

    The columns are summed by :func:`accumulate`, or by ``accumulate_fn`` when given (the CIM mode).
    """
    if xc.ndim not in (3, 4) or weight.ndim != xc.ndim:
        raise UnsupportedOperatorError(f"{describe(node)}: only 1-D and 2-D convolutions are supported")
    one_d = xc.ndim == 3
    if one_d:  # run as 2-D with a height of one
        xc, weight = xc[:, :, None, :], weight[:, :, None, :]
        strides, dilations, pads = [1, *strides], [1, *dilations], [0, pads[0], 0, pads[1]]
    n, c, h, wd = xc.shape
    m, cg, kh, kw = weight.shape
    if c != cg * group or m % group:
        raise ArtifactError(
            f"{describe(node)}: input channels {c} do not match weight {list(weight.shape)} with group {group}"
        )
    xp = np.pad(xc, [(0, 0), (0, 0), (pads[0], pads[2]), (pads[1], pads[3])])
    out_h = (h + pads[0] + pads[2] - ((kh - 1) * dilations[0] + 1)) // strides[0] + 1
    out_w = (wd + pads[1] + pads[3] - ((kw - 1) * dilations[1] + 1)) // strides[1] + 1
    cols = im2col(xp, [kh, kw], strides, dilations, [out_h, out_w], group)
    fn = accumulate if accumulate_fn is None else accumulate_fn
    acc = fn(weight.reshape(group, m // group, cg * kh * kw), cols).reshape(n, m, out_h, out_w)
    return acc[:, :, 0, :] if one_d else acc


def _channel_scale(record: OperatorQuantConfig, channels: int, ndim: int, channel_axis: int) -> np.ndarray:
    """The weight scale per output channel, shaped to broadcast along ``channel_axis`` of an ``ndim`` array.

    A ConvTranspose with groups has one scale per output channel of a group (its weight axis 1), repeated
    for every group.
    """
    w_scale = np.asarray(record.weight_scale, dtype=np.float64).reshape(-1)
    if w_scale.size > 1:
        if w_scale.size != channels and channels % w_scale.size == 0:
            w_scale = np.tile(w_scale, channels // w_scale.size)
        shape = [1] * ndim
        shape[channel_axis] = -1
        w_scale = w_scale.reshape(shape)
    return w_scale


def _input_scale(s_in: float | np.ndarray, ndim: int, channel_axis: int) -> float | np.ndarray:
    """The input scale of a MAC: a number, or (a depthwise Conv's per-channel input) one per output channel."""
    if np.ndim(s_in) == 0:
        return float(s_in)
    return along(np.asarray(s_in, np.float64), ndim, channel_axis)


def requant_acc(acc: np.ndarray, s_in: float | np.ndarray, record: OperatorQuantConfig, channel_axis: int,
                real_bias: np.ndarray | None = None, mode: str = "float") -> Ints | np.ndarray:
    """``real = acc * (s_in * s_w[channel])`` (+ a real bias), requantized to the output record.

    Without an output record (the MAC feeds a fused activation that reads the accumulator), the real
    values themselves. ``mode`` ``'fixed_point'`` or ``'power_of_two'`` (a CIM spec's ``requant``) requantizes
    an integer accumulator with integers only
    (:func:`~maptools.quantization.reference.crossbar.requant_integer`); the float path stays where that
    does not apply (no output record, a real bias, a float accumulator).
    """
    has_output = bool(record.outputs) and record.outputs[0] is not None
    if mode != "float":
        if has_output and real_bias is None and acc.dtype.kind in "iu":
            w_scale = _channel_scale(record, acc.shape[channel_axis], 1, 0)
            return requant_integer(acc, s_in, record, channel_axis, w_scale, mode)
        logger.debug("%s: requantized in float (no output record, a real bias or alpha/beta)", record.name)
    w_scale = _channel_scale(record, acc.shape[channel_axis], acc.ndim, channel_axis)
    values_real = acc.astype(np.float64) * (_input_scale(s_in, acc.ndim, channel_axis) * w_scale)
    if real_bias is not None:
        values_real = values_real + real_bias
    if not has_output:
        return values_real
    return requantize(values_real, record.outputs[0])


def mac_input(node: onnx.NodeProto, value: Value | None, tq: TensorQuant) -> Ints:
    """The integer input of a MAC operator at its recorded quantization (requantized if held otherwise)."""
    if value is None:
        raise ArtifactError(f"{describe(node)}: missing activation input")
    if not (isinstance(value, Ints) and value.same_grid(tq)):
        logger.debug("%s: input requantized to its record (scale %s)", describe(node), describe_scale(tq.scale))
    return requantize(value, tq)


# -- load-time checks ----------------------------------------------------------------------------------------
def _quantized_activations(executor: Executor, node: onnx.NodeProto, count: int) -> None:
    """Check that a product of activations has its input and output quantization recorded."""
    record = executor.record(node)
    if record is None or not record.outputs or record.outputs[0] is None:
        raise UnsupportedOperatorError(f"{describe(node)}: {node.op_type} that is not quantized (no quantinfo record)")
    if len(record.inputs) < count or any(tq is None for tq in record.inputs[:count]):
        raise UnsupportedOperatorError(f"{describe(node)}: {node.op_type} of an unquantized input")


def prepare_mac(executor: Executor, node: onnx.NodeProto) -> MacWeights | None:
    """Fetch and check the integer weight and bias of a MAC operator (None: a product of two activations)."""
    record = executor.record(node)
    node_attrs = attrs(node)
    if node.op_type in ("Conv", "ConvTranspose"):
        kernel = node_attrs.get("kernel_shape")
        if kernel is not None and len(kernel) > 2:
            raise UnsupportedOperatorError(
                f"{describe(node)}: {len(kernel)}-D kernels are not supported by the integer reference "
                "executor (1-D and 2-D only)"
            )
    if node.op_type == "ConvTranspose" and ("output_shape" in node_attrs or string_attr(
            node_attrs, "auto_pad", "NOTSET") not in ("NOTSET", "VALID", "")):
        raise UnsupportedOperatorError(
            f"{describe(node)}: ConvTranspose with output_shape or auto_pad SAME_* is not supported "
            "(explicit pads only)"
        )
    w_key, b_key = weight_key(node.name, node.op_type), bias_key(node.name, node.op_type)
    if executor.quantparams.get(w_key) is None:  # missing, or None (a weight is never None)
        if node.op_type in ("MatMul", "Gemm") and node.input[1] not in executor.dq_sources:
            _quantized_activations(executor, node, 2)  # a product of two activations
            return None
        if record is None or record.weight_scale is None:
            raise UnsupportedOperatorError(
                f"{describe(node)} is not quantized (no quantinfo record, no integer weight); the integer "
                "reference executor runs quantized Conv/ConvTranspose/Gemm/MatMul only"
            )
        raise ArtifactError(f"quantparams.pkl has no {w_key!r} for {describe(node)}; re-run quantize")
    if record is None or record.weight_scale is None:
        raise ArtifactError(f"quantinfo.pkl has no weight quantization for {describe(node)}; re-run quantize")
    if not record.inputs or record.inputs[0] is None:
        raise ArtifactError(f"quantinfo.pkl: {describe(node)} has no input quantization")
    weight = np.asarray(executor.quantparams[w_key]).astype(np.int64)
    bias = executor.quantparams.get(b_key)
    bias = None if bias is None else np.asarray(bias).astype(np.int64).reshape(-1)
    producer = executor.dq_sources.get(node.input[1])
    if producer is not None and (producer.shape != weight.shape or not np.array_equal(producer, weight)):
        raise ArtifactError(
            f"the integer weight of {describe(node)} in {QUANTMODEL} differs from quantparams.pkl {w_key!r}"
        )
    if bias is not None and record.bias_scale is not None:
        expected = _input_scale(record.inputs[0].scale, 1, 0) * _channel_scale(record, bias.size, 1, 0)
        recorded = np.asarray(record.bias_scale, np.float64).reshape(-1)
        if recorded.size != expected.size or not np.allclose(recorded, expected, rtol=1e-4, atol=0.0):
            raise ArtifactError(f"quantinfo.pkl: bias scale of {describe(node)} is not input_scale * weight_scale")
    if node.op_type == "MatMul":
        if weight.ndim != 2:
            raise UnsupportedOperatorError(f"{describe(node)}: MatMul with a {weight.ndim}-D constant weight")
        _quantized_activations(executor, node, 1)
    if node.op_type == "Gemm" and record.weight_axis is not None \
            and record.weight_axis != (0 if int(node_attrs.get("transB", 0)) else 1):
        raise ArtifactError(f"quantinfo.pkl: {describe(node)} has per-channel weight scales along the input axis")
    return MacWeights(weight=weight, bias=bias)


def _real_bias(node: onnx.NodeProto, args: list[Value | None], scale: float = 1.0) -> np.ndarray | None:
    """A bias input the map left unquantized (None in quantparams.pkl), as real values times ``scale``."""
    if len(args) > 2 and args[2] is not None:
        logger.debug("%s: bias not quantized, added in float", describe(node))
        return scale * real(args[2]).astype(np.float64)
    return None


# -- handlers ------------------------------------------------------------------------------------------------
def _strides_dilations(node_attrs: dict[str, Any], dims: int) -> tuple[list[int], list[int]]:
    return list(node_attrs.get("strides") or [1] * dims), list(node_attrs.get("dilations") or [1] * dims)


@register("Conv", kind="integer", prepare=prepare_mac)
def conv(executor: Executor, node: onnx.NodeProto, args: list[Value | None],
         state: MacWeights) -> list[Value]:
    """Integer convolution: im2col and :func:`accumulate`, bias added as an integer."""
    record = executor.record(node)
    tq_in = record.inputs[0]
    xc = mac_input(node, args[0], tq_in).centred_int()
    node_attrs = attrs(node)
    kernel = list(state.weight.shape[2:])
    strides, dilations = _strides_dilations(node_attrs, len(kernel))
    pads = spatial_pads(node_attrs, list(xc.shape[2:]), kernel, strides, dilations)
    acc = conv_accumulator(xc, state.weight, strides, dilations, pads, int(node_attrs.get("group", 1)), node,
                           executor.mac_accumulator(node))
    if state.bias is not None:
        acc = acc + state.bias.reshape((1, -1) + (1,) * (acc.ndim - 2))
    real_bias = None if state.bias is not None else _real_bias(node, args)
    if real_bias is not None:
        real_bias = real_bias.reshape((1, -1) + (1,) * (acc.ndim - 2))
    return [requant_acc(acc, tq_in.scale, record, 1, real_bias, executor.requant_mode)]


@register("ConvTranspose", kind="integer", prepare=prepare_mac)
def conv_transpose(executor: Executor, node: onnx.NodeProto, args: list[Value | None],
                   state: MacWeights) -> list[Value]:
    """Integer transposed convolution, as the Conv of the zero-inserted input with the flipped kernel."""
    record = executor.record(node)
    tq_in = record.inputs[0]
    xc = mac_input(node, args[0], tq_in).centred_int()
    node_attrs = attrs(node)
    weight = state.weight
    kernel = list(weight.shape[2:])
    dims = len(kernel)
    if xc.ndim != dims + 2 or dims not in (1, 2):
        raise UnsupportedOperatorError(f"{describe(node)}: only 1-D and 2-D transposed convolutions are supported")
    strides, dilations = _strides_dilations(node_attrs, len(kernel))
    pads = list(node_attrs.get("pads") or [0] * (2 * dims))
    if string_attr(node_attrs, "auto_pad", "NOTSET") == "VALID":
        pads = [0] * (2 * dims)
    output_padding = list(node_attrs.get("output_padding") or [0] * dims)
    group = int(node_attrs.get("group", 1))
    c, mg = weight.shape[:2]
    if c != xc.shape[1] or c % group:
        raise ArtifactError(f"{describe(node)}: input channels {xc.shape[1]} do not match weight "
                            f"{list(weight.shape)} with group {group}")
    cg = c // group
    flipped = weight[(slice(None), slice(None)) + (slice(None, None, -1),) * dims]
    conv_weight = flipped.reshape(group, cg, mg, *kernel).swapaxes(1, 2).reshape(group * mg, cg, *kernel)
    sizes = [(n - 1) * s + 1 for n, s in zip(xc.shape[2:], strides, strict=True)]
    inserted = np.zeros(xc.shape[:2] + tuple(sizes), dtype=xc.dtype)
    inserted[(slice(None), slice(None)) + tuple(slice(None, None, s) for s in strides)] = xc
    begin = [d * (k - 1) - p for d, k, p in zip(dilations, kernel, pads[:dims], strict=True)]
    end = [d * (k - 1) - p + o for d, k, p, o in zip(dilations, kernel, pads[dims:], output_padding, strict=True)]
    crop = tuple(slice(max(0, -b), n - max(0, -e)) for b, e, n in zip(begin, end, sizes, strict=True))
    inserted = inserted[(slice(None), slice(None)) + crop]
    conv_pads = [max(0, b) for b in begin] + [max(0, e) for e in end]
    acc = conv_accumulator(inserted, conv_weight, [1] * dims, dilations, conv_pads, group, node,
                           executor.mac_accumulator(node))
    if state.bias is not None:
        acc = acc + state.bias.reshape((1, -1) + (1,) * dims)
    real_bias = None if state.bias is not None else _real_bias(node, args)
    if real_bias is not None:
        real_bias = real_bias.reshape((1, -1) + (1,) * dims)
    return [requant_acc(acc, tq_in.scale, record, 1, real_bias, executor.requant_mode)]


@register("Gemm", kind="integer", prepare=prepare_mac)
def gemm(executor: Executor, node: onnx.NodeProto, args: list[Value | None],
         state: MacWeights | None) -> list[Value]:
    """``alpha * A' @ B' + beta * C``: integer accumulator, ``alpha``/``beta`` applied to the real values."""
    record = executor.record(node)
    node_attrs = attrs(node)
    trans_a, trans_b = int(node_attrs.get("transA", 0)), int(node_attrs.get("transB", 0))
    alpha, beta = float(node_attrs.get("alpha", 1.0)), float(node_attrs.get("beta", 1.0))
    if state is None:  # B is an activation
        xa = mac_input(node, args[0], record.inputs[0])
        xb = mac_input(node, args[1], record.inputs[1])
        a, b = xa.centred_int(), xb.centred_int()
        acc = _matmul_acc(a.T if trans_a else a, b.T if trans_b else b)
        values_real = acc.astype(np.float64) * (alpha * float(xa.scale) * float(xb.scale))
        bias = _real_bias(node, args, beta)
        return [requantize(values_real if bias is None else values_real + bias, record.outputs[0])]
    tq_in = record.inputs[0]
    a = mac_input(node, args[0], tq_in).centred_int()
    a = a.T if trans_a else a
    b = state.weight.T if trans_b else state.weight
    acc = _matmul_acc(a, b, executor.mac_accumulator(node))
    real_bias = None
    if alpha == 1.0 and beta == 1.0:
        if state.bias is not None:
            acc = acc + state.bias.reshape(1, -1)
    else:
        acc_scale = float(tq_in.scale) * np.asarray(record.weight_scale, np.float64).reshape(1, -1)
        acc = acc.astype(np.float64) * alpha
        if state.bias is not None:
            real_bias = beta * state.bias.reshape(1, -1).astype(np.float64) * acc_scale
    if state.bias is None:
        real_bias = _real_bias(node, args, beta)
    return [requant_acc(acc, tq_in.scale, record, 1, real_bias, executor.requant_mode)]


@register("MatMul", kind="integer", prepare=prepare_mac)
def matmul(executor: Executor, node: onnx.NodeProto, args: list[Value | None],
           state: MacWeights | None) -> list[Value]:
    """Integer matrix product with a constant weight, or of two quantized activations."""
    record = executor.record(node)
    if state is not None:
        tq_in = record.inputs[0]
        a = mac_input(node, args[0], tq_in).centred_int()
        acc = _matmul_acc(a, state.weight, executor.mac_accumulator(node))
        return [requant_acc(acc, tq_in.scale, record, acc.ndim - 1, None, executor.requant_mode)]
    xa = mac_input(node, args[0], record.inputs[0])
    xb = mac_input(node, args[1], record.inputs[1])
    acc = _matmul_acc(xa.centred_int(), xb.centred_int())
    values_real = acc.astype(np.float64) * (float(xa.scale) * float(xb.scale))
    return [requantize(values_real, record.outputs[0])]
