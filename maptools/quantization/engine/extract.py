"""What a map records of a quantized PPQ graph: ``quantinfo.pkl``'s configs and ``quantparams.pkl``'s integers.

:func:`quantinfo` reads every quantized operator's tensor configs into
:class:`~maptools.quantization.records.OperatorQuantConfig` records; :func:`quantparams` computes the integer
weights and biases exactly as PPQ's fake quantizer rounds them (:func:`quantize_to_int`), under the keys of
:mod:`maptools.quantization.format`, in the containers of :mod:`maptools.quantization.intmath`.
"""

from __future__ import annotations

import logging

import numpy as np

from maptools.quantization.engine.exporter import quantize_to_int
from maptools.quantization.engine.facade import (
    BaseGraph,
    QuantableOperation,
    QuantizationProperty,
    QuantizationStates,
    TensorQuantizationConfig,
)
from maptools.quantization.engine.fusion import FUSED_ACTIVATION_TYPES, unmaterialized_variables
from maptools.quantization.engine.quantizer import WEIGHTED_TYPES, LowBitSpec
from maptools.quantization.format import BIAS_TYPES, bias_key, weight_key
from maptools.quantization.intmath import BIAS_BITS, container_dtype
from maptools.quantization.records import OperatorQuantConfig, TensorQuant

__all__ = [
    "LIVE_STATES",
    "bias_config",
    "fake_quantized_parameters",
    "quantinfo",
    "quantized_operations",
    "quantparams",
    "weight_config",
]

logger = logging.getLogger(__name__)

#: Config states whose quantization PPQ applies (to activations or to parameters).
LIVE_STATES = frozenset({QuantizationStates.ACTIVATED, QuantizationStates.PASSIVE, QuantizationStates.BAKED,
                         QuantizationStates.PASSIVE_BAKED})


def quantized_operations(graph: BaseGraph) -> list[QuantableOperation]:
    """Quantized operators in topological order."""
    return [op for op in graph.topological_sort() if isinstance(op, QuantableOperation)]


def _tensor_quant(name: str, config: TensorQuantizationConfig) -> TensorQuant | None:
    root = config.dominated_by
    if root.state not in LIVE_STATES or root.scale is None:
        return None
    if root.policy.has_property(QuantizationProperty.PER_CHANNEL):  # a depthwise input (engine.channelwise)
        scale = root.scale.detach().cpu().numpy().astype(np.float32).reshape(-1)
        zero_point = np.round(root.offset.detach().cpu().numpy().astype(np.float64)).astype(np.int32).reshape(-1)
        return TensorQuant(name=name, bits=int(root.num_of_bits), scale=scale, zero_point=zero_point,
                           qmin=int(root.quant_min), qmax=int(root.quant_max), axis=int(root.channel_axis))
    return TensorQuant(
        name=name,
        bits=int(root.num_of_bits),
        scale=float(root.scale.flatten()[0].item()),
        zero_point=int(round(float(root.offset.flatten()[0].item()))),
        qmin=int(root.quant_min),
        qmax=int(root.quant_max),
    )


def _overlapped(graph: BaseGraph, name: str) -> bool:
    """Whether the producer of tensor ``name`` hands its quantization to another config (PPQ fused it)."""
    var = graph.variables[name]
    op = var.source_op
    if not isinstance(op, QuantableOperation):
        return False
    config = op.config.output_quantization_config[op.outputs.index(var)]
    return config.state == QuantizationStates.OVERLAPPED


def weight_config(op: QuantableOperation) -> TensorQuantizationConfig | None:
    """The live config of an operator's constant weight (input 1), or None."""
    if op.type not in WEIGHTED_TYPES or op.num_of_input < 2 or not op.inputs[1].is_parameter:
        return None
    cfg = op.config.input_quantization_config[1]
    return cfg if cfg.state in LIVE_STATES else None


