"""Per-channel activation scales for tensors that only depthwise Convs read.

One activation scale per tensor rounds away the channels whose range is a few steps of the largest channel's
(Paddle's PicoDet layout detector, docs/benchmarks.rst). A depthwise Conv's output channel ``c`` reads only its
input channel ``c``, so an input step per channel ``s_x[c]`` joins the per-channel weight step in the
requantization multiplier ``s_x[c] * s_w[c] / s_out`` and the zero point ``z_x[c]`` joins channel ``c``'s bias:
exact in the chip's integer arithmetic, at no cost. A tensor qualifies when every reader is such a Conv (one
output channel per input channel) reading it as its data input, its producer writes it element by element, and PPQ
shares its quantization with no other tensor. It then gets, per channel, the step of its own calibrated range
(FP32 min-max on the calibration batches), never coarser than the tensor's calibrated step: the large channels
keep the tensor's scale and zero point, the small ones gain resolution. Only tensors whose channel ranges spread
over more than :data:`SPREAD_RATIO` are changed; every other map is unchanged to the byte.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterable
from typing import Any

import numpy as np
import torch

from maptools.quantization.engine.facade import (
    BaseGraph,
    Operation,
    QuantableOperation,
    QuantizationOptimizationPass,
    QuantizationPolicy,
    QuantizationProperty,
    QuantizationStates,
    TensorQuantizationConfig,
    Variable,
)
from maptools.quantization.engine.fusion import FUSED_ACTIVATION_TYPES, unmaterialized_variables

__all__ = ["SPREAD_RATIO", "ChannelScalePass", "channel_scales", "depthwise_only_variables", "is_depthwise"]

logger = logging.getLogger(__name__)

#: A tensor gets per-channel scales when its largest channel range is more than this many times its smallest
#: (channel range: ``max(x_c, 0) - min(x_c, 0)`` on the calibration batches); on the corpus it touches the
#: layout detector and the PP-OCRv4 recognizer only (docs/benchmarks.rst).
SPREAD_RATIO = 100.0
#: A finer channel's range is its calibrated range times this (headroom for held-out values beyond it); 2.0 was
#: worse on both corpus models the rule touches (docs/benchmarks.rst).
RANGE_MARGIN = 1.0


def is_depthwise(op: Operation) -> bool:
    """Whether ``op`` is a Conv whose output channel ``c`` reads only input channel ``c`` (group = channels)."""
    if op.type != "Conv" or len(op.inputs) < 2 or not op.inputs[1].is_parameter or op.inputs[1].value is None:
        return False
    weight = op.inputs[1].value
    group = int(op.attributes.get("group", 1))
    return group > 1 and weight.ndim >= 3 and int(weight.shape[1]) == 1 and int(weight.shape[0]) == group


def depthwise_only_variables(graph: BaseGraph) -> list[Variable]:
    """Activation tensors with a quantized producer that only depthwise Convs read, as their input 0."""
    found = []
    for var in graph.variables.values():
        if var.is_parameter or not var.dest_ops or not isinstance(var.source_op, QuantableOperation):
            continue
        if var.name in graph.outputs:
            continue
        if all(is_depthwise(op) and op.inputs[0] is var and op.inputs.count(var) == 1 for op in var.dest_ops):
            found.append(var)
    return found


def _group(graph: BaseGraph, root: TensorQuantizationConfig) -> list[tuple[TensorQuantizationConfig, Variable]]:
    """Every (config, variable) of the graph whose quantization is ``root``'s."""
    return [(config, var) for op in graph.operations.values() if isinstance(op, QuantableOperation)
            for config, var in op.config_with_variable if config.dominated_by is root]


def _root_of(var: Variable) -> TensorQuantizationConfig | None:
    """The config that quantizes ``var``, when it is an activated linear per-tensor one that may be changed."""
    producer = var.source_op
    root = producer.config.output_quantization_config[producer.outputs.index(var)].dominated_by
    policy = root.policy
    if (root.state != QuantizationStates.ACTIVATED or not root.is_revisable() or root.scale is None
            or not policy.has_property(QuantizationProperty.LINEAR)
            or not policy.has_property(QuantizationProperty.PER_TENSOR)):
        return None
    return root


def channel_scales(low: np.ndarray, high: np.ndarray, scale: float, offset: float, quant_min: int, quant_max: int,
                   power_of_two: bool = False, margin: float = 1.0) -> tuple[np.ndarray, np.ndarray]:
    """Per-channel scales and zero points from per-channel ranges, never coarser than the tensor's ``scale``.

    A channel whose own range needs the tensor's step keeps it and its zero point ``offset``; another gets the
    step of its range ``[min(low, 0), max(high, 0)]`` on ``quant_min .. quant_max`` (symmetric about 0 when
    ``quant_min < 0``), rounded up to a power of two with ``power_of_two``.
    """
    low = np.minimum(np.asarray(low, np.float64), 0.0)
    high = np.maximum(np.asarray(high, np.float64), 0.0)
    own = np.maximum(-low, high) / quant_max if quant_min < 0 else (high - low) / (quant_max - quant_min)
    own = own * margin
    own = np.maximum(own, np.finfo(np.float32).tiny)
    if power_of_two:
        own = np.exp2(np.ceil(np.log2(own)))
    finer = own < scale
    scales = np.where(finer, own, scale).astype(np.float32)
    if quant_min < 0:
        offsets = np.full(scales.shape, offset, dtype=np.float32)
    else:
        own_offsets = np.clip(np.round(-low / scales.astype(np.float64)), quant_min, quant_max)
        offsets = np.where(finer, own_offsets, offset).astype(np.float32)
    return scales, offsets


