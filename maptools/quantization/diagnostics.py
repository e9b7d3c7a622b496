"""Warnings when a quantized model's outputs are wrecked: too noisy, or collapsed to a constant.

A map can be unusable while its numbers look fine at a glance: a detector whose class scores all round to 0
still has a 30 dB output SNR (its box coordinates dominate the energy), and a classifier calibrated on random
data can read 22 dB on random data and 3 dB on images. After the error analysis (on held-out data where
there is any), :func:`output_warnings` checks every graph output and every part of an output built by a
final ``Concat``:

* SNR below :data:`SNR_WARNING_DB` against FP32;
* a quantized output (or part) that takes a single value over all analysed batches while the FP32 one varies
  (collapsed to a constant).

Each warning names the operators whose quantization alone hurts the outputs most (the layer-wise analysis)
and suggests what to try. The warnings go to the log, to ``report.json`` and to the command line summary.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence

__all__ = ["SNR_WARNING_DB", "WORST_OPERATORS", "output_warnings", "worst_operators"]

#: An output (or output part) below this SNR in dB against FP32 gets a warning: at 10 dB the noise amplitude
#: is about a third of the signal's, where top-1 agreement of a classifier typically falls below 80-90 %.
SNR_WARNING_DB = 10.0
#: How many operators a warning names.
WORST_OPERATORS = 3


def worst_operators(isolated_snr_db: Mapping[str, float], count: int = WORST_OPERATORS) -> list[tuple[str, float]]:
    """The ``count`` operators with the lowest layer-wise SNR (each quantized alone), worst first."""
    ranked = sorted(isolated_snr_db.items(), key=lambda item: item[1])
    return ranked[:count]


def _problems(name: str, snr: float, fp32_span: float | None, quant_span: float | None) -> list[str]:
    problems = []
    if fp32_span is not None and quant_span is not None and fp32_span > 0.0 and quant_span == 0.0:
        problems.append(f"{name} collapsed to a constant (FP32 spans {fp32_span:.4g})")
    elif math.isfinite(snr) and snr < SNR_WARNING_DB:
        problems.append(f"{name}: SNR {snr:.1f} dB against FP32 (below {SNR_WARNING_DB:.0f} dB)")
    return problems


def output_warnings(output_snr_db: Mapping[str, float], part_snr_db: Mapping[str, Mapping[str, float]],
                    fp32_span: Mapping[str, float], quant_span: Mapping[str, float],
                    isolated_snr_db: Mapping[str, float], data: str,
                    layer_bits_example: Sequence[str] = ()) -> list[str]:
    """One warning per wrecked graph output or output part.

    Args:
        output_snr_db: Graph output -> SNR.
        part_snr_db: Graph output built by a final Concat -> part tensor -> SNR.
        fp32_span: Output or part -> ``max - min`` of the FP32 values analysed.
        quant_span: The same for the quantized values.
        isolated_snr_db: Operator -> SNR of the outputs when only it is quantized (may be empty).
        data: What the figures were measured on (``'held-out'``, ``'in-sample'``...), for the message.
        layer_bits_example: Operator names to suggest for ``layer_bits`` (default: the worst ones).

    Returns:
        The warnings, plain sentences.
    """
    problems: list[str] = []
    for output, snr in output_snr_db.items():
        problems += _problems(f"output {output!r}", snr, fp32_span.get(output), quant_span.get(output))
        for part, part_snr in part_snr_db.get(output, {}).items():
            problems += _problems(f"output {output!r} part {part!r}", part_snr, fp32_span.get(part),
                                  quant_span.get(part))
    if not problems:
        return []
    worst = worst_operators(isolated_snr_db)
    culprits = ", ".join(f"{name} ({snr:.1f} dB)" for name, snr in worst)
    names = list(layer_bits_example) or [name for name, _ in worst]
    example = ", ".join(f"'{name}': 8" for name in names) if names else "'<node>': 8"
    advice = (f"; the operators hurting the outputs most when quantized alone: {culprits}" if culprits else "")
    advice += (f". Try more activation bits (activation_bits=8), layer_bits={{{example}}}, recipe='best', or "
               "calibration data like the inputs the model will see")
    return [f"{problem} on {data} data{advice}" for problem in problems]
