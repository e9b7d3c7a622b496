"""Cross-layer equalization into depthwise Convs, through activations that are not homogeneous, where it pays.

A depthwise Conv reads each input channel alone, but its input tensor has one activation scale: a channel whose
values peak at 0.09 beside one that peaks at 38 (the first block of the PicoDet layout detector) is rounded to
nothing, and the BatchNorm folded into the depthwise Conv then multiplies it by 25 to 50. Scaling output channel
``c`` of the Conv before the activation by ``k_c`` and the depthwise filter ``c`` by ``1 / k_c`` gives the small
channels more of the shared integer range. Through ``Relu`` that is the same function (PPQ's
``LayerwiseEqualizationPass`` crosses only ``Relu``-like operators, equalizes weights not activations, and never
meets these pairs); through hard-swish or a clipping ``Clip`` it is not: ``f(k x) / k != f(x)``.

So ``k_c`` is chosen per channel by measurement on calibration data: for each candidate in :data:`CANDIDATES`
(that keeps the channel inside the tensor's calibrated range), the depthwise output of channel ``c`` is computed
with its input ``f(k x) / k`` rounded on the tensor's integer grid and compared with the FP32 output ``w * f(x)``;
the mean of the difference the scaling itself makes is moved into the depthwise bias. The candidate with the
least squared error wins, ``1`` (nothing changed) unless another is at least :data:`MIN_GAIN` times better. A
depthwise Conv's output channel depends on its input channel alone, so the channels are chosen independently.

The change is to the float parameters before PPQ quantizes them; the map saves them (``ppq_state.json``), and the
integer executor, onnxruntime and ``verify`` see an ordinary graph.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from maptools.quantization.engine.fusion import GATES, gated_activations
from maptools.quantization.engine.quiet import import_ppq

import_ppq()

from ppq.IR import BaseGraph, Operation  # noqa: E402

__all__ = ["CANDIDATES", "MIN_GAIN", "EqualizedPair", "equalize_depthwise_inputs"]

logger = logging.getLogger(__name__)

#: Channel scale factors tried (1 keeps the channel as it is).
CANDIDATES = (1.0, 1.25, 1.5, 2.0, 2.5, 3.0, 4.0, 5.0, 6.0, 8.0, 12.0, 16.0, 24.0, 32.0)
#: A scale other than 1 is kept only when its squared error is at most this fraction of the unscaled one.
MIN_GAIN = 0.8
#: Calibration batches measured.
MAX_BATCHES = 4


@dataclass(frozen=True)
class EqualizedPair:
    """One Conv -> activation -> depthwise Conv pair and the channel scales applied (1 where nothing changed)."""

    producer: str
    activation: str
    depthwise: str
    scales: tuple[float, ...]


def _param(op: Operation, index: int) -> torch.Tensor | None:
    if index >= len(op.inputs) or op.inputs[index] is None or not op.inputs[index].is_parameter:
        return None
    return op.inputs[index].value


def _is_depthwise(op: Operation) -> bool:
    weight = _param(op, 1)
    group = op.attributes.get("group", 1)
    return op.type == "Conv" and weight is not None and weight.ndim == 4 and weight.shape[1] == 1 and \
        group == weight.shape[0] and group > 1


def _activation(graph: BaseGraph, op: Operation) -> tuple[Operation, Callable[[torch.Tensor], torch.Tensor]] | None:
    """The elementwise function of a single-input activation ``op`` (its output read whole), else None."""
    if op.type == "Relu":
        return op, torch.relu
    if op.type == "Clip":
        low, high = _param(op, 1), _param(op, 2)
        lo = float(low) if low is not None else -float("inf")
        hi = float(high) if high is not None else float("inf")
        return op, lambda x: torch.clamp(x, lo, hi)
    return None


def _pairs(graph: BaseGraph) -> list[tuple[Operation, Operation, Operation, Callable[[torch.Tensor], torch.Tensor]]]:
    """(Conv, activation, depthwise Conv, activation function) with every tensor between them read only there."""
    found = []
    for computing, gate, mul in gated_activations(graph, GATES["HardSwish"]):
        alpha, beta = float(gate.attributes.get("alpha", 0.2)), float(gate.attributes.get("beta", 0.5))
        found.append((computing, mul, lambda x, a=alpha, b=beta: x * torch.clamp(a * x + b, 0.0, 1.0)))
    for op in graph.operations.values():
        if op.type in ("Relu", "Clip") and op.inputs and op.inputs[0].source_op is not None:
            source = op.inputs[0].source_op
            if len(op.inputs[0].dest_ops) == 1:
                act = _activation(graph, op)
                if act is not None:
                    found.append((source, op, act[1]))
    pairs = []
    for producer, activation, function in found:
        out = activation.outputs[0]
        if producer.type != "Conv" or _param(producer, 1) is None or len(out.dest_ops) != 1:
            continue
        consumer = out.dest_ops[0]
        if not _is_depthwise(consumer) or consumer.inputs[0] is not out or \
                _param(consumer, 1).shape[0] != _param(producer, 1).shape[0]:
            continue
        pairs.append((producer, activation, consumer, function))
    return pairs


def _depthwise_channel(x: torch.Tensor, weight: torch.Tensor, op: Operation) -> torch.Tensor:
    """One channel of depthwise Conv ``op`` (no bias): ``x`` is ``[N, 1, H, W]``, ``weight`` ``[1, 1, kh, kw]``."""
    pads = list(op.attributes.get("pads", [0, 0, 0, 0]))
    x = F.pad(x, [pads[1], pads[3], pads[0], pads[2]])
    return F.conv2d(x, weight, stride=op.attributes.get("strides", 1), dilation=op.attributes.get("dilations", 1))


def _choose(x: torch.Tensor, function: Callable[[torch.Tensor], torch.Tensor], weight: torch.Tensor,
            consumer: Operation, step: float, top: float, bottom: float, shift_bias: bool) -> tuple[float, float]:
    """The scale of one channel and the bias shift that goes with it (see the module docstring)."""
    reference = _depthwise_channel(function(x), weight, consumer)
    best: tuple[float, float, float] | None = None
    for k in CANDIDATES:
        scaled = function(k * x)
        if k != 1.0 and (float(scaled.max()) > top or float(scaled.min()) < bottom):
            break
        shift = float((_depthwise_channel(scaled / k, weight, consumer) - reference).mean()) \
            if k != 1.0 and shift_bias else 0.0
        rounded = torch.round(scaled / step) * step / k
        error = float(((_depthwise_channel(rounded, weight, consumer) - shift - reference) ** 2).mean())
        if best is None or (error < best[0] * MIN_GAIN):
            best = (error, k, shift)
    assert best is not None
    return best[1], best[2]


def equalize_depthwise_inputs(graph: BaseGraph, forward: Callable[[Sequence[str]], list[torch.Tensor]],
                              activation_bits: Callable[[str], int]) -> list[EqualizedPair]:
    """Equalize every Conv -> activation -> depthwise Conv pair of the float ``graph`` in place.

    Args:
        graph: The dispatched, not yet quantized PPQ graph.
        forward: Runs the float graph on the calibration batches and returns the named tensors, each the
            batches concatenated.
        activation_bits: Operator name -> its activation bits (the activation's output grid).

    Returns:
        The pairs where at least one channel was scaled.
    """
    pairs = _pairs(graph)
    if not pairs:
        return []
    names = [name for producer, activation, _, _ in pairs for name in (producer.outputs[0].name,
                                                                          activation.outputs[0].name)]
    tensors = dict(zip(names, forward(names), strict=True))
    done = []
    for producer, activation, consumer, function in pairs:
        x, y = tensors[producer.outputs[0].name].double(), tensors[activation.outputs[0].name].double()
        top, bottom = float(y.max()), min(float(y.min()), 0.0)
        levels = 2 ** activation_bits(activation.name) - 1
        step = (top - bottom) / levels
        if step <= 0:
            continue
        weight_b = _param(consumer, 1)
        scales, shifts = [], []
        for c in range(x.shape[1]):
            k, shift = _choose(x[:, c:c + 1], function, weight_b[c:c + 1].double(), consumer, step, top, bottom,
                               _param(consumer, 2) is not None)
            scales.append(k)
            shifts.append(shift)
        if all(k == 1.0 for k in scales):
            continue
        k = torch.tensor(scales, dtype=weight_b.dtype, device=weight_b.device)
        weight_a, bias_a, bias_b = _param(producer, 1), _param(producer, 2), _param(consumer, 2)
        shape_a = [-1] + [1] * (weight_a.ndim - 1)
        producer.inputs[1].value = weight_a * k.reshape(shape_a)
        if bias_a is not None:
            producer.inputs[2].value = bias_a * k
        consumer.inputs[1].value = weight_b / k.reshape(-1, 1, 1, 1)
        if bias_b is not None:
            consumer.inputs[2].value = bias_b - torch.tensor(shifts, dtype=bias_b.dtype, device=bias_b.device)
        done.append(EqualizedPair(producer.name, activation.name, consumer.name, tuple(scales)))
    if done:
        logger.info("equalized %d Conv -> activation -> depthwise Conv pairs (%d channels scaled)", len(done),
                    sum(sum(k != 1.0 for k in pair.scales) for pair in done))
    return done
