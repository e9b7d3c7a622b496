"""Learned rounding of low-bit weights (AdaRound), reconstructed on sampled output positions, layer by layer.

Nearest rounding of each weight is not the rounding that best keeps a layer's output: at 4 bits it breaks
trained depthwise networks. AdaRound learns, per weight, whether to round down or up, minimising the error
of the layer's output (its fused activation included) on calibration data: the input comes from the
quantized network before the layer (the layers already rounded included), the target from the FP32 network
(asymmetric reconstruction). The rounding offset is a rectified sigmoid ``h(V)`` trained by Adam with the
regulariser ``sum(1 - |2h - 1|^beta)`` pushing every ``h`` to 0 or 1, ``beta`` annealed from 20 to 2 after
a warm-up.

Two more degrees of freedom are fitted to the same layer output, because rounding alone has too few where a
channel has few weights (a depthwise 3x3 Conv: 9 per channel):

* before the rounding of a depthwise layer is learned, each output channel's weight scale is searched among
  :attr:`RoundingSettings.scale_candidates` multiples of the calibrated one (:func:`search_scale`, against the
  output error with nearest rounding, not the weight error);
* the layer's bias is learned with the rounding (Adam), which also absorbs the shift of the output mean
  that the quantized layers before it cause (the bias correction of data-free quantization, learned);

and depthwise layers, whose rounding gains least per step, run :attr:`RoundingSettings.depthwise_factor` times
the steps. With :attr:`RoundingSettings.pairs` (off: on EfficientNet-Lite1 the regulariser leaves half of a pair's
roundings undecided, and rounded the pair ends worse than one layer at a time, benchmarks), a depthwise layer that
only a 1 x 1 Conv reads is learned together with it against that Conv's FP32 output (:func:`learn_pair_rounding`,
the part of BRECQ's block reconstruction whose output still needs one input patch per position); with
:attr:`RoundingSettings.pair_biases` (off too, benchmarks) the two are learned one at a time and only their biases
together (:func:`tune_pair_biases`).

The cost is kept small on a CPU in these ways:

* the loss is a sum over output positions, so each step uses a random sample of them: per layer a cache of
  :attr:`RoundingSettings.positions` output positions per image holds the input patches (im2col) of the
  quantized network and the FP32 targets at those positions, and a step is a ``(cout x k) @ (k x P)``
  product on ``P`` = :attr:`RoundingSettings.sample` of them (a per-channel dot product for a depthwise
  Conv); a held-out eighth of the cache measures each layer's error before and after;
* the inputs of each layer are obtained by carrying the calibration activations forward through the
  operators between the previous layer and this one (:class:`_Carrier`), once for the quantized network and
  once for the FP32 one, never by re-running the network from its input;
* each step's sampled patches land in buffers reused from step to step (:class:`_StepInputs`), and QDrop's masks
  come from bytes of 64-bit draws compared in float arithmetic (:class:`_Drops`): a fresh patch-size tensor per
  step, ``torch.rand`` and a boolean ``where`` made a depthwise step several times slower on a CPU
  (``bench/rounding_step.py``);
* ``time_budget`` scales the iterations of every layer to fit;
* with :attr:`RoundingSettings.quadratic`, a layer with no activation after it (a projection Conv, a
  classifier), whose output error is a quadratic form in its weights and bias, is learned on that form computed
  exactly from the sums of ``x xᵀ``, ``x``, ``x yᵀ``, ``y`` and ``y²`` over *every* output position of the
  calibration images (:class:`_Moments`), at a cost per step that does not depend on the number of positions;
  its bias is the least-squares one for the learned integers (closed form: the mean shift the quantized layers
  before it cause is removed exactly, not by Adam's steps), and its error before and after is measured on
  held-out calibration images, not positions.

Three levers help with little data or low activation bits:

* with fewer than :attr:`RoundingSettings.min_images` calibration images, augmented views of them (random
  resized crops and flips, :mod:`~maptools.quantization.engine.augment`) are added to the data the caches
  are sampled from (learned rounding only; calibration and LSQ see the given images);
* flat views (off by default): the first learned layer also sees flat images of every corner colour of the input
  range and greys (:attr:`RoundingSettings.flat_views`), so a dark frame or a wall keeps its response;
* QDrop: where a layer's input is quantized below 8 bits, each step replaces each input element by its FP32
  value (the FP32 network's, at the same position) with probability :attr:`RoundingSettings.qdrop`, so the
  rounding is not fitted to one particular pattern of activation rounding errors. The mask is drawn per
  element of the sampled patches. At 8-bit and float inputs nothing changes.

The result is written into PPQ's graph as float weights exactly on the grid (``w = s * q``, ``s`` the searched
scale, which also becomes the weight's and, times the input scale, the bias' quantization scale) and marked baked,
before PPQ bakes the other parameters, so every artifact carries the learned integers, and a later LSQ pass
(:class:`~maptools.quantization.engine.quantizer.IntegerZeroPointLSQPass`) trains the activation scales and
biases around them but neither the weights nor their scales.
"""

from __future__ import annotations

import dataclasses
import logging
import math
import sys
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F

from maptools.quantization.engine.augment import augment_batches, flat_batches  # noqa: E402
from maptools.quantization.engine.facade import (
    BaseGraph,
    LearnedStepSizePass,
    Operation,
    ParameterBakingPass,
    QuantableOperation,
    QuantizationOptimizationPass,
    QuantizationOptimizationPipeline,
    QuantizationStates,
    TorchExecutor,
)
from maptools.quantization.engine.fusion import (  # noqa: E402
    FUSED_ACTIVATION_TYPES,
    GATES,
    fused_activation,
    gated_activations,
)

__all__ = [
    "DEFAULTS",
    "LayerRounding",
    "LearnedRoundingPass",
    "RoundingSettings",
    "learn_pair_rounding",
    "learn_rounding",
    "learnable_layers",
    "tune_pair_biases",
    "with_learned_rounding",
]

logger = logging.getLogger(__name__)

#: The rectified sigmoid's stretch: ``h(V) = clamp(sigmoid(V) * (ZETA - GAMMA) + GAMMA, 0, 1)``.
ZETA, GAMMA = 1.1, -0.1
#: ``beta`` of the regulariser, annealed from the first to the second after the warm-up.
BETA_START, BETA_END = 20.0, 2.0
#: Share of the iterations before the regulariser starts.
WARMUP = 0.2
#: Share of the cached positions held out to measure each layer's error.
HELD_OUT = 0.125
#: Steps timed before a layer's iterations are fitted to its share of the time budget.
_TIMED_STEPS = 5
#: Lowest and highest multiplier of the calibrated weight scale the per-channel scale search tries.
SCALE_RANGE = (0.5, 1.2)


