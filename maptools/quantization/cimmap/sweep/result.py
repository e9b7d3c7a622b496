"""What :func:`~maptools.quantization.cimmap.sweep.grid.cim_sweep` measured: the grid points and the result.

:class:`SweepResult` holds every :class:`SweepPoint` and shows them as plain-text tables (:meth:`SweepResult.table`),
a PNG (:meth:`SweepResult.plot`) or JSON (:meth:`SweepResult.save`). The JSON holds no wall time and no process
count, so the same sweep gives the same bytes on the local pool and on a cluster; they are in
:meth:`SweepResult.timings` (and the log).
"""

from __future__ import annotations

import json
import math
import os
from collections.abc import Callable
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np

from maptools.quantization.cimmap.montecarlo import chip_statistics

__all__ = ["ADC_RANGE_KINDS", "TIMING_FIELDS", "SweepPoint", "SweepResult"]

#: The two ADC range choices compared at every grid point.
ADC_RANGE_KINDS: tuple[str, ...] = ("calibrated", "full")
#: The fields of a sweep that depend on where it ran, kept out of its JSON (:meth:`SweepResult.timings`).
TIMING_FIELDS: tuple[str, ...] = ("seconds", "jobs")


@dataclass
class SweepPoint:
    """One crossbar of the grid with one ADC range choice, and how the map fared on it.

    Attributes:
        rows: Crossbar rows.
        cell_bits: Bits per cell.
        dac_bits: Bits per DAC cycle.
        weight_encoding: ``'differential'`` or ``'offset'``.
        adc_bits: ADC bits.
        adc_range: ``'calibrated'`` or ``'full'``.
        spec: The full spec, in :meth:`CIMSpec.parse <maptools.quantization.cim.spec.CIMSpec.parse>`'s form.
        lossless_adc_bits: The ADC bits from which a full-range ADC is exact (:attr:`CIMSpec.lossless_adc_bits
            <maptools.quantization.cim.spec.CIMSpec.lossless_adc_bits>`).
        outputs: Graph output name -> ``{"vs_integer": {...}, "vs_fp32": {...}}``: ``top1`` (class scores only,
            else None), ``snr_db`` (``inf`` when identical) and, against the integer executor, ``equal`` (the
            fraction of identical output elements); ``vs_fp32`` is None when FP32 could not run.
        top1_labels: Top-1 accuracy of the first class-score output against the labels (None without labels).
        clipped: The mean fraction of calibration partial sums above their ADC range (calibrated points only).
        seconds: Wall time of the point (its calibration excluded); not in the JSON (:meth:`SweepResult.timings`).
        device: The device model of a point run on chips (:meth:`DeviceModel.to_dict
            <maptools.quantization.cim.device.DeviceModel.to_dict>`), None for exact cells.
        device_index: Its index in :attr:`SweepResult.devices`.
        chips: Every chip's ``{"outputs": ..., "top1_labels": ...}`` (chip ``i`` seeded ``child_seed(seed, i)``);
            ``outputs`` and ``top1_labels`` of the point are then their means over the chips.
    """

    rows: int
    cell_bits: int
    dac_bits: int
    weight_encoding: str
    adc_bits: int
    adc_range: str
    spec: str
    lossless_adc_bits: int
    outputs: dict[str, dict[str, Any]] = field(default_factory=dict)
    top1_labels: float | None = None
    clipped: float | None = None
    seconds: float = 0.0
    device: dict[str, Any] | None = None
    device_index: int | None = None
    chips: list[dict[str, Any]] | None = None

    @classmethod
    def over_chips(cls, point: SweepPoint, device: dict[str, Any], index: int, outputs: list[dict[str, Any]],
                   top1_labels: list[float | None]) -> SweepPoint:
        """``point`` run on chips: each chip's metrics kept, the point's metrics their means."""
        chips = [{"outputs": o, "top1_labels": t} for o, t in zip(outputs, top1_labels, strict=True)]
        labels = None if top1_labels[0] is None else float(np.mean(top1_labels))
        return replace(point, outputs=_mean_of(outputs), top1_labels=labels, device=device, device_index=index,
                       chips=chips)

    def spread(self, against: str, name: str, output: str | None = None) -> tuple[float, float, float] | None:
        """``(mean, std, worst)`` over the chips of one metric (``against`` ``'labels'`` for the accuracy).

        None for a point without chips or a metric that is not measured; std with ``ddof=1`` (0 for one
        chip), worst the lowest (every metric here is better higher).
        """
        if self.chips is None:
            return None
        if against == "labels":
            values = [chip["top1_labels"] for chip in self.chips]
        else:
            values = [SweepPoint.metric(replace(self, outputs=chip["outputs"]), against, name, output)
                      for chip in self.chips]
        if any(v is None for v in values):
            return None
        return chip_statistics(np.asarray(values, dtype=np.float64))

    def metric(self, against: str, name: str, output: str | None = None) -> float | None:
        """One metric of one output (the first one by default): ``against`` ``'integer'`` or ``'fp32'``."""
        values = self.outputs[output] if output is not None else next(iter(self.outputs.values()))
        block = values.get(f"vs_{against}")
        return None if block is None else block.get(name)


