"""Warnings when a quantized model's outputs are wrecked: too noisy, or collapsed to a constant.

A map can be unusable while its numbers look fine at a glance (examples in :ref:`guide-map-quality`). After the
error analysis (on held-out data where there is any), :func:`output_warnings` checks every graph output and
every part of an output built by a final ``Concat``:

* SNR below :data:`SNR_WARNING_DB` against FP32, or below :data:`SEQUENCE_WARNING_DB` for a sequence of class
  probabilities (:func:`sequence_outputs`: what a CTC text recognizer decodes into strings);
* a quantized output (or part) that takes a single value over all analysed batches while the FP32 one varies
  (collapsed to a constant).

Each warning names the operators whose quantization alone hurts the outputs most (the layer-wise analysis)
and suggests what applies to the map (:class:`Advice`): more bits only where they are not already there,
the first and last MAC at 8 bits when one of them hurts most, the ``best`` recipe when another ran,
real calibration data after random calibration, and always a check of the task metric on real inputs,
in the syntax of the interface that ran (keyword arguments from Python, options on the command line:
:func:`advice_syntax`).

A map can also look better on its calibration data than it is: learned rounding and LSQ fit the calibration
inputs, and with inputs of few scenes part of what they fit holds for those scenes only. Where the error was
measured on data other than the calibration data, :func:`fit_warnings` compares it with the same measure on the
calibration batches and warns when the held-out SNR is more than :data:`FIT_GAP_DB` lower and below
:data:`FIT_WARNING_DB`, both measured on enough samples.

The warnings go to the log, to ``report.json`` and to the command line summary.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Collection, Iterator, Mapping, Sequence
from contextvars import ContextVar
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from maptools.quantization.records import ANALYSIS_SAMPLES

if TYPE_CHECKING:
    import onnx

__all__ = ["CNN_TRANSFORMER_ADVICE", "FIT_GAP_DB", "FIT_WARNING_DB", "SEQUENCE_WARNING_DB", "SNR_WARNING_DB",
           "WORST_OPERATORS", "Advice", "advice_syntax", "cnn_transformer_convolutions", "fit_warnings",
           "output_warnings", "sequence_outputs", "worst_operators"]

#: An output (or output part) below this SNR in dB against FP32 gets a warning (why: :ref:`guide-map-quality`).
SNR_WARNING_DB = 10.0
#: A sequence of class probabilities below this SNR gets a warning: it changes decoded strings (why:
#: :ref:`guide-map-quality`, figures in ``docs/benchmarks_recognizer.json``).
SEQUENCE_WARNING_DB = 14.0
#: Why the advice for a CNN + transformer network below 8-bit weights keeps its Convs at 8 bits (the figures
#: of :ref:`guide-map-quality`, shown with the advice).
CNN_TRANSFORMER_ADVICE = ("the transformer's MatMuls hold 4-bit weights, the Convs do not: PP-OCRv4's recognizer "
                          "at W4A8 read 32/32 lines as FP32 this way, 0/32 without, 1/32 with its 8 worst operators "
                          "at 8 bits")
#: An output this many dB worse on held-out data than on the calibration data, and below :data:`FIT_WARNING_DB` on
#: the held-out data, gets a warning: the quantization fitted its calibration inputs (why:
#: :ref:`guide-calibration-fit`). Measured on at least :data:`~maptools.quantization.records.ANALYSIS_SAMPLES`
#: samples each: on 4 the gap of a map that holds was 7.0 dB.
FIT_GAP_DB = 8.0
#: Above this held-out SNR a gap to the calibration data's is not warned about: the map holds on the held-out data
#: (a text-orientation classifier read 21.5 dB on other pages, 45.5 dB on its calibration pages, and kept 97 % of its
#: predictions).
FIT_WARNING_DB = 20.0
#: How many operators a warning names.
WORST_OPERATORS = 3


#: The interface whose syntax the advice uses: ``"python"`` or ``"cli"``.
_SYNTAX: ContextVar[str] = ContextVar("maptools_advice_syntax", default="python")
#: Bits beyond which no more are suggested.
_MAX_BITS = 8


@contextlib.contextmanager
def advice_syntax(interface: str) -> Iterator[None]:
    """Within the block, warnings suggest settings as ``interface`` (``"python"`` or ``"cli"``) spells them."""
    token = _SYNTAX.set(interface)
    try:
        yield
    finally:
        _SYNTAX.reset(token)


@dataclass(frozen=True)
class Advice:
    """What a map was quantized with, so that a warning suggests only what would change it.

    Attributes:
        weight_bits: The map's weight bits.
        activation_bits: The map's activation bits.
        layer_bits: Node -> ``(weight_bits, activation_bits)`` where it differs (``first_last_bits`` included).
        first_and_last: The first and last MAC operators.
        recipe: The recipe that ran (None when a PPQ setting was given).
        random_calibration: Whether the map was calibrated on random data.
        convolutions: The Conv operators of a CNN + transformer network (a MatMul reading a Softmax), else
            empty: below 8-bit weights such a network keeps its outputs with every Conv and the last MAC at 8
            bits while the transformer's MatMuls hold the lower bits (:data:`CNN_TRANSFORMER_ADVICE`).
    """

    weight_bits: int = 8
    activation_bits: int = 8
    layer_bits: Mapping[str, tuple[int, int]] = field(default_factory=dict)
    first_and_last: Sequence[str] = ()
    recipe: str | None = "default"
    random_calibration: bool = False
    convolutions: Sequence[str] = ()

    def bits_of(self, node: str) -> tuple[int, int]:
        """``(weight_bits, activation_bits)`` of a node."""
        return tuple(self.layer_bits.get(node, (self.weight_bits, self.activation_bits)))  # type: ignore[return-value]

    def suggestions(self, worst: Sequence[str], cli: bool) -> list[str]:
        """What to try, in the syntax of the command line (``cli``) or of Python."""
        tries = []
        below = [name for name in worst if min(self.bits_of(name)) < _MAX_BITS]
        convs = [name for name in self.convolutions if min(self.bits_of(name)) < _MAX_BITS]
        if convs:  # the worst few at 8 bits do not hold such a network: every Conv and the last MAC do
            example = "{" + ", ".join(f"'{name}': {_MAX_BITS}" for name in convs) + "}"
            last = [name for name in self.first_and_last[-1:] if min(self.bits_of(name)) < _MAX_BITS]
            both = (f"--first-last-bits {_MAX_BITS} and " if cli else f"first_last_bits={_MAX_BITS}, ") if last else ""
            flags = ",".join(f"{name}={_MAX_BITS}" for name in convs)
            tries.append(f"{both}every Conv at {_MAX_BITS} bits ({CNN_TRANSFORMER_ADVICE}): "
                         + (f"--layer-bits {flags}" if cli else f"layer_bits={example}"))
            below = []
        if worst and worst[0] in self.first_and_last and worst[0] in below:
            tries.append(f"--first-last-bits {_MAX_BITS}" if cli else f"first_last_bits={_MAX_BITS}")
            below = [name for name in below if name not in self.first_and_last]
        if below:
            example = ", ".join(f"'{name}': {_MAX_BITS}" for name in below)
            flags = ",".join(f"{name}={_MAX_BITS}" for name in below)
            tries.append(f"--layer-bits {flags}" if cli else f"layer_bits={{{example}}}")
        if self.activation_bits < _MAX_BITS:
            tries.append(f"--activation-bits {_MAX_BITS}" if cli else f"activation_bits={_MAX_BITS}")
        if self.recipe is not None and self.recipe != "best":
            tries.append("--recipe best" if cli else "recipe='best'")
        if self.random_calibration:
            tries.append("calibration data like the inputs the model will see ("
                         + ("--calib-dir or --calib-npy" if cli else "calibset=") + ")")
        return tries


def worst_operators(isolated_snr_db: Mapping[str, float], count: int = WORST_OPERATORS) -> list[tuple[str, float]]:
    """The ``count`` operators with the lowest layer-wise SNR (each quantized alone), worst first."""
    ranked = sorted(isolated_snr_db.items(), key=lambda item: item[1])
    return ranked[:count]


def sequence_outputs(proto: onnx.ModelProto) -> list[str]:
    """Graph outputs that are sequences of class probabilities: made by a Softmax over the last axis of a tensor of
    rank 3 or more (``[N, T, classes]``, what a CTC text recognizer decodes)."""
    producers = {out: node for node in proto.graph.node for out in node.output}
    found = []
    for vi in proto.graph.output:
        node = producers.get(vi.name)
        if node is None or node.op_type != "Softmax" or not vi.type.tensor_type.HasField("shape"):
            continue
        rank = len(vi.type.tensor_type.shape.dim)
        axis = next((a.i for a in node.attribute if a.name == "axis"), -1)
        if rank >= 3 and axis in (-1, rank - 1):
            found.append(vi.name)
    return found


def cnn_transformer_convolutions(proto: onnx.ModelProto, grouped: bool = True) -> list[str]:
    """The Conv operators of a network that also has attention (a MatMul reading a Softmax's output); [] otherwise.

    Without ``grouped`` the grouped (depthwise) Convs are left out: the smaller set measured in
    ``docs/benchmarks_recognizer.json``, which the advice does not take because it loses lines.
    """
    softmax_outputs = {out for node in proto.graph.node if node.op_type == "Softmax" for out in node.output}
    if not any(node.op_type == "MatMul" and softmax_outputs & set(node.input) for node in proto.graph.node):
        return []
    return [node.name for node in proto.graph.node if node.op_type == "Conv"
            and (grouped or all(a.name != "group" or a.i <= 1 for a in node.attribute))]


def _problems(name: str, snr: float, fp32_span: float | None, quant_span: float | None,
              sequence: bool = False) -> list[str]:
    problems = []
    if fp32_span is not None and quant_span is not None and fp32_span > 0.0 and quant_span == 0.0:
        problems.append(f"{name} collapsed to a constant (FP32 spans {fp32_span:.4g})")
    elif math.isfinite(snr) and snr < SNR_WARNING_DB:
        problems.append(f"{name}: SNR {snr:.1f} dB against FP32 (below {SNR_WARNING_DB:.0f} dB)")
    elif sequence and math.isfinite(snr) and snr < SEQUENCE_WARNING_DB:
        problems.append(f"{name}: SNR {snr:.1f} dB against FP32, below the {SEQUENCE_WARNING_DB:.0f} dB under which a "
                        "sequence of class probabilities (a text recognizer's) decodes to other strings")
    return problems


def output_warnings(output_snr_db: Mapping[str, float], part_snr_db: Mapping[str, Mapping[str, float]],
                    fp32_span: Mapping[str, float], quant_span: Mapping[str, float],
                    isolated_snr_db: Mapping[str, float], data: str,
                    advice: Advice | None = None, sequences: Collection[str] = ()) -> list[str]:
    """One warning per wrecked graph output or output part.

    Args:
        output_snr_db: Graph output -> SNR.
        part_snr_db: Graph output built by a final Concat -> part tensor -> SNR.
        fp32_span: Output or part -> ``max - min`` of the FP32 values analysed.
        quant_span: The same for the quantized values.
        isolated_snr_db: Operator -> SNR of the outputs when only it is quantized (may be empty).
        data: What the figures were measured on (``'held-out'``, ``'in-sample'``...), for the message.
        advice: What the map was quantized with (default: W8A8, the ``default`` recipe, user data); the
            syntax is the interface's of :func:`advice_syntax`.
        sequences: The outputs held to :data:`SEQUENCE_WARNING_DB` (see :func:`sequence_outputs`).

    Returns:
        The warnings, plain sentences.
    """
    problems: list[str] = []
    for output, snr in output_snr_db.items():
        problems += _problems(f"output {output!r}", snr, fp32_span.get(output), quant_span.get(output),
                              output in sequences)
        for part, part_snr in part_snr_db.get(output, {}).items():
            problems += _problems(f"output {output!r} part {part!r}", part_snr, fp32_span.get(part),
                                  quant_span.get(part))
    if not problems:
        return []
    worst = worst_operators(isolated_snr_db)
    culprits = ", ".join(f"{name} ({snr:.1f} dB)" for name, snr in worst)
    message = (f"; the operators hurting the outputs most when quantized alone: {culprits}" if culprits else "")
    tries = (advice or Advice()).suggestions([name for name, _ in worst], _SYNTAX.get() == "cli")
    if tries:
        message += ". Try " + ", ".join(tries)
    message += ". Check the task metric (accuracy, detections, decoded text) on real held-out inputs: the SNR is " \
               "only a proxy"
    return [f"{problem} on {data} data{message}" for problem in problems]


def fit_warnings(calibration_snr_db: Mapping[str, float], held_out_snr_db: Mapping[str, float],
                 data: str, samples: int) -> list[str]:
    """One warning per graph output whose SNR on the ``data`` data (held-out, evalset) is below
    :data:`FIT_WARNING_DB` and more than :data:`FIT_GAP_DB` below its SNR on the calibration batches, when each
    figure is of at least :data:`~maptools.quantization.records.ANALYSIS_SAMPLES` samples (``samples``: the fewer
    of the two)."""
    if samples < ANALYSIS_SAMPLES:  # the SNR of a few samples is several dB from that of many
        return []
    warnings = []
    for output, held in held_out_snr_db.items():
        fitted = calibration_snr_db.get(output, math.nan)
        if math.isfinite(held) and math.isfinite(fitted) and held < FIT_WARNING_DB and fitted - held > FIT_GAP_DB:
            warnings.append(
                f"output {output!r}: SNR {held:.1f} dB on {data} data but {fitted:.1f} dB on the calibration data: "
                "the quantization fitted its calibration inputs (the activation ranges, and learned rounding and LSQ "
                f"where they ran, are fitted to them), and the figure on {data} data is the one to trust. Calibrate "
                "on more and more varied inputs, like those the chip will see")
    return warnings