def spread(low: np.ndarray, high: np.ndarray) -> float:
    """The largest channel range over the smallest (inf when a channel is constant at 0)."""
    ranges = np.maximum(np.asarray(high, np.float64), 0.0) - np.minimum(np.asarray(low, np.float64), 0.0)
    smallest = float(ranges.min()) if ranges.size else 0.0
    return float("inf") if smallest <= 0.0 else float(ranges.max()) / smallest


class ChannelScalePass(QuantizationOptimizationPass):
    """Per-channel scales for the depthwise-only tensors that spread over :data:`SPREAD_RATIO` (see the module).

    Runs after PPQ's calibration and alignment, before the passive-parameter pass, which then quantizes each
    depthwise Conv's bias at ``s_x[c] * s_w[c]``. :attr:`applied` lists the tensors changed, with their spread.
    """

    def __init__(self, power_of_two: bool = False) -> None:
        super().__init__(name="maptools depthwise channel scales")
        self.power_of_two = power_of_two
        #: Tensor name -> the spread of its channel ranges, for every tensor given per-channel scales.
        self.applied: dict[str, float] = {}

    def optimize(self, graph: BaseGraph, dataloader: Iterable[Any] | None = None, executor: Any = None,
                 calib_steps: int | None = None, collate_fn: Callable[[Any], Any] | None = None,
                 **kwargs: Any) -> None:  # noqa: D102 - PPQ's signature
        candidates = {}
        # the accumulator and gate inside a fused activation share its config but are never integers
        inside = unmaterialized_variables(graph, set(FUSED_ACTIVATION_TYPES))
        for var in depthwise_only_variables(graph):
            root = _root_of(var)
            if root is None:
                continue
            group = _group(graph, root)
            if any(other is not var and not (other.name in inside and config.state == QuantizationStates.OVERLAPPED)
                   for config, other in group):  # PPQ aligned it with another tensor
                continue
            channels = int(var.dest_ops[0].inputs[1].value.shape[0])
            candidates[var.name] = (root, group, channels)
        if not candidates or dataloader is None or executor is None:
            return
        low, high = self._ranges(graph, executor, dataloader, calib_steps, collate_fn, list(candidates))
        for name, (root, group, channels) in candidates.items():
            if low[name].shape != (channels,):
                continue
            ratio = spread(low[name], high[name])
            if ratio <= SPREAD_RATIO:
                continue
            scales, offsets = channel_scales(low[name], high[name], float(root.scale.reshape(-1)[0]),
                                             float(root.offset.reshape(-1)[0]), int(root.quant_min),
                                             int(root.quant_max), self.power_of_two, RANGE_MARGIN)
            policy = QuantizationPolicy(
                (root.policy._policy & ~QuantizationProperty.PER_TENSOR.value) | QuantizationProperty.PER_CHANNEL.value)
            for config, _ in group:
                config.policy = policy
                config.channel_axis = 1
            device = root.scale.device
            root.scale = torch.from_numpy(scales).to(device)
            root.offset = torch.from_numpy(offsets).to(device)
            self.applied[name] = ratio
        if self.applied:
            logger.debug("per-channel scales for %d depthwise input(s): %s", len(self.applied),
                         ", ".join(f"{k} ({v:.0f}x)" for k, v in self.applied.items()))

    @staticmethod
    def _ranges(graph: BaseGraph, executor: Any, dataloader: Iterable[Any], calib_steps: int | None,
                collate_fn: Callable[[Any], Any] | None,
                names: list[str]) -> tuple[dict[str, np.ndarray], dict[str, np.ndarray]]:
        """Per-channel FP32 min and max of ``names`` over the calibration batches."""
        low: dict[str, np.ndarray] = {}
        high: dict[str, np.ndarray] = {}
        operations = [op for op in graph.operations.values() if isinstance(op, QuantableOperation)]
        for op in operations:
            op.dequantize()
        try:
            for step, batch in enumerate(dataloader):
                if calib_steps is not None and step >= calib_steps:
                    break
                feed = collate_fn(batch) if collate_fn is not None else batch
                outputs = executor.forward(inputs=feed, output_names=names)
                for name, value in zip(names, outputs, strict=True):
                    axes = tuple(axis for axis in range(value.ndim) if axis != 1)
                    mins = value.amin(dim=axes).double().cpu().numpy()
                    maxs = value.amax(dim=axes).double().cpu().numpy()
                    low[name] = mins if name not in low else np.minimum(low[name], mins)
                    high[name] = maxs if name not in high else np.maximum(high[name], maxs)
        finally:
            for op in operations:
                op.restore_quantize_state()
        return low, high
