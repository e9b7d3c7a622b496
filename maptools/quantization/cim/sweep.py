"""How a map fares on a grid of crossbars: :func:`cim_sweep` and ``maptools cim-sweep``.

For every crossbar of the grid ``adc_bits x rows x cell_bits`` (with one ``dac_bits`` and weight encoding),
the map runs in the CIM mode of the integer reference executor (:mod:`maptools.quantization.reference.crossbar`)
twice, with full-range ADCs (``adc_range='full'``) and with ADC ranges calibrated on calibration data
(:func:`~maptools.quantization.cim.mapcal.calibrate_map`), and its outputs are compared with

* the **exact integer executor** (the same map with exact MACs): top-1 agreement for class-score outputs
  ``[N, C]``, SNR in dB and the fraction of output elements that are identical ("= int");
* **FP32**: the float model the map's manifest records (checked against its SHA-256), run by onnxruntime:
  top-1 agreement and SNR;
* the **labels**, when given (Python only): top-1 accuracy of the first class-score output.

Everything comes from the map's artifacts; nothing is re-quantized. The partial sums, and so the histograms
the ranges are chosen from, do not depend on ``adc_bits``: the calibration data runs once per
``(rows, cell_bits)`` and gives the ranges of every ADC width.

Data: the evaluation inputs are ``inputs`` (``--inputs DIR``), else ``batches`` random standard-normal
batches of the map's input shapes (seed ``seed``). The calibration data is ``calib`` (``--calib DIR``), else
the evaluation inputs themselves when they were given (in-sample, as the result's ``calibration_data``
says), else other random batches (seed ``seed + 1``, held out).

The grid points run in parallel over a :class:`concurrent.futures.ProcessPoolExecutor` (``jobs`` worker
processes, default ``os.cpu_count()``; each with one BLAS thread); ``jobs=1`` runs in this process.

.. code-block:: python
   :class: needs-files

    from maptools.examples import digits
    from maptools.quantization.cim import cim_sweep

    train, _ = digits.load_split("train")
    test, labels = digits.load_split("test")
    result = cim_sweep("digits_w4a4", [test], calib=[train], labels=labels, adc_bits=range(3, 11),
                       rows=(64, 128, 256), cell_bits=(1, 2))
    print(result.table())
    result.save("sweep.json")
    result.plot("sweep.png")
"""

from __future__ import annotations

import contextlib
import json
import logging
import math
import os
import time
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from concurrent.futures import Future, ProcessPoolExecutor, as_completed
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from maptools.errors import InvalidArgumentError, InvalidTypeError
from maptools.quantization import artifacts
from maptools.quantization.cim.mapcal import MapCalibration, collect_histograms
from maptools.quantization.cim.spec import CIMSpec
from maptools.quantization.reference.core import ReferenceExecutor
from maptools.quantization.verify import compare

__all__ = ["ADC_RANGE_KINDS", "SweepPoint", "SweepResult", "cim_sweep", "parse_int_list", "run_cli"]

logger = logging.getLogger(__name__)

#: The two ADC range choices compared at every grid point.
ADC_RANGE_KINDS: tuple[str, ...] = ("calibrated", "full")
#: Random batches when no inputs are given.
DEFAULT_BATCHES = 2
_BLAS_ENV = ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS")

