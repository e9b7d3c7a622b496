"""Accuracy as a distribution over chips: :func:`monte_carlo` runs a map on N simulated chips of one device.

Each chip is the map's crossbars programmed anew (:mod:`~maptools.quantization.cim.analog`): chip ``i`` is
seeded with ``child_seed(seed, i)``, so its value depends on ``(seed, i)`` alone -- the same in any process,
for any number of worker processes (``jobs``) and in any order. The figure of a chip is ``metric(outputs)``;
:class:`Top1Agreement` and :class:`Top1Accuracy` are ready-made (picklable, for worker processes).
"""

from __future__ import annotations

import logging
import math
import os
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from maptools.errors import InvalidArgumentError, InvalidTypeError
from maptools.quantization.cim.analog import SeedLike, child_seed, seed_sequence
from maptools.quantization.cim.device import DeviceModel
from maptools.quantization.cim.spec import CIMSpec
from maptools.quantization.cimmap.pool import process_pool
from maptools.quantization.reference.executor import ReferenceExecutor

__all__ = ["PERCENTILES", "MonteCarloResult", "Top1Accuracy", "Top1Agreement", "chip_statistics", "monte_carlo"]

logger = logging.getLogger(__name__)

Outputs = dict[str, np.ndarray]
#: The percentiles :class:`MonteCarloResult` reports.
PERCENTILES: tuple[float, ...] = (5.0, 50.0, 95.0)


def chip_statistics(values: np.ndarray, higher_is_better: bool = True) -> tuple[float, float, float]:
    """``(mean, std, worst)`` of one figure over chips: std with ``ddof=1`` (0 for one chip)."""
    std = float(np.std(values, ddof=1)) if values.size > 1 else 0.0
    worst = float(np.min(values) if higher_is_better else np.max(values))
    return float(np.mean(values)), std, worst


def _first_scores(outputs: Outputs, name: str | None) -> np.ndarray:
    if name is None:
        name = next(iter(outputs))
    if name not in outputs:
        raise InvalidArgumentError(f"metric output: got {name!r}, expected one of {sorted(outputs)}")
    scores = np.asarray(outputs[name])
    return scores.reshape(scores.shape[0], -1)


@dataclass(frozen=True)
class Top1Agreement:
    """The fraction of samples whose top-1 class equals the reference's (e.g. the exact executor's outputs).

    Attributes:
        reference: Class scores ``(N, classes)`` of the reference.
        output: The graph output compared (None: the first).
    """

    reference: np.ndarray
    output: str | None = None

    def __call__(self, outputs: Outputs) -> float:
        """The agreement of one chip's outputs."""
        scores = _first_scores(outputs, self.output)
        reference = np.asarray(self.reference).reshape(scores.shape[0], -1)
        return float(np.mean(scores.argmax(1) == reference.argmax(1)))


@dataclass(frozen=True)
class Top1Accuracy:
    """The fraction of samples whose top-1 class is the label.

    Attributes:
        labels: One integer label per sample.
        output: The graph output scored (None: the first).
    """

    labels: np.ndarray
    output: str | None = None

    def __call__(self, outputs: Outputs) -> float:
        """The top-1 accuracy of one chip's outputs."""
        return float(np.mean(_first_scores(outputs, self.output).argmax(1) == np.asarray(self.labels).reshape(-1)))


