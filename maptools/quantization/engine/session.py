"""One PPQ quantization run, seen through maptools' own types.

:class:`PPQSession` loads a prepared ONNX model into PPQ, quantizes it with the
:class:`~maptools.quantization.engine.quantizer.LowBitQuantizer`, and hands back what the rest of maptools
needs as plain records and numpy arrays: the per-operator quantization configs, the integer weights and
biases, the faithful QDQ ONNX model, simulated outputs and the graph-wise error.
"""

from __future__ import annotations

import logging
import tempfile
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import onnx
import torch

from maptools.errors import ArtifactError, EngineError, UnsupportedOperatorError
from maptools.quantization.engine.quiet import import_ppq, ppq_silenced
from maptools.quantization.records import OperatorQuantConfig, TensorQuant

import_ppq()

from ppq.api import dispatch_graph, load_onnx_graph  # noqa: E402
from ppq.api.setting import DispatchingTable, QuantizationSetting, QuantizationSettingFactory  # noqa: E402
from ppq.core import QuantizationProperty, QuantizationStates, TargetPlatform  # noqa: E402
from ppq.executor import TorchExecutor  # noqa: E402
from ppq.executor.op import DEFAULT_BACKEND_TABLE  # noqa: E402
from ppq.IR import BaseGraph, QuantableOperation  # noqa: E402

from maptools.quantization.engine.exporter import FaithfulQDQExporter, quantize_to_int  # noqa: E402
from maptools.quantization.engine.fusion import FUSED_ACTIVATION_TYPES, unmaterialized_variables  # noqa: E402
from maptools.quantization.engine.operators import operator_fixes  # noqa: E402
from maptools.quantization.engine.outputs import FinalConcat, final_concats  # noqa: E402
from maptools.quantization.engine.quantizer import (  # noqa: E402
    BIAS_TYPES,
    WEIGHTED_TYPES,
    LowBitQuantizer,
    LowBitSpec,
)
from maptools.quantization.engine.rewrites import ppq_compatible  # noqa: E402
from maptools.quantization.engine.speedups import accelerated_pipeline, fast_observers  # noqa: E402
from maptools.quantization.engine.state import (  # noqa: E402
    capture_state,
    parameter_fingerprints,
    restore_state,
    spec_from_state,
)
from maptools.quantization.engine.threads import DEFAULT_THREADS, torch_threads  # noqa: E402

__all__ = ["PPQSession", "default_setting", "weight_key", "bias_key"]

logger = logging.getLogger(__name__)

Batch = Mapping[str, torch.Tensor]
_LIVE = {QuantizationStates.ACTIVATED, QuantizationStates.PASSIVE, QuantizationStates.BAKED,
         QuantizationStates.PASSIVE_BAKED}


def default_setting() -> QuantizationSetting:
    """PPQ's TensorRT setting, the baseline every recipe starts from."""
    return QuantizationSettingFactory.trt_setting()


def weight_key(op_name: str, op_type: str) -> str:
    """``quantparams.pkl`` key of an operator's integer weight."""
    return f"{op_name}_{'conv' if op_type in ('Conv', 'ConvTranspose') else 'gemm'}_weight"


def bias_key(op_name: str, op_type: str) -> str:
    """``quantparams.pkl`` key of an operator's integer bias."""
    return f"{op_name}_{'conv' if op_type in ('Conv', 'ConvTranspose') else 'gemm'}_bias"


def _tensor_quant(name: str, config) -> TensorQuant | None:
    root = config.dominated_by
    if root.state not in _LIVE or root.scale is None:
        return None
    return TensorQuant(
        name=name,
        bits=int(root.num_of_bits),
        scale=float(root.scale.flatten()[0].item()),
        zero_point=int(round(float(root.offset.flatten()[0].item()))),
        qmin=int(root.quant_min),
        qmax=int(root.quant_max),
    )


