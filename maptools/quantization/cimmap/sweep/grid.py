"""The grid runner: :func:`cim_sweep` runs a map on every crossbar of a grid.

See :mod:`~maptools.quantization.cimmap.sweep` for what is measured and on which data.
"""

from __future__ import annotations

import logging
import os
import time
from collections.abc import Iterable, Mapping, Sequence
from concurrent.futures import Future, as_completed
from pathlib import Path
from typing import Any

import numpy as np

from maptools.errors import FloatModelMissingError, InvalidArgumentError, InvalidTypeError
from maptools.quantization import artifacts
from maptools.quantization.artifacts import QUANTINFO, QUANTMODEL, QUANTPARAMS, MapContents
from maptools.quantization.cim.analog import seed_sequence
from maptools.quantization.cim.device import DeviceModel
from maptools.quantization.cim.mapcalibration import MapCalibration
from maptools.quantization.cim.spec import INT_RANGES, CIMSpec
from maptools.quantization.cimmap.cluster import task_pool
from maptools.quantization.cimmap.sweep import worker
from maptools.quantization.cimmap.sweep.result import ADC_RANGE_KINDS, SweepPoint, SweepResult
from maptools.quantization.cimmap.sweep.worker import (
    Batch,
    Outputs,
    _calibrate_task,
    _chips_task,
    _class_scores,
    _evaluate_task,
    _init_worker,
    _run,
    _State,
)
from maptools.quantization.reference.executor import ReferenceExecutor
from maptools.quantization.replay import float_model_path
from maptools.quantization.validation import MAX_THREADS, check_batches, check_jobs, check_positive_int, check_seed
from maptools.quantization.verify import compare

__all__ = ["cim_sweep", "parse_float_list", "parse_int_list"]

logger = logging.getLogger("maptools.quantization.cimmap.sweep")

#: Random batches when no inputs are given.
DEFAULT_BATCHES = 2
def parse_int_list(text: str | Iterable[int], what: str, low: int = 1, high: int | None = None) -> list[int]:
    """Integers from ``"4-10"``, ``"128,256,512"``, ``"3-5,8"`` or an iterable of ints, sorted and unique.

    Raises:
        InvalidArgumentError: Not such a list, or a value outside ``low .. high`` (a range's ends are checked
            before it is expanded).
    """
    bound = f"{low}..{high}" if high is not None else f">= {low}"

    def inside(value: int) -> bool:
        return value >= low and (high is None or value <= high)

    if isinstance(text, str):
        try:
            spans = [tuple(int(v) for v in part.strip().split("-", 1)) for part in text.split(",")]
        except ValueError:
            raise InvalidArgumentError(f"{what}: expected integers like 4-10 or 128,256,512, got {text!r}") from None
        if not all(inside(v) for span in spans for v in span):  # before a range is expanded
            raise InvalidArgumentError(f"{what}: expected integers in {bound}, got {text!r}")
        values = [v for span in spans for v in range(span[0], span[-1] + 1)]
    else:
        try:
            values = [int(v) for v in text]
        except (TypeError, ValueError):
            raise InvalidArgumentError(f"{what}: expected integers, got {text!r}") from None
    if not values or not all(inside(v) for v in values):
        raise InvalidArgumentError(f"{what}: expected integers in {bound}, got {text!r}")
    return sorted(set(values))


def parse_float_list(text: str | Iterable[float], what: str, low: float = 0.0) -> list[float]:
    """Numbers from ``"0,0.02,0.05"`` or an iterable of numbers, each finite and ``>= low``, sorted and unique.

    Raises:
        InvalidArgumentError: Not such a list, or a value below ``low``.
    """
    try:
        values = [float(v) for v in (text.split(",") if isinstance(text, str) else text)]
    except (TypeError, ValueError):
        raise InvalidArgumentError(f"{what}: expected numbers like 0,0.02,0.05, got {text!r}") from None
    if not values or not all(np.isfinite(v) and v >= low for v in values):
        raise InvalidArgumentError(f"{what}: expected finite numbers >= {low:g}, got {text!r}")
    return sorted(set(values))