Batch = dict[str, np.ndarray]
Outputs = dict[str, np.ndarray]


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
        seconds: Wall time of the point (its calibration excluded).
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
        seconds: Wall time of the sweep.
        jobs: Worker processes used.
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

    def point(self, rows: int, cell_bits: int, adc_bits: int, adc_range: str) -> SweepPoint:
        """The point of one crossbar and range choice.

        Raises:
            KeyError: not in the grid.
        """
        for p in self.points:
            if (p.rows, p.cell_bits, p.adc_bits, p.adc_range) == (rows, cell_bits, adc_bits, adc_range):
                return p
        raise KeyError(f"no point rows={rows}, cell_bits={cell_bits}, adc_bits={adc_bits}, adc_range={adc_range}")

    @property
    def geometries(self) -> list[tuple[int, int]]:
        """The ``(rows, cell_bits)`` of the grid, in sweep order."""
        return list(dict.fromkeys((p.rows, p.cell_bits) for p in self.points))

    @property
    def adc_bits(self) -> list[int]:
        """The ADC widths of the grid, ascending."""
        return sorted({p.adc_bits for p in self.points})

    def ideal_from(self, rows: int, cell_bits: int, adc_range: str) -> int | None:
        """The fewest ADC bits of the grid from which every output equals the exact integer executor's.

        "From": at that width and at every larger one of the grid. None when the largest width does not reach it.
        """
        found = None
        for bits in sorted(self.adc_bits, reverse=True):
            p = self.point(rows, cell_bits, bits, adc_range)
            if all(values["vs_integer"]["equal"] == 1.0 for values in p.outputs.values()):
                found = bits
            else:
                break
        return found

    def to_dict(self) -> dict[str, Any]:
        """A JSON-serializable dict (infinite SNRs as the string ``"inf"``)."""
        data = asdict(self)
        data["ideal_from"] = [{"rows": r, "cell_bits": c, "adc_range": kind, "adc_bits": self.ideal_from(r, c, kind)}
                              for r, c in self.geometries for kind in ADC_RANGE_KINDS]
        return _json_safe(data)

    def save(self, path: str | os.PathLike[str]) -> Path:
        """Write :meth:`to_dict` as JSON; returns the path."""
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
        for key, caption in against:
            lines.append("")
            lines.append(f"{caption}: {title if key != 'labels' else 'top-1 accuracy (%)'}")
            header = f"{'rows':>5} {'cell':>4} {'ADC range':10} " + " ".join(f"{b:>6}" for b in bits) + \
                     f" {'= int from':>10}"
            lines.append(header)
            lines.append("-" * len(header))
            for rows, cell in self.geometries:
                for kind in ADC_RANGE_KINDS:
                    cells = []
                    for b in bits:
                        p = self.point(rows, cell, b, kind)
                        value = p.top1_labels if key == "labels" else metric(p, key)
                        cells.append(f"{_fmt(value, '%' if key == 'labels' else unit):>6}")
                    ideal = self.ideal_from(rows, cell, kind)
                    lines.append(f"{rows:>5} {cell:>4} {kind:10} " + " ".join(cells)
                                 + f" {'-' if ideal is None else ideal:>10}")
        lines.append("")
        lines.append(f"= int from: the fewest ADC bits from which every output equals the exact integer executor's; "
                     f"{len(self.points)} points in {self.seconds:.1f} s on {self.jobs} process(es)")
        return "\n".join(lines)

    def plot(self, path: str | os.PathLike[str]) -> Path:
        """A PNG: the headline metric against ADC bits, per geometry, calibrated (solid) and full range (dashed)."""
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
            for g, (rows, cell) in enumerate(self.geometries):
                for kind, style in zip(ADC_RANGE_KINDS, ("-", "--"), strict=True):
                    values = [metric(self.point(rows, cell, b, kind), key) for b in bits]
                    shown = [np.nan if v is None or not math.isfinite(v) else (100 * v if unit == "%" else v)
                             for v in values]
                    ax.plot(bits, shown, style, marker="o", markersize=3, color=colors[g % len(colors)],
                            label=f"R={rows}, c={cell}, {kind}")
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


def parse_int_list(text: str | Iterable[int], what: str, low: int = 1, high: int | None = None) -> list[int]:
    """Integers from ``"4-10"``, ``"128,256,512"``, ``"3-5,8"`` or an iterable of ints, sorted and unique.

    Raises:
        InvalidArgumentError: Not such a list, or a value outside ``low .. high``.
    """
    values: list[int] = []
    if isinstance(text, str):
        try:
            for part in (p.strip() for p in text.split(",")):
                first, sep, last = part.partition("-")
                values.extend(range(int(first), int(last) + 1) if sep else [int(part)])
        except ValueError:
            raise InvalidArgumentError(f"{what}: expected integers like 4-10 or 128,256,512, got {text!r}") from None
    else:
        try:
            values = [int(v) for v in text]
        except (TypeError, ValueError):
            raise InvalidArgumentError(f"{what}: expected integers, got {text!r}") from None
    bound = f"{low}..{high}" if high is not None else f">= {low}"
    if not values or any(v < low or (high is not None and v > high) for v in values):
        raise InvalidArgumentError(f"{what}: expected integers in {bound}, got {text!r}")
    return sorted(set(values))


# -- the work of one process ---------------------------------------------------------------------------------
@dataclass
class _State:
    """What a worker needs: the map, the data, the reference outputs."""

    executor: ReferenceExecutor
    inputs: list[Batch]
    calib: list[Batch]
    exact: Outputs
    fp32: Outputs | None
    labels: np.ndarray | None