@dataclass
class ErrorAnalysis:
    """Graph-wise error: quantized vs FP32, per graph output and per quantized operator output.

    ``part_*`` hold the parts of outputs built by a final ``Concat`` (see
    :mod:`~maptools.quantization.engine.outputs`): output name -> part tensor name -> figure. ``*_span`` are
    ``max - min`` of the FP32 and the quantized values of each output and part over the analysed batches (a
    quantized span of 0 where FP32's is not: the output collapsed to a constant).
    """

    output_snr_db: dict[str, float]
    output_cosine: dict[str, float]
    layer_snr_db: dict[str, float]
    layer_cosine: dict[str, float]
    isolated_snr_db: dict[str, float]
    isolated_cosine: dict[str, float]
    part_snr_db: dict[str, dict[str, float]] = field(default_factory=dict)
    part_cosine: dict[str, dict[str, float]] = field(default_factory=dict)
    fp32_span: dict[str, float] = field(default_factory=dict)
    quant_span: dict[str, float] = field(default_factory=dict)


def _snr_db(signal: float, noise: float) -> float:
    if noise <= 0.0:
        return float("inf")
    if signal <= 0.0:
        return float("-inf")
    return float(10.0 * np.log10(signal / noise))


def _copy_io_types(source: onnx.ModelProto, target: onnx.ModelProto) -> None:
    """Give ``target`` the graph inputs/outputs of ``source``: same order, same types (dynamic dims kept)."""
    for kind in ("input", "output"):
        declared = {vi.name: vi for vi in getattr(source.graph, kind)}
        present = {vi.name: vi for vi in getattr(target.graph, kind)}
        order = [name for name in declared if name in present] + [n for n in present if n not in declared]
        merged = []
        for name in order:
            vi = onnx.ValueInfoProto()
            vi.CopyFrom(present[name])
            if name in declared:
                vi.type.CopyFrom(declared[name].type)
            merged.append(vi)
        container = getattr(target.graph, kind)
        del container[:]
        container.extend(merged)
    del target.graph.value_info[:]


