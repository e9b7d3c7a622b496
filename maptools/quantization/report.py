"""The quantization report: ``report.json`` and ``report.png`` beside the artifacts.

``report.json`` holds the settings, the timings of each stage, and the error (SNR in dB and cosine,
quantized vs FP32 on calibration data) of every graph output and, graph-wise (and layer-wise when it was
measured), of every quantized operator.
``report.png`` is a figure of fixed size (1200 x 700 px) for a network of any size: on the left the
:data:`WORST_SHOWN` operators of lowest SNR (horizontal bars coloured by operator kind, see :data:`KINDS`),
on the right the SNR of every quantized operator along the graph with the graph outputs' SNR marked. Both
are rendered to bytes here and written atomically with the other artifacts.
"""

from __future__ import annotations

import io
import json
import math
from collections.abc import Mapping
from typing import Any

from maptools.quantization.format import MAC_TYPES, REPORT_JSON, REPORT_PNG

__all__ = ["FIGURE_PIXELS", "KINDS", "WORST_SHOWN", "render_report", "worst_operators"]


def _finite(value: float) -> float | str:
    return value if math.isfinite(value) else ("inf" if value > 0 else "-inf")


#: Operators shown in the left panel of ``report.png`` (the lowest SNR first).
WORST_SHOWN = 30
#: Size of ``report.png`` in pixels (width, height), whatever the number of operators.
FIGURE_PIXELS = (1200, 700)
_DPI = 100

#: Operator kinds and their colours in ``report.png``; a type not listed is "other".
KINDS: dict[str, tuple[str, frozenset[str]]] = {
    "conv / matmul": ("tab:blue", MAC_TYPES),
    "activation": ("tab:orange", frozenset({"Relu", "Clip", "PRelu", "LeakyRelu", "Sigmoid", "HardSigmoid",
                                            "HardSwish", "Tanh", "Softmax", "Elu", "Selu", "Gelu", "Swish",
                                            "Mish", "Softplus"})),
    "pooling": ("tab:green", frozenset({"MaxPool", "AveragePool", "GlobalAveragePool", "GlobalMaxPool",
                                        "ReduceMean", "ReduceMax"})),
    "add / mul / concat": ("tab:purple", frozenset({"Add", "Sub", "Mul", "Div", "Concat", "Sum", "Max", "Min"})),
}
_OTHER = ("other (pad, reshape...)", "tab:gray")
_OUTPUT_COLOURS = ("tab:red", "tab:brown", "tab:pink", "tab:olive", "tab:cyan", "black")


def _kind(op_type: str | None) -> tuple[str, str]:
    for name, (colour, types) in KINDS.items():
        if op_type in types:
            return name, colour
    return _OTHER


def _short(name: str, width: int = 36) -> str:
    return name if len(name) <= width else "…" + name[-(width - 1):]  # the end of a path names the layer


def worst_operators(layer_snr: Mapping[str, float], count: int = WORST_SHOWN) -> list[str]:
    """The ``count`` operators with the lowest SNR, lowest first (graph order among equals)."""
    order = sorted(range(len(layer_snr)), key=lambda i: (list(layer_snr.values())[i], i))
    names = list(layer_snr)
    return [names[i] for i in order[:count]]


