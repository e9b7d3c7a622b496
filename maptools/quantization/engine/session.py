"""One PPQ quantization run, seen through maptools' own types.

:class:`PPQSession` loads a prepared ONNX model into PPQ, quantizes it with the
:class:`~maptools.quantization.engine.quantizer.LowBitQuantizer`, runs the quantized or the float graph,
and hands back what the rest of maptools needs as plain records and numpy arrays. The jobs behind its
methods each have their module: the records of ``quantinfo.pkl`` and ``quantparams.pkl``
(:mod:`~maptools.quantization.engine.extract`), the QDQ export (:mod:`~maptools.quantization.engine.exporter`),
the error analysis (:mod:`~maptools.quantization.engine.analysis`), the quantization saved as data
(:mod:`~maptools.quantization.engine.state`) and the fix-up of fan-out tensors PPQ leaves in float
(:mod:`~maptools.quantization.engine.holes`).
"""

from __future__ import annotations

import logging
import tempfile
from collections.abc import Mapping, Sequence
from pathlib import Path

import numpy as np
import onnx
import torch

from maptools.errors import ArtifactError, EngineError, UnsupportedOperatorError
from maptools.quantization.engine import analysis, extract
from maptools.quantization.engine.analysis import ErrorAnalysis
from maptools.quantization.engine.exporter import export_qdq
from maptools.quantization.engine.facade import (
    DEFAULT_BACKEND_TABLE,
    BaseGraph,
    DispatchingTable,
    QuantableOperation,
    QuantizationSetting,
    TargetPlatform,
    dispatch_graph,
    load_onnx_graph,
)
from maptools.quantization.engine.floats import float_operators
from maptools.quantization.engine.holes import close_quantization_holes
from maptools.quantization.engine.learned_rounding import (
    LayerRounding,
    LearnedRoundingPass,
    RoundingSettings,
    with_learned_rounding,
)
from maptools.quantization.engine.operators import FixedOperatorExecutor
from maptools.quantization.engine.outputs import FinalConcat, final_concats
from maptools.quantization.engine.quantizer import LowBitQuantizer, LowBitSpec
from maptools.quantization.engine.quiet import ppq_silenced
from maptools.quantization.engine.recipes import default_setting
from maptools.quantization.engine.rewrites import ppq_compatible
from maptools.quantization.engine.state import (
    capture_state,
    parameter_fingerprints,
    restore_state,
    spec_from_state,
)
from maptools.quantization.engine.threads import DEFAULT_THREADS, compute_threads, torch_threads
from maptools.quantization.progress import counted
from maptools.quantization.records import OperatorQuantConfig

__all__ = ["Batch", "PPQSession"]

logger = logging.getLogger(__name__)

