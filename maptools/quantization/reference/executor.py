"""The integer reference executor: walking a map's graph and holding outputs at records.

:class:`ReferenceExecutor` reads the graph of ``quant_model.onnx``, matches every QuantizeLinear boundary
to the ``TensorQuant`` of ``quantinfo.pkl`` it applies, prepares every node with the handler of its
operator type (see :mod:`~maptools.quantization.reference.registry`) and runs the nodes in order. After
every operator that has a record, its outputs are requantized to the record's ``outputs`` quantization.
"""

from __future__ import annotations

import copy
import logging
import math
import os
from collections.abc import Callable, Mapping
from typing import Any

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
from maptools.quantization.artifacts import (
    QUANTINFO,
    QUANTMODEL,
    QUANTPARAMS,
    load_quant_model,
    load_quantinfo,
    load_quantparams,
    read_manifest,
    read_map_files,
)
from maptools.quantization.cim.adc import AdcCalibration
from maptools.quantization.cim.analog import SeedLike, check_device
from maptools.quantization.cim.derived import check_records_gains, check_settings_spec
from maptools.quantization.cim.device import DeviceModel
from maptools.quantization.cim.mapcalibration import MapCalibration, has_map_calibration, read_map_calibration
from maptools.quantization.cim.spec import CIMSpec
from maptools.quantization.intmath import smallest_int_dtype
from maptools.quantization.mapdir import resolve_map
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
from maptools.quantization.reference.backends import CrossbarMac, MacBackend, mac_backend
from maptools.quantization.reference.crossbar import (
    CimMode,
    MacAccumulator,
    MacHook,
    MacOperands,
    crossbar_fingerprint,
    mac_operands,
)
from maptools.quantization.reference.mac import MacWeights
from maptools.quantization.reference.registry import HANDLERS, OpHandler, describe
from maptools.quantization.reference.values import (
    Ints,
    Param,
    Value,
    describe_scale,
    real,
    requantize,
    same_scale,
    same_zero_point,
)

__all__ = ["SUPPORTED_OPS", "ReferenceExecutor"]

logger = logging.getLogger("maptools.quantization.reference.core")

#: Operator types :func:`simulate` executes: every type with a dedicated handler (integer or float) and
#: every type the generic float handler accepts (QuantizeLinear/DequantizeLinear are the quantization
#: boundaries).
SUPPORTED_OPS: frozenset[str] = frozenset(HANDLERS)

Outputs = dict[str, np.ndarray]


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


def _refuse_channel_scales_on_crossbars(quantinfo: Mapping[str, OperatorQuantConfig]) -> None:
    """A crossbar takes one input scale and zero point per MAC: a map with per-channel activation scales is
    refused (``quantize`` does not make them with ``cim=``)."""
    for name, record in quantinfo.items():
        if record.inputs and record.inputs[0] is not None and record.inputs[0].axis is not None:
            raise UnsupportedOperatorError(
                f"cim: the map records per-channel activation scales for the input of {name!r}, and the crossbar "
                "model takes one input scale per MAC; quantize with channel_activations=False "
                "(--per-tensor-activations) for a crossbar")