_STATE: _State | None = None


def _init_worker(mapname: str, mapsave_dir: str | None, inputs: list[Batch], calib: list[Batch], exact: Outputs,
                 fp32: Outputs | None, labels: np.ndarray | None) -> None:
    global _STATE
    with contextlib.suppress(ImportError):  # the environment already asked for one thread; make sure
        from threadpoolctl import threadpool_limits

        threadpool_limits(1)
    _STATE = _State(ReferenceExecutor.load(mapname, mapsave_dir), inputs, calib, exact, fp32, labels)
    logger.debug("cim-sweep worker %d ready", os.getpid())


def _run(executor: ReferenceExecutor, batches: list[Batch]) -> Outputs:
    runs = [executor.run(batch) for batch in batches]
    return {name: np.concatenate([np.asarray(r[name]) for r in runs]) if runs[0][name].ndim else
            np.stack([r[name] for r in runs]) for name in runs[0]}


def _class_scores(array: np.ndarray) -> bool:
    return array.ndim == 2 and array.shape[1] > 1


def _calibrate_task(rows: int, cell_bits: int, base: CIMSpec, adc_bits: list[int],
                    method: str) -> tuple[int, int, dict[int, MapCalibration], float]:
    state = _STATE
    assert state is not None
    started = time.perf_counter()
    spec = base.replace(rows=rows, cell_bits=cell_bits, adc_bits=None)
    histograms = collect_histograms(state.executor, state.calib, spec)
    calibrations = {bits: histograms.calibration(bits, method=method) for bits in adc_bits}
    return rows, cell_bits, calibrations, time.perf_counter() - started


def _evaluate_task(spec: CIMSpec, calibration: MapCalibration | None) -> tuple[CIMSpec, dict[str, Any],
                                                                                float | None, float]:
    state = _STATE
    assert state is not None
    started = time.perf_counter()
    outputs = _run(state.executor.with_cim(spec, calibration), state.inputs)
    metrics: dict[str, Any] = {}
    top1_labels = None
    for name, out in outputs.items():
        exact = state.exact[name]
        vs_int = compare(exact, out)
        entry: dict[str, Any] = {"vs_integer": {"top1": vs_int["top1"], "snr_db": vs_int["snr_db"],
                                                "equal": float(np.mean(out == exact)) if out.size else 1.0}}
        if state.fp32 is not None and name in state.fp32 and state.fp32[name].shape == out.shape:
            vs_fp = compare(state.fp32[name], out)
            entry["vs_fp32"] = {"top1": vs_fp["top1"], "snr_db": vs_fp["snr_db"]}
        else:
            entry["vs_fp32"] = None
        metrics[name] = entry
        if top1_labels is None and state.labels is not None and _class_scores(out):
            top1_labels = float(np.mean(out.argmax(axis=1) == state.labels))
    return spec, metrics, top1_labels, time.perf_counter() - started


# -- the sweep ------------------------------------------------------------------------------------------------
def _as_batches(data: Any, executor: ReferenceExecutor, what: str) -> list[Batch]:
    """Checked numpy batches (torch tensors converted) of a batch or an iterable of batches."""
    if isinstance(data, (Mapping, np.ndarray)) or hasattr(data, "detach"):
        data = [data]
    if isinstance(data, (str, bytes)) or not isinstance(data, Iterable):
        raise InvalidTypeError(f"{what}: got {type(data).__name__}, expected a batch (dict input name -> array, or an "
                               "array) or an iterable of batches")
    batches = [executor.check_inputs(batch) for batch in data]
    if not batches:
        raise InvalidArgumentError(f"{what}: holds no batch; expected at least one batch of the map's inputs")
    return batches


def _random_batches(mapname: str, mapsave_dir: str | os.PathLike | None, count: int, seed: int) -> list[Batch]:
    manifest = artifacts.read_manifest(artifacts.resolve_map(mapname, mapsave_dir))
    shapes = manifest["settings"]["input_shapes"]
    generator = np.random.default_rng(seed)
    return [{name: generator.standard_normal(shape).astype(np.float32) for name, shape in shapes.items()}
            for _ in range(count)]


