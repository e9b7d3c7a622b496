"""QDQ export that stays faithful below 8 bits.

ONNX before 1.16 has no int4 type, so PPQ's ONNX Runtime exporter stores low-bit values in int8/uint8
QuantizeLinear outputs and onnxruntime never clips them to the low-bit range. This exporter inserts a
``Clip`` to the ``[quant_min, quant_max]`` integer range between every activation QuantizeLinear and its
DequantizeLinear, and stores parameters as integers (weights in int8, biases in int32) followed by
DequantizeLinear, so stock onnxruntime computes exactly what PPQ simulated.

The Clip is inserted at 8 bits too, where it changes no value: it keeps onnxruntime's graph optimizer from
fusing ``DQ -> Conv -> Q`` into its own integer kernels (QLinearConv), whose requantization rounds
differently from PPQ's simulation (:ref:`bench-export`).
"""

from __future__ import annotations

import tempfile
from pathlib import Path

import numpy as np
import onnx
import torch

from maptools.errors import EngineError
from maptools.quantization.engine.facade import (
    BaseGraph,
    ONNXRUNTIMExporter,
    Operation,
    QDQHelper,
    QuantableOperation,
    QuantizationProperty,
    QuantizationStates,
    TensorQuantizationConfig,
    Variable,
    ppq_tensor_round,
)
from maptools.quantization.engine.quiet import ppq_silenced
from maptools.quantization.format import QUANTMODEL
from maptools.quantization.intmath import container_dtype

__all__ = ["FaithfulQDQExporter", "export_qdq", "quantize_to_int"]

#: The torch dtype of each integer container of :func:`~maptools.quantization.intmath.container_dtype`.
_TORCH_DTYPES = {np.dtype(np.int8): torch.int8, np.dtype(np.uint8): torch.uint8, np.dtype(np.int32): torch.int32}


def quantize_to_int(value: torch.Tensor, config: TensorQuantizationConfig) -> torch.Tensor:
    """Integer representation of a tensor under ``config``, computed exactly as PPQ's fake quantizer does.

    Returns an int64 tensor in ``[quant_min, quant_max]``.
    """
    scale, offset = config.scale, config.offset
    if config.policy.has_property(QuantizationProperty.PER_CHANNEL):
        shape = [1 if axis != config.channel_axis else -1 for axis in range(value.ndim)]
        scale, offset = scale.view(shape), offset.view(shape)
    integer = ppq_tensor_round(value / scale, config.rounding) + offset
    # clamp in float64: float32 rounds a 32-bit bound such as 2^31 - 1 up to 2^31, which wraps in int32
    return torch.clamp(integer.to(torch.float64), config.quant_min, config.quant_max).to(torch.int64)


def _container(config: TensorQuantizationConfig) -> torch.dtype:
    """Integer container of a quantized tensor (:func:`~maptools.quantization.intmath.container_dtype`).

    int32 for biases, uint8 when asymmetric (unsigned ranges included), else int8.
    """
    signed = not config.policy.has_property(QuantizationProperty.ASYMMETRICAL)
    return _TORCH_DTYPES[container_dtype(int(config.num_of_bits), signed)]


