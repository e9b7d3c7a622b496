"""What a search found: :class:`SearchResult`, its JSON (no timings: the same bytes wherever it ran), table and plot."""

from __future__ import annotations

import json
import math
import os
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

__all__ = ["SearchResult", "candidate_label"]


def candidate_label(weight_bits: int, activation_bits: int) -> str:
    """``'W4A8'``."""
    return f"W{weight_bits}A{activation_bits}"


def _json_safe(value: Any) -> Any:
    """Infinite and NaN floats as the strings ``"inf"``, ``"-inf"``, ``"nan"`` (strict JSON)."""
    if isinstance(value, float) and not math.isfinite(value):
        return str(value)
    if isinstance(value, dict):
        return {k: _json_safe(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_json_safe(v) for v in value]
    return value


@dataclass
class SearchResult:
    """The front of a mixed-precision search.

    Attributes:
        data: Everything measured, as written to JSON: ``model``, ``data``, ``settings``, ``figure`` (what the
            figure is), ``front_figure`` (what the finer figure the front is drawn over is, or None),
            ``objective``, ``candidates``, ``layers``, ``sensitivity`` (layer -> candidate label ->
            ``nsr``, ``adc_conversions``, ``energy_j``), ``uniform`` (the uniform-bit points), ``points`` (the
            measured walk points: ``layer_bits``, ``step``, predictions, ``figure``, ``front_figure`` (with a
            front figure), ``snr_db``, ``adc_conversions``, ``energy_j``, ``pareto`` and, with ``verify_front``,
            each front point's ``verification``), ``proxy`` (the predicted against the measured SNR),
            ``budget``, ``chosen`` (index in ``points`` or None), ``verification`` (of the chosen point's map;
            None without a mapname) and ``front_verification`` (None without ``verify_front``).
        seconds: Wall time (not in the JSON).
        computed: Points measured in this run (not in the JSON).
        cached: Points read from the cache (not in the JSON).
    """

    data: dict[str, Any]
    seconds: float = 0.0
    computed: int = 0
    cached: int = 0

    @property
    def points(self) -> list[dict[str, Any]]:
        """The measured walk points, costliest first."""
        return self.data["points"]

    @property
    def uniform(self) -> list[dict[str, Any]]:
        """The uniform-bit points."""
        return self.data["uniform"]

    @property
    def front(self) -> list[dict[str, Any]]:
        """The walk and uniform points on the Pareto front, costliest first."""
        return [p for p in self.points + self.uniform if p["pareto"]]

    @property
    def chosen(self) -> dict[str, Any] | None:
        """The point chosen under the budget (None when none fits)."""
        index = self.data["chosen"]
        return None if index is None else self.points[index]

    def layer_bits(self, index: int) -> dict[str, tuple[int, int]]:
        """The ``layer_bits`` of walk point ``index``, for :func:`~maptools.quantization.quantize`."""
        return {node: (w, a) for node, (w, a) in self.points[index]["layer_bits"].items()}

    def to_json(self) -> str:
        """The JSON text (sorted keys, strict: infinities as strings)."""
        return json.dumps(_json_safe(self.data), indent=1, sort_keys=True, allow_nan=False) + "\n"

    def save(self, path: str | os.PathLike[str]) -> Path:
        """Write :meth:`to_json` atomically; returns the path."""
        path = Path(path)
        handle, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
        try:
            with os.fdopen(handle, "w") as stream:
                stream.write(self.to_json())
            os.replace(tmp, path)
        except BaseException:
            Path(tmp).unlink(missing_ok=True)
            raise
        return path

    def table(self) -> str:
        """Plain text: every uniform and walk point, its figure, SNR and cost relative to the reference."""
        ref = self.data["budget"]["reference_adc_conversions"]
        ref_energy = self.data["budget"]["reference_energy_j"]
        fine = bool(self.data.get("front_figure"))
        lines = [f"search: {self.data['figure']}; cost per sample on {self.data['settings']['spec']}, relative to "
                 f"{self.data['budget']['reference']}"
                 + (f"; front over {self.data['front_figure']}" if fine else ""),
                 f"{'point':>10} {'figure':>8}" + (f" {'front':>8}" if fine else "")
                 + f" {'SNR dB':>7} {'ADC conv':>12} {'ADC rel':>7} {'energy rel':>10} front"]

        def row(name: str, p: dict[str, Any]) -> str:
            check = p.get("verification")
            return (f"{name:>10} {p['figure']:8.3f}" + (f" {p['front_figure']:8.3f}" if fine else "")
                    + f" {p['snr_db']:7.2f} {p['adc_conversions']:12d} "
                    f"{p['adc_conversions'] / ref:7.3f} {p['energy_j'] / ref_energy:10.3f} "
                    f"{'*' if p['pareto'] else ''}"
                    + ("" if check is None else " reproduced" if check["reproduced"] else " NOT reproduced"))

        lines += [row(p["label"], p) for p in self.uniform]
        lines += [row(f"step {p['step']}", p) + (" <- chosen" if i == self.data["chosen"] else "")
                  for i, p in enumerate(self.points)]
        verification = self.data.get("verification")
        if verification is not None:
            lines.append(f"chosen point re-quantized as {verification['mapname']!r}: figure "
                         f"{verification['figure']:.3f} ({'' if verification['reproduced'] else 'NOT '}reproduced)")
        return "\n".join(lines)

    def plot(self, path: str | os.PathLike[str]) -> Path:
        """Figure against ADC conversions (relative to the reference): walk points, the front, uniform points.

        With a front figure, a second panel: the front is drawn over it, the choice over the task figure.
        """
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        keys = ["front_figure", "figure"] if self.data.get("front_figure") else ["figure"]
        fig, axes = plt.subplots(len(keys), 1, figsize=(6.4, 4.2 * len(keys)), dpi=100, squeeze=False)
        for ax, key in zip(axes[:, 0], keys, strict=True):
            self._panel(ax, key)
        fig.tight_layout()
        path = Path(path)
        fig.savefig(path)
        plt.close(fig)
        return path

    def _panel(self, ax: Any, key: str) -> None:
        """One panel of :meth:`plot`: the figure ``key`` of every point, the front drawn where it is over ``key``."""
        ref = self.data["budget"]["reference_adc_conversions"]
        ax.scatter([p["adc_conversions"] / ref for p in self.points], [p[key] for p in self.points],
                   s=18, color="tab:blue", label="greedy walk points")
        if key == ("front_figure" if self.data.get("front_figure") else "figure"):
            front = sorted(self.front, key=lambda p: p["adc_conversions"])
            ax.plot([p["adc_conversions"] / ref for p in front], [p[key] for p in front], color="tab:blue",
                    linewidth=0.8, label="Pareto front")
        ax.scatter([p["adc_conversions"] / ref for p in self.uniform], [p[key] for p in self.uniform],
                   marker="s", s=28, color="tab:red", label="uniform bits")
        for p in self.uniform:
            ax.annotate(p["label"], (p["adc_conversions"] / ref, p[key]), fontsize=7,
                        xytext=(3, 3), textcoords="offset points")
        if self.chosen is not None:
            ax.scatter([self.chosen["adc_conversions"] / ref], [self.chosen[key]], marker="*", s=120,
                       color="tab:orange", label="chosen under the budget", zorder=3)
        ax.axvline(self.data["budget"]["adc_fraction"], color="grey", linestyle=":", linewidth=0.8)
        ax.set_xlabel(f"ADC conversions per sample / {self.data['budget']['reference']}")
        ax.set_ylabel(self.data[key])
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