@dataclass
class SweepResult:
    """What :func:`cim_sweep` measured.

    Attributes:
        mapname: The map.
        samples: Evaluation samples (the batch dimension summed over the batches).
        inputs_data: What the evaluation ran on (``'inputs'`` or ``'random (N batches, seed S)'``).
        calibration_data: What the ADC ranges were calibrated on (``'calib'``, ``'inputs (in-sample)'`` or
            ``'random (N batches, seed S, held out)'``).
        method: The calibration method.
        reference: Graph output name -> the exact integer executor against FP32 (``top1``, ``snr_db``), and
            ``"labels"`` -> the top-1 accuracy of ``fp32`` and ``integer`` when labels were given.
        fp32_error: Why FP32 could not run (None when it ran).
        points: Every grid point, ``2 * len(adc_bits) * len(rows) * len(cell_bits)`` of them.
        seconds: Wall time of the sweep; not in the JSON (:meth:`timings`).
        jobs: Worker processes used; not in the JSON.
        devices: The device grid (each :meth:`DeviceModel.to_dict
            <maptools.quantization.cim.device.DeviceModel.to_dict>`), None for exact cells.
        chips: Chips per device point, None for exact cells.
    """

    mapname: str
    samples: int
    inputs_data: str
    calibration_data: str
    method: str
    reference: dict[str, Any]
    fp32_error: str | None
    points: list[SweepPoint]
    seconds: float = 0.0
    jobs: int = 1
    devices: list[dict[str, Any]] | None = None
    chips: int | None = None

    def point(self, rows: int, cell_bits: int, adc_bits: int, adc_range: str, device: int | None = None) -> SweepPoint:
        """The point of one crossbar and range choice (and device: its index in :attr:`devices`).

        Raises:
            KeyError: not in the grid.
        """
        for p in self.points:
            if (p.rows, p.cell_bits, p.adc_bits, p.adc_range, p.device_index) == (rows, cell_bits, adc_bits,
                                                                                  adc_range, device):
                return p
        raise KeyError(f"no point rows={rows}, cell_bits={cell_bits}, adc_bits={adc_bits}, adc_range={adc_range}, "
                       f"device={device}")

    @property
    def device_keys(self) -> list[int | None]:
        """The devices of the grid by index (``[None]``: exact cells)."""
        return list(range(len(self.devices))) if self.devices else [None]

    @property
    def geometries(self) -> list[tuple[int, int]]:
        """The ``(rows, cell_bits)`` of the grid, in sweep order."""
        return list(dict.fromkeys((p.rows, p.cell_bits) for p in self.points))

    @property
    def adc_bits(self) -> list[int]:
        """The ADC widths of the grid, ascending."""
        return sorted({p.adc_bits for p in self.points})

    def ideal_from(self, rows: int, cell_bits: int, adc_range: str, device: int | None = None) -> int | None:
        """The fewest ADC bits of the grid from which every output equals the exact integer executor's.

        "From": at that width and at every larger one of the grid. None when the largest width does not reach it.
        """
        found = None
        for bits in sorted(self.adc_bits, reverse=True):
            p = self.point(rows, cell_bits, bits, adc_range, device)
            if all(values["vs_integer"]["equal"] == 1.0 for values in p.outputs.values()):
                found = bits
            else:
                break
        return found

    def timings(self) -> dict[str, Any]:
        """Where and how long the sweep ran: ``seconds``, ``jobs`` and every point's ``seconds``, in point order."""
        return {"seconds": self.seconds, "jobs": self.jobs, "points": [p.seconds for p in self.points]}

    def to_dict(self) -> dict[str, Any]:
        """A JSON-serializable dict (infinite SNRs as the string ``"inf"``), without :meth:`timings`."""
        data = asdict(self)
        for key in TIMING_FIELDS:
            del data[key]
        for point in data["points"]:
            del point["seconds"]
        if self.devices is None:  # exact cells: the record without the device fields
            for key in ("devices", "chips"):
                del data[key]
            for point in data["points"]:
                for key in ("device", "device_index", "chips"):
                    del point[key]
        data["ideal_from"] = [{"rows": r, "cell_bits": c, "adc_range": kind, "adc_bits": self.ideal_from(r, c, kind, d)}
                              | ({} if d is None else {"device": d})
                              for r, c in self.geometries for kind in ADC_RANGE_KINDS for d in self.device_keys]
        return _json_safe(data)

    def save(self, path: str | os.PathLike[str]) -> Path:
        """Write :meth:`to_dict` as JSON (the same bytes wherever the sweep ran); returns the path."""
        path = Path(path)
        path.write_text(json.dumps(self.to_dict(), indent=1, allow_nan=False) + "\n")
        return path

    def _headline(self) -> tuple[str, str, Callable[[SweepPoint, str], float | None]]:
        """The metric the tables show: top-1 agreement for class scores, else the SNR."""
        first = self.points[0]
        if first.metric("integer", "top1") is not None:
            return "top-1 agreement (%)", "%", lambda p, against: p.metric(against, "top1")
        return "SNR (dB)", "dB", lambda p, against: p.metric(against, "snr_db")

    def table(self) -> str:
        """Plain-text tables: the headline metric against the exact integer executor and FP32, per ADC width."""
        if not self.points:
            return f"cim-sweep {self.mapname!r}: no grid point"
        title, unit, metric = self._headline()
        output = next(iter(self.points[0].outputs))
        bits = self.adc_bits
        lines = [f"cim-sweep {self.mapname!r} on {self.samples} samples ({self.inputs_data}); ADC ranges calibrated on "
                 f"{self.calibration_data} ({self.method}); output {output!r}, {title}"]
        ref = self.reference.get(output, {})
        ref_value = ref.get("top1") if unit == "%" else ref.get("snr_db")
        if self.fp32_error is None:
            lines.append(f"exact integer executor vs FP32: {_fmt(ref_value, unit)} {unit}")
        else:
            lines.append(f"FP32 could not run: {self.fp32_error}")
        labels = self.reference.get("labels")
        if labels:
            lines.append("top-1 vs labels: " + ", ".join(f"{k} {_fmt(v, '%')} %" for k, v in labels.items()))
        against = [("integer", "vs exact integer")] + ([("fp32", "vs FP32")] if self.fp32_error is None else [])
        if any(p.top1_labels is not None for p in self.points):
            against.append(("labels", "vs labels"))
        name = "top1" if unit == "%" else "snr_db"
        chips = self.devices is not None
        width = 18 if chips else 6
        labels_of = {d: "" if d is None else f" {device_label(self.devices[d]):24}" for d in self.device_keys} \
            if self.devices else {None: ""}
        for key, caption in against:
            lines.append("")
            lines.append(f"{caption}: {title if key != 'labels' else 'top-1 accuracy (%)'}"
                         + (f", mean ± std (worst) over {self.chips} chips" if chips else ""))
            header = f"{'rows':>5} {'cell':>4} {'ADC range':10}" + (f" {'device':24}" if chips else "") + " " + \
                " ".join(f"{b:>{width}}" for b in bits) + f" {'= int from':>10}"
            lines.append(header)
            lines.append("-" * len(header))
            for rows, cell in self.geometries:
                for kind in ADC_RANGE_KINDS:
                    for d in self.device_keys:
                        cells = []
                        for b in bits:
                            p = self.point(rows, cell, b, kind, d)
                            shown = "%" if key == "labels" else unit
                            value = p.top1_labels if key == "labels" else metric(p, key)
                            spread = p.spread(key, name)
                            text = _fmt(value, shown) if spread is None else \
                                f"{_fmt(spread[0], shown)}±{_fmt(spread[1], shown)} ({_fmt(spread[2], shown)})"
                            cells.append(f"{text:>{width}}")
                        ideal = self.ideal_from(rows, cell, kind, d)
                        lines.append(f"{rows:>5} {cell:>4} {kind:10}{labels_of[d]} " + " ".join(cells)
                                     + f" {'-' if ideal is None else ideal:>10}")
        lines.append("")
        lines.append(f"= int from: the fewest ADC bits from which every output equals the exact integer executor's; "
                     f"{len(self.points)} points in {self.seconds:.1f} s on {self.jobs} process(es)")
        return "\n".join(lines)

    def plot(self, path: str | os.PathLike[str]) -> Path:
        """A PNG: the headline metric against ADC bits, per geometry, calibrated (solid) and full range (dashed).

        Points run on chips show their mean with a ± std bar and the worst chip as a triangle, one line per
        geometry and device.
        """
        from matplotlib.figure import Figure  # Agg canvas, no pyplot state
        from matplotlib.ticker import MaxNLocator

        title, unit, metric = self._headline()
        panels = [("integer", "vs exact integer executor")]
        if self.fp32_error is None:
            panels.append(("fp32", "vs FP32"))
        fig = Figure(figsize=(6.0 * len(panels), 4.4), dpi=110)
        bits = self.adc_bits
        colors = ["C0", "C1", "C2", "C3", "C4", "C5", "C6", "C7", "C8", "C9"]
        output = next(iter(self.points[0].outputs)) if self.points else ""
        for index, (key, caption) in enumerate(panels):
            ax = fig.add_subplot(1, len(panels), index + 1)
            lines = [(rows, cell, d) for rows, cell in self.geometries for d in self.device_keys]
            for g, (rows, cell, d) in enumerate(lines):
                for kind, style in zip(ADC_RANGE_KINDS, ("-", "--"), strict=True):
                    points = [self.point(rows, cell, b, kind, d) for b in bits]
                    shown = [_shown(metric(p, key), unit) for p in points]
                    label = f"R={rows}, c={cell}, {kind}" + ("" if d is None else f", {device_label(self.devices[d])}")
                    color = colors[g % len(colors)]
                    spreads = [p.spread(key, "top1" if unit == "%" else "snr_db") for p in points]
                    if d is None or any(v is None for v in spreads):
                        ax.plot(bits, shown, style, marker="o", markersize=3, color=color, label=label)
                        continue
                    std = [_shown(v[1], unit) for v in spreads]
                    ax.errorbar(bits, shown, yerr=std, linestyle=style, marker="o", markersize=3, color=color,
                                capsize=2, label=label)
                    ax.plot(bits, [_shown(v[2], unit) for v in spreads], "v", markersize=3, color=color)
            if key == "fp32":
                ref = self.reference.get(output, {})
                ref_value = ref.get("top1") if unit == "%" else ref.get("snr_db")
                if ref_value is not None and math.isfinite(ref_value):
                    ax.axhline(100 * ref_value if unit == "%" else ref_value, color="k", linewidth=0.8,
                               linestyle=":", label="exact integer")
            ax.xaxis.set_major_locator(MaxNLocator(integer=True))
            ax.set_xlabel("ADC bits")
            ax.set_ylabel(title)
            ax.set_title(f"{self.mapname}: {caption}", fontsize=10)
            ax.grid(alpha=0.3)
        fig.axes[-1].legend(fontsize=6, loc="best")
        fig.tight_layout()
        path = Path(path)
        fig.savefig(path, format="png", metadata={"Software": None})
        return path