class PPQSession:
    """Quantize one ONNX model with PPQ and read the results back as maptools records.

    Build one with :meth:`from_onnx` (a float model) or :meth:`from_state` (the float model and the
    quantization saved by :meth:`to_state`).

    Args:
        graph: The dispatched PPQ graph.
        spec: Bit widths and policies.
        device: ``'cpu'`` or ``'cuda'``.
        setting: A PPQ ``QuantizationSetting``; None for :func:`default_setting`.
        output_names: Graph output names, in the float model's order.
        opset: ONNX opset of the float model (the export uses at least 13).
        quantized: Whether ``graph`` is already quantized.
        threads: torch threads while quantizing and executing.
    """

    def __init__(self, graph: BaseGraph, spec: LowBitSpec, device: str,
                 setting: QuantizationSetting | None = None, output_names: Sequence[str] = (),
                 opset: int = 13, quantized: bool = False, threads: int = DEFAULT_THREADS) -> None:
        self.spec = spec
        self.device = device
        self.setting = setting if setting is not None else default_setting()
        self.opset = opset
        self.graph = graph
        self._output_names = list(output_names) or list(graph.outputs)
        self.executor = TorchExecutor(graph=self.graph, device=device)
        self._quantized = quantized
        #: Graph outputs built by a final Concat (kept in float, parts at their own quantization).
        self.final_concats: list[FinalConcat] = []
        #: torch threads while quantizing and executing (see :mod:`~maptools.quantization.engine.threads`).
        self.threads = threads
        #: Fingerprints of the parameters as loaded (see :func:`.state.parameter_fingerprints`).
        self.initial_parameters: dict[str, str] = parameter_fingerprints(graph)

    @classmethod
    def from_onnx(cls, model: onnx.ModelProto, spec: LowBitSpec, device: str,
                  setting: QuantizationSetting | None = None, threads: int = DEFAULT_THREADS) -> PPQSession:
        """Load a prepared ONNX model (named nodes, static input shapes) into PPQ and dispatch it."""
        setting = setting if setting is not None else default_setting()
        opset = max((o.version for o in model.opset_import if o.domain in ("", "ai.onnx")), default=13)
        model = ppq_compatible(model)
        concats = final_concats(model)
        with tempfile.TemporaryDirectory(prefix="maptools-") as tmp:
            path = Path(tmp) / "model.onnx"
            onnx.save(model, str(path))
            try:
                with ppq_silenced():
                    graph = load_onnx_graph(onnx_import_file=str(path))
            except Exception as exc:
                raise EngineError(f"PPQ could not load the model: {type(exc).__name__}: {exc}") from exc
        cls._check_supported(graph)
        table = DispatchingTable()  # the setting's own entries, then the final Concats (the setting is not changed)
        table.dispatchings = dict(setting.dispatching_table.dispatchings)
        for concat in concats:
            for name in concat.float_nodes:
                table.append(name, TargetPlatform.FP32)
        with ppq_silenced():
            graph = dispatch_graph(graph=graph, platform=TargetPlatform.TRT_INT8, dispatcher=setting.dispatcher,
                                   dispatching_table=table)
        session = cls(graph, spec, device, setting, [o.name for o in model.graph.output], opset, threads=threads)
        session.final_concats = concats
        return session

    def to_state(self, quantparams: Mapping[str, np.ndarray | None]) -> dict:
        """The quantization of the graph as JSON-ready data (``ppq_state.json``), for :meth:`from_state`.

        Args:
            quantparams: :meth:`quantparams` of this session: weights and biases are saved as references
                to these integers when they give PPQ's values bit for bit.
        """
        return capture_state(self.graph, self.spec, quantparams, self.initial_parameters)

    @classmethod
    def from_state(cls, model: onnx.ModelProto, state: Mapping, quantparams: Mapping[str, np.ndarray | None],
                   device: str = "cpu") -> PPQSession:
        """Rebuild a quantized session: the float model loaded by :meth:`from_onnx`, quantized as ``state`` says.

        Nothing is unpickled: ``state`` is the JSON of :meth:`to_state` and ``quantparams`` plain arrays. The
        graph's quantized forward is PPQ's simulation of the original session to the bit.

        Args:
            model: The same prepared float model the session was quantized from.
            state: :meth:`to_state`'s data.
            quantparams: The integer weights and biases saved with it.
            device: ``'cpu'`` or ``'cuda'``.

        Raises:
            ArtifactError: the state is malformed or does not fit ``quantparams``.
            EngineError: the rebuilt graph differs from the quantized one.
        """
        spec = spec_from_state(state)
        session = cls.from_onnx(model, spec, device)
        try:
            with ppq_silenced():
                restore_state(session.graph, spec, state, quantparams)
        except (EngineError, ArtifactError):
            raise
        except Exception as exc:
            raise session._engine_error("restoring the quantization", exc) from exc
        session.executor.load_graph(session.graph)
        session._quantized = True
        return session

    @staticmethod
    def _check_supported(graph: BaseGraph) -> None:
        for op in graph.operations.values():
            if op.type not in DEFAULT_BACKEND_TABLE:
                raise UnsupportedOperatorError(
                    f"node {op.name!r}: operator type {op.type!r} cannot be executed by PPQ 0.6.6; "
                    "remove or replace it before quantizing"
                )

    # -- quantization -----------------------------------------------------------------------------
    def quantize(self, batches: Sequence[Batch]) -> None:
        """Calibrate on ``batches`` and quantize the graph in place (PPQ's passes per the setting).

        The calibration runs with the speed-ups of :mod:`~maptools.quantization.engine.speedups` (weights
        fake-quantized once instead of on every forward, a faster percentile observer): PPQ's passes,
        with results identical to the bit.
        """
        quantizer = LowBitQuantizer(graph=self.graph, spec=self.spec)
        quantizer._verbose = False
        quantizer.build_quant_pipeline = accelerated_pipeline(quantizer.build_quant_pipeline)
        device = self.device

        def collate(batch: Batch) -> dict[str, torch.Tensor]:
            return {name: tensor.to(device) for name, tensor in batch.items()}

        try:
            with ppq_silenced(), fast_observers(), operator_fixes(), torch_threads(self.threads):
                quantizer.quantize(inputs=collate(batches[0]), calib_dataloader=list(batches),
                                   executor=self.executor, setting=self.setting,
                                   calib_steps=len(batches), collate_fn=collate)
        except Exception as exc:
            raise self._engine_error("quantization", exc) from exc
        closed = self._close_quantization_holes()
        if closed:
            logger.debug("quantized %d fan-out tensors PPQ left in float: %s", len(closed), ", ".join(closed))
        self._quantized = True

    def _close_quantization_holes(self) -> list[str]:
        """Quantize tensors PPQ would hand unquantized to a consumer that expects integers.

        When an operator's output fans out (a residual block's ReLU feeding both a Conv and an Add), PPQ's
        alignment can leave the output config overlapped by the Add's input config: PPQ then quantizes the
        tensor only on the Add's edge and the Conv computes on floats, although its input config (and so
        ``quantinfo.pkl``) says the input is quantized. A chip computes every MAC on integers, so the
        producer's output is quantized here at the same (dominating) scale; the Add's quantization of it
        becomes an identity.

        With ``layer_bits``, a consumer may requantize the tensor to its own bits (a 4-bit Conv reading the
        output of a ReLU6 that a residual ``Add`` keeps at 8 bits). PPQ then rounds the float tensor once,
        to 4 bits, while the chip (and ``quantinfo.pkl``: the ReLU6 output is 8-bit) materializes the 8-bit
        tensor and requantizes it: the producer's output is quantized here too, so PPQ, onnxruntime and
        the integer executor all round twice.

        Returns:
            ``'producer -> consumer'`` for every tensor quantized.
        """
        live = QuantizationStates.is_activated
        closed = []
        for op in self.graph.topological_sort():
            if not isinstance(op, QuantableOperation):
                continue
            for config, var in zip(op.config.output_quantization_config, op.outputs, strict=True):
                if live(config.state) or config.dominated_by is config or not live(config.dominated_by.state):
                    continue
                for dest in var.dest_ops:
                    if not isinstance(dest, QuantableOperation) or dest.type in ("Relu", "Clip"):
                        continue  # Q(relu(x)) == relu(Q(x)): a fused activation is not a hole
                    dest_config = dest.config.input_quantization_config[dest.inputs.index(var)]
                    if dest.config.output_quantization_config and (
                            dest_config.dominated_by is dest.config.output_quantization_config[0].dominated_by):
                        continue  # an activation fused into its producer (Conv -> Sigmoid) reads the accumulator
                    if not live(dest_config.state) or dest_config.dominated_by is not config.dominated_by:
                        # quantized with the dominating config's scale: its bit width and range too (they
                        # differ when layer_bits gives the consumer other bits than the producer)
                        root = config.dominated_by
                        config.policy, config.num_of_bits = root.policy, root.num_of_bits
                        config.quant_min, config.quant_max = root.quant_min, root.quant_max
                        config.state = QuantizationStates.ACTIVATED
                        closed.append(f"{op.name} -> {dest.name}")
                        break
        return closed

    def _engine_error(self, stage: str, exc: Exception) -> EngineError:
        message = f"{type(exc).__name__}: {exc}"
        # the longest name in the message: '/a/Slice' is also a substring of '/a/Slice_1'
        culprit = max((op for op in self.graph.operations.values() if op.name in message),
                      key=lambda op: len(op.name), default=None)
        where = f" at node {culprit.name!r} ({culprit.type})" if culprit is not None else ""
        return EngineError(f"PPQ failed during {stage}{where}: {message}")

    # -- execution --------------------------------------------------------------------------------
    def forward(self, batch: Batch, quantized: bool = True,
                output_names: Sequence[str] | None = None) -> dict[str, np.ndarray]:
        """Run the graph on one batch, with PPQ's fake quantization (``quantized``) or in FP32."""
        names = list(output_names) if output_names is not None else self._output_names
        if not quantized:
            self.graph_dequantize()
        try:
            return self._execute(batch, names, "execution")
        finally:
            if not quantized:
                self.graph_restore()

    def _execute(self, batch: Batch, names: Sequence[str], stage: str) -> dict[str, np.ndarray]:
        """One silent forward of the graph in its current state; PPQ errors become :class:`EngineError`."""
        feed = {name: tensor.to(self.device) for name, tensor in batch.items()}
        try:
            with ppq_silenced(), operator_fixes(), torch_threads(self.threads):
                outputs = self.executor.forward(inputs=feed, output_names=list(names))
        except Exception as exc:
            raise self._engine_error(stage, exc) from exc
        return {name: out.detach().cpu().numpy() for name, out in zip(names, outputs, strict=True)}

    def graph_dequantize(self) -> None:
        """Switch every quantized operator to FP32 execution."""
        for op in self.graph.operations.values():
            if isinstance(op, QuantableOperation):
                op.dequantize()

    def graph_restore(self) -> None:
        """Undo :meth:`graph_dequantize`."""
        for op in self.graph.operations.values():
            if isinstance(op, QuantableOperation):
                op.restore_quantize_state()

    def error_analysis(self, batches: Sequence[Batch], layerwise: bool = False) -> ErrorAnalysis:
        """Graph-wise error of the quantized graph against FP32 on ``batches``.

        Every quantized operator's output is compared, including the error accumulated from the graph's
        inputs (as PPQ's ``graphwise_error_analyse``), as well as every graph output and every part of an
        output built by a final ``Concat``. With ``layerwise``, also the layer-wise error of every quantized
        operator (:meth:`layerwise`, on the first batch); without it the ``isolated_*`` figures are empty.
        """
        layer_vars = {op.outputs[0].name: op.name for op in self.graph.topological_sort()
                      if isinstance(op, QuantableOperation) and op.outputs}
        parts = {concat.output: list(concat.parts) for concat in self.final_concats}
        watched = self._output_names + [part for names in parts.values() for part in names]
        names = list(dict.fromkeys(watched + list(layer_vars)))
        sums = {name: np.zeros(4) for name in names}  # signal, noise, dot, candidate power
        spans = {name: [np.inf, -np.inf, np.inf, -np.inf] for name in watched}  # fp32 min/max, quantized min/max
        for batch in batches:
            quant = self.forward(batch, quantized=True, output_names=names)
            ref = self.forward(batch, quantized=False, output_names=names)
            for name in names:
                r = ref[name].astype(np.float64)
                q = quant[name].astype(np.float64)
                sums[name] += (np.sum(r * r), np.sum((r - q) ** 2), np.sum(r * q), np.sum(q * q))
                if name in spans and r.size:
                    low_r, high_r, low_q, high_q = spans[name]
                    spans[name] = [min(low_r, r.min()), max(high_r, r.max()), min(low_q, q.min()), max(high_q, q.max())]

        def snr(name: str) -> float:
            return _snr_db(sums[name][0], sums[name][1])

        def cos(name: str) -> float:
            signal, _, dot, power = sums[name]
            return float(dot / max(np.sqrt(signal * power), 1e-30))

        isolated_snr, isolated_cos = self.layerwise(batches[0]) if batches and layerwise else ({}, {})
        return ErrorAnalysis(
            output_snr_db={n: snr(n) for n in self._output_names},
            output_cosine={n: cos(n) for n in self._output_names},
            layer_snr_db={op: snr(var) for var, op in layer_vars.items()},
            layer_cosine={op: cos(var) for var, op in layer_vars.items()},
            isolated_snr_db=isolated_snr,
            isolated_cosine=isolated_cos,
            part_snr_db={out: {p: snr(p) for p in names_} for out, names_ in parts.items()},
            part_cosine={out: {p: cos(p) for p in names_} for out, names_ in parts.items()},
            fp32_span={n: float(v[1] - v[0]) for n, v in spans.items() if np.isfinite(v[0])},
            quant_span={n: float(v[3] - v[2]) for n, v in spans.items() if np.isfinite(v[2])},
        )

    def layerwise(self, batch: Batch) -> tuple[dict[str, float], dict[str, float]]:
        """Layer-wise error: the graph outputs' SNR and cosine when only one operator is quantized.

        As PPQ's ``layerwise_error_analyse``: every other operator runs in FP32, so the figure is the error
        that operator brings in by itself. One forward per quantized operator, on one batch.
        """
        names = self._output_names
        ref = [self.forward(batch, quantized=False)[name].astype(np.float64) for name in names]
        snr: dict[str, float] = {}
        cos: dict[str, float] = {}
        self.graph_dequantize()
        try:
            for op in self.quantized_operations():
                op.restore_quantize_state()
                try:
                    outputs = self._execute(batch, names, "layer-wise analysis")
                finally:
                    op.dequantize()
                quant = [outputs[name].astype(np.float64) for name in names]
                signal = sum(float(np.sum(r * r)) for r in ref)
                noise = sum(float(np.sum((r - q) ** 2)) for r, q in zip(ref, quant, strict=True))
                dot = sum(float(np.sum(r * q)) for r, q in zip(ref, quant, strict=True))
                power = sum(float(np.sum(q * q)) for q in quant)
                snr[op.name] = _snr_db(signal, noise)
                cos[op.name] = float(dot / max(np.sqrt(signal * power), 1e-30))
        finally:
            self.graph_restore()
        return snr, cos

    # -- extraction -------------------------------------------------------------------------------
    def quantized_operations(self) -> list[QuantableOperation]:
        """Quantized operators in topological order."""
        return [op for op in self.graph.topological_sort() if isinstance(op, QuantableOperation)]

    def quantinfo(self) -> dict[str, OperatorQuantConfig]:
        """Per-operator quantization configs, keyed by node name."""
        info: dict[str, OperatorQuantConfig] = {}
        # tensors inside a fused activation that is not a clip (Conv -> Sigmoid, x * HardSigmoid(x)): the
        # activation reads the accumulator, they are never integers
        inside = {name for name in unmaterialized_variables(self.graph, FUSED_ACTIVATION_TYPES)
                  if self._overlapped(name)}

        def tensor_quant(var, cfg) -> TensorQuant | None:
            return None if var.name in inside else _tensor_quant(var.name, cfg)

        for op in self.quantized_operations():
            configs = op.config.input_quantization_config
            act_inputs = [None if var.is_parameter else tensor_quant(var, cfg)
                          for cfg, var in zip(configs, op.inputs, strict=True)]
            outputs = [tensor_quant(var, cfg)
                       for cfg, var in zip(op.config.output_quantization_config, op.outputs, strict=True)]
            first_in = next((t for t in act_inputs if t is not None), None)
            first_out = outputs[0] if outputs else None
            ref = first_out or first_in
            record = OperatorQuantConfig(
                name=op.name, op_type=op.type,
                input_bits=first_in.bits if first_in else None,
                input_scale=first_in.scale if first_in else None,
                input_zero_point=first_in.zero_point if first_in else 0,
                output_bits=first_out.bits if first_out else None,
                output_scale=first_out.scale if first_out else None,
                output_zero_point=first_out.zero_point if first_out else 0,
                io_bits=ref.bits if ref else None,
                io_min=ref.qmin if ref else None,
                io_max=ref.qmax if ref else None,
                symmetric=self.spec.symmetrical,
                inputs=act_inputs, outputs=outputs,
            )
            weight = self._weight_config(op)
            if weight is not None:
                cfg = weight
                record.weight_bits = int(cfg.num_of_bits)
                record.weight_min, record.weight_max = int(cfg.quant_min), int(cfg.quant_max)
                record.weight_scale = cfg.scale.detach().cpu().numpy().astype(np.float32).reshape(-1)
                per_channel = cfg.policy.has_property(QuantizationProperty.PER_CHANNEL)
                record.weight_axis = int(cfg.channel_axis) if per_channel else None
            bias = self._bias_config(op)
            if bias is not None:
                record.bias_bits = int(bias.num_of_bits)
                record.bias_scale = bias.scale.detach().cpu().numpy().astype(np.float32).reshape(-1)
            info[op.name] = record
        return info

    def _overlapped(self, name: str) -> bool:
        """Whether the producer of tensor ``name`` hands its quantization to another config (PPQ fused it)."""
        var = self.graph.variables[name]
        op = var.source_op
        if not isinstance(op, QuantableOperation):
            return False
        config = op.config.output_quantization_config[op.outputs.index(var)]
        return config.state == QuantizationStates.OVERLAPPED

    @staticmethod
    def _weight_config(op: QuantableOperation):
        if op.type not in WEIGHTED_TYPES or op.num_of_input < 2 or not op.inputs[1].is_parameter:
            return None
        cfg = op.config.input_quantization_config[1]
        return cfg if cfg.state in _LIVE else None

    @staticmethod
    def _bias_config(op: QuantableOperation):
        if op.type not in BIAS_TYPES or op.num_of_input < 3 or not op.inputs[2].is_parameter:
            return None
        cfg = op.config.input_quantization_config[2]
        return cfg if cfg.state in _LIVE else None

    def quantparams(self) -> dict[str, np.ndarray | None]:
        """Integer weights and biases: ``<node>_conv_weight`` / ``_conv_bias`` (``_gemm_`` for Gemm/MatMul)."""
        params: dict[str, np.ndarray | None] = {}
        for op in self.quantized_operations():
            weight = self._weight_config(op)
            if weight is None:
                continue
            w_int = quantize_to_int(op.inputs[1].value.detach().cpu(), weight).numpy()
            params[weight_key(op.name, op.type)] = w_int.astype(np.int8 if weight.num_of_bits <= 8 else np.int32)
            if op.type in BIAS_TYPES:
                bias = self._bias_config(op)
                params[bias_key(op.name, op.type)] = None if bias is None else self._bias_int(op, bias)
        return params

    @staticmethod
    def _bias_int(op: QuantableOperation, config) -> np.ndarray:
        """The int32 bias of ``op``; a value beyond the 32-bit range is clipped to it (as PPQ simulates) and logged.

        PPQ clamps in float32, where ``2^31 - 1`` rounds up to ``2^31``: cast as is, a saturated bias
        wrapped around to ``-2^31``.
        """
        low, high = int(config.quant_min), int(config.quant_max)
        values = quantize_to_int(op.inputs[2].value.detach().cpu().reshape(-1), config).numpy()
        saturated = np.flatnonzero((values <= low) | (values >= high))
        if saturated.size:
            logger.warning("%s: the bias of channel(s) %s saturates the %d-bit range (input scale x weight "
                           "scale too small for it); it is clipped, as in PPQ's simulation",
                           op.name, saturated.tolist()[:8], int(config.num_of_bits))
        return np.clip(values, low, high).astype(np.int32)

    def fake_quantized_parameters(self) -> dict[str, np.ndarray]:
        """PPQ's own fake-quantized weights and biases (float), keyed like :meth:`quantparams`."""
        result: dict[str, np.ndarray] = {}
        for op in self.quantized_operations():
            if self._weight_config(op) is not None:
                result[weight_key(op.name, op.type)] = op.inputs[1].value.detach().cpu().numpy()
            if self._bias_config(op) is not None:
                result[bias_key(op.name, op.type)] = op.inputs[2].value.detach().cpu().numpy().reshape(-1)
        return result

    def export_qdq(self, io_like: onnx.ModelProto | None = None) -> onnx.ModelProto:
        """The faithful QDQ model (see :class:`~maptools.quantization.engine.exporter.FaithfulQDQExporter`).

        Args:
            io_like: The original model: its graph input and output types (dynamic dims included) are
                copied onto the export, and intermediate shapes are dropped, so the QDQ model accepts
                the same shapes as the float one.
        """
        exporter = FaithfulQDQExporter()
        exporter.opset = self.opset
        with tempfile.TemporaryDirectory(prefix="maptools-") as tmp:
            path = Path(tmp) / "quant_model.onnx"
            try:
                with ppq_silenced():
                    exporter.export(file_path=str(path), graph=self.graph.copy(), quantized_param=True)
            except Exception as exc:
                raise self._engine_error("export", exc) from exc
            model = onnx.load(str(path))
        model.producer_name = "maptools"
        # PPQ writes the initializers in the iteration order of a set of names, which follows Python's
        # per-process string hashing: sorted, the same map is the same bytes in every process
        initializers = sorted(model.graph.initializer, key=lambda tensor: tensor.name)
        del model.graph.initializer[:]
        model.graph.initializer.extend(initializers)
        if io_like is not None:
            _copy_io_types(io_like, model)
        try:
            onnx.checker.check_model(model)
        except Exception as exc:
            raise EngineError(f"the exported QDQ model fails onnx.checker: {exc}") from exc
        return model