#: One batch of inputs: input name -> tensor.
Batch = Mapping[str, torch.Tensor]


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
        #: Graph output names, in the float model's order.
        self.output_names = list(output_names) or list(graph.outputs)
        self.executor = FixedOperatorExecutor(graph=self.graph, device=device)
        self._quantized = quantized
        #: Graph outputs built by a final Concat (kept in float, parts at their own quantization).
        self.final_concats: list[FinalConcat] = []
        #: torch threads while quantizing and executing (see :mod:`~maptools.quantization.engine.threads`).
        self.threads = threads
        #: Operator types the quantizer quantizes (set by :meth:`quantize`).
        self.quantizable_types: frozenset[str] = frozenset()
        #: Learned rounding's per-layer records (:meth:`quantize` with ``rounding``), else empty.
        self.rounding_results: list[LayerRounding] = []
        #: Tensors given per-channel scales by :meth:`quantize` (name -> spread of their channel ranges).
        self.channel_scaled: dict[str, float] = {}
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
    def quantize(self, batches: Sequence[Batch], rounding: RoundingSettings | None = None,
                 channel_scales: bool = False) -> None:
        """Calibrate on ``batches`` and quantize the graph in place (PPQ's passes per the setting).

        The calibration runs with the speed-ups of :mod:`~maptools.quantization.engine.speedups` (weights
        fake-quantized once instead of on every forward, a faster percentile observer): PPQ's passes,
        with results identical to the bit. With ``rounding``, the weights are rounded by learned rounding
        (:mod:`~maptools.quantization.engine.learned_rounding`) before PPQ bakes them; its per-layer records
        are then in :attr:`rounding_results`. With ``channel_scales``, the tensors only depthwise Convs read
        whose channel ranges spread widely get per-channel scales (:mod:`.channelwise`), listed in
        :attr:`channel_scaled`.
        """
        quantizer = LowBitQuantizer(graph=self.graph, spec=self.spec, channel_scales=channel_scales)
        quantizer._verbose = False
        self.quantizable_types = frozenset(quantizer.quant_operation_types)
        rounding_pass = LearnedRoundingPass(rounding) if rounding is not None else None
        if rounding_pass is not None:
            quantizer.build_quant_pipeline = with_learned_rounding(quantizer.build_quant_pipeline, rounding_pass)
        device = self.device

        def collate(batch: Batch) -> dict[str, torch.Tensor]:
            return {name: tensor.to(device) for name, tensor in batch.items()}

        try:
            with ppq_silenced(), compute_threads(self.threads):
                quantizer.quantize(inputs=collate(batches[0]), calib_dataloader=counted("calibration batch", batches),
                                   executor=self.executor, setting=self.setting,
                                   calib_steps=len(batches), collate_fn=collate)
        except Exception as exc:
            raise self._engine_error("quantization", exc) from exc
        if rounding_pass is not None:
            self.rounding_results = rounding_pass.results
        if quantizer.channel_pass is not None:
            self.channel_scaled = dict(quantizer.channel_pass.applied)
        closed = close_quantization_holes(self.graph)
        if closed:
            logger.debug("quantized %d fan-out tensors PPQ left in float: %s", len(closed), ", ".join(closed))
        self._quantized = True

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
        names = list(output_names) if output_names is not None else self.output_names
        if not quantized:
            self.graph_dequantize()
        try:
            return self.execute(batch, names, "execution")
        finally:
            if not quantized:
                self.graph_restore()

    def execute(self, batch: Batch, names: Sequence[str], stage: str) -> dict[str, np.ndarray]:
        """One silent forward of the graph in its current state; PPQ errors become :class:`EngineError`."""
        feed = {name: tensor.to(self.device) for name, tensor in batch.items()}
        try:  # torch's threads only: one forward per batch (and per operator in the layer-wise analysis) must not
            # pay threadpoolctl's scan of the loaded libraries; quantize() limits numpy's BLAS around the whole run
            with ppq_silenced(), torch_threads(self.threads):
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

    # -- error analysis -------------------------------------------------------------------------------
    def error_analysis(self, batches: Sequence[Batch], layerwise: bool = False,
                       layerwise_batches: int = 1) -> ErrorAnalysis:
        """Graph-wise error of the quantized graph against FP32 on ``batches`` (see :mod:`.analysis`).

        With ``layerwise``, also the layer-wise error of every quantized operator (:meth:`layerwise`, on the
        first ``layerwise_batches`` batches); without it the ``isolated_*`` figures are empty.
        """
        return analysis.error_analysis(self, batches, layerwise, layerwise_batches)

    def output_snr(self, batches: Sequence[Batch]) -> dict[str, float]:
        """The SNR in dB of each graph output against FP32 over ``batches`` (see :mod:`.analysis`)."""
        return analysis.output_snr(self, batches)

    def layerwise(self, batches: Sequence[Batch]) -> tuple[dict[str, float], dict[str, float]]:
        """Layer-wise error: the graph outputs' SNR and cosine when only one operator is quantized."""
        return analysis.layerwise(self, batches)

    # -- records and export ---------------------------------------------------------------------------
    def quantized_operations(self) -> list[QuantableOperation]:
        """Quantized operators in topological order."""
        return extract.quantized_operations(self.graph)

    def quantinfo(self) -> dict[str, OperatorQuantConfig]:
        """Per-operator quantization configs, keyed by node name (``quantinfo.pkl``)."""
        return extract.quantinfo(self.graph, self.spec)

    def float_operators(self) -> list[dict[str, str]]:
        """The operators left in float, in graph order, each with why (see :mod:`.floats`)."""
        final_nodes = {name for concat in self.final_concats for name in concat.float_nodes}
        return float_operators(self.graph, self.quantizable_types, final_nodes)

    def quantparams(self) -> dict[str, np.ndarray | None]:
        """Integer weights and biases: ``<node>_conv_weight`` / ``_conv_bias`` (``_gemm_`` for Gemm/MatMul)."""
        return extract.quantparams(self.graph)

    def fake_quantized_parameters(self) -> dict[str, np.ndarray]:
        """PPQ's own fake-quantized weights and biases (float), keyed like :meth:`quantparams`."""
        return extract.fake_quantized_parameters(self.graph)

    def export_qdq(self, io_like: onnx.ModelProto | None = None) -> onnx.ModelProto:
        """The faithful QDQ model (see :func:`~maptools.quantization.engine.exporter.export_qdq`).

        Args:
            io_like: The original model: its graph input and output types (dynamic dims included) are
                copied onto the export, and intermediate shapes are dropped, so the QDQ model accepts
                the same shapes as the float one.

        Raises:
            EngineError: PPQ failed to export, or the model fails ``onnx.checker``.
        """
        try:
            return export_qdq(self.graph, self.opset, io_like)
        except EngineError:
            raise
        except Exception as exc:
            raise self._engine_error("export", exc) from exc