@dataclass(frozen=True)
class MonteCarloResult:
    """The figure of every chip and its distribution.

    Attributes:
        values: ``metric`` of chip ``0 .. N-1``, in chip order.
        spec: The crossbar.
        device: The device model.
        seed: The seed's entropy and spawn key (chip ``i`` is ``child_seed(seed, i)``).
        higher_is_better: Whether the worst chip is the lowest value (else the highest).
        jobs: Worker processes used.
        seconds: Wall time.
    """

    values: np.ndarray
    spec: CIMSpec
    device: DeviceModel
    seed: dict[str, Any]
    higher_is_better: bool = True
    jobs: int = 1
    seconds: float = 0.0
    percentile_levels: tuple[float, ...] = field(default=PERCENTILES)

    @property
    def mean(self) -> float:
        """Mean over chips."""
        return chip_statistics(self.values, self.higher_is_better)[0]

    @property
    def std(self) -> float:
        """Standard deviation over chips (``ddof=1``; 0 for one chip)."""
        return chip_statistics(self.values, self.higher_is_better)[1]

    @property
    def worst(self) -> float:
        """The worst chip's value."""
        return chip_statistics(self.values, self.higher_is_better)[2]

    @property
    def percentiles(self) -> dict[float, float]:
        """Percentile -> value (linear interpolation), for :data:`PERCENTILES`."""
        return {p: float(np.percentile(self.values, p)) for p in self.percentile_levels}

    def to_dict(self) -> dict[str, Any]:
        """JSON-serializable: the values, their statistics, spec, device and seed."""
        return {"chips": int(self.values.size), "values": self.values.tolist(), "mean": self.mean, "std": self.std,
                "worst": self.worst, "percentiles": {str(k): v for k, v in self.percentiles.items()},
                "higher_is_better": self.higher_is_better, "spec": self.spec.to_dict(),
                "device": self.device.to_dict(), "seed": self.seed, "jobs": self.jobs, "seconds": self.seconds}

    def __str__(self) -> str:
        pct = ", ".join(f"p{p:g} {v:.4g}" for p, v in self.percentiles.items())
        return (f"{self.values.size} chips: mean {self.mean:.4g}, std {self.std:.4g}, worst {self.worst:.4g} "
                f"({pct})")


def _batches(inputs: Any) -> list[Any]:
    if isinstance(inputs, list | tuple):
        if not inputs:
            raise InvalidArgumentError("inputs: got an empty list, expected a batch or a list of batches")
        return list(inputs)
    return [inputs]


def _chip(base: ReferenceExecutor, device: DeviceModel, seed: SeedLike, static: bool | str) -> ReferenceExecutor:
    """A new chip of ``base``'s crossbar: numpy's analog cells, or torch's static ones (``static``)."""
    assert base.cim is not None
    if not static:
        return base.with_cim(base.cim.spec, base.cim.adc, device=device, seed=seed)
    from maptools.quantization.cimmap.staticchip import StaticChipBackend  # imports torch

    return base.with_backend(StaticChipBackend(base.cim.spec, base.cim.adc, device=device, seed=seed,
                                               compiled=static == "compiled"))


def _run_chip(base: ReferenceExecutor, batches: list[Any], device: DeviceModel, seed: np.random.SeedSequence,
              chip: int, metric: Callable[[Outputs], float], static: bool | str = False) -> float:
    """``metric`` of chip ``chip``: a new chip of ``base``'s crossbar, run on every batch in order."""
    executor = _chip(base, device, child_seed(seed, chip), static)
    runs = [executor.run(batch) for batch in batches]
    outputs = {name: np.concatenate([np.asarray(r[name]).reshape(np.shape(r[name]) or (1,)) for r in runs])
               for name in runs[0]}
    value = metric(outputs)
    if isinstance(value, bool) or not isinstance(value, int | float | np.integer | np.floating):
        raise InvalidTypeError(f"metric: returned {type(value).__name__}, expected a number")
    return float(value)


_WORKER: tuple[ReferenceExecutor, list[Any], DeviceModel, np.random.SeedSequence, Callable[[Outputs], float],
               bool | str] | None = None


def _init_worker(mapname: str, mapsave_dir: str | None, cim: CIMSpec | bool, adc: Any, batches: list[Any],
                 device: DeviceModel, seed: np.random.SeedSequence, metric: Callable[[Outputs], float],
                 static: bool | str = False) -> None:
    global _WORKER
    _WORKER = (ReferenceExecutor.load(mapname, mapsave_dir, cim=cim, adc=adc), batches, device, seed, metric, static)


def _worker_chip(chip: int) -> float:
    assert _WORKER is not None
    base, batches, device, seed, metric, static = _WORKER
    return _run_chip(base, batches, device, seed, chip, metric, static)


