"""Integer reference executor: run a quantized map the way integer hardware would.

:func:`simulate` reads only the files of ``mapsave/<mapname>`` -- the graph structure from
``quant_model.onnx``, every number from ``quantinfo.pkl`` and ``quantparams.pkl`` -- and executes the
network with integer tensors. It imports neither PPQ nor onnxruntime, only numpy and onnx.

.. code-block:: python

    from maptools.quantization.reference import simulate
    outputs = simulate('digits_w4a4', {'input': images})                     # {'logits': float32 array}
    outputs, integers = simulate('digits_w4a4', images, return_integers=True)
    integers['/block1/conv1/Conv']                                           # what the tile outputs

Semantics
---------

Every tensor between operators is an integer tensor ``q`` with ``real = scale * (q - zero_point)``.

* ``QuantizeLinear -> [Clip] -> DequantizeLinear`` chains of the QDQ model are the quantization
  boundaries: ``q = clip(round_half_even(real / scale) + zero_point, qmin, qmax)``. Each one is matched to
  the ``TensorQuant`` of ``quantinfo.pkl`` of the same tensor name (falling back to the node's own
  initializers when no record carries that name); a record that disagrees with the node is an
  :class:`~maptools.errors.ArtifactError`. A QuantizeLinear applied to a tensor already held as integers
  with the same scale and zero point is exact (only the clip applies).
* ``Conv``, ``Gemm`` and ``MatMul`` multiply-accumulate integers exactly: ``acc = sum((x - x_zp) * w) +
  bias`` with the integer weights and int32 biases of ``quantparams.pkl``, then requantize with the
  recorded scales: ``real = acc * (s_in * s_w[channel])``, ``q = clip(round_half_even(real / s_out) +
  zp_out, qmin, qmax)``. The products are summed by BLAS in float32 when every partial sum provably stays
  below 2**24, in float64 below 2**53 (both exact: all intermediate values are representable integers),
  else by an int64 matmul. An input held at another scale than the operator's recorded input
  quantization (or not quantized at all) is first requantized to the recorded one, exactly as an
  integer chip fed from that record would need.
* ``Relu``, ``MaxPool`` and the layout operators (``Flatten``, ``Reshape``, ``Transpose``,
  ``Squeeze``, ``Unsqueeze``, ``Identity``, ``Slice``, ``Concat`` of equally quantized inputs, ``Pad``
  with a value on the integer grid) act on the integers directly, which is exact.
* ``Add``, ``Sub``, ``Mul``, ``Div``, ``Clip``, ``AveragePool``, ``GlobalAveragePool``, ``Concat`` of
  differently quantized inputs and the activation functions ``Sigmoid``, ``HardSigmoid``, ``HardSwish``
  and ``Tanh`` dequantize, compute in float64 and requantize.
* A MAC operator whose output has no record feeds an activation fused into it (``Conv -> Sigmoid``,
  ``Conv -> x * HardSigmoid(x)``, see :mod:`maptools.quantization.engine.fusion`): the activation reads
  the real accumulator value, ``acc * (s_in * s_w[channel])``, and only its result is requantized.
* After every operator that has a record in ``quantinfo.pkl``, its output is held at the record's
  ``outputs[0]`` quantization (requantized if it was not already): these integers are what a tile sees,
  and what ``return_integers=True`` returns.

Inputs of the graph are float32 and quantized in float32 arithmetic, like ONNX ``QuantizeLinear``; every
internal requantization divides in float64.

Relation to PPQ's simulation
----------------------------

Where PPQ quantizes every tensor it hands to a MAC operator, this executor computes the same integers as
PPQ's fake-quantized float32 simulation, up to rounding ties of PPQ's float32 arithmetic (bit-exact on the
4-bit maps tried). PPQ 0.6.6 may however pass a tensor *unquantized* to some consumers although
``quantinfo.pkl`` records its quantization -- typically a residual ``Relu`` (or ``MaxPool``) output that feeds
both a ``Conv`` and an ``Add``: PPQ quantizes it only at the ``Add`` input, and the ``Conv`` multiplies float
values, which integer hardware cannot do. ``quant_model.onnx`` reproduces PPQ there (no QuantizeLinear on
that edge); this executor follows ``quantinfo.pkl`` and quantizes it, so its outputs differ from PPQ's and
onnxruntime's on such maps.
"""

from __future__ import annotations

import logging
import math
import os
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any, Literal, overload

import numpy as np
import onnx
from onnx import numpy_helper

from maptools.errors import (
    ArtifactError,
    InvalidArgumentError,
    InvalidTypeError,
    MaptoolsError,
    ModelError,
    UnsupportedOperatorError,
)
from maptools.quantization.artifacts import QUANTMODEL, read_artifact_bytes, read_quantinfo, read_quantparams
from maptools.quantization.records import OperatorQuantConfig, TensorQuant

__all__ = ["SUPPORTED_OPS", "ReferenceExecutor", "simulate"]

logger = logging.getLogger(__name__)

_BOUNDARY_OPS = frozenset({"QuantizeLinear", "DequantizeLinear"})
_MAC_OPS = frozenset({"Conv", "Gemm", "MatMul"})
_LAYOUT_OPS = frozenset({"Flatten", "Reshape", "Transpose", "Squeeze", "Unsqueeze", "Identity", "Slice"})
_ELEMENTWISE = {"Add": np.add, "Sub": np.subtract, "Mul": np.multiply, "Div": np.divide}


def _hard_sigmoid(x: np.ndarray, attrs: Mapping[str, Any]) -> np.ndarray:
    return np.clip(float(attrs.get("alpha", 0.2)) * x + float(attrs.get("beta", 0.5)), 0.0, 1.0)


#: Activation functions computed in float64 on the dequantized input (or on a fused MAC's accumulator).
_ACTIVATIONS: dict[str, Callable[[np.ndarray, Mapping[str, Any]], np.ndarray]] = {
    "Sigmoid": lambda x, attrs: 0.5 * (1.0 + np.tanh(0.5 * x)),  # 1 / (1 + exp(-x)), without overflow
    "HardSigmoid": _hard_sigmoid,
    "HardSwish": lambda x, attrs: x * np.clip(x / 6.0 + 0.5, 0.0, 1.0),
    "Tanh": lambda x, attrs: np.tanh(x),
}
#: Operator types :func:`simulate` executes (QuantizeLinear/DequantizeLinear are the quantization boundaries).
SUPPORTED_OPS: frozenset[str] = frozenset(
    _BOUNDARY_OPS | _MAC_OPS | _LAYOUT_OPS | set(_ELEMENTWISE) | set(_ACTIVATIONS)
    | {"Relu", "Clip", "Concat", "MaxPool", "AveragePool", "GlobalAveragePool", "Constant", "Pad"}
)
_EXACT_FLOAT32 = float(2**24)
_EXACT_FLOAT64 = float(2**53)
_SCALE_RTOL = 1e-5


