"""The quantization report: ``report.json`` and ``report.png`` beside the artifacts.

``report.json`` holds the settings, the timings of each stage, and the error (SNR in dB and cosine,
quantized vs FP32 on calibration data) of every graph output and, graph-wise (and layer-wise when it was
measured), of every quantized operator.
``report.png`` is a bar chart of the per-operator SNR, one bar per quantized layer. Both are rendered to
bytes here and written atomically with the other artifacts.
"""

from __future__ import annotations

import io
import json
import math
from collections.abc import Mapping
from typing import Any

__all__ = ["REPORT_JSON", "REPORT_PNG", "render_report"]

#: Settings, timings and per-operator error.
REPORT_JSON = "report.json"
#: Per-layer SNR bar chart.
REPORT_PNG = "report.png"


def _finite(value: float) -> float | str:
    return value if math.isfinite(value) else ("inf" if value > 0 else "-inf")


def _bar_chart(title: str, layer_snr: Mapping[str, float], op_types: Mapping[str, str]) -> bytes:
    import matplotlib

    matplotlib.use("Agg", force=True)
    from matplotlib.figure import Figure

    names = list(layer_snr)
    values = [min(layer_snr[n], 99.0) if math.isfinite(layer_snr[n]) else 99.0 for n in names]
    height = max(3.0, 0.22 * len(names) + 1.2)
    fig = Figure(figsize=(9, height), dpi=80)
    ax = fig.add_subplot()
    colors = ["tab:blue" if op_types.get(n) in ("Conv", "Gemm", "MatMul", "ConvTranspose") else "tab:gray"
              for n in names]
    ax.barh(range(len(names)), values, color=colors)
    ax.set_yticks(range(len(names)))
    ax.set_yticklabels([f"{n} ({op_types.get(n, '?')})" for n in names], fontsize=7)
    ax.invert_yaxis()
    ax.set_xlabel("SNR vs FP32 (dB), accumulated from the input")
    ax.set_title(title, fontsize=10)
    ax.grid(axis="x", alpha=0.3)
    fig.tight_layout()
    fig.set_layout_engine(None)  # laid out: spares savefig a second (text layout) pass, same pixels
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", metadata={"Software": None})
    return buffer.getvalue()


def render_report(mapname: str, settings: Mapping[str, Any], timings: Mapping[str, float],
                  output_snr_db: Mapping[str, float], output_cosine: Mapping[str, float],
                  layer_snr_db: Mapping[str, float], layer_cosine: Mapping[str, float],
                  op_types: Mapping[str, str], isolated_snr_db: Mapping[str, float] | None = None,
                  isolated_cosine: Mapping[str, float] | None = None,
                  extra: Mapping[str, Any] | None = None) -> dict[str, bytes]:
    """Render ``report.json`` and ``report.png``.

    The per-operator entries hold the graph-wise error (``snr_db``, ``cosine``: the operator's own output,
    accumulated from the input) and, when ``isolated_snr_db`` is given (``quantize(layerwise_analysis=True)``),
    the layer-wise error (``layerwise_snr_db``, ``layerwise_cosine``: the graph outputs when only that
    operator is quantized); without it these two keys are left out.

    ``extra`` adds top-level keys (``analysis``: what the figures were measured on, ``output_parts``: the
    parts of outputs built by a final Concat, ``warnings``).

    Returns:
        File name -> bytes, ready for :func:`maptools.quantization.artifacts.write_map`.
    """
    isolated_snr_db = isolated_snr_db or {}
    isolated_cosine = isolated_cosine or {}

    def operator(n: str) -> dict[str, Any]:
        entry = {"node": n, "op_type": op_types.get(n), "snr_db": _finite(layer_snr_db[n]), "cosine": layer_cosine[n]}
        if isolated_snr_db:
            entry["layerwise_snr_db"] = _finite(isolated_snr_db[n]) if n in isolated_snr_db else None
            entry["layerwise_cosine"] = isolated_cosine.get(n)
        return entry

    report = {
        "mapname": mapname,
        "settings": dict(settings),
        "timings_seconds": {k: round(v, 3) for k, v in timings.items()},
        "outputs": {n: {"snr_db": _finite(output_snr_db[n]), "cosine": output_cosine[n]} for n in output_snr_db},
        "operators": [operator(n) for n in layer_snr_db],
        **dict(extra or {}),
    }
    bits = f"W{settings.get('weight_bits')}A{settings.get('activation_bits')}"
    title = f"{mapname}: per-layer SNR ({bits}, {len(layer_snr_db)} quantized layers)"
    return {
        REPORT_JSON: (json.dumps(report, indent=2) + "\n").encode(),
        REPORT_PNG: _bar_chart(title, layer_snr_db, op_types),
    }
