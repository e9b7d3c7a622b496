"""The integer reference executor: walking a map's graph and holding outputs at records.

:class:`ReferenceExecutor` reads the graph of ``quant_model.onnx``, matches every QuantizeLinear boundary
to the ``TensorQuant`` of ``quantinfo.pkl`` it applies, prepares every node with the handler of its
operator type (see :mod:`~maptools.quantization.reference.registry`) and runs the nodes in order. After
every operator that has a record, its outputs are requantized to the record's ``outputs`` quantization.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

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
from maptools.quantization.artifacts import QUANTMODEL
from maptools.quantization.cim.adc import AdcCalibration
from maptools.quantization.cim.analog import SeedLike
from maptools.quantization.cim.device import DeviceModel
from maptools.quantization.cim.spec import CIMSpec
from maptools.quantization.records import OperatorQuantConfig, TensorQuant
from maptools.quantization.reference import (  # noqa: F401 - importing them registers their handlers
    activations,
    boundary,
    elementwise,
    generic,
    layout,
    mac,
    pooling,
    resize,
)
from maptools.quantization.reference.cim_mode import CimModeMixin
from maptools.quantization.reference.crossbar import CimMode, MacAccumulator, MacHook
from maptools.quantization.reference.loading import MapLoadingMixin
from maptools.quantization.reference.mac import MacWeights
from maptools.quantization.reference.registry import HANDLERS, OpHandler, describe
from maptools.quantization.reference.values import Ints, Param, Value, int_dtype, real, requantize, same_scale

__all__ = ["SUPPORTED_OPS", "ReferenceExecutor"]

logger = logging.getLogger("maptools.quantization.reference.core")

#: Operator types :func:`simulate` executes: every type with a dedicated handler (integer or float) and
#: every type the generic float handler accepts (QuantizeLinear/DequantizeLinear are the quantization
#: boundaries).
SUPPORTED_OPS: frozenset[str] = frozenset(HANDLERS)

Outputs = dict[str, np.ndarray]

if TYPE_CHECKING:
    from maptools.quantization.cim.mapcal import MapCalibration


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


class ReferenceExecutor(CimModeMixin, MapLoadingMixin):
    """The integer executor of one map, loaded once and run on any number of batches.

    Every node is checked and prepared here, before anything is computed: an operator the executor cannot
    run is refused now, naming the node.

    With ``cim`` it simulates a compute-in-memory chip: every MAC with a constant weight goes through the
    crossbar model (see :mod:`~maptools.quantization.reference.crossbar`).

    Args:
        model: ``quant_model.onnx`` of the map.
        quantinfo: ``quantinfo.pkl`` of the map (node name -> :class:`OperatorQuantConfig`).
        quantparams: ``quantparams.pkl`` of the map (integer weights and biases).
        cim: None for exact MACs, or the :class:`~maptools.quantization.cim.spec.CIMSpec` of the crossbar.
        adc: The ADC calibration of a spec with ``adc_range='calibrated'`` (and ``adc_bits`` set): a
            :class:`~maptools.quantization.cim.mapcal.MapCalibration` or a dict node name ->
            :class:`~maptools.quantization.cim.adc.AdcCalibration`; ignored otherwise.
        device: The analog non-idealities of the chip (:class:`~maptools.quantization.cim.device.DeviceModel`,
            needs ``cim``); None for exact cells. See :meth:`with_cim`.
        seed: The chip's seed (an int or a :class:`numpy.random.SeedSequence`).

    Raises:
        UnsupportedOperatorError: the graph holds an operator this executor cannot run.
        ArtifactError: the three files disagree (a missing record, weight or mismatched quantization).
        InvalidArgumentError: a calibrated ``cim`` spec without a calibration for every crossbar MAC, or one
            made for another crossbar.
        InvalidTypeError: ``cim`` is not a CIMSpec (``cim=True`` is for :meth:`load`).
    """

    def __init__(self, model: onnx.ModelProto, quantinfo: Mapping[str, OperatorQuantConfig],
                 quantparams: Mapping[str, np.ndarray | None], cim: CIMSpec | None = None,
                 adc: MapCalibration | Mapping[str, AdcCalibration] | None = None, *,
                 device: DeviceModel | None = None, seed: SeedLike = 0) -> None:
        self.model = model
        self.quantinfo = dict(quantinfo)
        self.quantparams = dict(quantparams)
        graph = model.graph
        #: Initializer name -> array.
        self.initializers: dict[str, np.ndarray] = {init.name: numpy_helper.to_array(init)
                                                    for init in graph.initializer}
        self.input_names = [vi.name for vi in graph.input if vi.name not in self.initializers]
        self._input_types = {vi.name: _declared_type(vi) for vi in graph.input if vi.name not in self.initializers}
        self.output_names = [vi.name for vi in graph.output]
        self._nodes = list(graph.node)
        self._handlers = [self._handler(node) for node in self._nodes]
        self._consumers: dict[str, list[onnx.NodeProto]] = {}
        for node in self._nodes:
            for name in node.input:
                self._consumers.setdefault(name, []).append(node)
        self._records: dict[str, list[TensorQuant]] = {}
        for config in self.quantinfo.values():
            for tq in list(config.inputs) + list(config.outputs):
                if tq is not None:
                    self._records.setdefault(tq.name, []).append(tq)
        #: DequantizeLinear output name -> the integer initializer it dequantizes (int64).
        self.dq_sources: dict[str, np.ndarray] = {
            node.output[0]: self.initializers[node.input[0]].astype(np.int64) for node in self._nodes
            if node.op_type == "DequantizeLinear" and node.input[0] in self.initializers
        }
        self._states = [None if h.prepare is None else h.prepare(self, node)
                        for node, h in zip(self._nodes, self._handlers, strict=True)]
        self._mac_states = {node.name: state for node, state in zip(self._nodes, self._states, strict=True)
                            if isinstance(state, MacWeights)}
        #: The crossbar simulated (None: exact MACs).
        self.cim: CimMode | None = None
        #: Called with every crossbar MAC's operands, weights and columns (None: no hook).
        self.mac_hook: MacHook | None = None
        #: The analog non-idealities of the simulated chip (None: exact cells).
        self.device: DeviceModel | None = None
        self._accumulators: dict[str, MacAccumulator] = {}
        self._configure(cim, adc, None, device, seed)

    # -- the graph and its records ----------------------------------------------------------------
    @staticmethod
    def _handler(node: onnx.NodeProto) -> OpHandler:
        handler = HANDLERS.get(node.op_type) if node.domain in ("", "ai.onnx") else None
        if handler is None:
            domain = f" of domain {node.domain!r}" if node.domain not in ("", "ai.onnx") else ""
            raise UnsupportedOperatorError(
                f"{describe(node)}: operator type {node.op_type!r}{domain} is not supported by the integer "
                f"reference executor (see maptools.quantization.reference.SUPPORTED_OPS: {len(SUPPORTED_OPS)} "
                "types of the default ONNX domain, no control flow)"
            )
        return handler

    @property
    def opset(self) -> int:
        """The model's opset version of the default ONNX domain."""
        for entry in self.model.opset_import:
            if entry.domain in ("", "ai.onnx"):
                return int(entry.version)
        return 1

    def record(self, node: onnx.NodeProto) -> OperatorQuantConfig | None:
        """The quantinfo record of a node (by node name), None when it has none."""
        return self.quantinfo.get(node.name)

    def resolve_boundary(self, node: onnx.NodeProto) -> TensorQuant:
        """The ``TensorQuant`` a QuantizeLinear applies: the quantinfo record of its tensor, else its own numbers."""
        scale_name = node.input[1]
        zp_name = node.input[2] if len(node.input) > 2 and node.input[2] else ""
        if scale_name not in self.initializers or (zp_name and zp_name not in self.initializers):
            raise ArtifactError(f"{QUANTMODEL}: {describe(node)} has a non-constant scale or zero point")
        scale = self.initializers[scale_name]
        if scale.size != 1:
            raise UnsupportedOperatorError(f"{describe(node)}: per-channel activation quantization is not supported")
        zp_arr = self.initializers[zp_name] if zp_name else np.zeros((), np.uint8)
        q_scale, q_zp = float(scale.reshape(-1)[0]), int(zp_arr.reshape(-1)[0])
        info = np.iinfo(zp_arr.dtype)
        lo, hi = int(info.min), int(info.max)
        chain_end = node.output[0]
        consumers = self._consumers.get(node.output[0], [])
        if len(consumers) == 1 and consumers[0].op_type == "Clip":
            clip = consumers[0]
            bounds = [self.initializers.get(name) if name else None for name in list(clip.input[1:3])]
            if bounds and bounds[0] is not None:
                lo = max(lo, int(bounds[0]))
            if len(bounds) > 1 and bounds[1] is not None:
                hi = min(hi, int(bounds[1]))
            chain_end = clip.output[0]
        consumers = self._consumers.get(chain_end, [])
        names = [node.input[0]] + [c.output[0] for c in consumers if c.op_type == "DequantizeLinear"]
        candidates = [tq for name in names for tq in self._records.get(name, [])]
        for tq in candidates:
            if same_scale(tq.scale, q_scale) and tq.zero_point == q_zp:
                if (tq.qmin, tq.qmax) != (lo, hi):
                    raise ArtifactError(
                        f"{QUANTMODEL}: {describe(node)} clips {node.input[0]!r} to [{lo}, {hi}] but "
                        f"quantinfo records [{tq.qmin}, {tq.qmax}]"
                    )
                return tq
        if candidates:
            recorded = ", ".join(f"scale {t.scale:.6g} zp {t.zero_point}" for t in candidates)
            raise ArtifactError(
                f"{QUANTMODEL}: {describe(node)} quantizes {node.input[0]!r} with scale {q_scale:.6g}, zero point "
                f"{q_zp}, but quantinfo records {recorded} for that tensor"
            )
        bits = max(1, math.ceil(math.log2(hi - lo + 1)))
        logger.debug("%s: no quantinfo record for %r, using the node's own scale %.6g", describe(node),
                     node.input[0], q_scale)
        return TensorQuant(name=node.input[0], bits=bits, scale=q_scale, zero_point=q_zp, qmin=lo, qmax=hi)

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
            if name in self.initializers:
                return self.initializers[name]
            raise ArtifactError(f"{QUANTMODEL}: tensor {name!r} is used before it is produced")

        for node, handler, state in zip(self._nodes, self._handlers, self._states, strict=True):
            args = [fetch(name) for name in node.input]
            try:
                outputs = handler.run(self, node, args, state)
            except MaptoolsError:
                raise
            except Exception as exc:
                raise ModelError(
                    f"{QUANTMODEL}: {describe(node)} failed in the integer reference executor: "
                    f"{type(exc).__name__}: {exc}"
                ) from exc
            if node.op_type not in ("QuantizeLinear", "DequantizeLinear") and not self._is_boundary_clip(node, args):
                outputs = self._hold_at_record(node, outputs)
                first = outputs[0] if outputs else None
                if isinstance(first, Ints):
                    integers[node.name] = first.q.astype(int_dtype(first.qmin, first.qmax))
            for name, value in zip(node.output, outputs, strict=False):
                env[name] = value
        results: dict[str, np.ndarray] = {}
        for name in self.output_names:
            value = fetch(name)
            results[name] = np.asarray(real(value), dtype=np.float32)
        if return_integers:
            return results, integers
        return results

    @staticmethod
    def _is_boundary_clip(node: onnx.NodeProto, args: list[Value | None]) -> bool:
        return node.op_type == "Clip" and isinstance(args[0], Ints) and args[0].raw

    def _hold_at_record(self, node: onnx.NodeProto, outputs: list[Value]) -> list[Value]:
        """Requantize an operator's outputs to the ``outputs`` quantization of its quantinfo record, if any."""
        record = self.record(node)
        if record is None or not record.outputs or not outputs:
            return outputs
        held = list(outputs)
        for index, tq in enumerate(record.outputs[:len(held)]):
            if tq is None:
                continue
            value = held[index]
            if isinstance(value, Param):
                value = value.real()
            if not (isinstance(value, Ints) and value.same_grid(tq) and value.qmin >= tq.qmin
                    and value.qmax <= tq.qmax):
                logger.debug("%s: output %d requantized to its record (scale %.6g)", describe(node), index, tq.scale)
            held[index] = requantize(value, tq)
        return held