def _device_grid(device: DeviceModel | None, prog_error: Iterable[float] | str | None,
                 drift_time: Iterable[float] | str | None) -> list[DeviceModel]:
    """The devices of the grid: ``device`` (default ``DeviceModel()``) at every programming error and time."""
    if device is None and prog_error is None and drift_time is None:
        return []
    if device is None:
        device = DeviceModel()
    elif not isinstance(device, DeviceModel):
        raise InvalidTypeError(f"device: got {type(device).__name__}, expected None or a DeviceModel")
    errors = [device.prog_sigma_rel] if prog_error is None else parse_float_list(prog_error, "prog_error")
    times = [device.time] if drift_time is None else parse_float_list(drift_time, "drift_time")
    if drift_time is not None and not any(v != 0 for name in ("drift_nu", "drift_nu_std")
                                          for v in np.atleast_1d(getattr(device, name))):
        raise InvalidArgumentError(f"drift_time: got {drift_time!r} for a device without drift (drift_nu 0); pass "
                                   "device=DeviceModel(drift_nu=...) (--drift-nu)")
    return [device.replace(prog_sigma_rel=p, time=t) for p in errors for t in times]


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


def _random_batches(shapes: Mapping[str, Sequence[int]], count: int, seed: int) -> list[Batch]:
    generator = np.random.default_rng(seed)
    return [{name: generator.standard_normal(shape).astype(np.float32) for name, shape in shapes.items()}
            for _ in range(count)]


def _fp32_outputs(path: Path, batches: list[Batch]) -> Outputs:
    """The float model's outputs (onnxruntime), the model being the one the manifest records (checked)."""
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.log_severity_level = 3
    options.intra_op_num_threads = 1
    session = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
    names = [o.name for o in session.get_outputs()]
    runs = [dict(zip(names, session.run(names, batch), strict=True)) for batch in batches]
    return {name: np.concatenate([r[name] for r in runs]) for name in names}


def _reason(exc: BaseException) -> str:
    return f"{type(exc).__name__}: {' '.join(str(exc).split())}"