def _figure(title: str, layer_snr: Mapping[str, float], op_types: Mapping[str, str],
            output_snr: Mapping[str, float], isolated_snr: Mapping[str, float]) -> bytes:
    """``report.png``: the worst operators (left) and the SNR along the graph (right), fixed size."""
    import matplotlib

    matplotlib.use("Agg", force=True)
    from matplotlib.figure import Figure
    from matplotlib.lines import Line2D
    from matplotlib.patches import Patch
    from matplotlib.ticker import MaxNLocator

    names = list(layer_snr)
    finite = [v for v in [*layer_snr.values(), *output_snr.values(), *isolated_snr.values()] if math.isfinite(v)]
    top = (max(finite) if finite else 0.0) + 3.0  # where an infinite SNR (no error at all) is drawn
    bottom = min([0.0, *finite])

    def shown(value: float) -> float:
        return top if value == math.inf else (bottom if value == -math.inf else value)

    width, height = FIGURE_PIXELS
    fig = Figure(figsize=(width / _DPI, height / _DPI), dpi=_DPI)
    grid = fig.add_gridspec(1, 2, width_ratios=[1.0, 1.25], left=0.235, right=0.98, top=0.88, bottom=0.17,
                            wspace=0.12)
    fig.suptitle(title, fontsize=12)

    # left: the worst operators, lowest SNR at the top
    worst = worst_operators(layer_snr)
    ax = fig.add_subplot(grid[0])
    values = [shown(layer_snr[n]) for n in worst]
    ax.barh(range(len(worst)), values, color=[_kind(op_types.get(n))[1] for n in worst], height=0.75)
    ax.set_yticks(range(len(worst)))
    ax.set_yticklabels([_short(n) for n in worst], fontsize=8)
    ax.set_ylim(WORST_SHOWN - 0.5 if len(worst) == WORST_SHOWN else len(worst) - 0.5, -0.5)
    for y, (n, v) in enumerate(zip(worst, values, strict=True)):
        ax.text(v, y, f" {layer_snr[n]:.1f}" if math.isfinite(layer_snr[n]) else " inf", va="center", fontsize=7)
    ax.set_xlim(min(0.0, bottom), max([1.0, *values]) * 1.15)
    ax.set_xlabel("SNR vs FP32 (dB)")
    shown_what = f"the {len(worst)} lowest of {len(names)}" if len(worst) < len(names) else f"all {len(names)}"
    ax.set_title(f"{shown_what} quantized operators, lowest SNR first", fontsize=10)
    ax.grid(axis="x", alpha=0.3)

    # right: every quantized operator along the graph, the graph outputs marked
    ax = fig.add_subplot(grid[1])
    x = list(range(len(names)))
    ax.plot(x, [shown(layer_snr[n]) for n in names], color="0.6", linewidth=1.0, zorder=1)
    ax.scatter(x, [shown(layer_snr[n]) for n in names], c=[_kind(op_types.get(n))[1] for n in names],
               s=14 if len(names) <= 120 else 7, zorder=2)
    extra = []
    if isolated_snr:
        ax.plot(x, [shown(isolated_snr.get(n, math.nan)) for n in names], color="black", linewidth=0.8,
                linestyle=":", zorder=1)
        extra.append(Line2D([], [], color="black", linestyle=":", label="layer-wise: graph outputs, this op alone"))
    for index, (name, value) in enumerate(output_snr.items()):
        colour = _OUTPUT_COLOURS[index % len(_OUTPUT_COLOURS)]
        ax.axhline(shown(value), color=colour, linestyle="--", linewidth=1.0, zorder=0)
        ax.plot([len(names) - 1], [shown(value)], marker="D", color=colour, markersize=7, zorder=3)
        extra.append(Line2D([], [], color=colour, linestyle="--", marker="D",
                            label=f"graph output {_short(name, 24)}: {value:.2f} dB"))
    ax.set_xlabel("quantized operators in graph order (input → output)")
    ax.set_ylabel("SNR vs FP32 (dB), accumulated from the input")
    ax.set_title("SNR along the graph", fontsize=10)
    ax.set_xlim(-0.5, len(names) - 1 + max(1.0, 0.02 * len(names)))
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.set_ylim(bottom - 1.0, top + 2.0)
    ax.grid(alpha=0.3)
    if any(v == math.inf for v in [*layer_snr.values(), *output_snr.values()]):
        ax.text(0.01, 0.99, "inf (no error) drawn at the top", transform=ax.transAxes, va="top", fontsize=7)

    present = dict.fromkeys(_kind(op_types.get(n)) for n in names)
    handles = [Patch(color=colour, label=kind) for kind, colour in present] + extra
    fig.legend(handles=handles, loc="lower center", ncol=min(len(handles), 4), fontsize=8.5, frameon=False)
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
    operator is quantized); without it these two keys are left out. ``worst_operators`` lists the operators
    of the figure's left panel (the :data:`WORST_SHOWN` of lowest graph-wise SNR, lowest first).

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
        "worst_operators": worst_operators(layer_snr_db),
    }
    bits = f"W{settings.get('weight_bits')}A{settings.get('activation_bits')}"
    title = f"{mapname}: SNR of the quantized operators vs FP32 ({bits}, {len(layer_snr_db)} operators)"
    return {
        REPORT_JSON: (json.dumps(report, indent=2) + "\n").encode(),
        REPORT_PNG: _figure(title, layer_snr_db, op_types, output_snr_db, isolated_snr_db),
    }