class FaithfulQDQExporter(ONNXRUNTIMExporter):
    """ONNX Runtime QDQ exporter with low-bit clipping and integer parameters.

    PPQ's exporters are singletons (one instance per class and process), so the opset is an attribute set
    before each export rather than a constructor argument: :attr:`opset`.
    """

    def __init__(self) -> None:
        super().__init__(removed_activation_types=["Relu", "Clip"])
        self._opset = 13

    @property
    def opset(self) -> int:
        """ONNX opset of the exported model (at least 13, the first with per-channel QDQ)."""
        return self._opset

    @opset.setter
    def opset(self, value: int) -> None:
        self._opset = max(13, int(value))

    def infer_qtype(self, config: TensorQuantizationConfig) -> tuple[torch.dtype, torch.dtype]:
        """Container dtypes (zero point, value) of a quantized tensor."""
        dtype = _container(config)
        return dtype, dtype

    @property
    def required_opsets(self) -> dict[str, int]:
        """Opsets of the exported model."""
        return {"": self._opset}

    def insert_quantize_node(self, graph: BaseGraph, var: Variable, config: TensorQuantizationConfig,
                             op: Operation) -> Operation:
        """Insert QuantizeLinear followed by an integer Clip to ``[quant_min, quant_max]``."""
        created = super().insert_quantize_node(graph=graph, var=var, config=config, op=op)
        dtype = _container(config)
        clip = graph.create_operation(op_type="Clip", attributes={})
        graph.insert_op_after(A=clip, B=created, output_idx=0)
        graph.create_variable(name=None, value=torch.tensor(int(config.quant_min), dtype=dtype),
                              is_parameter=True, dest_ops=[clip])
        graph.create_variable(name=None, value=torch.tensor(int(config.quant_max), dtype=dtype),
                              is_parameter=True, dest_ops=[clip])
        for link in (created.outputs[0], clip.outputs[0]):
            link.dtype = dtype
            link.shape = var.shape
        return clip

    def convert_operation(self, graph: BaseGraph, op: QuantableOperation, quantized_param: bool) -> None:
        """Insert Q/(Clip)/DQ around one operator; parameters become integers followed by DequantizeLinear."""
        for config, var in list(op.config_with_variable):
            if not QDQHelper.TQC_Exportable_Check(TQC=config, bounded_var=var):
                continue
            if var.is_parameter:
                if config.state == QuantizationStates.BAKED:
                    config.state = QuantizationStates.ACTIVATED
                if config.state == QuantizationStates.PASSIVE_BAKED:
                    config.state = QuantizationStates.PASSIVE
                dtype = _container(config)
                integer = quantize_to_int(var.value, config)
                self.insert_dequantize_node(graph=graph, var=var, config=config, op=op)
                var.value = integer.to(dtype)
                continue
            if self._already_quantized(var, config):
                continue
            created = self.insert_quantize_node(graph=graph, var=var, config=config, op=op)
            self.insert_dequantize_node(graph=graph, var=created.outputs[0], config=config, op=created)

    @staticmethod
    def _already_quantized(var: Variable, config: TensorQuantizationConfig) -> bool:
        """Whether an identical Q/DQ already sits on this variable (shared by a neighbouring operator)."""
        candidates = []
        if var.source_op is not None and var.source_op.type == "DequantizeLinear":
            candidates.append(var.source_op)
        if len(var.dest_ops) == 1 and var.dest_ops[0].type == "QuantizeLinear":
            candidates.append(var.dest_ops[0])
        for node in candidates:
            scale, offset = node.inputs[1].value, node.inputs[2].value
            if (torch.max(torch.abs(scale - config.scale)).item() < 1e-4 * max(config.scale.abs().max().item(), 1e-12)
                    and torch.max(torch.abs(offset.float() - config.offset.float())).item() < 0.1):
                return True
        return False


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


def export_qdq(graph: BaseGraph, opset: int, io_like: onnx.ModelProto | None = None) -> onnx.ModelProto:
    """The faithful QDQ model of a quantized graph (``quant_model.onnx``), checked by ``onnx.checker``.

    Args:
        graph: The quantized PPQ graph (a copy is exported; the graph is not changed).
        opset: The float model's opset (the export uses at least 13).
        io_like: The original model: its graph input and output types (dynamic dims included) are
            copied onto the export, and intermediate shapes are dropped, so the QDQ model accepts
            the same shapes as the float one.

    Raises:
        EngineError: the exported model fails ``onnx.checker``. PPQ's own errors while exporting propagate.
    """
    exporter = FaithfulQDQExporter()
    exporter.opset = opset
    with tempfile.TemporaryDirectory(prefix="maptools-") as tmp:
        path = Path(tmp) / QUANTMODEL
        with ppq_silenced():
            exporter.export(file_path=str(path), graph=graph.copy(), quantized_param=True)
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