@dataclass(frozen=True)
class RoundingSettings:
    """How learned rounding runs.

    Attributes:
        iterations: Adam steps per layer (fewer when ``time_budget`` asks).
        sample: Output positions per step.
        positions: Output positions cached per image (all of them when a map has fewer).
        lr: Adam's learning rate on ``V``.
        reg_weight: Weight of the rounding regulariser against the reconstruction error.
        max_weight_bits: Only layers with weights of at most this many bits are learned.
        time_budget: Seconds the whole pass may take (None: no limit); scales each layer's iterations.
        device: Where the caches live and the optimisation runs (``'cpu'``, ``'cuda'``).
        seed: Seed of the position sampling and of the augmentation (``quantize`` sets it to its ``seed``).
        layers: Only these operators (None: every eligible one).
        min_images: With fewer calibration images, augmented views are added up to this many (0: never); 32,
            because from 32 images on the views measured worse end to end (benchmarks, *Learned rounding*).
        qdrop: Probability of replacing an input element by its FP32 value in a step, where the layer's input
            is quantized below 8 bits (0: QDrop off).
        scale_candidates: Weight-scale multipliers tried per output channel of a depthwise layer before the
            rounding is learned, spread over :data:`SCALE_RANGE` (0: the calibrated scales kept). Other layers
            keep their calibrated scales: with more weights per channel the rounding has the freedom, and
            the scale searched with nearest rounding measured worse after learning.
        bias_lr: Adam's learning rate on the bias, learned with the rounding, relative to the standard
            deviation of the layer's FP32 outputs (0: the bias kept).
        depthwise_factor: Depthwise layers (one input channel per group) run this many times the iterations.
        quadratic: Layers without an activation after them (the target is their output) are learned on the exact
            quadratic loss of every calibration position, with the least-squares bias, where they have at
            least as many positions as inputs (else on sampled positions, as the others). Off: per layer and
            end to end on held-out images of the same photographs it measured better, on other photographs
            not (benchmarks, *Learned rounding*).
        quadratic_reg: Weight of the rounding regulariser (its mean over the weights) against the quadratic loss
            divided by nearest rounding's.
        quadratic_factor: Layers learned on the quadratic loss run this many times the iterations.
        quadratic_activations: Layers followed by an activation are learned on the quadratic loss too, against
            their FP32 output before the activation.
        pairs: A depthwise layer followed by a 1 x 1 Conv that only it feeds is learned together with it, against
            the 1 x 1 Conv's FP32 output (:func:`learn_pair_rounding`), for the depthwise layer's steps. Off: on
            EfficientNet-Lite1 ``reg_weight`` leaves half of a pair's roundings undecided (benchmarks).
        pair_biases: A depthwise layer followed by a 1 x 1 Conv that only it feeds: each learned alone (as without
            pairs), then the two biases tuned together against the 1 x 1 Conv's FP32 output, the integers fixed
            (:func:`tune_pair_biases`, :attr:`iterations` steps); the pair keeps the better of the two on held-out
            positions; it replaces :attr:`pairs` when both are set. Off: it lifts the SNR along Lite1 at 60 steps
            per layer without LSQ, but ``best`` end to end is worse on Lite1 and Lite2 (benchmarks).
        qdrop_below_bits: QDrop applies where the layer's input is quantized below this many bits (8: at 4- to
            7-bit activations, as published; at 8-bit ones the input kept quantized in every step).
        photometric: The augmented views (:attr:`min_images`) are also darkened and tinted
            (:func:`~maptools.quantization.engine.augment.augment_batches`). Off: on EfficientNet-Lite1 at W4A8 it
            traded the photographs' errors (benchmarks).
        damping: Weight of a ridge term added to a layer's sampled loss: each weight's squared distance from its
            FP32 value times the mean square of its input, the error the rounding would cause if the inputs were
            uncorrelated, so the rounding does not lean on correlations only the calibration data show (0: off; along
            EfficientNet-Lite1 it moved the SNR probes no more than any change of the settings does, benchmarks).
        flat_views: The first learned layer's cache (sampled positions) also holds flat images spanning the
            calibration inputs' range (:func:`~maptools.quantization.engine.augment.flat_batches`: black, white, each
            saturated colour, greys), sampled as calibration images are, so its rounding keeps flat and dark regions,
            which natural photographs hardly weigh. Off: over three seeds on EfficientNet-Lite1 at W4A8 (capped by
            :attr:`flat_share`) they lowered the KL but lost confident crops on two seeds (benchmarks).
        flat_share: With :attr:`flat_views`, the largest share of the first learned layer's cached rows the flat
            images take together: each gets fewer positions when the photographs are few, since a flat image's positions
            are nearly one row repeated and uncapped they would outweigh what few photographs show.
    """

    iterations: int = 300
    sample: int = 512
    positions: int = 128
    lr: float = 1e-2
    reg_weight: float = 0.01
    max_weight_bits: int = 8
    time_budget: float | None = None
    device: str = "cpu"
    seed: int = 0
    layers: tuple[str, ...] | None = None
    min_images: int = 32
    qdrop: float = 0.5
    scale_candidates: int = 32
    bias_lr: float = 1e-3
    depthwise_factor: int = 4
    quadratic: bool = False
    quadratic_reg: float = 0.1
    quadratic_factor: int = 1
    quadratic_activations: bool = False
    pairs: bool = False
    qdrop_below_bits: int = 8
    pair_biases: bool = False
    photometric: bool = False
    damping: float = 0.0
    flat_views: bool = False
    flat_share: float = 0.125


#: The settings ``quantize(rounding='learned')`` starts from (its ``time_budget``, device and seed replace
#: theirs); the benchmarks vary it to measure the iterations and sample size.
DEFAULTS = RoundingSettings()


@dataclass
class LayerRounding:
    """What learned rounding did to one layer.

    ``error_nearest`` and ``error_learned`` are the mean squared error per output position (summed over
    channels, after the fused activation) on the held-out cached positions, with nearest and learned
    integers. ``target`` is the variable reconstructed: the fused activation's output, else the layer's; for the two
    layers of a pair (:attr:`RoundingSettings.pairs`) the 1 x 1 Conv's, whose errors both records carry.
    """

    name: str
    op_type: str
    target: str
    weight_bits: int
    iterations: int
    sample: int
    positions: int
    error_nearest: float
    error_learned: float
    changed: float
    seconds: float
    loss: float = math.nan
    #: The learned integers in the ONNX weight's layout.
    integers: torch.Tensor | None = field(default=None, repr=False)

    def to_dict(self) -> dict[str, float | int | str]:
        """The JSON-ready record (``report.json``'s ``learned_rounding``)."""
        return {"node": self.name, "op_type": self.op_type, "target": self.target, "weight_bits": self.weight_bits,
                "iterations": self.iterations, "sample": self.sample, "positions": self.positions,
                "error_nearest": self.error_nearest, "error_learned": self.error_learned,
                "changed_fraction": self.changed, "seconds": round(self.seconds, 3)}


# -- layers --------------------------------------------------------------------------------------------
@dataclass
class _Layer:
    """A MAC operator seen as ``G`` groups of ``(Og x Kg)`` matrices over input patches."""

    op: QuantableOperation
    groups: int
    weight: torch.Tensor  # (G, Og, Kg), float32, the FP32 weights
    scale: torch.Tensor  # (G, Og, 1)
    bias: torch.Tensor | None  # (Cout,)
    quant_min: int
    quant_max: int
    patches: Callable[[torch.Tensor], torch.Tensor]  # input -> (N, L, G * Kg)
    outputs: Callable[[torch.Tensor], torch.Tensor]  # output -> (N, L, Cout)
    to_weight: Callable[[torch.Tensor], torch.Tensor]  # (G, Og, Kg) -> the ONNX weight's layout
    activation: Callable[[torch.Tensor], torch.Tensor]
    target: str  # the FP32 variable reconstructed (after the fused activation)
    tail: list[Operation] = field(default_factory=list)
    per_channel: bool = True  # one weight scale per output channel (else one for the tensor)

    @property
    def depthwise(self) -> bool:
        """One input and one output channel per group: a few taps per channel."""
        return self.groups > 1 and self.weight.shape[1] == 1

    @property
    def bits(self) -> int:
        return int(self.op.config.input_quantization_config[1].num_of_bits)

    @property
    def input_bits(self) -> int | None:
        """Bits of the layer's quantized input (its own or, overlapped, its producer's), None when it is float."""
        config = self.op.config.input_quantization_config[0].dominated_by
        return int(config.num_of_bits) if QuantizationStates.is_activated(config.state) else None

    def drops_input_quantization(self, settings: RoundingSettings) -> bool:
        """Whether QDrop applies: an input quantized below :attr:`RoundingSettings.qdrop_below_bits` bits and
        ``qdrop > 0``."""
        bits = self.input_bits
        return settings.qdrop > 0 and bits is not None and bits < settings.qdrop_below_bits