def _fp32_outputs(mapname: str, mapsave_dir: str | os.PathLike | None, batches: list[Batch]) -> Outputs:
    """The float model's outputs (onnxruntime), the model being the one the manifest records."""
    import onnxruntime as ort

    from maptools.quantization.replay import float_model_path

    directory = artifacts.resolve_map(mapname, mapsave_dir)
    path = float_model_path(mapname, artifacts.read_manifest(directory), directory)
    options = ort.SessionOptions()
    options.log_severity_level = 3
    options.intra_op_num_threads = 1
    session = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
    names = [o.name for o in session.get_outputs()]
    runs = [dict(zip(names, session.run(names, batch), strict=True)) for batch in batches]
    return {name: np.concatenate([r[name] for r in runs]) for name in names}


@contextlib.contextmanager
def _one_blas_thread(enabled: bool) -> Iterator[None]:
    """Worker processes inherit one BLAS/OpenMP thread each (the environment is restored afterwards)."""
    saved = {name: os.environ.get(name) for name in _BLAS_ENV}
    if enabled:
        os.environ.update(dict.fromkeys(_BLAS_ENV, "1"))
    try:
        yield
    finally:
        for name, value in saved.items():
            if value is None:
                os.environ.pop(name, None)
            else:
                os.environ[name] = value