def _shown(value: float | None, unit: str) -> float:
    """A metric as plotted: percent for agreements, NaN when missing or infinite."""
    return np.nan if value is None or not math.isfinite(value) else (100 * value if unit == "%" else value)


def _mean_of(values: list[Any]) -> Any:
    """The element-wise mean of equally shaped metric records (dicts of numbers; None stays None)."""
    first = values[0]
    if isinstance(first, dict):
        return {key: _mean_of([v[key] for v in values]) for key in first}
    if first is None:
        return None
    return float(np.mean(values))


def device_label(device: dict[str, Any]) -> str:
    """A device point's axes: its programming error and read time."""
    error = device["prog_sigma_rel"]
    error = ",".join(f"{100 * e:g}" for e in error) if isinstance(error, list) else f"{100 * error:g}"
    time = device["time"] if device["time"] is not None else device["drift_t0"]
    return f"prog {error} %, t {time:g} s"


def _fmt(value: float | None, unit: str) -> str:
    if value is None:
        return "-"
    if unit == "%":
        return f"{100 * value:.1f}"
    return "inf" if math.isinf(value) else f"{value:.1f}"


def _json_safe(value: Any) -> Any:
    if isinstance(value, float) and not math.isfinite(value):
        return "inf" if value > 0 else "-inf" if value < 0 else None
    if isinstance(value, dict):
        return {k: _json_safe(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_json_safe(v) for v in value]
    return value