# -- values flowing through the graph -------------------------------------------------------------
@dataclass
class _Ints:
    """An integer tensor: ``real = scale * (q - zero_point)``, ``q`` in ``[qmin, qmax]``.

    ``raw`` marks integers between a QuantizeLinear and its DequantizeLinear (not yet an activation).
    """

    q: np.ndarray
    scale: float
    zero_point: int
    qmin: int
    qmax: int
    raw: bool = False

    def real(self) -> np.ndarray:
        """The real (float64) values."""
        return self.scale * (self.q - self.zero_point).astype(np.float64)

    def centred(self) -> np.ndarray:
        """``q - zero_point`` as float64 (exact)."""
        return (self.q - self.zero_point).astype(np.float64)

    def same_grid(self, tq: TensorQuant) -> bool:
        """Whether this tensor is already quantized like ``tq`` (same scale and zero point)."""
        return _same_scale(self.scale, tq.scale) and self.zero_point == tq.zero_point

    def with_q(self, q: np.ndarray, **changes: Any) -> _Ints:
        """A copy holding other integers (same quantization unless ``changes`` say otherwise)."""
        fields = {"scale": self.scale, "zero_point": self.zero_point, "qmin": self.qmin, "qmax": self.qmax,
                  "raw": self.raw}
        fields.update(changes)
        return _Ints(q=q, **fields)


@dataclass
class _Param:
    """A DequantizeLinear'd integer initializer: ``real = scale * (q - zero_point)`` along ``axis``."""

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


Value = np.ndarray | _Ints | _Param
Outputs = dict[str, np.ndarray]


def _same_scale(a: float, b: float) -> bool:
    return abs(a - b) <= _SCALE_RTOL * max(abs(a), abs(b), 1e-30)


def _real(value: Value) -> np.ndarray:
    if isinstance(value, (_Ints, _Param)):
        return value.real()
    return np.asarray(value)


def _quantize(real: np.ndarray, tq: TensorQuant) -> np.ndarray:
    """``clip(round_half_even(real / scale) + zero_point, qmin, qmax)`` as int64.

    float32 input is divided in float32 (as ONNX QuantizeLinear), anything else in float64.
    """
    real = np.asarray(real)
    single = real.dtype == np.float32
    scaled = real / np.float32(tq.scale) if single else real.astype(np.float64) / float(tq.scale)
    q = np.rint(scaled).astype(np.int64) + int(tq.zero_point)
    return np.clip(q, tq.qmin, tq.qmax)


def _requantize(value: Value, tq: TensorQuant) -> _Ints:
    """Hold ``value`` at the quantization ``tq`` (exact when it already is)."""
    if isinstance(value, _Ints) and value.same_grid(tq):
        q = value.q if value.qmin >= tq.qmin and value.qmax <= tq.qmax else np.clip(value.q, tq.qmin, tq.qmax)
    else:
        q = _quantize(_real(value), tq)
    return _Ints(q=q, scale=float(tq.scale), zero_point=int(tq.zero_point), qmin=int(tq.qmin), qmax=int(tq.qmax))


def _int_dtype(qmin: int, qmax: int) -> np.dtype:
    for dtype in (np.int8, np.uint8, np.int16, np.uint16, np.int32):
        info = np.iinfo(dtype)
        if info.min <= qmin and qmax <= info.max:
            return np.dtype(dtype)
    return np.dtype(np.int64)


def _exact_dtype(bound: float) -> np.dtype:
    """The fastest dtype whose matmul is exact when every partial sum stays below ``bound`` in magnitude.

    Sums of integer products are exact in float32 below 2**24 and in float64 below 2**53 (every
    intermediate value is then a representable integer); beyond that, int64.
    """
    if bound < _EXACT_FLOAT32:
        return np.dtype(np.float32)
    if bound < _EXACT_FLOAT64:
        return np.dtype(np.float64)
    logger.debug("accumulator bound %.3g exceeds 2**53: int64 matmul", bound)
    return np.dtype(np.int64)


def _exact_matmul(a: np.ndarray, b: np.ndarray, bound: float) -> np.ndarray:
    """``a @ b`` of integer-valued arrays, exactly, as int64 (``bound``: see :func:`_exact_dtype`)."""
    dtype = _exact_dtype(bound)
    return np.matmul(a.astype(dtype), b.astype(dtype)).astype(np.int64)


# -- attributes and small helpers --------------------------------------------------------------------
def _attrs(node: onnx.NodeProto) -> dict[str, Any]:
    return {a.name: onnx.helper.get_attribute_value(a) for a in node.attribute}


def _describe(node: onnx.NodeProto) -> str:
    return f"node {node.name!r} ({node.op_type})"


def _declared_type(value_info: onnx.ValueInfoProto) -> tuple[list[int | None] | None, np.dtype]:
    """Declared dims of a graph input (None for a dynamic dim; None for an unknown rank) and numpy dtype."""
    tensor_type = value_info.type.tensor_type
    dims = None
    if tensor_type.HasField("shape"):
        dims = [d.dim_value if d.HasField("dim_value") and d.dim_value > 0 else None for d in tensor_type.shape.dim]
    try:
        dtype = np.dtype(onnx.helper.tensor_dtype_to_np_dtype(tensor_type.elem_type))
    except Exception:  # undefined element type
        dtype = np.dtype(np.float32)
    return dims, dtype