class ReferenceExecutor:
    """The integer executor of one map, loaded once and run on any number of batches.

    Every node is checked and prepared here, before anything is computed: an operator the executor cannot
    run is refused now, naming the node.

    With ``cim`` it simulates a compute-in-memory chip: every MAC with a constant weight goes through the
    crossbar model (see :mod:`~maptools.quantization.reference.crossbar`). The MACs accumulate through one
    :class:`~maptools.quantization.reference.backends.MacBackend`, built from ``cim``, ``adc``, ``device``
    and ``seed``, or given as ``backend``.

    Args:
        model: ``quant_model.onnx`` of the map.
        quantinfo: ``quantinfo.pkl`` of the map (node name -> :class:`OperatorQuantConfig`).
        quantparams: ``quantparams.pkl`` of the map (integer weights and biases).
        cim: None for exact MACs, or the :class:`~maptools.quantization.cim.spec.CIMSpec` of the crossbar.
        adc: The ADC calibration of a spec with ``adc_range='calibrated'`` (and ``adc_bits`` set): a
            :class:`~maptools.quantization.cim.mapcalibration.MapCalibration` or a dict node name ->
            :class:`~maptools.quantization.cim.adc.AdcCalibration`; ignored otherwise.
        device: The analog non-idealities of the chip (:class:`~maptools.quantization.cim.device.DeviceModel`,
            needs ``cim``); None for exact cells. See :meth:`with_cim`.
        seed: The chip's seed (an int or a :class:`numpy.random.SeedSequence`).
        backend: The MAC backend itself, instead of ``cim``, ``adc``, ``device`` and ``seed``.

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
                 device: DeviceModel | None = None, seed: SeedLike = 0, backend: MacBackend | None = None) -> None:
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
        if cim is not None:
            _refuse_channel_scales_on_crossbars(self.quantinfo)
        if backend is None:
            backend = mac_backend(cim, adc, device=device, seed=seed)
        elif cim is not None or adc is not None or device is not None:
            raise InvalidArgumentError("backend: given with cim, adc or device; pass either a backend or those")
        self.backend = backend
        self._accumulators: dict[str, MacAccumulator] = backend.accumulators(self.crossbar_macs(),
                                                                             lambda: self.fingerprint)

    # -- loading a map ----------------------------------------------------------------------------
    @classmethod
    def load(cls, mapname: str, mapsave_dir: str | os.PathLike | None = None, cim: CIMSpec | bool | None = None,
             adc: MapCalibration | Mapping[str, AdcCalibration] | None = None, *, device: DeviceModel | None = None,
             seed: SeedLike = 0) -> ReferenceExecutor:
        """Load ``mapsave/<mapname>`` (each file checked against the manifest, all three of one snapshot).

        Args:
            mapname: The map name given to ``quantize``.
            mapsave_dir: The mapsave directory (default ``$MAPTOOLS_MAPSAVE`` or ``./mapsave``).
            cim: None for exact MACs; a :class:`~maptools.quantization.cim.spec.CIMSpec` for the crossbar
                model; True for the map's own CIM spec and ADC calibration (its ``cim.json``, see
                :func:`~maptools.quantization.cimmap.mapcal.write_map_calibration`).
            adc: The ADC calibration of a spec with ``adc_range='calibrated'``; None for the map's stored one
                (which must then exist and match the spec).
            device: The analog non-idealities of the chip (needs ``cim``); None for exact cells.
            seed: The chip's seed (an int or a SeedSequence).

        Raises:
            MapNotFoundError: no such map.
            ArtifactError: a file is missing, modified, corrupt, or the files disagree; ``cim=True`` on a map
                without a CIM calibration.
            UnsupportedOperatorError: the graph holds an operator this executor cannot run.
            InvalidArgumentError: a calibrated spec without a matching calibration.
        """
        check_device(device, seed, cim)  # before reading anything (cim=True: the cells are checked once known)
        # the graph, records and parameters of the same quantize run, even while the map is being replaced
        files = read_map_files(mapname, [QUANTMODEL, QUANTINFO, QUANTPARAMS], mapsave_dir)
        spec: CIMSpec | None = None
        if cim is True or (isinstance(cim, CIMSpec) and adc is None and cim.adc_bits is not None
                           and cim.adc_range == "calibrated"):
            if cim is not True and not has_map_calibration(mapname, mapsave_dir):
                raise InvalidArgumentError(
                    f"cim: spec {cim} has adc_range='calibrated' but no adc= was given and map {mapname!r} stores no "
                    "ADC calibration; pass adc=maptools.quantization.cimmap.calibrate_map(...) or use "
                    "adc_range='full'")
            stored = read_map_calibration(mapname, mapsave_dir)
            spec = stored.spec if cim is True else cim
            adc = stored
        elif cim is not False:
            spec = cim  # type: ignore[assignment]  # None or a CIMSpec (anything else is refused below)
        executor = cls.from_files(mapname, files, spec, adc, device=device, seed=seed)
        if cim is True:  # what the map stores derived from cim.json agrees with it
            check_records_gains(executor.quantinfo, stored)
            check_settings_spec(read_manifest(resolve_map(mapname, mapsave_dir)).get("settings", {}), stored)
        return executor

    @classmethod
    def from_files(cls, mapname: str, files: Mapping[str, bytes], cim: CIMSpec | None = None,
                   adc: MapCalibration | Mapping[str, AdcCalibration] | None = None, *,
                   device: DeviceModel | None = None, seed: SeedLike = 0) -> ReferenceExecutor:
        """The executor of a map's files already read as one snapshot (:func:`~maptools.quantization.read_map`).

        Args:
            mapname: The map, for errors.
            files: At least ``quant_model.onnx``, ``quantinfo.pkl`` and ``quantparams.pkl``: their checked bytes.
            cim, adc, device, seed: As :meth:`load` (``cim`` a spec or None).

        Raises:
            ArtifactError: a file is corrupt, or the files disagree.
        """
        return cls(load_quant_model(mapname, files[QUANTMODEL]), load_quantinfo(files[QUANTINFO]),
                   load_quantparams(files[QUANTPARAMS]), cim, adc, device=device, seed=seed)

    # -- the crossbar MACs and the MAC backend -----------------------------------------------------
    @property
    def crossbar_nodes(self) -> list[onnx.NodeProto]:
        """The MAC nodes with a constant, quantized weight: those a CIM chip runs on crossbars."""
        return [node for node, state in zip(self._nodes, self._states, strict=True) if isinstance(state, MacWeights)]

    def mac_weights(self, node: onnx.NodeProto) -> MacWeights:
        """The integer weight and bias of a crossbar node (one of :attr:`crossbar_nodes`).

        Raises:
            InvalidArgumentError: not a crossbar node of this executor.
        """
        state = self._mac_states.get(node.name)
        if state is None:
            raise InvalidArgumentError(f"{describe(node)} is not a MAC with a constant weight of this map")
        return state

    def crossbar_operands(self) -> list[tuple[onnx.NodeProto, MacOperands]]:
        """Every crossbar node with its operands (:func:`~.crossbar.mac_operands`), in graph order."""
        return [(node, mac_operands(node, self.record(node))) for node in self.crossbar_nodes]

    def crossbar_macs(self) -> list[CrossbarMac]:
        """Every crossbar node with its operands and integer weight, in graph order (what a backend is given)."""
        return [CrossbarMac(node, ops, self.mac_weights(node).weight) for node, ops in self.crossbar_operands()]

    @property
    def fingerprint(self) -> str:
        """The SHA-256 of every crossbar MAC's operands and weights (:func:`~.crossbar.crossbar_fingerprint`).

        An ADC calibration records the fingerprint of the executor it was made on, and is refused by an
        executor of another one.
        """
        return crossbar_fingerprint((ops, self.mac_weights(node).weight) for node, ops in self.crossbar_operands())

    def with_backend(self, backend: MacBackend) -> ReferenceExecutor:
        """A copy of this executor with another MAC backend, sharing the loaded map (nothing re-read or re-checked).

        Raises:
            InvalidArgumentError: the backend refuses this map's MACs (a calibration of another map, or one
                missing a MAC).
        """
        twin = copy.copy(self)
        twin.backend = backend
        twin._accumulators = backend.accumulators(self.crossbar_macs(), lambda: self.fingerprint)
        return twin

    def with_cim(self, cim: CIMSpec | None, adc: MapCalibration | Mapping[str, AdcCalibration] | None = None, *,
                 mac_hook: MacHook | None = None, device: DeviceModel | None = None,
                 seed: SeedLike = 0) -> ReferenceExecutor:
        """A copy of this executor in another mode: :meth:`with_backend` of :func:`~.backends.mac_backend`.

        Args:
            cim: None for exact MACs, or a CIMSpec (see the class arguments).
            adc: The ADC calibration of a calibrated spec (see the class arguments).
            mac_hook: Called with the operands, integer weights and centred columns of every crossbar MAC
                before it is accumulated (see :data:`~maptools.quantization.reference.crossbar.MacHook`); it
                must not modify them. None for no hook.
            device: The analog cells' non-idealities (needs ``cim``); None or an ideal model for exact cells.
                Each call makes a new chip: its cells are programmed on their first run and kept for the
                following ones (see :mod:`~maptools.quantization.cim.analog`).
            seed: The chip's seed (an int or a SeedSequence); crossbar MAC ``i`` (graph order) draws from
                ``child_seed(seed, i)``.

        Raises:
            InvalidArgumentError: as the class, or a device without ``cim`` or whose per-level parameters do
                not fit the spec's cells.
            InvalidTypeError: as the class, or a ``device`` or ``seed`` of the wrong type.
        """
        return self.with_backend(mac_backend(cim, adc, hook=mac_hook, device=device, seed=seed))

    @property
    def cim(self) -> CimMode | None:
        """The crossbar simulated (None: exact MACs)."""
        return self.backend.cim

    @property
    def device(self) -> DeviceModel | None:
        """The analog non-idealities of the simulated chip (None: exact cells)."""
        return self.backend.device

    @property
    def mac_hook(self) -> MacHook | None:
        """Called with every crossbar MAC's operands, weights and columns (None: no hook)."""
        return self.backend.hook

    def mac_accumulator(self, node: onnx.NodeProto) -> Callable[[np.ndarray, np.ndarray], np.ndarray] | None:
        """The accumulation step of a MAC node: None for the exact :func:`~.mac.accumulate`, else the backend's."""
        return self._accumulators.get(node.name)

    @property
    def requant_mode(self) -> str:
        """How MAC accumulators are requantized: ``'float'`` (exact mode), else the CIM spec's ``requant``."""
        return self.backend.requant_mode

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
        if scale.size != 1:  # per channel: only as quantinfo records it (a tensor only depthwise Convs read)
            return self._per_channel_boundary(node, scale, zp_arr, candidates, (lo, hi))
        for tq in candidates:
            if same_scale(tq.scale, q_scale) and tq.zero_point == q_zp:
                if (tq.qmin, tq.qmax) != (lo, hi):
                    raise ArtifactError(
                        f"{QUANTMODEL}: {describe(node)} clips {node.input[0]!r} to [{lo}, {hi}] but "
                        f"quantinfo records [{tq.qmin}, {tq.qmax}]"
                    )
                return tq
        if candidates:
            recorded = ", ".join(f"scale {describe_scale(t.scale)} zp {t.zero_point}" for t in candidates)
            raise ArtifactError(
                f"{QUANTMODEL}: {describe(node)} quantizes {node.input[0]!r} with scale {q_scale:.6g}, zero point "
                f"{q_zp}, but quantinfo records {recorded} for that tensor"
            )
        bits = max(1, math.ceil(math.log2(hi - lo + 1)))
        logger.debug("%s: no quantinfo record for %r, using the node's own scale %.6g", describe(node),
                     node.input[0], q_scale)
        return TensorQuant(name=node.input[0], bits=bits, scale=q_scale, zero_point=q_zp, qmin=lo, qmax=hi)

    @staticmethod
    def _per_channel_boundary(node: onnx.NodeProto, scale: np.ndarray, zp_arr: np.ndarray,
                              candidates: list[TensorQuant], bounds: tuple[int, int]) -> TensorQuant:
        """The per-channel record a QuantizeLinear with one scale per channel applies (it must be recorded)."""
        axis = next((int(a.i) for a in node.attribute if a.name == "axis"), 1)
        for tq in candidates:
            if tq.axis is not None and tq.axis == axis and same_scale(tq.scale, scale) \
                    and same_zero_point(tq.zero_point, zp_arr):
                if (tq.qmin, tq.qmax) != bounds:
                    raise ArtifactError(f"{QUANTMODEL}: {describe(node)} clips {node.input[0]!r} to {list(bounds)} "
                                        f"but quantinfo records [{tq.qmin}, {tq.qmax}]")
                return tq
        raise UnsupportedOperatorError(
            f"{describe(node)}: per-channel activation quantization along axis {axis} that quantinfo does not "
            f"record for {node.input[0]!r} (per-channel scales are recorded for tensors only depthwise Convs read)")

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
                    integers[node.name] = first.q.astype(smallest_int_dtype(first.qmin, first.qmax))
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
                logger.debug("%s: output %d requantized to its record (scale %s)", describe(node), index,
                             describe_scale(tq.scale))
            held[index] = requantize(value, tq)
        return held