def _conv_layer(op: QuantableOperation, weight: torch.Tensor) -> tuple | None:
    if weight.ndim != 4 or op.attributes.get("auto_pad", "NOTSET") not in ("NOTSET", b"NOTSET"):
        return None
    cout, cin_g, kh, kw = weight.shape
    group = int(op.attributes.get("group", 1))
    strides = list(op.attributes.get("strides", [1, 1]))
    dilations = list(op.attributes.get("dilations", [1, 1]))
    pads = list(op.attributes.get("pads", [0, 0, 0, 0]))
    if cout % group:
        return None
    pad = (pads[1], pads[3], pads[0], pads[2])  # ONNX (top, left, bottom, right) -> F.pad (left, right, top, bottom)

    def patches(x: torch.Tensor) -> torch.Tensor:
        x = F.pad(x, pad) if any(pad) else x
        return F.unfold(x, (kh, kw), dilation=dilations, stride=strides).transpose(1, 2)

    def outputs(y: torch.Tensor) -> torch.Tensor:
        return y.flatten(2).transpose(1, 2)

    matrix = weight.reshape(group, cout // group, cin_g * kh * kw)
    return group, matrix, patches, outputs, lambda m: m.reshape(cout, cin_g, kh, kw)


def _rows(x: torch.Tensor) -> torch.Tensor:
    return x.reshape(1, -1, x.shape[-1])


def _matrix_layer(op: QuantableOperation, weight: torch.Tensor) -> tuple | None:
    if weight.ndim != 2:
        return None
    if op.type == "Gemm":
        attrs = op.attributes
        if int(attrs.get("transA", 0)) or float(attrs.get("alpha", 1.0)) != 1.0 or float(attrs.get("beta", 1.0)) != 1.0:
            return None
        transposed = bool(int(attrs.get("transB", 0)))
    else:
        transposed = False
    matrix = weight if transposed else weight.t()  # (Cout, K)
    return 1, matrix.unsqueeze(0), _rows, _rows, (lambda m: m[0]) if transposed else (lambda m: m[0].t())


def _clip(op: Operation) -> Callable[[torch.Tensor], torch.Tensor]:
    bounds = []
    for index, attr in ((1, "min"), (2, "max")):
        value = None
        if len(op.inputs) > index and op.inputs[index].value is not None and op.inputs[index].name:
            value = float(torch.as_tensor(op.inputs[index].value).reshape(-1)[0])
        elif attr in op.attributes:
            value = float(op.attributes[attr])
        bounds.append(value)
    return lambda y: torch.clamp(y, min=bounds[0], max=bounds[1])


def _hard_sigmoid_gate(op: Operation) -> Callable[[torch.Tensor], torch.Tensor]:
    alpha, beta = float(op.attributes.get("alpha", 0.2)), float(op.attributes.get("beta", 0.5))
    return lambda y: y * torch.clamp(alpha * y + beta, 0.0, 1.0)


_ACTIVATIONS: dict[str, Callable[[Operation], Callable[[torch.Tensor], torch.Tensor]]] = {
    "Relu": lambda op: F.relu,
    "Clip": _clip,
    "Sigmoid": lambda op: torch.sigmoid,
    "HardSwish": lambda op: F.hardswish,
    "SoftPlus": lambda op: F.softplus,
    "Softplus": lambda op: F.softplus,
    "Gelu": lambda op: F.gelu,
}
_GATED: dict[str, Callable[[Operation], Callable[[torch.Tensor], torch.Tensor]]] = {
    "Sigmoid": lambda op: lambda y: y * torch.sigmoid(y),
    "HardSigmoid": _hard_sigmoid_gate,
}


def _activation_of(graph: BaseGraph, op: Operation, gates: dict[str, tuple[Operation, Operation]]) -> tuple:
    """The fused activation after ``op`` as PPQ fuses it: (function, target variable, tail operators)."""
    if op.name in gates:
        gate, mul = gates[op.name]
        return _GATED[gate.type](gate), mul.outputs[0].name, [gate, mul]
    activation = fused_activation(graph, op, set(FUSED_ACTIVATION_TYPES))
    if activation is not None and activation.type in _ACTIVATIONS and activation.outputs:
        return _ACTIVATIONS[activation.type](activation), activation.outputs[0].name, [activation]
    return (lambda y: y), op.outputs[0].name, []


def learnable_layers(graph: BaseGraph, max_weight_bits: int = 8,
                     names: Iterable[str] | None = None) -> list[_Layer]:
    """The Conv/Gemm/MatMul operators whose constant weights learned rounding can round, in graph order.

    A layer qualifies when its weight is quantized (ACTIVATED, at most ``max_weight_bits`` bits) and its
    shape is one the patch extraction knows (2-D Conv with explicit pads, Gemm without ``transA``/``alpha``/
    ``beta``, MatMul with a 2-D weight).
    """
    wanted = set(names) if names is not None else None
    gates = {computing.name: (gate, mul) for gate_type in GATES.values()
             for computing, gate, mul in gated_activations(graph, gate_type)}
    layers = []
    for op in graph.topological_sort():
        if op.type not in ("Conv", "Gemm", "MatMul") or not isinstance(op, QuantableOperation):
            continue
        if (wanted is not None and op.name not in wanted) or len(op.inputs) < 2 or not op.inputs[1].is_parameter:
            continue
        config = op.config.input_quantization_config[1]
        if config.state != QuantizationStates.ACTIVATED or int(config.num_of_bits) > max_weight_bits:
            continue
        weight = torch.as_tensor(op.inputs[1].value).detach().float().cpu()
        shape = _conv_layer(op, weight) if op.type == "Conv" else _matrix_layer(op, weight)
        if shape is None:
            logger.debug("learned rounding: %s (%s) has a layout it does not handle; nearest rounding", op.name,
                         op.type)
            continue
        groups, matrix, patches, outputs, to_weight = shape
        cout = matrix.shape[0] * matrix.shape[1]
        scale = torch.as_tensor(config.scale).detach().float().cpu().reshape(-1)
        per_channel = scale.numel() > 1
        scale = scale if per_channel else scale.expand(cout)
        bias = None
        if op.type in ("Conv", "Gemm") and len(op.inputs) > 2 and op.inputs[2].value is not None:
            bias = torch.as_tensor(op.inputs[2].value).detach().float().cpu().reshape(-1)
            if bias.numel() != cout:
                bias = None if bias.numel() != 1 else bias.expand(cout)
        activation, target, tail = _activation_of(graph, op, gates)
        layers.append(_Layer(op, groups, matrix, scale.reshape(groups, -1, 1), bias, int(config.quant_min),
                             int(config.quant_max), patches, outputs, to_weight, activation, target, tail,
                             per_channel))
    return layers


# -- carrying the calibration data forward -----------------------------------------------------------------
class _Carrier:
    """The activations of every calibration batch at one point of the graph, advanced operator by operator.

    ``quantized=False`` runs the operators in FP32 (their parameters as loaded), else with PPQ's fake
    quantization as configured now (the layers already rounded included).
    """

    def __init__(self, graph: BaseGraph, executor: TorchExecutor, order: list[Operation],
                 batches: Sequence[dict[str, torch.Tensor]], quantized: bool) -> None:
        self.graph, self.executor, self.order, self.quantized = graph, executor, order, quantized
        self.index = {op.name: i for i, op in enumerate(order)}
        self.cursor = 0
        self.values: dict[str, list[torch.Tensor]] = {
            name: [batch[name] for batch in batches] for name in graph.inputs}
        self.batches = len(batches)

    def last_use(self, name: str) -> int:
        """Index of the last operator reading ``name`` (-1 if none)."""
        var = self.graph.variables[name]
        return max((self.index.get(op.name, -1) for op in var.dest_ops), default=-1)

    @torch.no_grad()
    def advance(self, stop: int, keep: Iterable[str] = ()) -> None:
        """Run the operators up to ``stop`` (exclusive); keep what later operators and ``keep`` need."""
        if stop <= self.cursor:
            return
        ops = self.order[self.cursor:stop]
        keep = set(keep)
        produced = [var.name for op in ops for var in op.outputs]
        wanted = [name for name in dict.fromkeys(list(self.values) + produced)
                  if name in keep or self.last_use(name) >= stop]
        outputs = [name for name in wanted if name not in self.values]
        if outputs:
            switched = [op for op in ops if isinstance(op, QuantableOperation)] if not self.quantized else []
            for op in switched:
                op.dequantize()
            try:
                results: dict[str, list[torch.Tensor]] = {name: [] for name in outputs}
                for b in range(self.batches):
                    feed = {name: values[b] for name, values in self.values.items()}
                    out = self.executor.partial_graph_forward(operations=ops, feed_dict=feed, output_names=outputs)
                    for name, value in zip(outputs, out, strict=True):
                        results[name].append(value.detach())
            finally:
                for op in switched:
                    op.restore_quantize_state()
        else:
            results = {}
        self.values = {name: self.values[name] if name in self.values else results[name] for name in wanted}
        self.cursor = stop


# -- the optimisation --------------------------------------------------------------------------------------
def _rectified_sigmoid(v: torch.Tensor) -> torch.Tensor:
    return torch.clamp(torch.sigmoid(v) * (ZETA - GAMMA) + GAMMA, 0.0, 1.0)


def _initial_v(rest: torch.Tensor) -> torch.Tensor:
    """``V`` with ``h(V)`` equal to the fractional part ``rest`` (clamped inside the sigmoid's range)."""
    p = ((rest - GAMMA) / (ZETA - GAMMA)).clamp(1e-4, 1 - 1e-4)
    return torch.log(p / (1 - p))


def _beta(step: int, total: int) -> float:
    start = WARMUP * total
    progress = max(0.0, (step - start) / max(total - start, 1.0))
    return BETA_END + (BETA_START - BETA_END) * (1.0 - progress)


@dataclass
class _Cache:
    """Sampled input patches (G, M, Kg) and FP32 targets (M, Cout) of one layer; the last rows held out.

    ``fp_patches``: the FP32 network's input patches at the same positions, for QDrop (else None).
    ``outer``: the FP32 targets (M, Cout') of the pointwise layer after a depthwise one at the same positions, when
    the two are learned together (else None).
    """

    patches: torch.Tensor
    targets: torch.Tensor
    train: int
    fp_patches: torch.Tensor | None = None
    outer: torch.Tensor | None = None


def _sample_cache(layer: _Layer, inputs: Sequence[torch.Tensor], targets: Sequence[torch.Tensor],
                  positions: int, generator: torch.Generator, device: str,
                  fp_inputs: Sequence[torch.Tensor] | None = None,
                  outer: Sequence[torch.Tensor] | None = None, counts: Sequence[int] | None = None) -> _Cache:
    """Per image, ``positions`` random output positions (``counts[b]`` for the images of input ``b`` when given):
    their input patches and FP32 targets (and the FP32 input patches when ``fp_inputs`` is given, the FP32 maps
    ``outer`` at the same positions when given)."""
    patch_rows, target_rows, fp_rows, outer_rows = [], [], [], []
    groups = layer.groups
    for b, (x, y) in enumerate(zip(inputs, targets, strict=True)):
        patch, out = layer.patches(x.float().cpu()), layer.outputs(y.float().cpu())  # (N, L, G*Kg), (N, L, Cout)
        fp_patch = layer.patches(fp_inputs[b].float().cpu()) if fp_inputs is not None else None
        outer_map = layer.outputs(outer[b].float().cpu()) if outer is not None else None
        if patch.shape[:2] != out.shape[:2] or (outer_map is not None and outer_map.shape[:2] != out.shape[:2]):
            raise ValueError(f"{layer.op.name}: {patch.shape[1]} patches for {out.shape[1]} outputs")
        for n in range(patch.shape[0]):
            count = min(positions if counts is None else counts[b], patch.shape[1])
            index = torch.randperm(patch.shape[1], generator=generator)[:count]
            patch_rows.append(patch[n, index])
            target_rows.append(out[n, index])
            if fp_patch is not None:
                fp_rows.append(fp_patch[n, index])
            if outer_map is not None:
                outer_rows.append(outer_map[n, index])
    targets_ = torch.cat(target_rows)
    order = torch.randperm(targets_.shape[0], generator=generator)  # held-out rows from every image

    def layout(rows: list[torch.Tensor]) -> torch.Tensor:
        return torch.cat(rows).reshape(-1, groups, layer.weight.shape[2])[order].transpose(0, 1).contiguous().to(device)

    patches, targets_ = layout(patch_rows), targets_[order].to(device)
    held = max(1, int(round(targets_.shape[0] * HELD_OUT))) if targets_.shape[0] > 1 else 0
    return _Cache(patches, targets_, targets_.shape[0] - held, layout(fp_rows) if fp_rows else None,
                  torch.cat(outer_rows)[order].to(device) if outer_rows else None)


class _Drops:
    """QDrop's masks, as the weights of a ``lerp`` from the FP32 inputs to the quantized ones: 0 (the FP32 value) with
    probability ``qdrop`` (in steps of 1/256), else 1.

    Drawn as bytes, seven to each 64-bit word of ``generator`` (whose draws leave the top bit clear), compared in
    float arithmetic: on a CPU ``torch.rand`` and a boolean ``where`` cost several times the layer's product
    (``bench/rounding_step.py``).
    """

    def __init__(self, qdrop: float, generator: torch.Generator, device: torch.device | str = "cpu") -> None:
        self.generator, self.device = generator, device
        #: A uniform byte lies below this with probability ``qdrop`` (rounded to 1/256).
        self.threshold = round(qdrop * 256)
        self.words = torch.empty(0, dtype=torch.int64)
        self.weights = torch.empty(0, device=device)
        self.low = slice(0, 7) if sys.byteorder == "little" else slice(1, 8)  # the bytes below the top one

    def draw(self, shape: torch.Size) -> torch.Tensor:
        """A fresh mask of ``shape`` (valid until the next draw)."""
        count = math.prod(shape)
        words = -(-count // 7)
        if self.words.numel() < words:
            self.words = torch.empty(words, dtype=torch.int64)
            self.weights = torch.empty(words * 7, device=self.device)
        drawn = self.words[:words].random_(generator=self.generator)
        weights = self.weights[:words * 7]
        weights.view(words, 7).copy_(drawn.view(torch.uint8).view(words, 8)[:, self.low])
        # byte b -> 1 where b >= threshold, else 0: clamp(b - threshold + 1, 0, 1) on whole numbers
        return weights.add_(1 - self.threshold).clamp_(0.0, 1.0)[:count].view(shape)


class _StepInputs:
    """The input patches (G, P, Kg) of each step's sampled rows, in buffers reused from step to step.

    Reused because on a CPU the page faults of a fresh buffer per step cost more than the layer's product; with
    QDrop (``drops``) each element is its FP32 value (``cache.fp_patches``) exactly where the mask says so.
    """

    def __init__(self, cache: _Cache, sample: int, drops: _Drops | None) -> None:
        groups, _, width = cache.patches.shape
        self.patches = cache.patches
        self.inputs = torch.empty(groups, sample, width, device=cache.patches.device)
        #: With QDrop: the FP32 patches, the buffer their rows land in, and the masks.
        self.mixing = (cache.fp_patches, torch.empty_like(self.inputs), drops) \
            if cache.fp_patches is not None and drops is not None else None

    def __call__(self, rows: torch.Tensor) -> torch.Tensor:
        """The patches of ``rows``, valid until the next call."""
        torch.index_select(self.patches, 1, rows, out=self.inputs)
        if self.mixing is None:
            return self.inputs
        fp_patches, fp32, drops = self.mixing
        torch.index_select(fp_patches, 1, rows, out=fp32)
        return fp32.lerp_(self.inputs, drops.draw(self.inputs.shape))  # exact at weights 0 and 1


def _layer_output(layer: _Layer, patches: torch.Tensor, weight: torch.Tensor,
                  bias: torch.Tensor | None) -> torch.Tensor:
    """The layer's output after its activation at the positions of ``patches`` (G, P, Kg): (P, Cout).

    One batched product per group (a depthwise Conv: per channel a dot product of its k*k taps); on a CPU this
    is about twice as fast as an elementwise product and sum over a (P, G, Kg) layout.
    """
    out = torch.bmm(patches, weight.transpose(1, 2))  # (G, P, Og)
    out = out.transpose(0, 1).reshape(patches.shape[1], -1)
    return layer.activation(out + bias if bias is not None else out)


def _channel_errors(layer: _Layer, cache: _Cache, weight: torch.Tensor, bias: torch.Tensor | None,
                    rows: slice) -> torch.Tensor:
    """Squared output error summed over ``rows``, per output channel: (Cout,)."""
    with torch.no_grad():
        total = torch.zeros(cache.targets.shape[1], dtype=torch.float64, device=cache.targets.device)
        for start in range(rows.start, rows.stop, 4096):
            stop = min(start + 4096, rows.stop)
            out = _layer_output(layer, cache.patches[:, start:stop], weight, bias)
            total += ((out - cache.targets[start:stop]) ** 2).sum(dim=0).double()
        return total


def _error(layer: _Layer, cache: _Cache, weight: torch.Tensor, bias: torch.Tensor | None, rows: slice) -> float:
    count = rows.stop - rows.start
    return float(_channel_errors(layer, cache, weight, bias, rows).sum() / count) if count else math.nan


def _quantize(layer: _Layer, ratio: torch.Tensor) -> torch.Tensor:
    """Nearest integers of ``ratio`` (weight / scale) on the layer's grid; half to even, as PPQ."""
    return torch.clamp(torch.round(ratio), layer.quant_min, layer.quant_max)


def _nearest(layer: _Layer, device: torch.device | str) -> torch.Tensor:
    """The layer's nearest integers at its calibrated scale, on ``device``."""
    return _quantize(layer, layer.weight.to(device) / layer.scale.to(device))


def search_scale(layer: _Layer, cache: _Cache, candidates: int) -> torch.Tensor:
    """The weight scale (G, Og, 1) that minimises the layer's output error with nearest rounding on the training
    rows: per output channel a multiple of the calibrated scale from :data:`SCALE_RANGE` (or 1).

    Each output channel's error depends only on its own weights and scale (the activation is elementwise), so
    the search is exact per channel; with one scale for the tensor, one multiplier for all.
    """
    device = cache.patches.device
    base = layer.scale.to(device)
    if candidates <= 0:
        return base
    weight = layer.weight.to(device)
    bias = layer.bias.to(device) if layer.bias is not None else None
    factors = torch.cat([torch.ones(1), torch.linspace(*SCALE_RANGE, candidates)]).tolist()
    rows = slice(0, cache.train)
    errors = torch.stack([_channel_errors(layer, cache, _quantize(layer, weight / (base * f)) * base * f, bias, rows)
                          for f in factors])  # (F, Cout)
    if not layer.per_channel:
        return base * factors[int(errors.sum(dim=1).argmin())]
    best = torch.as_tensor(factors, device=device)[errors.argmin(dim=0)]
    return base * best.to(base.dtype).reshape(base.shape)


@dataclass
class _Learned:
    """One layer's learned integers (G, Og, Kg), weight scale (G, Og, 1) and bias (Cout,) with the nearest ones."""

    nearest: torch.Tensor
    learned: torch.Tensor
    scale: torch.Tensor
    bias: torch.Tensor | None
    loss: float
    steps: int


def _variables(layer: _Layer, scale: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``weight / scale``, its floor, and AdaRound's ``V`` starting at its fractional part (``h(V)`` equal to it)."""
    ratio = layer.weight.to(scale.device) / scale
    floor = torch.floor(ratio)
    return ratio, floor, _initial_v(ratio - floor).requires_grad_(True)


def _rounded(layer: _Layer, ratio: torch.Tensor, floor: torch.Tensor, v: torch.Tensor, steps: int) -> torch.Tensor:
    """The integers ``V`` decides (up where ``V >= 0``), or the nearest ones of ``ratio`` when no step was taken."""
    with torch.no_grad():
        return torch.clamp(floor + (v >= 0).float(), layer.quant_min, layer.quant_max) if steps \
            else _quantize(layer, ratio)


def _optimise(vs: Sequence[torch.Tensor], optimizer: torch.optim.Optimizer, iterations: int,
              reconstruction: Callable[[list[torch.Tensor]], torch.Tensor],
              regulariser: Callable[[torch.Tensor], torch.Tensor],
              on_step: Callable[[int, float], bool] | None) -> tuple[float, int]:
    """AdaRound's steps on the ``vs`` (one per layer learned together): ``reconstruction`` of their ``h(V)``, plus
    after the warm-up ``regulariser`` of each weight's ``1 - |2h - 1|^beta`` (``beta`` annealed); returns the last
    loss and the steps taken (``on_step`` may stop)."""
    loss_value = math.nan
    for step in range(iterations):
        hs = [_rectified_sigmoid(v) for v in vs]
        loss = reconstruction(hs)
        if step >= WARMUP * iterations:
            beta = _beta(step, iterations)
            for h in hs:
                loss = loss + regulariser(1 - (2 * h - 1).abs().pow(beta))
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        loss_value = float(loss.detach())
        if on_step is not None and not on_step(step, loss_value):
            return loss_value, step + 1
    return loss_value, iterations


def _ridge(layer: _Layer, cache: _Cache, damping: float) -> Callable[[torch.Tensor], torch.Tensor] | None:
    """``damping`` times the layer's output error under uncorrelated inputs: ``sum((w - w_fp)^2 * E[x^2])`` over the
    weights (G, Og, Kg), ``E[x^2]`` the mean square of each input on the training rows; None when ``damping`` is 0."""
    if damping <= 0:
        return None
    energy = (cache.patches[:, :cache.train] ** 2).mean(dim=1).unsqueeze(1)  # (G, 1, Kg)
    fp = layer.weight.to(cache.patches.device)
    return lambda weight: damping * ((weight - fp) ** 2 * energy).sum()


def learn_rounding(layer: _Layer, cache: _Cache, settings: RoundingSettings, iterations: int,
                   generator: torch.Generator, on_step: Callable[[int, float], bool] | None = None) -> _Learned:
    """Learn one layer's integers on its cache, after searching its weight scale and with its bias.

    Args:
        on_step: Called after every step with (step, loss); returning False stops early.

    Returns:
        The nearest integers at the calibrated scale, and the learned ones with their scale and bias.
    """
    device = cache.patches.device
    nearest = _nearest(layer, device)
    scale = search_scale(layer, cache, settings.scale_candidates if layer.depthwise else 0)
    bias = layer.bias.to(device) if layer.bias is not None else None
    ratio, floor, v = _variables(layer, scale)
    groups = [{"params": [v], "lr": settings.lr}]
    if bias is not None and settings.bias_lr > 0:
        bias = bias.clone().requires_grad_(True)
        groups.append({"params": [bias], "lr": settings.bias_lr * float(cache.targets[:cache.train].std())})
    optimizer = torch.optim.Adam(groups)
    sample = min(settings.sample, cache.train)
    # QDrop's masks from their own stream: the sampled rows are those of the same run without QDrop
    drops = _Drops(settings.qdrop, torch.Generator().manual_seed(settings.seed + 1), device) \
        if cache.fp_patches is not None else None
    inputs = _StepInputs(cache, sample, drops)
    ridge = _ridge(layer, cache, settings.damping)

    def reconstruction(hs: list[torch.Tensor]) -> torch.Tensor:
        rows = torch.randint(cache.train, (sample,), generator=generator).to(device)
        weight = torch.clamp(floor + hs[0], layer.quant_min, layer.quant_max) * scale
        out = _layer_output(layer, inputs(rows), weight, bias)
        loss = ((out - cache.targets.index_select(0, rows)) ** 2).sum(dim=1).mean()
        return loss if ridge is None else loss + ridge(weight)

    loss_value, step = _optimise([v], optimizer, iterations, reconstruction,
                                 lambda undecided: settings.reg_weight * undecided.sum(), on_step)
    return _Learned(nearest, _rounded(layer, ratio, floor, v, step), scale,
                    bias.detach() if bias is not None else None, loss_value, step)


# -- a depthwise layer learned with the pointwise layer after it ------------------------------------------------
def _pointwise_after(graph: BaseGraph, first: _Layer, second: _Layer) -> bool:
    """Whether ``first`` is depthwise and ``second`` a 1 x 1, stride-1, unpadded, ungrouped Conv reading only
    ``first``'s reconstructed output, which nothing else reads: the pair's output at a position then depends on
    ``first``'s input patch there alone, so the two can be learned together on the same sampled positions."""
    op = second.op
    if not first.depthwise or op.type != "Conv" or second.groups != 1 or op.inputs[0].name != first.target:
        return False
    kernel = tuple(torch.as_tensor(op.inputs[1].value).shape[2:])
    strides = [int(x) for x in op.attributes.get("strides", [1, 1])]
    pads = [int(x) for x in op.attributes.get("pads", [0, 0, 0, 0])]
    return kernel == (1, 1) and set(strides) <= {1} and not any(pads) \
        and len(graph.variables[first.target].dest_ops) == 1


def _pair_output(first: _Layer, second: _Layer, patches: torch.Tensor, weights: Sequence[torch.Tensor],
                 biases: Sequence[torch.Tensor | None],
                 between: Callable[[torch.Tensor], torch.Tensor]) -> torch.Tensor:
    """The pointwise layer's output (P, Cout) from the depthwise layer's input patches (G, P, Kg)."""
    middle = between(_layer_output(first, patches, weights[0], biases[0]))
    return _layer_output(second, middle.unsqueeze(0), weights[1], biases[1])


def _pair_error(first: _Layer, second: _Layer, cache: _Cache, weights: Sequence[torch.Tensor],
                biases: Sequence[torch.Tensor | None], between: Callable[[torch.Tensor], torch.Tensor],
                rows: slice) -> float:
    """Mean squared error per position (summed over channels) of the pair's output on ``rows``."""
    assert cache.outer is not None
    count = rows.stop - rows.start
    if not count:
        return math.nan
    with torch.no_grad():
        total = 0.0
        for start in range(rows.start, rows.stop, 4096):
            stop = min(start + 4096, rows.stop)
            out = _pair_output(first, second, cache.patches[:, start:stop], weights, biases, between)
            total += float(((out - cache.outer[start:stop]) ** 2).sum(dtype=torch.float64))
    return total / count


def learn_pair_rounding(first: _Layer, second: _Layer, cache: _Cache, settings: RoundingSettings, iterations: int,
                        generator: torch.Generator, between: Callable[[torch.Tensor], torch.Tensor],
                        on_step: Callable[[int, float], bool] | None = None) -> tuple[_Learned, _Learned]:
    """Learn a depthwise layer's integers together with those of the pointwise layer after it, against the
    pointwise layer's FP32 output (``cache.outer``), so the depthwise rounding is judged by what the next layer
    makes of it (BRECQ's block reconstruction, for the part of a block whose output needs one patch per position).

    ``between`` quantizes the depthwise output as the pointwise layer's input (straight-through gradient; with
    QDrop below 8 bits each element stays float with probability ``qdrop``). The depthwise scale is searched first on
    its own output, as in :func:`learn_rounding`; both biases are learned with the roundings.
    """
    assert cache.outer is not None
    device = cache.patches.device
    layers = (first, second)
    scales = [search_scale(first, cache, settings.scale_candidates), second.scale.to(device)]
    ratios, floors, vs = (list(part) for part in zip(*(_variables(layer, scale)
                                                         for layer, scale in zip(layers, scales, strict=True)),
                                                       strict=True))
    biases = [layer.bias.to(device) if layer.bias is not None else None for layer in layers]
    groups: list[dict] = [{"params": vs, "lr": settings.lr}]
    spreads = (float(cache.targets[:cache.train].std()), float(cache.outer[:cache.train].std()))
    for k, bias in enumerate(biases):
        if bias is not None and settings.bias_lr > 0:
            biases[k] = bias.clone().requires_grad_(True)
            groups.append({"params": [biases[k]], "lr": settings.bias_lr * spreads[k]})
    optimizer = torch.optim.Adam(groups)
    sample = min(settings.sample, cache.train)
    middle_drop = second.drops_input_quantization(settings)
    drops = _Drops(settings.qdrop, torch.Generator().manual_seed(settings.seed + 1), device) \
        if cache.fp_patches is not None or middle_drop else None
    inputs = _StepInputs(cache, sample, drops)

    def dropped(middle: torch.Tensor) -> torch.Tensor:
        quantized = between(middle)
        if not middle_drop:
            return quantized
        assert drops is not None
        return torch.lerp(middle, quantized, drops.draw(middle.shape))

    def reconstruction(hs: list[torch.Tensor]) -> torch.Tensor:
        rows = torch.randint(cache.train, (sample,), generator=generator).to(device)
        weights = [torch.clamp(floor + h, layer.quant_min, layer.quant_max) * scale
                   for floor, h, layer, scale in zip(floors, hs, layers, scales, strict=True)]
        out = _pair_output(first, second, inputs(rows), weights, biases, dropped)
        return ((out - cache.outer.index_select(0, rows)) ** 2).sum(dim=1).mean()

    loss_value, step = _optimise(vs, optimizer, iterations, reconstruction,
                                 lambda undecided: settings.reg_weight * undecided.sum(), on_step)
    first_result, second_result = (
        _Learned(_nearest(layer, device),
                 _rounded(layer, ratio, floor, v, step), scale, bias.detach() if bias is not None else None,
                 loss_value, step)
        for layer, ratio, floor, v, scale, bias in zip(layers, ratios, floors, vs, scales, biases, strict=True))
    return first_result, second_result


# -- layers with a linear target: the exact quadratic loss on every position ----------------------------------
@dataclass
class _Moments:
    """Sums over positions of a layer's input patches ``x`` (the quantized network's) and FP32 targets ``y``.

    Where the layer's output is its target (no activation after it), the output error of any weight and bias is a
    quadratic form in these sums, so every position of every calibration image enters each step at a cost that
    does not grow with the number of positions. Float64: the error is a small difference of large sums.
    """

    xx: torch.Tensor  # (G, Kg, Kg)
    x: torch.Tensor  # (G, Kg)
    xy: torch.Tensor  # (G, Kg, Og)
    y: torch.Tensor  # (Cout,)
    yy: torch.Tensor  # (Cout,)
    count: int = 0

    @classmethod
    def of(cls, layer: _Layer, inputs: Iterable[torch.Tensor], targets: Iterable[torch.Tensor]) -> _Moments:
        """The sums over every output position of ``inputs`` (quantized) and ``targets`` (FP32)."""
        groups, og, kg = layer.weight.shape
        cout = groups * og
        sums = cls(torch.zeros(groups, kg, kg, dtype=torch.float64), torch.zeros(groups, kg, dtype=torch.float64),
                   torch.zeros(groups, kg, og, dtype=torch.float64), torch.zeros(cout, dtype=torch.float64),
                   torch.zeros(cout, dtype=torch.float64))
        for x, y in zip(inputs, targets, strict=True):
            patch = layer.patches(x.float().cpu()).reshape(-1, groups, kg).transpose(0, 1).double()  # (G, P, Kg)
            out = layer.outputs(y.float().cpu()).reshape(-1, cout).double()  # (P, Cout)
            if patch.shape[1] != out.shape[0]:
                raise ValueError(f"{layer.op.name}: {patch.shape[1]} patches for {out.shape[0]} outputs")
            sums.xx += torch.bmm(patch.transpose(1, 2), patch)
            sums.x += patch.sum(dim=1)
            sums.xy += torch.bmm(patch.transpose(1, 2), out.reshape(-1, groups, og).transpose(0, 1))
            sums.y += out.sum(dim=0)
            sums.yy += (out ** 2).sum(dim=0)
            sums.count += out.shape[0]
        return sums

    def quadratic(self, bias: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor, float]:
        """The error per position, summed over channels, as ``w A w - 2 w B + c`` of the weights (G, Og, Kg):
        (A (G, Kg, Kg), B (G, Kg, Og), c), with ``bias`` (Cout,) fixed, or for None with the least-squares bias of
        every weight (the centred moments)."""
        n = max(self.count, 1)
        groups, _, og = self.xy.shape
        if bias is None:
            mean_x, mean_y = self.x / n, self.y / n
            return (self.xx / n - mean_x.unsqueeze(2) * mean_x.unsqueeze(1),
                    self.xy / n - mean_x.unsqueeze(2) * mean_y.reshape(groups, 1, og),
                    float((self.yy / n - mean_y ** 2).sum()))
        b = bias.double().cpu().reshape(-1)  # the target less the bias: y - b
        return (self.xx / n, (self.xy - self.x.unsqueeze(2) * b.reshape(groups, 1, og)) / n,
                float((self.yy - 2 * b * self.y + n * b ** 2).sum() / n))

    def error(self, weight: torch.Tensor, bias: torch.Tensor | None) -> float:
        """Mean squared output error per position, summed over channels, of ``weight`` (G, Og, Kg) and ``bias``
        (None: no bias)."""
        fixed = bias if bias is not None else torch.zeros(self.y.shape[0])
        return float(_quadratic_form(weight.double().cpu(), *self.quadratic(fixed)))

    def bias_for(self, weight: torch.Tensor) -> torch.Tensor:
        """The bias (Cout,) that makes the mean output equal the FP32 target's mean: the least-squares bias."""
        n = max(self.count, 1)
        mean_out = torch.einsum("gok,gk->go", weight.double().cpu(), self.x / n).reshape(-1)
        return (self.y / n - mean_out).float()


def _quadratic_form(w: torch.Tensor, a: torch.Tensor, b: torch.Tensor, c: float) -> torch.Tensor:
    """``w A w - 2 w B + c`` summed over groups and output channels (see :meth:`_Moments.quadratic`)."""
    return torch.einsum("gok,gkl,gol->", w, a, w) - 2 * torch.einsum("gok,gko->", w, b) + c


def _quadratic_target(layer: _Layer, settings: RoundingSettings) -> str | None:
    """The variable a layer is learned against on the quadratic loss (its own output), None for sampled positions.

    Its output is the reconstructed variable where no activation follows (the loss is then exact); with
    :attr:`RoundingSettings.quadratic_activations` also before an activation (the loss then ignores it).
    """
    if not settings.quadratic or (layer.tail and not settings.quadratic_activations):
        return None
    return layer.op.outputs[0].name


def learn_rounding_quadratic(layer: _Layer, train: _Moments, settings: RoundingSettings, iterations: int,
                             on_step: Callable[[int, float], bool] | None = None) -> _Learned:
    """Learn a linear-target layer's integers on the exact quadratic loss of all its training positions.

    The bias is not a variable: for every weight the least-squares bias is known (:meth:`_Moments.bias_for`),
    so the loss is the output covariance error and the bias is set from the learned integers at the end (kept
    as loaded when ``bias_lr`` is 0 or the layer has none). The loss is divided by nearest rounding's, so the
    regulariser's weight :attr:`RoundingSettings.quadratic_reg` means the same on every layer.
    """
    learn_bias = layer.bias is not None and settings.bias_lr > 0
    fixed = None if learn_bias else layer.bias if layer.bias is not None else torch.zeros(layer.scale.numel())
    a, b, c = train.quadratic(fixed)
    nearest = _nearest(layer, layer.scale.device)
    reference = max(float(_quadratic_form(nearest.double() * layer.scale.double(), a, b, c)), 1e-30)
    a, b = a.float(), b.float()
    ratio, floor, v = _variables(layer, layer.scale)
    optimizer = torch.optim.Adam([v], lr=settings.lr)
    loss_value, step = _optimise(
        [v], optimizer, iterations,
        lambda hs: _quadratic_form(torch.clamp(floor + hs[0], layer.quant_min, layer.quant_max) * layer.scale, a,
                                   b, c) / reference,
        lambda undecided: settings.quadratic_reg * undecided.mean(), on_step)
    learned = _rounded(layer, ratio, floor, v, step)
    bias = train.bias_for(learned * layer.scale) if learn_bias else layer.bias
    return _Learned(nearest, learned, layer.scale, bias, loss_value, step)


# -- the pass ------------------------------------------------------------------------------------------
class LearnedRoundingPass(QuantizationOptimizationPass):
    """PPQ pass: learned rounding of every eligible layer, run after calibration and before parameter baking."""

    def __init__(self, settings: RoundingSettings) -> None:
        super().__init__(name="maptools learned rounding")
        self.settings = settings
        #: One record per learned layer, filled by :meth:`optimize`.
        self.results: list[LayerRounding] = []

    def optimize(self, graph: BaseGraph, dataloader: Iterable = (), executor: TorchExecutor | None = None,
                 collate_fn: Callable | None = None, **kwargs) -> None:  # noqa: D102 - PPQ's signature
        settings = self.settings
        layers = learnable_layers(graph, settings.max_weight_bits, settings.layers)
        if not layers or executor is None:
            return
        batches = [collate_fn(batch) if collate_fn is not None else batch for batch in dataloader]
        batches = augment_batches(batches, settings.min_images, settings.seed, settings.photometric)
        self.results = run(graph, executor, layers, batches, settings)


def with_learned_rounding(build: Callable[..., QuantizationOptimizationPipeline],
                          rounding: LearnedRoundingPass) -> Callable[..., QuantizationOptimizationPipeline]:
    """Wrap a quantizer's ``build_quant_pipeline``: ``rounding`` runs just before PPQ bakes the parameters.

    Before LSQ when the setting has it (LSQ then starts from the learned integers), else before baking.
    """

    def build_quant_pipeline(setting, *args, **kwargs) -> QuantizationOptimizationPipeline:
        passes = list(build(setting, *args, **kwargs))
        where = next((i for i, p in enumerate(passes) if isinstance(p, (LearnedStepSizePass, ParameterBakingPass))),
                     len(passes))
        return QuantizationOptimizationPipeline(passes[:where] + [rounding] + passes[where:])

    return build_quant_pipeline


def _iterations(layer: _Layer, settings: RoundingSettings) -> int:
    """Adam steps of one layer: :attr:`RoundingSettings.depthwise_factor` times more for a depthwise one,
    :attr:`RoundingSettings.quadratic_factor` times for one learned on the quadratic loss."""
    if _quadratic_target(layer, settings) is not None:
        return settings.iterations * max(1, settings.quadratic_factor)
    return settings.iterations * (max(1, settings.depthwise_factor) if layer.depthwise else 1)


def _held_batches(batches: int) -> int:
    """Calibration batches held out of a quadratic layer's loss to measure its error: an eighth, none of one."""
    return max(1, int(round(batches * HELD_OUT))) if batches > 1 else 0


def _quadratic(layer: _Layer, settings: RoundingSettings, targets: Sequence[torch.Tensor]) -> bool:
    """Whether ``layer`` is learned on the quadratic loss: a quadratic target (``targets``, one per calibration
    batch) with at least as many training positions as inputs per group (with fewer, sampled positions cost less
    and say the same)."""
    if _quadratic_target(layer, settings) is None or not targets:
        return False
    train = targets[:len(targets) - _held_batches(len(targets))]
    per_image = layer.outputs(train[0][:1]).shape[1] if train else 0
    return per_image * sum(y.shape[0] for y in train) >= layer.weight.shape[2]


def _cost(layer: _Layer, settings: RoundingSettings) -> float:
    """Relative cost of a layer's steps: multiply-adds per position, plus a fixed overhead, times its steps."""
    return (float(layer.weight.numel()) + 2e4) * _iterations(layer, settings)


def run(graph: BaseGraph, executor: TorchExecutor, layers: list[_Layer], batches: Sequence[dict[str, torch.Tensor]],
        settings: RoundingSettings) -> list[LayerRounding]:
    """Learn the rounding of ``layers`` in graph order, writing each result into the graph before the next."""
    started = time.perf_counter()
    order = graph.topological_sort()
    quant = _Carrier(graph, executor, order, batches, quantized=True)
    fp32 = _Carrier(graph, executor, order, batches, quantized=False)
    generator = torch.Generator().manual_seed(settings.seed)
    costs = [_cost(layer, settings) for layer in layers]
    pairs = {i for i in range(len(layers) - 1)
             if (settings.pairs or settings.pair_biases) and _pointwise_after(graph, layers[i], layers[i + 1])}
    results: list[LayerRounding] = []
    carry_seconds = 0.0
    for i, layer in enumerate(layers):
        if i - 1 in pairs:  # learned with the depthwise layer before it
            continue
        layer_started = time.perf_counter()
        second = layers[i + 1] if i in pairs else None
        position = quant.index[layer.op.name]
        last = second or layer
        tail_end = max([quant.index[last.op.name]] + [quant.index[op.name] for op in last.tail]) + 1
        later_targets = [other.target for other in layers[i:]]
        source = layer.op.inputs[0].name
        qdrop = layer.drops_input_quantization(settings)
        before = _quadratic_target(layer, settings) if second is None else None
        fp32.advance(max(fp32.cursor, tail_end), keep=later_targets + ([source] if qdrop else [])
                     + ([before] if before is not None else []))
        quant.advance(position, keep=[source])
        input_config = layer.op.config.input_quantization_config[0]
        quadratic = _quadratic(layer, settings, fp32.values[before] if before is not None else [])
        flats = _flat_values(graph, executor, order, batches, position, tail_end, source, layer.target) \
            if settings.flat_views and i == 0 and second is None and not quadratic else None
        with torch.no_grad():
            inputs = [executor.quantize_function(x, input_config)
                      for x in quant.values[source] + (flats[0] if flats else [])]
        if flats:
            fp_targets = fp32.values[layer.target] + flats[1]
            fp_sources = fp32.values[source] + flats[2] if qdrop else None
        else:
            fp_targets, fp_sources = fp32.values[layer.target], fp32.values.get(source) if qdrop else None
        if quadratic:
            targets, held = fp32.values[before], _held_batches(len(inputs))
            train_sums = _Moments.of(layer, inputs[:len(inputs) - held], targets[:len(targets) - held])
            held_sums = _Moments.of(layer, inputs[len(inputs) - held:], targets[len(targets) - held:]) if held \
                else train_sums
        else:
            cache = _sample_cache(layer, inputs, fp_targets, settings.positions, generator, settings.device,
                                  fp_sources, fp32.values[second.target] if second is not None else None,
                                  _flat_counts(settings, quant.values[source], flats[0]) if flats else None)
            train_sums = None
        carry_seconds += time.perf_counter() - layer_started
        budget = _budget(settings, costs, i, started, carry_seconds, 2 if second is not None else 1)
        if train_sums is not None:
            done = [_learn_quadratic_layer(layer, train_sums, held_sums, settings, budget, i, len(layers), started)]
        elif second is not None:
            config = second.op.config.input_quantization_config[0].dominated_by  # where PPQ quantizes it
            learn = _learn_pair_biases if settings.pair_biases else _learn_pair
            done = learn(layer, second, cache, settings, budget, generator,
                         lambda x, config=config: executor.quantize_function(x, config), i, len(layers), started)
        else:
            done = [_learn_layer(layer, cache, settings, budget, generator, i, len(layers), started)]
        del inputs
        for result in done:
            result.seconds = (time.perf_counter() - layer_started) / len(done)
        results.extend(done)
        skipped = 2 if second is not None else 1
        for finished in ({layer.target, before} | ({second.target} if second is not None else set())) - {None}:
            if finished not in later_targets[skipped:] and fp32.last_use(finished) < fp32.cursor:
                fp32.values.pop(finished, None)
    logger.info("learned rounding: %d layers in %.1f s (%.1f s carrying activations forward)", len(layers),
                time.perf_counter() - started, carry_seconds)
    return results


def _flat_values(graph: BaseGraph, executor: TorchExecutor, order: list[Operation],
                 batches: Sequence[dict[str, torch.Tensor]], position: int, tail_end: int, source: str,
                 target: str) -> tuple[list[torch.Tensor], list[torch.Tensor], list[torch.Tensor]] | None:
    """The flat images' (:func:`flat_batches`) values at a layer's input, quantized network, and at its input and
    target, FP32 network; None when the model's inputs are not one image."""
    flats = flat_batches(batches)
    if not flats:
        return None
    quant = _Carrier(graph, executor, order, flats, quantized=True)
    quant.advance(position, keep=[source])
    fp32 = _Carrier(graph, executor, order, flats, quantized=False)
    fp32.advance(tail_end, keep=[source, target])
    logger.info("learned rounding: %d flat images added to the first layer's calibration data", len(flats))
    return quant.values[source], fp32.values[target], fp32.values[source]


def _flat_counts(settings: RoundingSettings, photographs: Sequence[torch.Tensor],
                 flats: Sequence[torch.Tensor]) -> list[int]:
    """Positions per input batch when flat images follow the photographs: the photographs keep
    :attr:`RoundingSettings.positions`, the flat images share at most :attr:`RoundingSettings.flat_share` of all rows
    (at least one position each)."""
    each = settings.positions
    if settings.flat_share < 1.0:
        photo_rows = settings.positions * sum(int(x.shape[0]) for x in photographs)
        flat_rows = photo_rows * settings.flat_share / (1.0 - settings.flat_share)
        each = max(1, min(each, int(flat_rows // sum(int(x.shape[0]) for x in flats))))
    return [settings.positions] * len(photographs) + [each] * len(flats)


def _budget(settings: RoundingSettings, costs: list[float], i: int, started: float,
            carry_seconds: float, count: int = 1) -> float | None:
    """Seconds of optimisation layers ``i`` to ``i + count - 1`` may take: the budget left, less the carrying
    expected for the layers still to come, shared among the remaining layers by their cost; None without a
    budget."""
    if settings.time_budget is None:
        return None
    remaining = settings.time_budget - (time.perf_counter() - started)
    remaining -= carry_seconds / (i + 1) * (len(costs) - i - 1)
    return max(0.0, remaining) * sum(costs[i:i + count]) / sum(costs[i:])


def _progress(layer: _Layer, iterations: int, budget: float | None, i: int, count: int,
              started: float) -> Callable[[int, float], bool]:
    """The ``on_step`` of one layer: logs progress four times and stops when the layer's ``budget`` is spent."""
    state = {"t0": time.perf_counter(), "planned": iterations}
    name = layer.op.name

    def on_step(step: int, loss: float) -> bool:
        elapsed = time.perf_counter() - state["t0"]
        if budget is not None and step == _TIMED_STEPS - 1:  # after a few timed steps, fit the budget
            state["planned"] = min(iterations, max(_TIMED_STEPS, int(budget / (elapsed / _TIMED_STEPS))))
        if (step + 1) % max(1, iterations // 4) == 0:
            per_step = elapsed / (step + 1)
            logger.info("learned rounding: layer %d of %d (%s): iteration %d of %d, loss %.4g, layer ETA %.0f s, "
                        "elapsed %.0f s", i + 1, count, name, step + 1, state["planned"], loss,
                        per_step * (state["planned"] - step - 1), time.perf_counter() - started)
        return step + 1 < state["planned"]

    return on_step


def _learn_layer(layer: _Layer, cache: _Cache, settings: RoundingSettings, budget: float | None,
                 generator: torch.Generator, i: int, count: int, started: float) -> LayerRounding:
    """Learn one layer on sampled positions (within ``budget`` seconds when given) and write it into the graph."""
    on_step = _progress(layer, _iterations(layer, settings), budget, i, count, started)
    result = learn_rounding(layer, cache, settings, _iterations(layer, settings), generator, on_step)
    device = cache.patches.device
    scale, bias = layer.scale.to(device), layer.bias.to(device) if layer.bias is not None else None
    held = _held_rows(cache)
    error_nearest = _error(layer, cache, result.nearest * scale, bias, held)
    error_learned = _error(layer, cache, result.learned * result.scale, result.bias, held)
    return _finish(layer, result, error_nearest, error_learned, min(settings.sample, cache.train),
                   cache.targets.shape[0], i, count, started)


def _learn_pair(first: _Layer, second: _Layer, cache: _Cache, settings: RoundingSettings, budget: float | None,
                generator: torch.Generator, between: Callable[[torch.Tensor], torch.Tensor], i: int, count: int,
                started: float) -> list[LayerRounding]:
    """Learn a depthwise layer with the pointwise one after it and write both; their errors are the pair's output
    errors on the held-out positions (both fall back to nearest together)."""
    iterations = _iterations(first, settings)
    first_result, second_result = learn_pair_rounding(first, second, cache, settings, iterations, generator, between,
                                                      _progress(first, iterations, budget, i, count, started))
    results = (first_result, second_result)
    error_learned = _pair_error(first, second, cache, [r.learned * r.scale for r in results], [r.bias for r in results],
                                between, _held_rows(cache))
    return _finish_pair(first, second, cache, results, error_learned, between, settings, i, count, started)


def _held_rows(cache: _Cache) -> slice:
    """The cache's held-out rows that measure the errors before and after (the training rows when none is held out)."""
    return slice(cache.train, cache.targets.shape[0]) if cache.targets.shape[0] > cache.train else slice(0, cache.train)


def _finish_pair(first: _Layer, second: _Layer, cache: _Cache, results: Sequence[_Learned], error_learned: float,
                 between: Callable[[torch.Tensor], torch.Tensor], settings: RoundingSettings, i: int, count: int,
                 started: float) -> list[LayerRounding]:
    """Write and record both layers of a pair against the pair's held-out error with nearest rounding (its calibrated
    scales and biases); both fall back to nearest together."""
    device = cache.patches.device
    layers = (first, second)
    nearest = [layer.scale.to(device) * result.nearest for layer, result in zip(layers, results, strict=True)]
    original = [layer.bias.to(device) if layer.bias is not None else None for layer in layers]
    error_nearest = _pair_error(first, second, cache, nearest, original, between, _held_rows(cache))
    sample, positions = min(settings.sample, cache.train), cache.targets.shape[0]
    return [dataclasses.replace(_finish(layer, result, error_nearest, error_learned, sample, positions, i + k, count,
                                        started), target=second.target)
            for k, (layer, result) in enumerate(zip(layers, results, strict=True))]


def _learn_pair_biases(first: _Layer, second: _Layer, cache: _Cache, settings: RoundingSettings,
                       budget: float | None, generator: torch.Generator,
                       between: Callable[[torch.Tensor], torch.Tensor], i: int, count: int,
                       started: float) -> list[LayerRounding]:
    """Learn a depthwise layer and the pointwise one after it each alone on the pair's cached positions, then tune
    their biases together against the pair's output; write both (errors: the pair's, on held-out positions)."""
    steps = (_iterations(first, settings), _iterations(second, settings), settings.iterations)
    shares = [None if budget is None else budget * n / sum(steps) for n in steps]
    alone = _Cache(cache.patches, cache.targets, cache.train, cache.fp_patches)
    first_result = learn_rounding(first, alone, settings, steps[0], generator,
                                  _progress(first, steps[0], shares[0], i, count, started))
    with torch.no_grad():
        middle = between(_layer_output(first, cache.patches, first_result.learned * first_result.scale,
                                       first_result.bias))
    fp_middle = cache.targets.unsqueeze(0) if second.drops_input_quantization(settings) else None
    assert cache.outer is not None
    second_result = learn_rounding(second, _Cache(middle.unsqueeze(0), cache.outer, cache.train, fp_middle), settings,
                                   steps[1], generator, _progress(second, steps[1], shares[1], i + 1, count, started))
    results = (first_result, second_result)
    held = _held_rows(cache)
    weights = [result.learned * result.scale for result in results]
    error_alone = _pair_error(first, second, cache, weights, [r.bias for r in results], between, held)
    tuned = tune_pair_biases(first, second, cache, weights, [r.bias for r in results], settings, steps[2], generator,
                             between, _progress(second, steps[2], shares[2], i + 1, count, started))
    error_tuned = _pair_error(first, second, cache, weights, tuned, between, held)
    logger.info("learned rounding: pair %s / %s: held-out error %.4g each alone, %.4g with the biases tuned together",
                first.op.name, second.op.name, error_alone, error_tuned)
    if error_tuned < error_alone:
        results = tuple(dataclasses.replace(r, bias=b) for r, b in zip(results, tuned, strict=True))
    return _finish_pair(first, second, cache, results, min(error_tuned, error_alone), between, settings, i, count,
                        started)


def tune_pair_biases(first: _Layer, second: _Layer, cache: _Cache, weights: Sequence[torch.Tensor],
                     biases: Sequence[torch.Tensor | None], settings: RoundingSettings, iterations: int,
                     generator: torch.Generator, between: Callable[[torch.Tensor], torch.Tensor],
                     on_step: Callable[[int, float], bool] | None = None) -> list[torch.Tensor | None]:
    """Both biases of a depthwise + pointwise pair, tuned by Adam against the pair's FP32 output with the weights
    fixed, so the depthwise layer's bias serves the next layer's output rather than its own."""
    assert cache.outer is not None
    device = cache.patches.device
    spreads = (float(cache.targets[:cache.train].std()), float(cache.outer[:cache.train].std()))
    tuned = [b.detach().clone().requires_grad_(True) if b is not None else None for b in biases]
    groups = [{"params": [b], "lr": settings.bias_lr * spread} for b, spread in zip(tuned, spreads, strict=True)
              if b is not None]
    if not groups or iterations <= 0:
        return list(biases)
    optimizer = torch.optim.Adam(groups)
    sample = min(settings.sample, cache.train)
    for step in range(iterations):
        rows = torch.randint(cache.train, (sample,), generator=generator).to(device)
        out = _pair_output(first, second, cache.patches.index_select(1, rows), weights, tuned, between)
        loss = ((out - cache.outer.index_select(0, rows)) ** 2).sum(dim=1).mean()
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        if on_step is not None and not on_step(step, float(loss.detach())):
            break
    return [b.detach() if b is not None else None for b in tuned]


def _learn_quadratic_layer(layer: _Layer, train: _Moments, held: _Moments, settings: RoundingSettings,
                           budget: float | None, i: int, count: int, started: float) -> LayerRounding:
    """Learn one linear-target layer on its quadratic loss and write it into the graph; errors on held-out images."""
    on_step = _progress(layer, _iterations(layer, settings), budget, i, count, started)
    result = learn_rounding_quadratic(layer, train, settings, _iterations(layer, settings), on_step)
    error_nearest = held.error(result.nearest * layer.scale, layer.bias)
    error_learned = held.error(result.learned * result.scale, result.bias)
    if layer.bias is not None and settings.bias_lr > 0:  # nearest with the least-squares bias may be better
        corrected = train.bias_for(result.nearest * layer.scale)
        error_corrected = held.error(result.nearest * layer.scale, corrected)
        if error_corrected < error_learned:
            result = dataclasses.replace(result, learned=result.nearest, bias=corrected)
            error_learned = error_corrected
    return _finish(layer, result, error_nearest, error_learned, train.count, train.count + held.count, i, count,
                   started)


def _finish(layer: _Layer, result: _Learned, error_nearest: float, error_learned: float, sample: int, positions: int,
            i: int, count: int, started: float) -> LayerRounding:
    """Fall back to nearest where learning did worse on held-out data, write the layer, and record it."""
    name = layer.op.name
    scale, bias = layer.scale.to(result.scale.device), layer.bias
    if bias is not None:
        bias = bias.to(result.scale.device)
    if not error_learned <= error_nearest:  # never worse than nearest on the held-out positions
        logger.info("learned rounding: %s: held-out error %.4g against %.4g with nearest; keeping nearest", name,
                    error_learned, error_nearest)
        result = dataclasses.replace(result, learned=result.nearest, scale=scale, bias=bias)
        error_learned = error_nearest
    _write(layer, result)
    changed = float((result.learned != result.nearest).float().mean())
    logger.info("learned rounding: layer %d of %d (%s, W%d): held-out error %.4g -> %.4g (%.2fx), %.1f%% of the "
                "integers changed, %d steps, elapsed %.0f s", i + 1, count, name, layer.bits, error_nearest,
                error_learned, error_nearest / error_learned if error_learned > 0 else math.inf, 100 * changed,
                result.steps, time.perf_counter() - started)
    return LayerRounding(name=name, op_type=layer.op.type, target=layer.target, weight_bits=layer.bits,
                         iterations=result.steps, sample=sample,
                         positions=positions, error_nearest=error_nearest, error_learned=error_learned,
                         changed=changed, seconds=0.0, loss=result.loss,
                         integers=layer.to_weight(result.learned.cpu()).to(torch.int32))


def _write(layer: _Layer, result: _Learned) -> None:
    """Write the learned weights (exactly on their grid), their scale and the bias into PPQ's graph.

    The weight is marked baked (LSQ leaves it alone); the bias' passive scale follows the weight scale.
    """
    op = layer.op
    weight_var, weight_config = op.inputs[1], op.config.input_quantization_config[1]
    original = torch.as_tensor(weight_var.value)
    weight_var.value = layer.to_weight((result.learned * result.scale).cpu()).to(
        dtype=original.dtype, device=original.device).contiguous()
    old_scale = torch.as_tensor(weight_config.scale)
    new_scale = result.scale.reshape(-1) if layer.per_channel else result.scale.reshape(-1)[:1]
    weight_config.scale = new_scale.reshape(old_scale.shape).to(dtype=old_scale.dtype, device=old_scale.device)
    weight_config.state = QuantizationStates.BAKED  # final: LSQ leaves it alone
    if result.bias is not None and len(op.inputs) > 2 and op.inputs[2].value is not None:
        bias_var = op.inputs[2]
        old_bias = torch.as_tensor(bias_var.value)
        bias_var.value = result.bias.cpu().reshape(old_bias.shape).to(dtype=old_bias.dtype, device=old_bias.device)
        bias_config = op.config.input_quantization_config[2]
        if bias_config.state == QuantizationStates.PASSIVE:  # scale = input scale * weight scale
            input_config = op.config.input_quantization_config[0]
            bias_config.scale = weight_config.scale * input_config.scale
