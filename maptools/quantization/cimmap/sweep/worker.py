"""The work of one process of a sweep: calibrating one crossbar geometry and evaluating one grid point.

The state (the map, the data, the reference outputs) is set once per worker process by :func:`_init_worker`
(or by :func:`~maptools.quantization.cimmap.sweep.grid.cim_sweep` itself with ``jobs=1``).
"""

from __future__ import annotations

import contextlib
import logging
import os
import time
from dataclasses import dataclass
from typing import Any

import numpy as np

from maptools.quantization.cim.analog import child_seed
from maptools.quantization.cim.device import DeviceModel
from maptools.quantization.cim.mapcalibration import MapCalibration
from maptools.quantization.cim.spec import CIMSpec
from maptools.quantization.cimmap.mapcal import collect_histograms
from maptools.quantization.reference.executor import ReferenceExecutor
from maptools.quantization.verify import compare

logger = logging.getLogger("maptools.quantization.cimmap.sweep")

Batch = dict[str, np.ndarray]
Outputs = dict[str, np.ndarray]


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


def _init_worker(mapname: str, files: dict[str, bytes], inputs: list[Batch], calib: list[Batch], exact: Outputs,
                 fp32: Outputs | None, labels: np.ndarray | None) -> None:
    global _STATE
    with contextlib.suppress(ImportError):  # the environment already asked for one thread; make sure
        from threadpoolctl import threadpool_limits

        threadpool_limits(1)
    # the files the parent read as one snapshot: every worker runs the same map
    _STATE = _State(ReferenceExecutor.from_files(mapname, files), inputs, calib, exact, fp32, labels)
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


def _metrics(outputs: Outputs) -> tuple[dict[str, Any], float | None]:
    """Every output against the exact integer executor and FP32, and the top-1 accuracy against the labels."""
    state = _STATE
    assert state is not None
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
    return metrics, top1_labels


def _evaluate_task(spec: CIMSpec, calibration: MapCalibration | None) -> tuple[CIMSpec, dict[str, Any],
                                                                                float | None, float]:
    state = _STATE
    assert state is not None
    started = time.perf_counter()
    metrics, top1_labels = _metrics(_run(state.executor.with_cim(spec, calibration), state.inputs))
    return spec, metrics, top1_labels, time.perf_counter() - started


def _chips_task(spec: CIMSpec, calibration: MapCalibration | None, device: DeviceModel, chips: int,
                seed: np.random.SeedSequence) -> tuple[CIMSpec, list[dict[str, Any]], list[float | None], float]:
    """One grid point on ``chips`` chips of ``device``: chip ``i`` seeded ``child_seed(seed, i)``."""
    state = _STATE
    assert state is not None
    started = time.perf_counter()
    outputs, labels = [], []
    for chip in range(chips):
        executor = state.executor.with_cim(spec, calibration, device=device, seed=child_seed(seed, chip))
        metrics, top1_labels = _metrics(_run(executor, state.inputs))
        outputs.append(metrics)
        labels.append(top1_labels)
    return spec, outputs, labels, time.perf_counter() - started