def _spatial_pads(attrs: dict[str, Any], in_sizes: list[int], kernel: list[int], strides: list[int],
                  dilations: list[int]) -> list[int]:
    """Explicit ``[begin..., end...]`` pads from ``pads`` / ``auto_pad``."""
    dims = len(in_sizes)
    auto_pad = attrs.get("auto_pad", b"NOTSET")
    auto_pad = auto_pad.decode() if isinstance(auto_pad, bytes) else str(auto_pad)
    if auto_pad in ("NOTSET", ""):
        pads = list(attrs.get("pads", [0] * (2 * dims)))
        return pads if pads else [0] * (2 * dims)
    if auto_pad == "VALID":
        return [0] * (2 * dims)
    begin, end = [], []
    for size, k, s, d in zip(in_sizes, kernel, strides, dilations, strict=True):
        out = -(-size // s)
        total = max(0, (out - 1) * s + (k - 1) * d + 1 - size)
        small, large = total // 2, total - total // 2
        begin.append(small if auto_pad == "SAME_UPPER" else large)
        end.append(large if auto_pad == "SAME_UPPER" else small)
    return begin + end


def _window_slices(kernel: list[int], strides: list[int], dilations: list[int], out_sizes: list[int]):
    """Yield ``(kernel offset, tuple of spatial slices)`` for every kernel position."""
    for offset in np.ndindex(*kernel):
        slices = tuple(
            slice(o * d, o * d + s * (n - 1) + 1, s)
            for o, s, d, n in zip(offset, strides, dilations, out_sizes, strict=True)
        )
        yield offset, slices


def _pool(x: np.ndarray, kernel: list[int], strides: list[int], pads: list[int], dilations: list[int],
          ceil_mode: bool, reduce: Callable[[np.ndarray, np.ndarray], np.ndarray], pad_value: float,
          extra_value: float | None = None) -> np.ndarray:
    """Sliding-window reduction over the spatial axes of ``x`` (N, C, *spatial).

    ``pad_value`` fills the explicit pads, ``extra_value`` (default ``pad_value``) the extra end padding
    ``ceil_mode`` may need.
    """
    dims = len(kernel)
    sizes = list(x.shape[2:])
    begin, end = pads[:dims], pads[dims:]
    out_sizes, extra = [], []
    for size, k, s, d, b, e in zip(sizes, kernel, strides, dilations, begin, end, strict=True):
        span = (k - 1) * d + 1
        total = size + b + e - span
        out = (-(-total // s) if ceil_mode else total // s) + 1
        if ceil_mode and (out - 1) * s >= size + b:
            out -= 1
        out_sizes.append(out)
        extra.append(max(0, (out - 1) * s + span - (size + b + e)))
    widths = [(0, 0), (0, 0)] + [(b, e) for b, e in zip(begin, end, strict=True)]
    xp = np.pad(x, widths, constant_values=pad_value)
    if any(extra):
        fill = pad_value if extra_value is None else extra_value
        xp = np.pad(xp, [(0, 0), (0, 0)] + [(0, n) for n in extra], constant_values=fill)
    result = None
    for _, slices in _window_slices(kernel, strides, dilations, out_sizes):
        window = xp[(slice(None), slice(None)) + slices]
        result = window.copy() if result is None else reduce(result, window)
    return result


# -- the executor -----------------------------------------------------------------------------------
class ReferenceExecutor:
    """The integer executor of one map, loaded once and run on any number of batches.

    Args:
        model: ``quant_model.onnx`` of the map.
        quantinfo: ``quantinfo.pkl`` of the map (node name -> :class:`OperatorQuantConfig`).
        quantparams: ``quantparams.pkl`` of the map (integer weights and biases).

    Raises:
        UnsupportedOperatorError: the graph holds an operator this executor cannot run.
        ArtifactError: the three files disagree (a missing record, weight or mismatched quantization).
    """

    def __init__(self, model: onnx.ModelProto, quantinfo: Mapping[str, OperatorQuantConfig],
                 quantparams: Mapping[str, np.ndarray | None]) -> None:
        self.model = model
        self.quantinfo = dict(quantinfo)
        self.quantparams = dict(quantparams)
        graph = model.graph
        self._initializers = {init.name: numpy_helper.to_array(init) for init in graph.initializer}
        self.input_names = [vi.name for vi in graph.input if vi.name not in self._initializers]
        self._input_types = {vi.name: _declared_type(vi) for vi in graph.input if vi.name not in self._initializers}
        self.output_names = [vi.name for vi in graph.output]
        self._nodes = list(graph.node)
        self._check_supported()
        self._consumers: dict[str, list[onnx.NodeProto]] = {}
        for node in self._nodes:
            for name in node.input:
                self._consumers.setdefault(name, []).append(node)
        self._records: dict[str, list[TensorQuant]] = {}
        for config in self.quantinfo.values():
            for tq in list(config.inputs) + list(config.outputs):
                if tq is not None:
                    self._records.setdefault(tq.name, []).append(tq)
        self._dq_sources = {node.output[0]: self._initializers[node.input[0]].astype(np.int64) for node in self._nodes
                            if node.op_type == "DequantizeLinear" and node.input[0] in self._initializers}
        self._boundary: dict[str, TensorQuant] = {}
        self._weights: dict[str, tuple[np.ndarray, np.ndarray | None]] = {}
        for node in self._nodes:
            if node.op_type == "QuantizeLinear":
                self._boundary[node.name] = self._resolve_boundary(node)
            elif node.op_type in _MAC_OPS:
                self._prepare_mac(node)

    # -- loading ----------------------------------------------------------------------------------
    @classmethod
    def load(cls, mapname: str, mapsave_dir: str | os.PathLike | None = None) -> ReferenceExecutor:
        """Load ``mapsave/<mapname>`` (each file checked against the manifest).

        Args:
            mapname: The map name given to ``quantize``.
            mapsave_dir: The mapsave directory (default ``$MAPTOOLS_MAPSAVE`` or ``./mapsave``).

        Raises:
            MapNotFoundError: no such map.
            ArtifactError: a file is missing, modified, corrupt, or the files disagree.
            UnsupportedOperatorError: the graph holds an operator this executor cannot run.
        """
        data = read_artifact_bytes(mapname, QUANTMODEL, mapsave_dir)
        try:
            model = onnx.load_from_string(data)
        except Exception as exc:
            raise ArtifactError(f"{QUANTMODEL} of map {mapname!r}: not a readable ONNX model ({exc})") from None
        return cls(model, read_quantinfo(mapname, mapsave_dir), read_quantparams(mapname, mapsave_dir))

    def _check_supported(self) -> None:
        for node in self._nodes:
            if node.domain not in ("", "ai.onnx") or node.op_type not in SUPPORTED_OPS:
                raise UnsupportedOperatorError(
                    f"{_describe(node)}: operator type {node.op_type!r} is not supported by the integer "
                    f"reference executor (supported: {', '.join(sorted(SUPPORTED_OPS))})"
                )
            if node.op_type in ("Conv", "MaxPool", "AveragePool"):
                kernel = _attrs(node).get("kernel_shape")
                if kernel is not None and len(kernel) > 2:
                    raise UnsupportedOperatorError(
                        f"{_describe(node)}: {len(kernel)}-D kernels are not supported by the integer reference "
                        "executor (1-D and 2-D only)"
                    )

    def _resolve_boundary(self, node: onnx.NodeProto) -> TensorQuant:
        """The ``TensorQuant`` a QuantizeLinear applies: the quantinfo record of its tensor, else its own numbers."""
        scale_name = node.input[1]
        zp_name = node.input[2] if len(node.input) > 2 and node.input[2] else ""
        if scale_name not in self._initializers or (zp_name and zp_name not in self._initializers):
            raise ArtifactError(f"{QUANTMODEL}: {_describe(node)} has a non-constant scale or zero point")
        scale = self._initializers[scale_name]
        if scale.size != 1:
            raise UnsupportedOperatorError(f"{_describe(node)}: per-channel activation quantization is not supported")
        zp_arr = self._initializers[zp_name] if zp_name else np.zeros((), np.uint8)
        q_scale, q_zp = float(scale.reshape(-1)[0]), int(zp_arr.reshape(-1)[0])
        info = np.iinfo(zp_arr.dtype)
        lo, hi = int(info.min), int(info.max)
        chain_end = node.output[0]
        consumers = self._consumers.get(node.output[0], [])
        if len(consumers) == 1 and consumers[0].op_type == "Clip":
            clip = consumers[0]
            bounds = [self._initializers.get(name) if name else None for name in list(clip.input[1:3])]
            if bounds and bounds[0] is not None:
                lo = max(lo, int(bounds[0]))
            if len(bounds) > 1 and bounds[1] is not None:
                hi = min(hi, int(bounds[1]))
            chain_end = clip.output[0]
        consumers = self._consumers.get(chain_end, [])
        names = [node.input[0]] + [c.output[0] for c in consumers if c.op_type == "DequantizeLinear"]
        candidates = [tq for name in names for tq in self._records.get(name, [])]
        for tq in candidates:
            if _same_scale(tq.scale, q_scale) and tq.zero_point == q_zp:
                if (tq.qmin, tq.qmax) != (lo, hi):
                    raise ArtifactError(
                        f"{QUANTMODEL}: {_describe(node)} clips {node.input[0]!r} to [{lo}, {hi}] but "
                        f"quantinfo records [{tq.qmin}, {tq.qmax}]"
                    )
                return tq
        if candidates:
            recorded = ", ".join(f"scale {t.scale:.6g} zp {t.zero_point}" for t in candidates)
            raise ArtifactError(
                f"{QUANTMODEL}: {_describe(node)} quantizes {node.input[0]!r} with scale {q_scale:.6g}, zero point "
                f"{q_zp}, but quantinfo records {recorded} for that tensor"
            )
        bits = max(1, math.ceil(math.log2(hi - lo + 1)))
        logger.debug("%s: no quantinfo record for %r, using the node's own scale %.6g", _describe(node),
                     node.input[0], q_scale)
        return TensorQuant(name=node.input[0], bits=bits, scale=q_scale, zero_point=q_zp, qmin=lo, qmax=hi)

    def _record(self, node: onnx.NodeProto) -> OperatorQuantConfig | None:
        return self.quantinfo.get(node.name)

    def _prepare_mac(self, node: onnx.NodeProto) -> None:
        """Fetch and check the integer weight and bias of a Conv/Gemm/MatMul with a constant weight."""
        record = self._record(node)
        family = "conv" if node.op_type == "Conv" else "gemm"
        w_key, b_key = f"{node.name}_{family}_weight", f"{node.name}_{family}_bias"
        if w_key not in self.quantparams:
            if node.op_type == "MatMul" and node.input[1] not in self._dq_sources:
                return  # a product of two activations
            if record is None or record.weight_scale is None:
                raise UnsupportedOperatorError(
                    f"{_describe(node)} is not quantized (no quantinfo record, no integer weight); the integer "
                    "reference executor runs quantized Conv/Gemm/MatMul only"
                )
            raise ArtifactError(f"quantparams.pkl has no {w_key!r} for {_describe(node)}; re-run quantize")
        if record is None or record.weight_scale is None:
            raise ArtifactError(f"quantinfo.pkl has no weight quantization for {_describe(node)}; re-run quantize")
        if not record.inputs or record.inputs[0] is None:
            raise ArtifactError(f"quantinfo.pkl: {_describe(node)} has no input quantization")
        weight = np.asarray(self.quantparams[w_key]).astype(np.int64)
        bias = self.quantparams.get(b_key)
        bias = None if bias is None else np.asarray(bias).astype(np.int64).reshape(-1)
        producer = self._dq_sources.get(node.input[1])
        if producer is not None and (producer.shape != weight.shape or not np.array_equal(producer, weight)):
            raise ArtifactError(
                f"the integer weight of {_describe(node)} in {QUANTMODEL} differs from quantparams.pkl {w_key!r}"
            )
        if bias is not None and record.bias_scale is not None:
            expected = float(record.inputs[0].scale) * record.weight_scale.astype(np.float64)
            if not np.allclose(record.bias_scale.astype(np.float64), expected, rtol=1e-4, atol=0.0):
                raise ArtifactError(
                    f"quantinfo.pkl: bias scale of {_describe(node)} is not input_scale * weight_scale"
                )
        self._weights[node.name] = (weight, bias)

    # -- running ----------------------------------------------------------------------------------
    def check_inputs(self, inputs: Mapping[str, Any] | Any) -> dict[str, np.ndarray]:
        """Normalise ``inputs`` to ``{graph input name: float32 array}``.

        Raises:
            InvalidArgumentError: a bare array for a multi-input model, missing or unknown input names, or an
                array of the wrong rank.
            InvalidTypeError: an input that is not a numpy array or torch tensor.
        """
        if not isinstance(inputs, Mapping):
            if len(self.input_names) != 1:
                raise InvalidArgumentError(
                    f"inputs: a bare array was given but the model has {len(self.input_names)} inputs "
                    f"{self.input_names}; pass a dict input name -> array"
                )
            inputs = {self.input_names[0]: inputs}
        unknown = sorted(set(inputs) - set(self.input_names))
        missing = [name for name in self.input_names if name not in inputs]
        if unknown or missing:
            raise InvalidArgumentError(
                f"inputs: expected exactly the graph inputs {self.input_names}; "
                + (f"missing {missing}" if missing else "")
                + ("; " if missing and unknown else "")
                + (f"unknown {unknown}" if unknown else "")
            )
        feed: dict[str, np.ndarray] = {}
        for name in self.input_names:
            value = inputs[name]
            if type(value).__module__.split(".")[0] == "torch" and hasattr(value, "detach"):
                value = value.detach().cpu().numpy()
            if not isinstance(value, np.ndarray):
                raise InvalidTypeError(
                    f"inputs[{name!r}]: expected a numpy array or torch tensor, got {type(value).__name__}"
                )
            if not np.issubdtype(value.dtype, np.number):
                raise InvalidTypeError(f"inputs[{name!r}]: expected a numeric array, got dtype {value.dtype}")
            dims, dtype = self._input_types[name]
            if dims is not None and (value.ndim != len(dims) or any(
                    d is not None and d != n for d, n in zip(dims, value.shape, strict=True))):
                expected = "[" + ", ".join("?" if d is None else str(d) for d in dims) + "]"
                raise InvalidArgumentError(
                    f"inputs[{name!r}]: expected a {len(dims)}-D array of shape {expected} (? = any size), "
                    f"got shape {list(value.shape)}"
                )
            feed[name] = np.ascontiguousarray(value, dtype=dtype)
        return feed

    def run(self, inputs: Mapping[str, Any] | Any, return_integers: bool = False) -> Outputs | tuple[Outputs, Outputs]:
        """Execute the graph; see :func:`simulate` for arguments and return values."""
        env: dict[str, Value] = dict(self.check_inputs(inputs))
        integers: dict[str, np.ndarray] = {}

        def fetch(name: str) -> Value | None:
            if not name:
                return None
            if name in env:
                return env[name]
            if name in self._initializers:
                return self._initializers[name]
            raise ArtifactError(f"{QUANTMODEL}: tensor {name!r} is used before it is produced")

        for node in self._nodes:
            args = [fetch(name) for name in node.input]
            handler = getattr(self, f"_op_{node.op_type}")
            try:
                outputs = handler(node, args)
            except MaptoolsError:
                raise
            except Exception as exc:
                raise ModelError(
                    f"{QUANTMODEL}: {_describe(node)} failed in the integer reference executor: "
                    f"{type(exc).__name__}: {exc}"
                ) from exc
            if node.op_type not in _BOUNDARY_OPS and not self._is_boundary_clip(node, args):
                outputs = self._hold_at_record(node, outputs)
                first = outputs[0] if outputs else None
                if isinstance(first, _Ints):
                    integers[node.name] = first.q.astype(_int_dtype(first.qmin, first.qmax))
            for name, value in zip(node.output, outputs, strict=False):
                env[name] = value
        results: dict[str, np.ndarray] = {}
        for name in self.output_names:
            value = fetch(name)
            results[name] = np.asarray(_real(value), dtype=np.float32)
        if return_integers:
            return results, integers
        return results

    @staticmethod
    def _is_boundary_clip(node: onnx.NodeProto, args: list[Value | None]) -> bool:
        return node.op_type == "Clip" and isinstance(args[0], _Ints) and args[0].raw

    def _hold_at_record(self, node: onnx.NodeProto, outputs: list[Value]) -> list[Value]:
        """Requantize an operator's first output to its quantinfo record, if it has one."""
        record = self._record(node)
        if record is None or not record.outputs or record.outputs[0] is None or not outputs:
            return outputs
        first = outputs[0]
        if isinstance(first, _Param):
            first = first.real()
        tq = record.outputs[0]
        if not (isinstance(first, _Ints) and first.same_grid(tq) and first.qmin >= tq.qmin and first.qmax <= tq.qmax):
            logger.debug("%s: output requantized to its record (scale %.6g)", _describe(node), tq.scale)
        return [_requantize(first, tq)] + list(outputs[1:])

    def _mac_input(self, node: onnx.NodeProto, value: Value | None, tq: TensorQuant) -> _Ints:
        """The integer input of a MAC operator at its recorded quantization."""
        if value is None:
            raise ArtifactError(f"{_describe(node)}: missing activation input")
        if not (isinstance(value, _Ints) and value.same_grid(tq)):
            logger.debug("%s: input requantized to its record (scale %.6g)", _describe(node), tq.scale)
        return _requantize(value, tq)

    # -- quantization boundaries ------------------------------------------------------------------
    def _op_QuantizeLinear(self, node: onnx.NodeProto, args: list[Value | None]) -> list[Value]:  # noqa: N802
        tq = self._boundary[node.name]
        out = _requantize(args[0], tq)
        out.raw = True
        return [out]

    def _op_DequantizeLinear(self, node: onnx.NodeProto, args: list[Value | None]) -> list[Value]:  # noqa: N802
        x = args[0]
        scale = np.asarray(args[1])
        zp = np.asarray(args[2]) if len(args) > 2 and args[2] is not None else np.zeros_like(scale, dtype=np.int64)
        if isinstance(x, _Ints):
            if scale.size != 1 or not _same_scale(float(scale.reshape(-1)[0]), x.scale) \
                    or int(zp.reshape(-1)[0]) != x.zero_point:
                raise ArtifactError(
                    f"{QUANTMODEL}: {_describe(node)} dequantizes with other numbers than its QuantizeLinear"
                )
            return [x.with_q(x.q, raw=False)]
        if node.input[0] in self._initializers:
            axis = int(_attrs(node).get("axis", 1)) if scale.size > 1 else None
            q = np.asarray(x)
            if axis is not None and axis < 0:
                axis += q.ndim
            return [_Param(node.input[0], q.astype(np.int64), scale.reshape(-1), zp.reshape(-1), axis)]
        raise ArtifactError(f"{QUANTMODEL}: {_describe(node)} dequantizes a tensor that is not quantized")

    # -- MAC operators ----------------------------------------------------------------------------
    def _requant_acc(self, acc: np.ndarray, s_in: float, record: OperatorQuantConfig, channel_axis: int,
                     real_bias: np.ndarray | None = None) -> _Ints | np.ndarray:
        """``real = acc * (s_in * s_w[channel])`` (+ a real bias), requantized to the output record.

        Without an output record (the MAC feeds a fused activation that reads the accumulator), the real
        values themselves.
        """
        w_scale = np.asarray(record.weight_scale, dtype=np.float64).reshape(-1)
        if w_scale.size > 1:
            shape = [1] * acc.ndim
            shape[channel_axis] = -1
            w_scale = w_scale.reshape(shape)
        real = acc.astype(np.float64) * (float(s_in) * w_scale)
        if real_bias is not None:
            real = real + real_bias
        if not record.outputs or record.outputs[0] is None:
            return real
        return _requantize(real, record.outputs[0])

    def _op_Conv(self, node: onnx.NodeProto, args: list[Value | None]) -> list[Value]:  # noqa: N802
        record = self._record(node)
        weight, bias = self._weights[node.name]
        tq_in = record.inputs[0]
        x = self._mac_input(node, args[0], tq_in)
        attrs = _attrs(node)
        xc = x.centred()
        w = weight.astype(np.float64)
        if xc.ndim not in (3, 4) or w.ndim != xc.ndim:
            raise UnsupportedOperatorError(f"{_describe(node)}: only 1-D and 2-D convolutions are supported")
        kernel = list(w.shape[2:])
        strides = list(attrs.get("strides") or [1] * len(kernel))
        dilations = list(attrs.get("dilations") or [1] * len(kernel))
        pads = _spatial_pads(attrs, list(xc.shape[2:]), kernel, strides, dilations)
        one_d = xc.ndim == 3
        if one_d:  # run as 2-D with a height of one
            xc, w = xc[:, :, None, :], w[:, :, None, :]
            strides, dilations, pads = [1, *strides], [1, *dilations], [0, pads[0], 0, pads[1]]
        n, c, h, wd = xc.shape
        m, cg, kh, kw = w.shape
        group = int(attrs.get("group", 1))
        if c != cg * group or m % group:
            raise ArtifactError(
                f"{_describe(node)}: input channels {c} do not match weight {weight.shape} with group {group}"
            )
        xp = np.pad(xc, [(0, 0), (0, 0), (pads[0], pads[2]), (pads[1], pads[3])])
        out_h = (h + pads[0] + pads[2] - ((kh - 1) * dilations[0] + 1)) // strides[0] + 1
        out_w = (wd + pads[1] + pads[3] - ((kw - 1) * dilations[1] + 1)) // strides[1] + 1
        mg, taps = m // group, kh * kw
        bound = float(np.abs(xc).max(initial=0.0)) * float(np.abs(w).max(initial=0.0)) * cg * taps
        dtype = _exact_dtype(bound)
        cols = np.empty((n, group, cg, taps, out_h * out_w), dtype=dtype)  # im2col
        for (i, j), slices in _window_slices([kh, kw], strides, dilations, [out_h, out_w]):
            cols[:, :, :, i * kw + j, :] = xp[(slice(None), slice(None)) + slices].reshape(n, group, cg, -1)
        cols = cols.reshape(n, group, cg * taps, out_h * out_w)
        acc = np.matmul(w.reshape(group, mg, cg * taps).astype(dtype), cols)
        acc = acc.astype(np.int64) if dtype != np.int64 else acc
        acc = acc.reshape(n, m, out_h, out_w)
        if bias is not None:
            acc = acc + bias.reshape(1, -1, 1, 1)
        if one_d:
            acc = acc[:, :, 0, :]
        return [self._requant_acc(acc, tq_in.scale, record, channel_axis=1)]

    def _op_Gemm(self, node: onnx.NodeProto, args: list[Value | None]) -> list[Value]:  # noqa: N802
        record = self._record(node)
        if node.name not in self._weights:
            raise UnsupportedOperatorError(f"{_describe(node)}: Gemm without a constant quantized weight")
        weight, bias = self._weights[node.name]
        attrs = _attrs(node)
        tq_in = record.inputs[0]
        x = self._mac_input(node, args[0], tq_in)
        a = x.centred()
        if int(attrs.get("transA", 0)):
            a = a.T
        trans_b = int(attrs.get("transB", 0))
        b = weight.astype(np.float64)
        b = b.T if trans_b else b
        alpha, beta = float(attrs.get("alpha", 1.0)), float(attrs.get("beta", 1.0))
        bound = float(np.abs(a).max(initial=0.0)) * float(np.abs(b).max(initial=0.0)) * a.shape[-1]
        acc = _exact_matmul(a, b, bound)
        real_bias = None
        if alpha == 1.0 and beta == 1.0:
            if bias is not None:
                acc = acc + bias.reshape(1, -1)
        else:
            acc_scale = float(tq_in.scale) * np.asarray(record.weight_scale, np.float64).reshape(1, -1)
            acc = acc.astype(np.float64) * alpha
            if bias is not None:
                real_bias = beta * bias.reshape(1, -1).astype(np.float64) * acc_scale
        channel_axis = 1
        if record.weight_axis is not None and record.weight_axis != (0 if trans_b else 1):
            raise ArtifactError(f"quantinfo.pkl: {_describe(node)} has per-channel weight scales along the input axis")
        return [self._requant_acc(acc, tq_in.scale, record, channel_axis, real_bias)]

    def _op_MatMul(self, node: onnx.NodeProto, args: list[Value | None]) -> list[Value]:  # noqa: N802
        record = self._record(node)
        if record is None or not record.outputs or record.outputs[0] is None:
            raise UnsupportedOperatorError(f"{_describe(node)}: MatMul that is not quantized (no quantinfo record)")
        if node.name in self._weights:
            weight, _ = self._weights[node.name]
            if weight.ndim != 2:
                raise UnsupportedOperatorError(f"{_describe(node)}: MatMul with a {weight.ndim}-D constant weight")
            tq_in = record.inputs[0]
            x = self._mac_input(node, args[0], tq_in)
            a = x.centred()
            b = weight.astype(np.float64)
            bound = float(np.abs(a).max(initial=0.0)) * float(np.abs(b).max(initial=0.0)) * b.shape[0]
            acc = _exact_matmul(a, b, bound)
            return [self._requant_acc(acc, tq_in.scale, record, channel_axis=acc.ndim - 1)]
        if len(record.inputs) < 2 or record.inputs[0] is None or record.inputs[1] is None:
            raise UnsupportedOperatorError(f"{_describe(node)}: MatMul of an unquantized input")
        xa = self._mac_input(node, args[0], record.inputs[0])
        xb = self._mac_input(node, args[1], record.inputs[1])
        a, b = xa.centred(), xb.centred()
        bound = float(np.abs(a).max(initial=0.0)) * float(np.abs(b).max(initial=0.0)) * a.shape[-1]
        acc = _exact_matmul(a, b, bound)
        real = acc.astype(np.float64) * (float(xa.scale) * float(xb.scale))
        return [_requantize(real, record.outputs[0])]

    # -- operators on integers ----------------------------------------------------------------------
    def _op_Relu(self, node: onnx.NodeProto, args: list[Value | None]) -> list[Value]:  # noqa: N802
        x = args[0]
        if isinstance(x, _Ints):
            return [x.with_q(np.maximum(x.q, x.zero_point), qmin=max(x.qmin, x.zero_point))]
        return [np.maximum(_real(x), 0.0)]

    def _op_MaxPool(self, node: onnx.NodeProto, args: list[Value | None]) -> list[Value]:  # noqa: N802
        attrs = _attrs(node)
        x = args[0]
        data = x.q if isinstance(x, _Ints) else _real(x)
        kernel = list(attrs["kernel_shape"])
        dims = len(kernel)
        strides = list(attrs.get("strides", [1] * dims))
        dilations = list(attrs.get("dilations", [1] * dims))
        pads = _spatial_pads(attrs, list(data.shape[2:]), kernel, strides, dilations)
        low = np.iinfo(np.int64).min if isinstance(x, _Ints) else -np.inf
        out = _pool(data, kernel, strides, pads, dilations, bool(attrs.get("ceil_mode", 0)), np.maximum, low)
        if len(node.output) > 1 and node.output[1]:
            raise UnsupportedOperatorError(f"{_describe(node)}: MaxPool indices output is not supported")
        return [x.with_q(out) if isinstance(x, _Ints) else out]

    def _layout(self, node: onnx.NodeProto, x: Value | None, fn: Callable[[np.ndarray], np.ndarray]) -> list[Value]:
        if isinstance(x, _Ints):
            return [x.with_q(fn(x.q))]
        return [fn(_real(x))]

    def _op_Identity(self, node: onnx.NodeProto, args: list[Value | None]) -> list[Value]:  # noqa: N802
        return self._layout(node, args[0], lambda a: a)

    def _op_Flatten(self, node: onnx.NodeProto, args: list[Value | None]) -> list[Value]:  # noqa: N802
        axis = int(_attrs(node).get("axis", 1))

        def flatten(a: np.ndarray) -> np.ndarray:
            ax = axis + a.ndim if axis < 0 else axis
            return a.reshape(int(np.prod(a.shape[:ax], dtype=np.int64)), -1)

        return self._layout(node, args[0], flatten)

    def _op_Reshape(self, node: onnx.NodeProto, args: list[Value | None]) -> list[Value]:  # noqa: N802
        shape = [int(s) for s in np.asarray(_real(args[1])).astype(np.int64).reshape(-1)]
        allowzero = int(_attrs(node).get("allowzero", 0))

        def reshape(a: np.ndarray) -> np.ndarray:
            target = [a.shape[i] if (s == 0 and not allowzero) else s for i, s in enumerate(shape)]
            return a.reshape(target)

        return self._layout(node, args[0], reshape)

    def _op_Transpose(self, node: onnx.NodeProto, args: list[Value | None]) -> list[Value]:  # noqa: N802
        perm = _attrs(node).get("perm")
        return self._layout(node, args[0], lambda a: np.transpose(a, perm))

    def _axes(self, node: onnx.NodeProto, args: list[Value | None]) -> list[int] | None:
        if len(args) > 1 and args[1] is not None:
            return [int(v) for v in np.asarray(_real(args[1])).astype(np.int64).reshape(-1)]
        axes = _attrs(node).get("axes")
        return None if axes is None else [int(v) for v in axes]

    def _op_Squeeze(self, node: onnx.NodeProto, args: list[Value | None]) -> list[Value]:  # noqa: N802
        axes = self._axes(node, args)
        return self._layout(node, args[0], lambda a: np.squeeze(a, axis=None if axes is None else tuple(axes)))

    def _op_Unsqueeze(self, node: onnx.NodeProto, args: list[Value | None]) -> list[Value]:  # noqa: N802
        axes = self._axes(node, args) or []

        def unsqueeze(a: np.ndarray) -> np.ndarray:
            rank = a.ndim + len(axes)
            return np.expand_dims(a, tuple(ax + rank if ax < 0 else ax for ax in axes))

        return self._layout(node, args[0], unsqueeze)

    def _op_Slice(self, node: onnx.NodeProto, args: list[Value | None]) -> list[Value]:  # noqa: N802
        attrs = _attrs(node)

        def ints(index: int, key: str) -> list[int] | None:
            if len(args) > index and args[index] is not None:
                return [int(v) for v in np.asarray(_real(args[index])).astype(np.int64).reshape(-1)]
            return None if key not in attrs else [int(v) for v in attrs[key]]

        starts, ends = ints(1, "starts"), ints(2, "ends")
        axes, steps = ints(3, "axes"), ints(4, "steps")

        def slice_(a: np.ndarray) -> np.ndarray:
            index = [slice(None)] * a.ndim
            for k, (start, end) in enumerate(zip(starts, ends, strict=True)):
                axis = axes[k] if axes is not None else k
                step = steps[k] if steps is not None else 1
                index[axis] = slice(start, end, step)
            return a[tuple(index)]

        return self._layout(node, args[0], slice_)

    def _op_Pad(self, node: onnx.NodeProto, args: list[Value | None]) -> list[Value]:  # noqa: N802
        attrs = _attrs(node)
        mode = attrs.get("mode", b"constant")
        mode = mode.decode() if isinstance(mode, bytes) else str(mode)
        if mode != "constant":
            raise UnsupportedOperatorError(f"{_describe(node)}: Pad mode {mode!r} is not supported (constant only)")
        x = args[0]
        if len(args) > 1 and args[1] is not None:
            pads = [int(v) for v in np.asarray(_real(args[1])).astype(np.int64).reshape(-1)]
        else:
            pads = [int(v) for v in attrs.get("pads", [])]
        value = float(np.asarray(_real(args[2])).reshape(-1)[0]) if len(args) > 2 and args[2] is not None \
            else float(attrs.get("value", 0.0))
        rank = len(pads) // 2
        if any(p < 0 for p in pads):
            raise UnsupportedOperatorError(f"{_describe(node)}: negative pads are not supported")
        widths = [(pads[i], pads[i + rank]) for i in range(rank)]
        if isinstance(x, _Ints):
            level = value / x.scale + x.zero_point
            if level == round(level) and x.qmin <= level <= x.qmax:  # the pad value lies on the integer grid
                return [x.with_q(np.pad(x.q, widths, constant_values=int(level)))]
        return [np.pad(_real(x).astype(np.float64), widths, constant_values=value)]

    def _op_Concat(self, node: onnx.NodeProto, args: list[Value | None]) -> list[Value]:  # noqa: N802
        axis = int(_attrs(node)["axis"])
        parts = [a for a in args if a is not None]
        first = parts[0]
        if all(isinstance(p, _Ints) for p in parts) and all(
            _same_scale(p.scale, first.scale) and p.zero_point == first.zero_point for p in parts
        ):
            q = np.concatenate([p.q for p in parts], axis=axis)
            return [first.with_q(q, qmin=min(p.qmin for p in parts), qmax=max(p.qmax for p in parts), raw=False)]
        return [np.concatenate([_real(p) for p in parts], axis=axis)]

    def _op_Constant(self, node: onnx.NodeProto, args: list[Value | None]) -> list[Value]:  # noqa: N802
        attrs = _attrs(node)
        if "value" not in attrs:
            raise UnsupportedOperatorError(f"{_describe(node)}: only Constant with a 'value' tensor is supported")
        return [numpy_helper.to_array(attrs["value"])]

    # -- float path: dequantize, compute in float64, requantize -----------------------------------------
    def _binary(self, node: onnx.NodeProto, args: list[Value | None]) -> list[Value]:
        a, b = (_real(v).astype(np.float64) for v in args[:2])
        return [_ELEMENTWISE[node.op_type](a, b)]

    _op_Add = _op_Sub = _op_Mul = _op_Div = _binary  # noqa: N815

    def _activation(self, node: onnx.NodeProto, args: list[Value | None]) -> list[Value]:
        return [_ACTIVATIONS[node.op_type](_real(args[0]).astype(np.float64), _attrs(node))]

    _op_Sigmoid = _op_HardSigmoid = _op_HardSwish = _op_Tanh = _activation  # noqa: N815

    def _op_Clip(self, node: onnx.NodeProto, args: list[Value | None]) -> list[Value]:  # noqa: N802
        x = args[0]
        if isinstance(x, _Ints) and x.raw:  # the integer Clip of a QuantizeLinear -> Clip -> DequantizeLinear chain
            lo = int(np.asarray(args[1]).reshape(-1)[0]) if len(args) > 1 and args[1] is not None else x.qmin
            hi = int(np.asarray(args[2]).reshape(-1)[0]) if len(args) > 2 and args[2] is not None else x.qmax
            return [x.with_q(np.clip(x.q, lo, hi), qmin=max(lo, x.qmin), qmax=min(hi, x.qmax))]
        attrs = _attrs(node)
        lo = _real(args[1]) if len(args) > 1 and args[1] is not None else attrs.get("min", -np.inf)
        hi = _real(args[2]) if len(args) > 2 and args[2] is not None else attrs.get("max", np.inf)
        return [np.clip(_real(x).astype(np.float64), lo, hi)]

    def _op_GlobalAveragePool(self, node: onnx.NodeProto, args: list[Value | None]) -> list[Value]:  # noqa: N802
        x = args[0]
        axes = tuple(range(2, np.ndim(x.q if isinstance(x, _Ints) else _real(x))))
        if isinstance(x, _Ints):
            return [x.scale * x.centred().mean(axis=axes, keepdims=True)]
        return [_real(x).astype(np.float64).mean(axis=axes, keepdims=True)]

    def _op_AveragePool(self, node: onnx.NodeProto, args: list[Value | None]) -> list[Value]:  # noqa: N802
        attrs = _attrs(node)
        x = args[0]
        data = x.centred() if isinstance(x, _Ints) else _real(x).astype(np.float64)
        kernel = list(attrs["kernel_shape"])
        dims = len(kernel)
        strides = list(attrs.get("strides", [1] * dims))
        dilations = list(attrs.get("dilations", [1] * dims))
        pads = _spatial_pads(attrs, list(data.shape[2:]), kernel, strides, dilations)
        ceil_mode = bool(attrs.get("ceil_mode", 0))
        total = _pool(data, kernel, strides, pads, dilations, ceil_mode, np.add, 0.0)
        ones = np.ones((1, 1) + data.shape[2:], dtype=np.float64)
        include = float(bool(attrs.get("count_include_pad", 0)))
        count = _pool(ones, kernel, strides, pads, dilations, ceil_mode, np.add, include, 0.0)
        mean = total / count
        return [x.scale * mean if isinstance(x, _Ints) else mean]


@overload
def simulate(mapname: str, inputs: Mapping[str, Any] | Any, *, mapsave_dir: str | os.PathLike | None = ...,
             return_integers: Literal[False] = ...) -> dict[str, np.ndarray]: ...


@overload
def simulate(mapname: str, inputs: Mapping[str, Any] | Any, *, mapsave_dir: str | os.PathLike | None = ...,
             return_integers: Literal[True]) -> tuple[dict[str, np.ndarray], dict[str, np.ndarray]]: ...


def simulate(
    mapname: str,
    inputs: Mapping[str, Any] | Any,
    *,
    mapsave_dir: str | os.PathLike | None = None,
    return_integers: bool = False,
) -> dict[str, np.ndarray] | tuple[dict[str, np.ndarray], dict[str, np.ndarray]]:
    """Run a quantized map with integer arithmetic, as the chip would.

    Reads only ``mapsave/<mapname>`` (``quant_model.onnx``, ``quantinfo.pkl``, ``quantparams.pkl``); see
    the module documentation for the exact semantics. To run many batches, load once with
    :meth:`ReferenceExecutor.load` and call :meth:`ReferenceExecutor.run`.

    Args:
        mapname: The map name given to ``quantize``.
        inputs: Graph input name -> float array (numpy array or torch tensor), e.g. ``{'input': images}``;
            a bare array is accepted for a single-input model. The batch size may differ from the one used
            for calibration when the model's batch axis is dynamic.
        mapsave_dir: The mapsave directory (default ``$MAPTOOLS_MAPSAVE`` or ``./mapsave``).
        return_integers: Also return every operator's integer output.

    Returns:
        With ``return_integers=False``: ``outputs``, a dict graph output name -> float32 array (the
        dequantized graph output, ``scale * (q - zero_point)``).

        With ``return_integers=True``: a tuple ``(outputs, integers)`` where ``integers`` is a dict node name
        -> integer array: the output of every operator of the model (node names as in ``quantinfo.pkl``;
        the inserted QuantizeLinear/Clip/DequantizeLinear nodes are not included) held at the quantization
        of its ``quantinfo`` record ``outputs[0]``, i.e. in ``[qmin, qmax]`` of that record, in the smallest
        numpy integer dtype that holds the range (``int8`` for signed 8-bit and below, ``uint8`` for
        unsigned...). An operator without a record that passes integers through (an unquantized
        ``Reshape``, say) keeps its input's quantization; operators with a float output are left out.

    Raises:
        MapNotFoundError: no such map.
        ArtifactError: a file is missing, modified or corrupt, or the three files disagree.
        UnsupportedOperatorError: the graph holds an operator the executor cannot run (raised before any
            computation; the message names the node and its operator type).
        InvalidArgumentError: a bare array for a multi-input model, missing or unknown input names, or an
            input of the wrong rank.
        InvalidTypeError: an input is neither a numpy array nor a torch tensor.
    """
    executor = ReferenceExecutor.load(mapname, mapsave_dir)
    return executor.run(inputs, return_integers=return_integers)
