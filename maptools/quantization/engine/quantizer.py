"""The low-bit PPQ quantizer: every quantized tensor at a chosen bit width.

Rebuilt from the idea of the ``ppq_lowbit`` extension: a subclass of PPQ's TensorRT quantizer whose bit
width, symmetry and weight granularity are parameters, with per-layer overrides. Weights are always
symmetric, per output channel when ``per_channel``; Conv/Gemm biases are kept at 32 bits with scale
``input_scale * weight_scale`` so the chip can add them to its int32 accumulator. With
``unsigned_nonnegative``, activations that cannot be negative use the unsigned range ``0 .. 2^b-1`` (zero
point 0, see :mod:`maptools.quantization.engine.unsigned`).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import torch

from maptools.quantization.engine.channelwise import ChannelScalePass
from maptools.quantization.engine.facade import (
    OBSERVER_MIN_SCALE,
    BaseGraph,
    LearnedStepSizePass,
    Operation,
    OperationQuantizationConfig,
    ParameterQuantizePass,
    PassiveParameterQuantizePass,
    QuantableOperation,
    QuantizationOptimizationPass,
    QuantizationOptimizationPipeline,
    QuantizationPolicy,
    QuantizationProperty,
    QuantizationSetting,
    QuantizationStates,
    QuantizeFusionPass,
    RoundingPolicy,
    RuntimeCalibrationPass,
    TargetPlatform,
    TensorRTQuantizer,
)
from maptools.quantization.engine.fusion import (
    FUSED_ACTIVATION_TYPES,
    GATES,
    LowBitFusionPass,
    gated_activations,
)
from maptools.quantization.engine.speedups import FastCalibrationPass
from maptools.quantization.engine.unsigned import unsigned_variables
from maptools.quantization.format import BIAS_TYPES, MAC_TYPES
from maptools.quantization.intmath import BIAS_BITS, ROUNDING, bias_range, int_range, unsigned_range

if TYPE_CHECKING:
    from maptools.quantization.config import QuantizeConfig

__all__ = ["WEIGHTED_TYPES", "LowBitQuantizer", "LowBitSpec"]

#: Operator types whose constant weight (input 1) is quantized per output channel: the MAC operators.
WEIGHTED_TYPES = MAC_TYPES
#: PPQ's rounding policy for :data:`~maptools.quantization.intmath.ROUNDING`.
_ROUNDING_POLICIES = {"half_even": RoundingPolicy.ROUND_HALF_EVEN}


@dataclass(frozen=True)
class LowBitSpec:
    """Bit widths and policies of a quantization run.

    Attributes:
        weight_bits: Default weight bit width.
        activation_bits: Default activation bit width.
        symmetrical: Symmetric (signed, zero point 0) or asymmetric (unsigned) activations.
        per_channel: Per-output-channel weight scales (else one scale per tensor).
        layer_bits: Node name -> ``(weight_bits, activation_bits)`` overrides.
        observer: Activation observer (PPQ name: ``percentile``, ``minmax``, ``kl``, ``mse``...).
        unsigned_nonnegative: With symmetric activations, quantize tensors that cannot be negative over
            ``0 .. 2^b-1`` instead of ``-2^(b-1) .. 2^(b-1)-1`` (not with the ``kl`` observer, which PPQ
            implements for signed ranges only).
        weight_observer: How each weight channel's scale is chosen
            (:data:`~maptools.quantization.config.WEIGHT_OBSERVERS`, see
            :func:`weight_scales`).
        power_of_two: Every scale (activations, weights, so biases too) a power of two, rounded up from the
            calibrated one (PPQ's ``POWER_OF_2`` policy): requantization is then a shift.
    """

    weight_bits: int = 8
    activation_bits: int = 8
    symmetrical: bool = True
    per_channel: bool = True
    layer_bits: dict[str, tuple[int, int]] = field(default_factory=dict)
    observer: str = "percentile"
    unsigned_nonnegative: bool = False
    weight_observer: str = "ppq"
    power_of_two: bool = False

    def bits_of(self, op_name: str) -> tuple[int, int]:
        """``(weight_bits, activation_bits)`` of an operator."""
        return self.layer_bits.get(op_name, (self.weight_bits, self.activation_bits))

    @classmethod
    def from_config(cls, config: QuantizeConfig) -> LowBitSpec:
        """The spec of a resolved configuration (no ``None`` left, see
        :meth:`~maptools.quantization.options.QuantizeOptions.applied`)."""
        bits = config.bits
        return cls(weight_bits=bits.weight_bits, activation_bits=bits.activation_bits, symmetrical=bits.symmetrical,
                   per_channel=bits.per_channel, layer_bits=bits.layer_bits, observer=config.calibration.observer,
                   unsigned_nonnegative=bits.unsigned_nonnegative, weight_observer=config.recipe.weight_observer,
                   power_of_two=bits.power_of_two)


#: The ``minmax`` weight observer applies from this many weight bits; below (2-bit weights, levels -2..1) a
#: weight keeps PPQ's scale, ``max|w| / 1.5``, which the trained models prefer (:ref:`guide-weight-scales`).
MINMAX_MIN_WEIGHT_BITS = 3
#: Candidate scales of the ``mse`` weight observer, as fractions of the ``minmax`` scale.
MSE_WEIGHT_GRID = tuple(0.5 + 0.01 * k for k in range(51))


def weight_scales(weight: torch.Tensor, channel_axis: int | None, quant_min: int, quant_max: int,
                  observer: str) -> torch.Tensor:
    """Per-channel (or per-tensor, ``channel_axis=None``) scales of a weight over ``[quant_min, quant_max]``.

    ``ppq`` is not computed here: PPQ's own scales are kept (see ``minmax`` for how they differ).

    ``minmax``: the smallest scale at which neither extreme is clipped, ``max(max_w / quant_max,
    min_w / quant_min)``. PPQ's own symmetric min-max divides ``max|w|`` by ``(quant_max - quant_min) / 2``
    (127.5 at 8 bits), which clips a channel's positive extreme by half a step and rounds its negative one a
    step further: the sum of a filter's weights (its response to a flat input) moves, and trained depthwise
    filters, differences of nearly equal large weights, break (:ref:`guide-weight-scales`).

    ``mse``: per channel, the scale among :data:`MSE_WEIGHT_GRID` times the ``minmax`` one with the least
    squared rounding error (ties go to the larger scale). Below 8 bits clipping the few largest weights pays
    for the finer step of all others.

    Returns:
        float64 scales, one per channel (a one-element tensor per tensor). All-zero channels get 0 (the
        caller handles them).
    """
    w = weight.detach().to(torch.float64)
    w = w.reshape(1, -1) if channel_axis is None else w.movedim(channel_axis, 0).reshape(w.shape[channel_axis], -1)
    positive, negative = w.clamp(min=0).amax(dim=1), (-w).clamp(min=0).amax(dim=1)
    base = torch.maximum(positive / quant_max, negative / -quant_min)
    if observer == "minmax":
        return base
    best, best_error = base.clone(), torch.full_like(base, float("inf"))
    live = base > 0
    for fraction in sorted(MSE_WEIGHT_GRID, reverse=True):
        scale = torch.where(live, base * fraction, torch.ones_like(base))
        rounded = torch.clamp(torch.round(w / scale[:, None]), quant_min, quant_max) * scale[:, None]
        error = ((w - rounded) ** 2).sum(dim=1)
        better = live & (error < best_error)
        best[better], best_error[better] = scale[better], error[better]
    return best


def weight_channel_axis(operation: Operation) -> int:
    """The output-channel axis of an operator's constant weight (input 1)."""
    if operation.type == "ConvTranspose":
        return 1
    if operation.type == "Gemm":
        return 0 if int(operation.attributes.get("transB", 0)) else 1
    if operation.type == "MatMul":
        return max(operation.inputs[1].value.ndim - 1, 0)
    return 0


class IntegerZeroPointLSQPass(LearnedStepSizePass):
    """PPQ's LSQ pass training weights, biases and scales but not zero points, nor baked parameters.

    PPQ's LSQ can learn the offsets of asymmetric configs as floats; a chip needs integer zero points, and an
    unsigned range must keep zero point 0, so they stay as calibrated: no offset requires a gradient, and PPQ's
    ``finetune`` gives its optimizer only the tensors that do. A parameter already baked (the integers of learned
    rounding, :mod:`~maptools.quantization.engine.learned_rounding`) is final: PPQ would train it as a float off
    its grid, so it is not trained (its scale, baked too, is not delegated to LSQ either).
    """

    def enable_block_gradient(self, block) -> None:  # noqa: D102 - PPQ's signature
        super().enable_block_gradient(block)
        for op in block.rps:
            if not isinstance(op, QuantableOperation):
                continue
            for config, var in op.config_with_variable:
                if isinstance(config.offset, torch.Tensor) and config.offset.is_leaf:
                    config.offset.requires_grad = False
                baked = config.state == QuantizationStates.BAKED
                if baked and var.is_parameter and isinstance(var.value, torch.Tensor):
                    var.value.requires_grad = False


class WeightScaleParameterQuantizePass(ParameterQuantizePass):
    """PPQ's parameter calibration, with maptools' weight scales (:func:`weight_scales`) and usable scales for
    dead channels.

    After PPQ's pass, every revisable weight config of a Conv/Gemm/MatMul gets the scales of
    :attr:`observer`. A channel whose weights are all zero (a pruned or dead filter, common after BatchNorm
    folding) would get PPQ's scale floor ``1e-8``, and its bias, quantized at ``input_scale * weight_scale``,
    integers beyond int32. Zero weights are exact at any scale, so such a channel takes the (lower) median
    scale of the live channels of its tensor (1.0 if none is live), and its bias the same precision as theirs.
    So does a channel whose weights are so small that its scale sits at that floor (they round to 0 at the
    median scale, an error below ``1e-8 * qmax`` per weight).
    """

    def __init__(self, method: str | None = None, observer: str = "ppq") -> None:
        super().__init__(method)
        #: The weight observer (one of :data:`~maptools.quantization.config.WEIGHT_OBSERVERS`).
        self.observer = observer

    def optimize(self, graph: BaseGraph, *args, **kwargs) -> None:  # noqa: D102 - PPQ's signature
        super().optimize(graph, *args, **kwargs)
        for op in graph.operations.values():
            if op.type not in WEIGHTED_TYPES or not hasattr(op, "config") or op.num_of_input < 2:
                continue
            var, config = op.inputs[1], op.config.input_quantization_config[1]
            if not var.is_parameter or var.value is None or config.scale is None or not config.is_revisable():
                continue
            flat = config.scale.detach().clone().reshape(-1)
            observer = self.observer
            if observer == "minmax" and int(config.num_of_bits) < MINMAX_MIN_WEIGHT_BITS:
                observer = "ppq"
            if observer != "ppq":
                per_channel = config.scale.numel() > 1 and config.channel_axis is not None
                computed = weight_scales(torch.as_tensor(var.value), config.channel_axis if per_channel else None,
                                         int(config.quant_min), int(config.quant_max), observer)
                if computed.numel() != flat.numel():
                    continue
                flat = computed.to(dtype=flat.dtype, device=flat.device)
            dead = flat <= OBSERVER_MIN_SCALE
            if bool(dead.any()):
                live = flat[~dead]
                flat[dead] = live.median() if live.numel() else torch.ones((), dtype=flat.dtype, device=flat.device)
            if config.policy.has_property(QuantizationProperty.POWER_OF_2):  # up: the extremes still fit
                flat = torch.exp2(torch.ceil(torch.log2(flat)))
            config.scale = flat.reshape(config.scale.shape)


class RangeMatchedPassiveParameterPass(PassiveParameterQuantizePass):
    """PPQ's passive-parameter pass, with a Clip's bounds and a Pad's value on their input's integer range.

    PPQ quantizes those constants with the scale of the operator's input config, but with their own bit
    width and range. Once the input config is dominated by a config of another bit width (a ReLU6 whose
    output feeds a residual ``Add`` kept at 8 bits by ``layer_bits``, while the ReLU6 is at 4 bits), the
    bound ``6`` was rounded at the 8-bit scale but clipped at the 4-bit maximum: ReLU6 became a clip at
    ``7 * scale``. The constants now take the bit width, policy and range of the config whose scale they use.
    """

    def optimize(self, graph: BaseGraph, **kwargs) -> None:  # noqa: D102 - PPQ's signature
        super().optimize(graph, **kwargs)
        for op in graph.operations.values():
            if op.type not in ("Clip", "Pad") or not hasattr(op, "config"):
                continue
            configs = op.config.input_quantization_config
            for config in configs[1:] if op.type == "Clip" else configs[2:3]:
                master = config.master_by
                if master is config or config.state != QuantizationStates.PASSIVE:
                    continue
                config.policy = master.policy
                config.num_of_bits = master.num_of_bits
                config.quant_min, config.quant_max = master.quant_min, master.quant_max


class LowBitQuantizer(TensorRTQuantizer):
    """PPQ quantizer that quantizes every tensor to the bit widths of a :class:`LowBitSpec`."""

    #: The runtime calibration pass it builds (PPQ's :class:`RuntimeCalibrationPass` gives the same results).
    calibration_pass: type[RuntimeCalibrationPass] = FastCalibrationPass

    def __init__(self, graph: BaseGraph, spec: LowBitSpec, channel_scales: bool = False) -> None:
        super().__init__(graph=graph)
        self._spec = spec
        #: The per-channel scale pass of depthwise-only tensors (:mod:`.channelwise`), None when not asked for.
        self.channel_pass = ChannelScalePass(power_of_two=spec.power_of_two) if channel_scales else None
        self._num_of_bits = spec.activation_bits
        self._quant_min, self._quant_max = int_range(spec.activation_bits, spec.symmetrical)
        self._unsigned: set[str] | None = None
        self._gate_sources: dict[str, str] | None = None  # gate and Mul of x * gate(x) -> the MAC giving x

    @property
    def spec(self) -> LowBitSpec:
        """The bit widths and policies in use."""
        return self._spec

    @property
    def quantize_policy(self) -> QuantizationPolicy:
        """The activation policy (per-tensor, linear, symmetric or asymmetric)."""
        symmetry = QuantizationProperty.SYMMETRICAL if self._spec.symmetrical else QuantizationProperty.ASYMMETRICAL
        return self._policy(symmetry + QuantizationProperty.LINEAR + QuantizationProperty.PER_TENSOR)

    def _policy(self, properties: int) -> QuantizationPolicy:
        """A policy of ``properties``, plus ``POWER_OF_2`` when the spec asks for power-of-two scales."""
        if self._spec.power_of_two:
            properties = properties + QuantizationProperty.POWER_OF_2
        return QuantizationPolicy(properties)

    @property
    def unsigned(self) -> set[str]:
        """Names of the activation tensors quantized over the unsigned range."""
        if self._unsigned is None:
            wanted = self._spec.symmetrical and self._spec.unsigned_nonnegative and self._spec.observer != "kl"
            self._unsigned = unsigned_variables(self._graph, self.activation_fusion_types) if wanted else set()
        return self._unsigned

    @property
    def rounding_policy(self) -> RoundingPolicy:
        """Round half to even (:data:`~maptools.quantization.intmath.ROUNDING`), as PPQ's TensorRT quantizer."""
        return _ROUNDING_POLICIES[ROUNDING]

    @property
    def activation_fusion_types(self) -> set[str]:
        """Activations applied to the accumulator of the MAC before them: PPQ's TensorRT set plus HardSwish."""
        return set(FUSED_ACTIVATION_TYPES)

    def build_quant_pipeline(self, setting: QuantizationSetting) -> QuantizationOptimizationPipeline:
        """PPQ's pipeline for ``setting``, with five of its passes built as maptools' subclasses instead, and
        :attr:`channel_pass` before the first passive-parameter pass.

        Each is constructed with the arguments PPQ's builder takes from ``setting``: maptools' weight scales
        (:class:`WeightScaleParameterQuantizePass`), HardSwish fusion
        (:class:`~maptools.quantization.engine.fusion.LowBitFusionPass`), the faster calibration
        (:class:`~maptools.quantization.engine.speedups.FastCalibrationPass`), Clip bounds on their input's
        range (:class:`RangeMatchedPassiveParameterPass`) and LSQ keeping zero points integer
        (:class:`IntegerZeroPointLSQPass`).
        """
        passes = [self._own_pass(optim_pass, setting) for optim_pass in super().build_quant_pipeline(setting)]
        if self.channel_pass is not None:  # after calibration and alignment, before the biases take their scales
            first = next((i for i, p in enumerate(passes) if isinstance(p, RangeMatchedPassiveParameterPass)), None)
            if first is not None:
                passes.insert(first, self.channel_pass)
        return QuantizationOptimizationPipeline(passes)

    def _own_pass(self, optim_pass: QuantizationOptimizationPass,
                  setting: QuantizationSetting) -> QuantizationOptimizationPass:
        """maptools' pass in place of one PPQ's builder made (``optim_pass`` itself when maptools has none)."""
        kind = type(optim_pass)
        if kind is ParameterQuantizePass:
            return WeightScaleParameterQuantizePass(setting.quantize_parameter_setting.calib_algorithm,
                                                    observer=self._spec.weight_observer)
        if kind is QuantizeFusionPass:
            fusion = setting.fusion_setting
            return LowBitFusionPass(activation_type=self.activation_fusion_types,
                                    fuse_activation=fusion.fuse_activation, fuse_passive_op=fusion.fuse_passive_op)
        if kind is RuntimeCalibrationPass:
            return self.calibration_pass(method=setting.quantize_activation_setting.calib_algorithm)
        if kind is PassiveParameterQuantizePass:
            return RangeMatchedPassiveParameterPass()
        if kind is LearnedStepSizePass:
            lsq = setting.lsq_optimization_setting
            return IntegerZeroPointLSQPass(interested_layers=lsq.interested_layers, lr=lsq.lr,
                                           collecting_device=lsq.collecting_device, steps=lsq.steps, gamma=lsq.gamma,
                                           is_scale_trainable=lsq.is_scale_trainable, block_size=lsq.block_size)
        return optim_pass

    def _make_unsigned(self, operation: Operation, config: OperationQuantizationConfig) -> None:
        """Give the non-negative activation tensors of ``operation`` the unsigned range, zero point 0."""
        pairs = [*zip(config.input_quantization_config, operation.inputs, strict=False),
                 *zip(config.output_quantization_config, operation.outputs, strict=False)]
        # a Clip's bounds take the range of the config whose scale they use later, in
        # RangeMatchedPassiveParameterPass
        for tqc, var in pairs:
            if var.name not in self.unsigned:
                continue
            tqc.policy = self._policy(
                QuantizationProperty.ASYMMETRICAL + QuantizationProperty.LINEAR + QuantizationProperty.PER_TENSOR
            )
            tqc.quant_min, tqc.quant_max = unsigned_range(tqc.num_of_bits)

    def _bits_of(self, operation: Operation) -> tuple[int, int]:
        """Bits of an operator; an activation fused into an overridden Conv/Gemm inherits its override.

        That holds for the gate and the ``Mul`` of a fused ``x * gate(x)`` too.
        """
        if operation.name in self._spec.layer_bits:
            return self._spec.bits_of(operation.name)
        if self._gate_sources is None:
            self._gate_sources = {op.name: computing.name
                                  for gate_type in GATES.values()
                                  for computing, gate, mul in gated_activations(self._graph, gate_type)
                                  for op in (gate, mul)}
        source_name = self._gate_sources.get(operation.name)
        if source_name is not None and source_name in self._spec.layer_bits:
            return self._spec.bits_of(source_name)
        if operation.type not in self.activation_fusion_types:
            return self._spec.bits_of(operation.name)
        source = operation.inputs[0].source_op if operation.inputs else None
        if source is not None and source.name in self._spec.layer_bits and len(operation.inputs[0].dest_ops) == 1:
            return self._spec.bits_of(source.name)
        return self._spec.bits_of(operation.name)

    def init_quantize_config(self, operation: Operation) -> OperationQuantizationConfig:
        """Build the quantization config of one operator at its bit widths."""
        weight_bits, act_bits = self._bits_of(operation)
        qmin, qmax = int_range(act_bits, self._spec.symmetrical)
        config = self.create_default_quant_config(
            policy=self.quantize_policy,
            rounding=self.rounding_policy,
            op=operation,
            num_of_bits=act_bits,
            exponent_bits=0,
            quant_max=qmax,
            quant_min=qmin,
            observer_algorithm=self._spec.observer,
        )
        if operation.type in WEIGHTED_TYPES and operation.num_of_input > 1 and operation.inputs[1].is_parameter:
            weight = config.input_quantization_config[1]
            granularity = (
                QuantizationProperty.PER_CHANNEL if self._spec.per_channel else QuantizationProperty.PER_TENSOR
            )
            weight.policy = self._policy(QuantizationProperty.SYMMETRICAL + QuantizationProperty.LINEAR + granularity)
            weight.num_of_bits = weight_bits
            weight.quant_min, weight.quant_max = int_range(weight_bits, True)
            weight.observer_algorithm = "minmax"
            if self._spec.per_channel:
                weight.channel_axis = weight_channel_axis(operation)
            if operation.type in BIAS_TYPES and operation.num_of_input > 2 and operation.inputs[2].is_parameter:
                bias = config.input_quantization_config[2]
                bias.policy = self._policy(QuantizationProperty.SYMMETRICAL + QuantizationProperty.LINEAR + granularity)
                bias.num_of_bits = BIAS_BITS
                bias.quant_min, bias.quant_max = bias_range(BIAS_BITS)
                bias.state = QuantizationStates.PASSIVE_INIT
                if self._spec.per_channel:
                    bias.channel_axis = 0
                bias.observer_algorithm = "minmax"
        elif operation.type in {"LayerNormalization"}:
            for tqc in config.input_quantization_config[1:]:
                tqc.state = QuantizationStates.FP32
        self._make_unsigned(operation, config)
        return config

    @property
    def target_platform(self) -> TargetPlatform:
        """PPQ platform the quantized operators are dispatched to."""
        return TargetPlatform.TRT_INT8