def monte_carlo(mapname: str | ReferenceExecutor, inputs: Any, *, cim: CIMSpec | bool, device: DeviceModel,
                chips: int, metric: Callable[[Outputs], float], seed: SeedLike = 0,
                adc: Any = None, higher_is_better: bool = True, jobs: int = 1,
                mapsave_dir: str | os.PathLike[str] | None = None, static: bool | str = False) -> MonteCarloResult:
    """Run a map on ``chips`` simulated chips of ``device`` and return the distribution of ``metric``.

    Args:
        mapname: The map, or a loaded :class:`~maptools.quantization.reference.ReferenceExecutor` (``jobs=1``
            only: worker processes load the map by name).
        inputs: One batch (an array or a dict input name -> array) or a list of batches; every chip runs all.
        cim: The crossbar (a CIMSpec), or True for the map's own spec and ADC calibration.
        device: The device model.
        chips: Number of chips, >= 1.
        metric: ``outputs -> float`` of one chip (outputs concatenated over the batches), e.g.
            :class:`Top1Agreement`; must be picklable for ``jobs > 1``.
        seed: The seed (an int or a SeedSequence); chip ``i`` uses ``child_seed(seed, i)``.
        adc: The ADC calibration of a calibrated spec (as :func:`~maptools.quantization.simulate`).
        higher_is_better: Whether a lower value is worse (for :attr:`MonteCarloResult.worst`).
        jobs: Worker processes (1: this process); the values do not depend on it.
        mapsave_dir: The mapsave directory.
        static: True: simulate each chip's static cells in torch
            (:class:`~maptools.quantization.cimmap.staticchip.StaticChipBackend`: the same chips, faster; the
            device must have no read noise); ``'compiled'``: the same with its ADC fused by ``torch.compile``
            (needs a C++ compiler).

    Raises:
        InvalidTypeError: a wrong type of ``device``, ``metric``, ``seed`` or ``mapname``.
        InvalidArgumentError: ``chips`` or ``jobs`` below 1, ``cim`` None, ``jobs > 1`` with an executor, or
            anything :func:`~maptools.quantization.simulate` refuses.
    """
    started = time.perf_counter()
    for name, value in (("chips", chips), ("jobs", jobs)):
        if isinstance(value, bool) or not isinstance(value, int | np.integer) or value < 1:
            raise InvalidArgumentError(f"{name}: got {value!r}, expected an integer >= 1")
    if not isinstance(device, DeviceModel):
        raise InvalidTypeError(f"device: got {type(device).__name__}, expected a DeviceModel")
    if not callable(metric):
        raise InvalidTypeError(f"metric: got {type(metric).__name__}, expected a callable outputs -> float")
    if cim is None or cim is False:
        raise InvalidArgumentError(f"cim: got {cim!r}, expected a CIMSpec or True (the map's own)")
    seq = seed_sequence(seed)
    batches = _batches(inputs)
    if isinstance(mapname, ReferenceExecutor):
        if jobs > 1:
            raise InvalidArgumentError(f"jobs: got {jobs} with a loaded executor, expected 1 (worker processes load "
                                       "the map by its name: pass mapname)")
        if cim is True:
            raise InvalidArgumentError("cim: True needs a map name (the spec is read from the map), got an executor")
        base = mapname.with_cim(cim, adc)
    elif isinstance(mapname, str):
        base = ReferenceExecutor.load(mapname, mapsave_dir, cim=cim, adc=adc)
    else:
        raise InvalidTypeError(f"mapname: got {type(mapname).__name__}, expected a map name or a ReferenceExecutor")
    assert base.cim is not None
    if not (isinstance(static, bool) or static == "compiled"):
        raise InvalidArgumentError(f"static: got {static!r}, expected False, True or 'compiled'")
    _chip(base, device, seq, static)  # checks the device against the cells (and its read noise when static)
    jobs = min(int(jobs), int(chips))
    if jobs == 1:
        values = [_run_chip(base, batches, device, seq, i, metric, static) for i in range(chips)]
    else:
        directory = None if mapsave_dir is None else str(mapsave_dir)
        with process_pool(jobs, _init_worker, (mapname, directory, cim, adc, batches, device, seq, metric,
                                                             static)) as pool:
            values = list(pool.map(_worker_chip, range(chips)))
    result = MonteCarloResult(np.asarray(values, dtype=np.float64), base.cim.spec, device,
                              {"entropy": seq.entropy, "spawn_key": list(seq.spawn_key)}, higher_is_better, jobs,
                              time.perf_counter() - started)
    logger.info("monte_carlo: %s in %.1f s (%d process(es))", result, result.seconds, jobs)
    if not math.isfinite(result.mean):
        logger.warning("monte_carlo: the metric is not finite on every chip: %s", values)
    return result