def bias_config(op: QuantableOperation) -> TensorQuantizationConfig | None:
    """The live config of an operator's constant bias (input 2), or None."""
    if op.type not in BIAS_TYPES or op.num_of_input < 3 or not op.inputs[2].is_parameter:
        return None
    cfg = op.config.input_quantization_config[2]
    return cfg if cfg.state in LIVE_STATES else None


def quantinfo(graph: BaseGraph, spec: LowBitSpec) -> dict[str, OperatorQuantConfig]:
    """Per-operator quantization configs of a quantized graph, keyed by node name (``quantinfo.pkl``)."""
    info: dict[str, OperatorQuantConfig] = {}
    # tensors inside a fused activation that is not a clip (Conv -> Sigmoid, x * HardSigmoid(x)): the
    # activation reads the accumulator, they are never integers
    inside = {name for name in unmaterialized_variables(graph, FUSED_ACTIVATION_TYPES) if _overlapped(graph, name)}

    def tensor_quant(var, cfg) -> TensorQuant | None:
        return None if var.name in inside else _tensor_quant(var.name, cfg)

    for op in quantized_operations(graph):
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
            output_bits=first_out.bits if first_out else None,
            output_scale=first_out.scale if first_out else None,
            output_zero_point=first_out.zero_point if first_out else 0,
            io_bits=ref.bits if ref else None,
            io_min=ref.qmin if ref else None,
            io_max=ref.qmax if ref else None,
            symmetric=spec.symmetrical,
            inputs=act_inputs, outputs=outputs,
        )
        weight = weight_config(op)
        if weight is not None:
            record.weight_bits = int(weight.num_of_bits)
            record.weight_min, record.weight_max = int(weight.quant_min), int(weight.quant_max)
            record.weight_scale = weight.scale.detach().cpu().numpy().astype(np.float32).reshape(-1)
            per_channel = weight.policy.has_property(QuantizationProperty.PER_CHANNEL)
            record.weight_axis = int(weight.channel_axis) if per_channel else None
        bias = bias_config(op)
        if bias is not None:
            record.bias_bits = int(bias.num_of_bits)
            record.bias_scale = bias.scale.detach().cpu().numpy().astype(np.float32).reshape(-1)
        info[op.name] = record
    return info


def quantparams(graph: BaseGraph) -> dict[str, np.ndarray | None]:
    """Integer weights and biases of a quantized graph (``quantparams.pkl``).

    Keys are :func:`~maptools.quantization.format.weight_key` and
    :func:`~maptools.quantization.format.bias_key`; a weighted operator whose bias is not quantized (or that
    has none) gets ``None`` under its bias key.
    """
    params: dict[str, np.ndarray | None] = {}
    for op in quantized_operations(graph):
        weight = weight_config(op)
        if weight is None:
            continue
        w_int = quantize_to_int(op.inputs[1].value.detach().cpu(), weight).numpy()
        params[weight_key(op.name, op.type)] = w_int.astype(container_dtype(int(weight.num_of_bits)))
        if op.type in BIAS_TYPES:
            bias = bias_config(op)
            params[bias_key(op.name, op.type)] = None if bias is None else _bias_int(op, bias)
    return params


def _bias_int(op: QuantableOperation, config: TensorQuantizationConfig) -> np.ndarray:
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
    return np.clip(values, low, high).astype(container_dtype(BIAS_BITS))


def fake_quantized_parameters(graph: BaseGraph) -> dict[str, np.ndarray]:
    """PPQ's own fake-quantized weights and biases (float), keyed like :func:`quantparams`."""
    result: dict[str, np.ndarray] = {}
    for op in quantized_operations(graph):
        if weight_config(op) is not None:
            result[weight_key(op.name, op.type)] = op.inputs[1].value.detach().cpu().numpy()
        if bias_config(op) is not None:
            result[bias_key(op.name, op.type)] = op.inputs[2].value.detach().cpu().numpy().reshape(-1)
    return result