def cim_sweep(mapname: str, inputs: Any = None, *, calib: Any = None, labels: Sequence[int] | np.ndarray | None = None,
              adc_bits: Iterable[int] | str = range(4, 11), rows: Iterable[int] | str = (128, 256, 512),
              cell_bits: Iterable[int] | str = (1, 2, 4), dac_bits: int = 1, weight_encoding: str = "differential",
              requant: str = "float", method: str = "mse", jobs: int | None = None,
              mapsave_dir: str | os.PathLike | None = None, batches: int = DEFAULT_BATCHES,
              seed: int = 0) -> SweepResult:
    """Run a map on every crossbar of a grid, with calibrated and full-range ADCs, against FP32 and exact MACs.

    Args:
        mapname: The map.
        inputs: The evaluation data: a batch (dict input name -> array, or an array for a single-input map)
            or an iterable of batches; None for ``batches`` random standard-normal batches of the map's shapes.
        calib: The calibration data of the ADC ranges, like ``inputs``; None for ``inputs`` (in-sample) when
            given, else random batches (seed ``seed + 1``).
        labels: Class labels of the evaluation samples (in batch order), for the top-1 accuracy; optional.
        adc_bits: ADC widths (1..16): ints or a string like ``"4-10"``.
        rows: Crossbar rows: ints or ``"128,256,512"``.
        cell_bits: Bits per cell (1..8): ints or ``"1,2,4"``.
        dac_bits: Bits per DAC cycle (1..8).
        weight_encoding: ``'differential'`` or ``'offset'``.
        requant: The requantization of every point (``'float'``, ``'fixed_point'``, ``'power_of_two'``).
        method: ADC calibration method, ``'mse'`` or ``'percentile'``.
        jobs: Worker processes (default ``os.cpu_count()``); 1 runs in this process.
        mapsave_dir: The mapsave directory.
        batches: Random batches when ``inputs`` is None.
        seed: Seed of the random batches.

    Returns:
        Every point's metrics, the references, and what the data was.

    Raises:
        MapNotFoundError: no such map.
        InvalidArgumentError: a bad grid value, inputs the map does not take, labels of another length.
    """
    started = time.perf_counter()
    grid_bits = parse_int_list(adc_bits, "adc_bits", 1, 16)
    grid_rows = parse_int_list(rows, "rows", 1)
    grid_cells = parse_int_list(cell_bits, "cell_bits", 1, 8)
    base = CIMSpec(dac_bits=dac_bits, weight_encoding=weight_encoding, requant=requant)  # validates them
    if jobs is None:
        jobs = os.cpu_count() or 1
    if isinstance(jobs, bool) or not isinstance(jobs, int) or jobs < 1:
        raise InvalidArgumentError(f"jobs: got {jobs!r}, expected a positive integer")
    if isinstance(batches, bool) or not isinstance(batches, int) or batches < 1:
        raise InvalidArgumentError(f"batches: got {batches!r}, expected a positive integer")
    executor = ReferenceExecutor.load(mapname, mapsave_dir)
    if inputs is None:
        eval_batches = _random_batches(mapname, mapsave_dir, batches, seed)
        inputs_data = f"random ({batches} batches, seed {seed})"
    else:
        eval_batches = _as_batches(inputs, executor, "inputs")
        inputs_data = "inputs"
    if calib is not None:
        calib_batches, calibration_data = _as_batches(calib, executor, "calib"), "calib"
    elif inputs is not None:
        calib_batches, calibration_data = eval_batches, "inputs (in-sample)"
    else:
        calib_batches = _random_batches(mapname, mapsave_dir, batches, seed + 1)
        calibration_data = f"random ({batches} batches, seed {seed + 1}, held out)"
    exact = _run(executor, eval_batches)
    samples = int(next(iter(exact.values())).shape[0]) if exact else 0
    label_array = None
    if labels is not None:
        label_array = np.asarray(labels).reshape(-1)
        if label_array.size != samples:
            raise InvalidArgumentError(f"labels: {label_array.size} labels for {samples} evaluation samples")
    fp32, fp32_error = None, None
    try:
        fp32 = _fp32_outputs(mapname, mapsave_dir, eval_batches)
    except Exception as exc:  # the float model gone or unreadable: the integer comparisons still run
        fp32_error = f"{type(exc).__name__}: {' '.join(str(exc).split())}"
        logger.warning("cim-sweep %r: FP32 could not run: %s", mapname, fp32_error)
    reference: dict[str, Any] = {}
    for name, out in exact.items():
        if fp32 is not None and name in fp32 and fp32[name].shape == out.shape:
            m = compare(fp32[name], out)
            reference[name] = {"top1": m["top1"], "snr_db": m["snr_db"]}
    if label_array is not None:
        first = next((n for n, o in exact.items() if _class_scores(o)), None)
        if first is not None:
            reference["labels"] = {"integer": float(np.mean(exact[first].argmax(1) == label_array))}
            if fp32 is not None and first in fp32:
                reference["labels"]["fp32"] = float(np.mean(fp32[first].argmax(1) == label_array))

    state_args = (mapname, None if mapsave_dir is None else str(mapsave_dir), eval_batches, calib_batches, exact, fp32,
                  label_array)
    geometries = [(r, c) for r in grid_rows for c in grid_cells]
    logger.info("cim-sweep %r: %d crossbars x %d ADC widths x 2 ranges on %d samples, %d process(es)", mapname,
                len(geometries), len(grid_bits), samples, jobs)
    points: list[SweepPoint] = []

    def record(spec: CIMSpec, metrics: dict[str, Any], top1: float | None, seconds: float,
               calibration: MapCalibration | None) -> None:
        clipped = None
        if calibration is not None:
            values = list(calibration.clipped.values())
            clipped = float(np.mean(values)) if values else 0.0
        points.append(SweepPoint(spec.rows, spec.cell_bits, spec.dac_bits, spec.weight_encoding,
                                 int(spec.adc_bits or 0), spec.adc_range, str(spec), spec.lossless_adc_bits, metrics,
                                 top1, clipped, seconds))
        logger.info("cim-sweep %r: %s done in %.1f s", mapname, spec, seconds)

    def spec_of(r: int, c: int, bits: int, kind: str) -> CIMSpec:
        return base.replace(rows=r, cell_bits=c, adc_bits=bits, adc_range=kind)

    if jobs == 1:
        global _STATE
        saved = _STATE
        try:
            _STATE = _State(executor, eval_batches, calib_batches, exact, fp32, label_array)
            for r, c in geometries:
                _, _, calibrations, _ = _calibrate_task(r, c, base, grid_bits, method)
                for bits in grid_bits:
                    for kind in ADC_RANGE_KINDS:
                        cal = calibrations[bits] if kind == "calibrated" else None
                        spec, metrics, top1, seconds = _evaluate_task(spec_of(r, c, bits, kind), cal)
                        record(spec, metrics, top1, seconds, cal)
        finally:
            _STATE = saved
    else:
        import multiprocessing

        context = multiprocessing.get_context("spawn")  # no fork of a process holding BLAS threads
        with _one_blas_thread(True), ProcessPoolExecutor(max_workers=jobs, mp_context=context,
                                                         initializer=_init_worker, initargs=state_args) as pool:
            pending: dict[Future[Any], tuple[str, MapCalibration | None]] = {}
            for r, c in geometries:
                pending[pool.submit(_calibrate_task, r, c, base, grid_bits, method)] = ("calibrate", None)
                for bits in grid_bits:
                    pending[pool.submit(_evaluate_task, spec_of(r, c, bits, "full"), None)] = ("evaluate", None)
            while pending:
                done = next(as_completed(pending))
                kind, cal = pending.pop(done)
                if kind == "calibrate":
                    r, c, calibrations, _ = done.result()
                    for bits in grid_bits:
                        future = pool.submit(_evaluate_task, spec_of(r, c, bits, "calibrated"), calibrations[bits])
                        pending[future] = ("evaluate", calibrations[bits])
                else:
                    record(*done.result(), cal)
    order = {(r, c, b, k): i for i, (r, c, b, k) in enumerate(
        (r, c, b, k) for r, c in geometries for b in grid_bits for k in ADC_RANGE_KINDS)}
    points.sort(key=lambda p: order[(p.rows, p.cell_bits, p.adc_bits, p.adc_range)])
    return SweepResult(mapname=mapname, samples=samples, inputs_data=inputs_data, calibration_data=calibration_data,
                       method=method, reference=reference, fp32_error=fp32_error, points=points,
                       seconds=time.perf_counter() - started, jobs=jobs)