def cim_sweep(mapname: str | MapContents, inputs: Any = None, *, calib: Any = None,
              labels: Sequence[int] | np.ndarray | None = None,
              adc_bits: Iterable[int] | str = range(4, 11), rows: Iterable[int] | str = (128, 256, 512),
              cell_bits: Iterable[int] | str = (1, 2, 4), dac_bits: int = 1, weight_encoding: str = "differential",
              requant: str = "float", method: str = "mse", jobs: int | None = None,
              mapsave_dir: str | os.PathLike | None = None, batches: int = DEFAULT_BATCHES,
              seed: int = 0, device: DeviceModel | None = None, prog_error: Iterable[float] | str | None = None,
              drift_time: Iterable[float] | str | None = None, chips: int = 8, cluster: Any = None) -> SweepResult:
    """Run a map on every crossbar of a grid, with calibrated and full-range ADCs, against FP32 and exact MACs.

    Args:
        mapname: The map, or the map already read (:func:`~maptools.quantization.read_map`): every file of the
            sweep comes from that one snapshot.
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
        seed: Seed of the random batches, and of the chips: chip ``i`` of every device point is
            ``child_seed(seed, i)`` (:func:`~maptools.quantization.cimmap.monte_carlo`'s chips).
        device: The analog cells (:class:`~maptools.quantization.cim.device.DeviceModel`); with it, or with
            ``prog_error`` or ``drift_time``, every grid point runs on ``chips`` chips of every device.
        prog_error: Device axis: values of the device's ``prog_sigma_rel`` (ints, floats or ``"0,0.02"``).
        drift_time: Device axis: values of the device's ``time``, seconds since programming (the device needs
            a ``drift_nu``).
        chips: Chips per device point (>= 1).
        cluster: None for the local process pool; a Dask scheduler address (``'tcp://host:port'``) or a
            ``distributed.LocalCluster`` to run the points there, with the same results
            (:func:`~maptools.quantization.cimmap.cluster.task_pool`).

    Returns:
        Every point's metrics, the references, and what the data was.

    Raises:
        MapNotFoundError: no such map.
        ArtifactError: a file of the map is missing, modified or malformed, or the float model it records is
            there but unsafe to read (not a regular file, too large, external data outside its folder): raised
            before anything runs. A float model moved away or changed only leaves out the FP32 reference.
        InvalidArgumentError: a bad grid value, inputs the map does not take, labels of another length.
    """
    started = time.perf_counter()
    grid_bits = parse_int_list(adc_bits, "adc_bits", *INT_RANGES["adc_bits"])
    grid_rows = parse_int_list(rows, "rows", *INT_RANGES["rows"])
    grid_cells = parse_int_list(cell_bits, "cell_bits", *INT_RANGES["cell_bits"])
    base = CIMSpec(dac_bits=dac_bits, weight_encoding=weight_encoding, requant=requant)  # validates them
    if jobs is None:
        jobs = min(os.cpu_count() or 1, MAX_THREADS)
    jobs = check_jobs(jobs)
    batches = check_batches(batches, "batches")
    seed = check_seed(seed)
    devices = _device_grid(device, prog_error, drift_time)
    if devices:
        chips = check_positive_int(chips, "chips")
        for cells in grid_cells:
            devices[0].check(cells)
    contents = artifacts.map_contents(mapname, mapsave_dir)
    mapname = contents.mapname
    shapes = contents.manifest["settings"]["input_shapes"]
    fp32_error = None
    try:  # a crafted model (a FIFO, a device, too large...) raises here, before anything runs
        model_path: Path | None = float_model_path(mapname, contents.manifest, contents.directory)
    except FloatModelMissingError as exc:  # moved away or changed: no FP32 reference, the rest runs
        model_path, fp32_error = None, _reason(exc)
    files = {name: contents.files[name] for name in (QUANTMODEL, QUANTINFO, QUANTPARAMS)}
    executor = ReferenceExecutor.from_files(mapname, files)
    if inputs is None:
        eval_batches = _random_batches(shapes, batches, seed)
        inputs_data = f"random ({batches} batches, seed {seed})"
    else:
        eval_batches = _as_batches(inputs, executor, "inputs")
        inputs_data = "inputs"
    if calib is not None:
        calib_batches, calibration_data = _as_batches(calib, executor, "calib"), "calib"
    elif inputs is not None:
        calib_batches, calibration_data = eval_batches, "inputs (in-sample)"
    else:
        calib_batches = _random_batches(shapes, batches, seed + 1)
        calibration_data = f"random ({batches} batches, seed {seed + 1}, held out)"
    exact = _run(executor, eval_batches)
    samples = int(next(iter(exact.values())).shape[0]) if exact else 0
    label_array = None
    if labels is not None:
        label_array = np.asarray(labels).reshape(-1)
        if label_array.size != samples:
            raise InvalidArgumentError(f"labels: {label_array.size} labels for {samples} evaluation samples")
    fp32 = None
    try:
        if model_path is not None:
            fp32 = _fp32_outputs(model_path, eval_batches)
    except Exception as exc:  # onnxruntime refused the float model: the integer comparisons still run
        fp32_error = _reason(exc)
    if fp32_error is not None:
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

    state_args = (mapname, files, eval_batches, calib_batches, exact, fp32, label_array)
    geometries = [(r, c) for r in grid_rows for c in grid_cells]
    logger.info("cim-sweep %r: %d crossbars x %d ADC widths x 2 ranges on %d samples, %d process(es)", mapname,
                len(geometries), len(grid_bits), samples, jobs)
    points: list[SweepPoint] = []
    chip_seed = seed_sequence(seed)
    # the device points: None (exact cells) without a device grid, else the index of every device
    device_keys: list[int | None] = list(range(len(devices))) if devices else [None]

    def record(spec: CIMSpec, metrics: Any, top1: Any, seconds: float, calibration: MapCalibration | None,
               index: int | None) -> None:
        clipped = None
        if calibration is not None:
            values = list(calibration.clipped.values())
            clipped = float(np.mean(values)) if values else 0.0
        point = SweepPoint(spec.rows, spec.cell_bits, spec.dac_bits, spec.weight_encoding, int(spec.adc_bits or 0),
                           spec.adc_range, str(spec), spec.lossless_adc_bits, metrics, top1, clipped, seconds)
        if index is not None:
            point = SweepPoint.over_chips(point, devices[index].to_dict(), index, metrics, top1)
        points.append(point)
        logger.info("cim-sweep %r: %s%s done in %.1f s", mapname, spec,
                    "" if index is None else f" on {chips} chips of device {index}", seconds)

    def spec_of(r: int, c: int, bits: int, kind: str) -> CIMSpec:
        return base.replace(rows=r, cell_bits=c, adc_bits=bits, adc_range=kind)

    def task(spec: CIMSpec, cal: MapCalibration | None, index: int | None) -> tuple[Any, ...]:
        if index is None:
            return (_evaluate_task, spec, cal)
        return (_chips_task, spec, cal, devices[index], chips, chip_seed)

    if jobs == 1 and cluster is None:
        saved = worker._STATE
        try:
            worker._STATE = _State(executor, eval_batches, calib_batches, exact, fp32, label_array)
            for r, c in geometries:
                _, _, calibrations, _ = _calibrate_task(r, c, base, grid_bits, method)
                for bits in grid_bits:
                    for kind in ADC_RANGE_KINDS:
                        cal = calibrations[bits] if kind == "calibrated" else None
                        for index in device_keys:
                            function, *args = task(spec_of(r, c, bits, kind), cal, index)
                            record(*function(*args), cal, index)
        finally:
            worker._STATE = saved
    else:
        with task_pool(jobs, _init_worker, state_args, cluster) as pool:
            pending: dict[Future[Any], tuple[str, MapCalibration | None, int | None]] = {}
            for r, c in geometries:
                pending[pool.submit(_calibrate_task, r, c, base, grid_bits, method)] = ("calibrate", None, None)
                for bits in grid_bits:
                    for index in device_keys:
                        future = pool.submit(*task(spec_of(r, c, bits, "full"), None, index))
                        pending[future] = ("evaluate", None, index)
            while pending:
                done = next(as_completed(pending))
                kind, cal, index = pending.pop(done)
                if kind == "calibrate":
                    r, c, calibrations, _ = done.result()
                    for bits in grid_bits:
                        for index in device_keys:
                            future = pool.submit(*task(spec_of(r, c, bits, "calibrated"), calibrations[bits], index))
                            pending[future] = ("evaluate", calibrations[bits], index)
                else:
                    record(*done.result(), cal, index)
    order = {key: i for i, key in enumerate(
        (r, c, b, k, d) for r, c in geometries for b in grid_bits for k in ADC_RANGE_KINDS for d in device_keys)}
    points.sort(key=lambda p: order[(p.rows, p.cell_bits, p.adc_bits, p.adc_range, p.device_index)])
    return SweepResult(mapname=mapname, samples=samples, inputs_data=inputs_data, calibration_data=calibration_data,
                       method=method, reference=reference, fp32_error=fp32_error, points=points,
                       seconds=time.perf_counter() - started, jobs=jobs,
                       devices=[d.to_dict() for d in devices] if devices else None,
                       chips=chips if devices else None)
