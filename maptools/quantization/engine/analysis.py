"""The error of a quantized PPQ session against FP32: graph-wise (every operator's output) and layer-wise.

The measures are those of :mod:`maptools.quantization.intmath` (:func:`~.intmath.snr_db`,
:func:`~.intmath.cosine`), accumulated over the analysed batches.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol

import numpy as np

from maptools.quantization.intmath import cosine, error_sums, snr_db
from maptools.quantization.progress import counted

#: One batch: input name -> tensor (:data:`maptools.quantization.engine.session.Batch`).
Batch = Mapping[str, Any]


class AnalysedSession(Protocol):
    """What the analysis calls on a :class:`~maptools.quantization.engine.session.PPQSession` (which imports us)."""

    output_names: list[str]
    final_concats: Sequence[Any]

    def quantized_operations(self) -> Iterable[Any]: ...
    def forward(self, batch: Batch, quantized: bool = ..., output_names: Sequence[str] | None = ...) -> Any: ...
    def execute(self, batch: Batch, names: Sequence[str], what: str) -> Any: ...
    def graph_dequantize(self) -> None: ...
    def graph_restore(self) -> None: ...

__all__ = ["ErrorAnalysis", "error_analysis", "layerwise", "output_snr"]


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
    #: Graph output -> SNR on the calibration batches, where the figures above are on other data (else empty).
    calibration_snr_db: dict[str, float] = field(default_factory=dict)


def _compared(session: AnalysedSession, batches: Iterable[Batch],
              names: Sequence[str]) -> Iterator[tuple[str, np.ndarray, np.ndarray]]:
    """Per batch and per name of ``names``: (name, FP32 value, quantized value), both float64."""
    for batch in batches:
        quant = session.forward(batch, quantized=True, output_names=names)
        ref = session.forward(batch, quantized=False, output_names=names)
        for name in names:
            yield name, ref[name].astype(np.float64), quant[name].astype(np.float64)


def error_analysis(session: AnalysedSession, batches: Sequence[Batch], layerwise_too: bool = False,
                   layerwise_batches: int = 1) -> ErrorAnalysis:
    """Graph-wise error of the session's quantized graph against FP32 on ``batches``.

    Every quantized operator's output is compared, including the error accumulated from the graph's
    inputs (as PPQ's ``graphwise_error_analyse``), as well as every graph output and every part of an
    output built by a final ``Concat``. With ``layerwise_too``, also the layer-wise error of every quantized
    operator (:func:`layerwise`, on the first ``layerwise_batches`` batches); without it the ``isolated_*``
    figures are empty.
    """
    layer_vars = {op.outputs[0].name: op.name for op in session.quantized_operations() if op.outputs}
    outputs = session.output_names
    parts = {concat.output: list(concat.parts) for concat in session.final_concats}
    watched = outputs + [part for names in parts.values() for part in names]
    names = list(dict.fromkeys(watched + list(layer_vars)))
    sums = {name: np.zeros(4) for name in names}  # signal, noise, dot, candidate power
    spans = {name: [np.inf, -np.inf, np.inf, -np.inf] for name in watched}  # fp32 min/max, quantized min/max
    for name, r, q in _compared(session, counted("error analysis batch", batches), names):
        sums[name] += error_sums(r, q)
        if name in spans and r.size:
            low_r, high_r, low_q, high_q = spans[name]
            spans[name] = [min(low_r, r.min()), max(high_r, r.max()), min(low_q, q.min()), max(high_q, q.max())]

    def snr(name: str) -> float:
        return snr_db(sums[name][0], sums[name][1])

    def cos(name: str) -> float:
        signal, _, dot, power = sums[name]
        return cosine(dot, signal, power)

    isolated_snr, isolated_cos = (layerwise(session, batches[:layerwise_batches]) if batches and layerwise_too
                                  else ({}, {}))
    return ErrorAnalysis(
        output_snr_db={n: snr(n) for n in outputs},
        output_cosine={n: cos(n) for n in outputs},
        layer_snr_db={op: snr(var) for var, op in layer_vars.items()},
        layer_cosine={op: cos(var) for var, op in layer_vars.items()},
        isolated_snr_db=isolated_snr,
        isolated_cosine=isolated_cos,
        part_snr_db={out: {p: snr(p) for p in names_} for out, names_ in parts.items()},
        part_cosine={out: {p: cos(p) for p in names_} for out, names_ in parts.items()},
        fp32_span={n: float(v[1] - v[0]) for n, v in spans.items() if np.isfinite(v[0])},
        quant_span={n: float(v[3] - v[2]) for n, v in spans.items() if np.isfinite(v[2])},
    )


def output_snr(session: AnalysedSession, batches: Sequence[Batch]) -> dict[str, float]:
    """The SNR in dB of each graph output against FP32 over ``batches`` (the outputs only: cheaper than
    :func:`error_analysis`)."""
    sums = {name: np.zeros(4) for name in session.output_names}
    for name, r, q in _compared(session, batches, session.output_names):
        sums[name] += error_sums(r, q)
    return {name: snr_db(total[0], total[1]) for name, total in sums.items()}


def layerwise(session: AnalysedSession, batches: Sequence[Batch]) -> tuple[dict[str, float], dict[str, float]]:
    """Layer-wise error: the graph outputs' SNR and cosine when only one operator is quantized.

    As PPQ's ``layerwise_error_analyse``: every other operator runs in FP32, so the figure is the error
    that operator brings in by itself. One forward per quantized operator and batch; the error sums are
    accumulated over ``batches``, so one image's accident weighs less than on PPQ's single batch.

    Returns:
        ``(snr_db, cosine)``: operator name -> figure, over all graph outputs together.
    """
    names = session.output_names
    refs = [[session.forward(batch, quantized=False)[name].astype(np.float64) for name in names]
            for batch in batches]
    sums: dict[str, np.ndarray] = {}
    session.graph_dequantize()
    try:
        for op in counted("layer-wise analysis operator", session.quantized_operations()):
            op.restore_quantize_state()
            try:
                total = np.zeros(4)
                for batch, ref in zip(batches, refs, strict=True):
                    outputs = session.execute(batch, names, "layer-wise analysis")
                    total += error_sums(ref, [outputs[name].astype(np.float64) for name in names])
            finally:
                op.dequantize()
            sums[op.name] = total
    finally:
        session.graph_restore()
    snr = {name: snr_db(t[0], t[1]) for name, t in sums.items()}
    cos = {name: cosine(t[2], t[0], t[3]) for name, t in sums.items()}
    return snr, cos