# -- command line ---------------------------------------------------------------------------------------------
def _folder_batches(folder: str, option: str, mapname: str, mapsave_dir: str | None, mean: Sequence[float],
                    std: Sequence[float]) -> list[Batch]:
    """The batches of a folder of .npy files or images, shaped as the map's (single) input."""
    from maptools.quantization import imagefolder_calibset, npy_calibset
    from maptools.quantization.verify import map_input_shapes

    shapes = map_input_shapes(mapname, mapsave_dir)
    path = Path(folder)
    if not path.is_dir():
        raise InvalidArgumentError(f"{option}: {folder!r} is not a directory; expected a folder of .npy files or "
                                   "images")
    if len(shapes) != 1:
        raise InvalidArgumentError(f"{option}: map {mapname!r} has {len(shapes)} inputs {list(shapes)}; a folder of "
                                   "inputs serves single-input maps only (from Python, pass cim_sweep(inputs=...))")
    data = npy_calibset(path, shapes) if any(path.glob("*.npy")) else imagefolder_calibset(path, shapes, mean=mean,
                                                                                           std=std)
    batches = [{name: np.asarray(value.numpy() if hasattr(value, "numpy") else value) for name, value in b.items()}
               for b in data]
    if not batches:
        raise InvalidArgumentError(f"{option}: {folder!r} holds less than one batch of the map's input shape "
                                   f"{next(iter(shapes.values()))}")
    return batches


def run_cli(args: Any) -> int:
    """``maptools cim-sweep``: the sweep of :func:`cim_sweep` from the parsed arguments; prints the tables.

    Returns:
        0 (errors raise :class:`~maptools.errors.MaptoolsError`, which the command line turns into exit code 2).
    """
    if args.out is not None and not Path(args.out).parent.is_dir():
        raise InvalidArgumentError(f"--out: the folder of {args.out!r} does not exist")
    if args.plot is not None and not Path(args.plot).parent.is_dir():
        raise InvalidArgumentError(f"--plot: the folder of {args.plot!r} does not exist")
    grid = {"adc_bits": parse_int_list(args.adc_bits, "--adc-bits", 1, 16),
            "rows": parse_int_list(args.rows, "--rows", 1),
            "cell_bits": parse_int_list(args.cell_bits, "--cell-bits", 1, 8)}
    artifacts.resolve_map(args.mapname, args.mapsave_dir)  # no such map: exit 2 before reading any folder
    inputs = calib = None
    if args.inputs is not None:
        inputs = _folder_batches(args.inputs, "--inputs", args.mapname, args.mapsave_dir, args.mean, args.std)
    if args.calib is not None:
        calib = _folder_batches(args.calib, "--calib", args.mapname, args.mapsave_dir, args.mean, args.std)
    result = cim_sweep(args.mapname, inputs, calib=calib, dac_bits=args.dac_bits, weight_encoding=args.encoding,
                       requant=args.requant, method=args.method, jobs=args.jobs, mapsave_dir=args.mapsave_dir,
                       batches=args.batches, seed=args.seed, **grid)
    print(result.table())
    if args.out is not None:
        print(f"wrote {result.save(args.out)}")
    if args.plot is not None:
        print(f"wrote {result.plot(args.plot)}")
    return 0
