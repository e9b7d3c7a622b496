"""The mixed-precision search: :func:`search` measures, walks, measures the walk's points and picks one.

1. Every uniform candidate ``W{w}A{a}`` of the chip's allowed set is quantized once, with PPQ's layer-wise
   analysis on held-out data: each crossbar MAC's sensitivity and its crossbar cost at that candidate.
2. The greedy walk of :mod:`~maptools.quantization.search.front` orders the assignments by predicted cost.
3. ``points`` assignments spread along the walk, and the first one whose predicted ADC conversions fit the
   budget, are quantized and measured for real (figure on held-out data, cost from the map).
4. The chosen point (the best measured figure within the budget) is quantized into ``mapname`` and measured
   again: its figure must be the one the search reported.

Every measurement goes through a content-hashed cache (:mod:`~maptools.quantization.search.cache`), and runs on
the local process pool or a Dask cluster (:func:`~maptools.quantization.cimmap.cluster.task_pool`).
"""

from __future__ import annotations

import hashlib
import itertools
import json
import logging
import os
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from concurrent.futures import Future, as_completed
from pathlib import Path
from typing import Any

import numpy as np

from maptools.errors import InvalidArgumentError, InvalidTypeError, ModelNotFoundError
from maptools.quantization.cim.cost import CIMCostParams
from maptools.quantization.cim.spec import CIMSpec
from maptools.quantization.cimmap.cluster import task_pool
from maptools.quantization.search import evaluate
from maptools.quantization.search.cache import PointCache, data_digest, default_cache_dir
from maptools.quantization.search.front import Candidate, greedy_walk, pareto, predicted, spread
from maptools.quantization.search.result import SearchResult, candidate_label
from maptools.quantization.validation import MAX_THREADS, check_jobs

__all__ = ["DEFAULT_ACTIVATION_BITS", "DEFAULT_LAYERWISE_BATCHES", "DEFAULT_SPEC", "DEFAULT_WEIGHT_BITS", "search"]

logger = logging.getLogger(__name__)

#: The chip's allowed weight and activation bits by default.
DEFAULT_WEIGHT_BITS: tuple[int, ...] = (2, 4, 6, 8)
DEFAULT_ACTIVATION_BITS: tuple[int, ...] = (4, 8)
#: Held-out batches the sensitivities are accumulated over by default (docs/search.rst, "The proxy").
DEFAULT_LAYERWISE_BATCHES = 8
#: How the noise of the operators between MACs is booked (:func:`~.evaluate.chain_noise`); part of a
#: sensitivity's cache key, so a change of it measures the sensitivities again.
ATTRIBUTION = "chains shared by readers and producers"
#: The crossbar costed by default: 256-row arrays of 2-bit cells, 8-bit ADCs.
DEFAULT_SPEC = CIMSpec(rows=256, cell_bits=2, adc_bits=8)
#: The costs the walk can lower.
OBJECTIVES = ("adc_conversions", "energy_j")
#: The quantize options a search passes on (the rest are the search's own).
QUANTIZE_OPTIONS = ("recipe", "observer", "seed", "symmetrical", "per_channel", "rounding")

Progress = Callable[[int, int, str], None]


def _bits(values: Iterable[int], what: str) -> list[int]:
    try:
        bits = sorted({int(v) for v in values})
    except (TypeError, ValueError):
        raise InvalidArgumentError(f"{what}: got {values!r}, expected integers in 2..8") from None
    if not bits or any(b < 2 or b > 8 for b in bits):
        raise InvalidArgumentError(f"{what}: got {values!r}, expected integers in 2..8")
    return bits


def _batches(data: Any, shapes: Mapping[str, Sequence[int]], what: str) -> list[evaluate.Batch]:
    """Numpy batches (torch tensors converted, a bare array for a single-input model) of the input names."""
    if data is None or isinstance(data, (str, bytes)) or not isinstance(data, Iterable):
        raise InvalidTypeError(f"{what}: got {type(data).__name__}, expected a list of batches (dict input name -> "
                               "array, or an array for a single-input model)")
    names = list(shapes)
    batches = []
    for batch in data:
        if not isinstance(batch, Mapping):
            if len(names) != 1:
                raise InvalidArgumentError(f"{what}: a bare array for a model of inputs {names}; expected dicts")
            batch = {names[0]: batch}
        if set(batch) != set(names):
            raise InvalidArgumentError(f"{what}: a batch of inputs {sorted(batch)}, expected {sorted(names)}")
        batches.append({name: np.ascontiguousarray(np.asarray(value.numpy() if hasattr(value, "numpy") else value,
                                                              dtype=np.float32)) for name, value in batch.items()})
    if not batches:
        raise InvalidArgumentError(f"{what}: holds no batch; expected at least one")
    return batches


def _metric_name(metric: evaluate.Metric) -> str:
    return f"{getattr(metric, '__module__', '?')}.{getattr(metric, '__qualname__', repr(metric))}"


def _run_tasks(tasks: list[dict[str, Any]], cache: PointCache, initargs: tuple[Any, ...], jobs: int, cluster: Any,
               progress: Progress | None, stage: str) -> list[dict[str, Any]]:
    """Each task's measurement: from the cache, else measured (in this process, the pool or the cluster) and cached.

    A measurement is stored as soon as it arrives, so an interrupted run keeps every point it finished.
    """
    results: list[dict[str, Any] | None] = [cache.get(task) for task in tasks]
    todo = [i for i, r in enumerate(results) if r is None]
    done = len(tasks) - len(todo)
    if done:
        logger.info("search %s: %d of %d points from the cache", stage, done, len(tasks))

    def store(index: int, measured: dict[str, Any]) -> None:
        nonlocal done
        # the form a cached point is read back in (keys sorted), so a fresh and a resumed search list (and walk)
        # the layers in the same order
        measured = json.loads(json.dumps(measured, sort_keys=True))
        cache.put(tasks[index], measured)
        results[index] = measured
        done += 1
        logger.info("search %s: %d/%d points (%s)", stage, done, len(tasks), tasks[index]["label"])
        if progress is not None:
            progress(done, len(tasks), stage)

    def args(task: dict[str, Any]) -> tuple[Any, ...]:
        layer_bits = None if task["layer_bits"] is None else {n: tuple(c) for n, c in task["layer_bits"].items()}
        return task["weight_bits"], task["activation_bits"], layer_bits, task["layerwise"]

    if todo and jobs == 1 and cluster is None:
        saved = evaluate._STATE
        try:
            evaluate.init_worker(*initargs)
            for index in todo:
                store(index, evaluate.measure(*args(tasks[index])))
        finally:
            evaluate._STATE = saved
    elif todo:
        with task_pool(min(jobs, len(todo)), evaluate.init_worker, initargs, cluster, one_thread=True) as pool:
            pending: dict[Future[Any], int] = {pool.submit(evaluate.measure, *args(tasks[i])): i for i in todo}
            try:
                for future in as_completed(pending):
                    store(pending[future], future.result())
            finally:
                for future in pending:
                    future.cancel()
    return [r for r in results if r is not None]


def search(onnx_path: str | os.PathLike[str], input_shapes: Mapping[str, Sequence[int]], calibset: Any, evalset: Any,
           *, weight_bits: Iterable[int] = DEFAULT_WEIGHT_BITS,
           activation_bits: Iterable[int] = DEFAULT_ACTIVATION_BITS, spec: CIMSpec = DEFAULT_SPEC,
           params: CIMCostParams | None = None, objective: str = "adc_conversions", points: int = 10,
           budget_adc_fraction: float = 0.7, layerwise_batches: int = DEFAULT_LAYERWISE_BATCHES,
           metric: evaluate.Metric = evaluate.top1_agreement, metric_name: str = "top-1 agreement with FP32 (%)",
           front_metric: evaluate.Metric | None = None, front_metric_name: str | None = None,
           verify_front: bool = False, mapname: str | None = None,
           mapsave_dir: str | os.PathLike[str] | None = None, cache_dir: str | os.PathLike[str] | None | bool = True,
           jobs: int | None = None, cluster: Any = None, progress: Progress | None = None,
           **quantize_options: Any) -> SearchResult:
    """Search per-layer bits under a crossbar budget: a front of (figure, cost) points and the best point within it.

    Args:
        onnx_path: The float ONNX model.
        input_shapes: Input name -> shape (the batch size of ``calibset`` and ``evalset``).
        calibset: Calibration batches (at least 8, PPQ's minimum): dicts input name -> array, or arrays.
        evalset: Held-out batches the figure and the sensitivities are measured on.
        weight_bits: The chip's allowed weight bits (2..8).
        activation_bits: Its allowed activation bits (2..8).
        spec: The crossbar the cost is counted on (default: 256 rows, 2-bit cells, 8-bit ADCs).
        params: The cost model's parameters (default :class:`~maptools.quantization.cim.cost.CIMCostParams`).
        objective: The cost the walk lowers: ``'adc_conversions'`` or ``'energy_j'``.
        points: Walk points to measure (>= 2; the budget's point is added when not among them).
        budget_adc_fraction: The budget: ADC conversions per sample as a fraction of uniform at the widest bits.
        layerwise_batches: Held-out batches the layer-wise sensitivities are accumulated over (at most the number
            of held-out batches the quantization analyses).
        metric: ``metric(fp32_outputs, quantized_outputs) -> figure`` (higher is better), a module-level function
            (it is sent to worker processes); default top-1 agreement with FP32 (SNR for other outputs).
        metric_name: What the figure is, for the JSON, the table and the plot.
        front_metric: A finer figure (same form as ``metric``) the front is drawn over, where ``metric`` ties
            (e.g. top-1 agreement on every crop where ``metric`` counts only the confident ones); the choice under
            the budget stays on ``metric``, this one breaks its ties. None: the front is over ``metric``.
        front_metric_name: What the front figure is (default: the function's name).
        verify_front: Quantize every point of the front again from its bits alone (a walk point from its
            ``layer_bits``, a uniform one from its weight and activation bits) and check that it gives the same
            figures and ADC conversions (``verification`` of each front point, ``front_verification``).
        mapname: Write the chosen point as this map and check that it reproduces its figure; None: no map.
        mapsave_dir: The mapsave directory of ``mapname``.
        cache_dir: The cache of measured points: True for :func:`~.cache.default_cache_dir`, a folder, or
            None / False for no cache.
        jobs: Local worker processes (default: the CPUs); 1 runs in this process.
        cluster: A Dask scheduler address or ``LocalCluster`` to run the measurements on instead.
        progress: ``progress(done, total, stage)`` after every measured point (stage ``'uniform'``, ``'walk'`` or
            ``'verify'``).
        quantize_options: ``recipe``, ``observer``, ``seed``, ``symmetrical``, ``per_channel``, ``rounding``.

    Returns:
        The :class:`~maptools.quantization.search.result.SearchResult`.

    Raises:
        InvalidArgumentError, InvalidTypeError: A bad argument, before anything runs.
        ModelNotFoundError: No such model file.
    """
    started = time.perf_counter()
    path = Path(onnx_path)
    if not path.is_file():
        raise ModelNotFoundError(f"onnx_path: {str(path)!r} is not a file; expected the float ONNX model")
    w_bits, a_bits = _bits(weight_bits, "weight_bits"), _bits(activation_bits, "activation_bits")
    if not isinstance(spec, CIMSpec):
        raise InvalidTypeError(f"spec: got {type(spec).__name__}, expected a CIMSpec")
    params = params or CIMCostParams()
    if not isinstance(params, CIMCostParams):
        raise InvalidTypeError(f"params: got {type(params).__name__}, expected a CIMCostParams or None")
    if objective not in OBJECTIVES:
        raise InvalidArgumentError(f"objective: got {objective!r}, expected one of {', '.join(OBJECTIVES)}")
    if isinstance(points, bool) or not isinstance(points, int) or points < 2:
        raise InvalidArgumentError(f"points: got {points!r}, expected an integer >= 2")
    if isinstance(budget_adc_fraction, bool) or not isinstance(budget_adc_fraction, int | float) \
            or not 0 < budget_adc_fraction <= 1:
        raise InvalidArgumentError(f"budget_adc_fraction: got {budget_adc_fraction!r}, expected a number in (0, 1]")
    if isinstance(layerwise_batches, bool) or not isinstance(layerwise_batches, int) or layerwise_batches < 1:
        raise InvalidArgumentError(f"layerwise_batches: got {layerwise_batches!r}, expected an integer >= 1")
    if not callable(metric):
        raise InvalidTypeError(f"metric: got {type(metric).__name__}, expected a function (fp32, quantized) -> float")
    if front_metric is not None and not callable(front_metric):
        raise InvalidTypeError(f"front_metric: got {type(front_metric).__name__}, expected None or a function "
                               "(fp32, quantized) -> float")
    if not isinstance(verify_front, bool):
        raise InvalidTypeError(f"verify_front: got {type(verify_front).__name__}, expected a bool")
    unknown = sorted(set(quantize_options) - set(QUANTIZE_OPTIONS))
    if unknown:
        raise InvalidArgumentError(f"quantize_options: got {unknown}, expected some of {', '.join(QUANTIZE_OPTIONS)}")
    jobs = check_jobs(min(os.cpu_count() or 1, MAX_THREADS) if jobs is None else jobs)
    shapes = {name: [int(d) for d in shape] for name, shape in input_shapes.items()}
    calib = _batches(calibset, shapes, "calibset")
    held_out = _batches(evalset, shapes, "evalset")
    if len(calib) < 8:
        raise InvalidArgumentError(f"calibset: got {len(calib)} batches, expected at least 8 (PPQ's minimum)")
    if mapname is not None:
        from maptools.quantization.mapdir import check_replaceable, map_directory

        check_replaceable(map_directory(mapname, mapsave_dir))  # a folder that is not a map: refused now
    model = path.read_bytes()
    options = dict(sorted(quantize_options.items()))
    settings = {"spec": str(spec), "spec_fields": spec.to_dict(), "params": params.to_dict(), "options": options,
                "metric": _metric_name(metric), "calib_batches": len(calib), "eval_batches": len(held_out)}
    if front_metric is not None:  # only then: a search without one keeps the cache keys it always had
        settings["front_metric"] = _metric_name(front_metric)
    identity = {"model": hashlib.sha256(model).hexdigest(), "calib": data_digest(calib),
                "evalset": data_digest(held_out), "shapes": shapes, "settings": settings}
    cache = PointCache(default_cache_dir() if cache_dir is True else (cache_dir or None), identity)
    initargs = (model, shapes, calib, held_out, options, spec, params, metric, front_metric)
    figures = ("figure", "front_figure") if front_metric is not None else ("figure",)
    kept = (*figures, "snr_db", "adc_conversions", "energy_j")
    candidates: list[Candidate] = list(itertools.product(w_bits, a_bits))
    widest = (w_bits[-1], a_bits[-1])

    def task(w: int, a: int, layer_bits: Mapping[str, Candidate] | None, layerwise: int | bool, label: str) -> dict:
        measured = {"weight_bits": w, "activation_bits": a, "layerwise": layerwise, "label": label,
                    "layer_bits": None if layer_bits is None else {n: list(c) for n, c in layer_bits.items()}}
        return {**measured, "attribution": ATTRIBUTION} if layerwise else measured

    # 1. the uniform candidates: sensitivities and costs
    uniform_tasks = [task(w, a, None, layerwise_batches, candidate_label(w, a)) for w, a in candidates]
    uniform = _run_tasks(uniform_tasks, cache, initargs, jobs, cluster, progress, "uniform")
    computed = cache.misses
    layers = list(uniform[0]["layers"])
    table = {layer: {c: uniform[i]["layers"][layer] for i, c in enumerate(candidates)} for layer in layers}

    # 2. the walk, and the points to measure
    walk = greedy_walk(table, objective)
    reference = uniform[candidates.index(widest)]
    limit = budget_adc_fraction * reference["adc_conversions"]
    walk_costs = [predicted(a, table, objective)[0] for a in walk]
    chosen_steps = spread(walk_costs, points)
    fits = [i for i, a in enumerate(walk) if predicted(a, table, "adc_conversions")[0] <= limit]
    if fits and fits[0] not in chosen_steps:
        chosen_steps = sorted([*chosen_steps, fits[0]])
    point_tasks = [task(*widest, walk[step], False, f"step {step}") for step in chosen_steps]
    measured = _run_tasks(point_tasks, cache, initargs, jobs, cluster, progress, "walk")
    computed = cache.misses

    # 3. the front and the choice
    walk_points = []
    for step, m in zip(chosen_steps, measured, strict=True):
        cost, snr = predicted(walk[step], table, objective)
        walk_points.append({"step": step, "layer_bits": {n: list(c) for n, c in walk[step].items()},
                            "predicted_cost": cost, "predicted_snr_db": snr,
                            **{k: m[k] for k in kept}})
    uniform_points = [{"label": candidate_label(*c), "weight_bits": c[0], "activation_bits": c[1],
                       **{k: m[k] for k in kept}} for c, m in zip(candidates, uniform, strict=True)]
    everything = walk_points + uniform_points
    for p, flag in zip(everything, pareto(everything, objective, figures[-1]), strict=True):
        p["pareto"] = flag
    within = [i for i, p in enumerate(walk_points) if p["adc_conversions"] <= limit]
    chosen = max(within, key=lambda i: (*(walk_points[i][k] for k in figures), -walk_points[i]["adc_conversions"]),
                 default=None)
    data = {
        "model": {"name": path.name, "sha256": identity["model"]},
        "data": {"calib_sha256": identity["calib"], "evalset_sha256": identity["evalset"], "shapes": shapes},
        "settings": settings, "figure": metric_name, "objective": objective,
        "front_figure": None if front_metric is None else (front_metric_name or _metric_name(front_metric)),
        "method": "greedy walk from the widest bits (AIMET-like), layer-wise PPQ sensitivities over "
                  f"{layerwise_batches} held-out batches, the noise between MACs {ATTRIBUTION}, additive noise",
        "candidates": [list(c) for c in candidates], "layers": layers,
        "sensitivity": {layer: {candidate_label(*c): table[layer][c] for c in candidates} for layer in layers},
        "walk_steps": len(walk), "uniform": uniform_points, "points": walk_points,
        "proxy": {**_proxy_agreement(walk_points), "layerwise_batches": layerwise_batches},
        "budget": {"adc_fraction": budget_adc_fraction, "reference": candidate_label(*widest),
                   "reference_adc_conversions": reference["adc_conversions"],
                   "reference_energy_j": reference["energy_j"], "limit_adc_conversions": limit},
        "chosen": chosen, "verification": None, "front_verification": None,
    }
    if verify_front:
        front = [p for p in everything if p["pareto"]]
        verify_tasks = [{**(task(*widest, p["layer_bits"], False, f"verify step {p['step']}") if "step" in p else
                            task(p["weight_bits"], p["activation_bits"], None, False, f"verify {p['label']}")),
                         "verify": True} for p in front]
        again = _run_tasks(verify_tasks, cache, initargs, jobs, cluster, progress, "verify")
        computed = cache.misses
        data["front_verification"] = _compare(front, again, figures)
    result = SearchResult(data=data, computed=computed, cached=cache.hits)
    if mapname is not None and chosen is not None:
        data["verification"] = _verify(result, chosen, path, initargs, mapname, mapsave_dir)
    result.seconds = time.perf_counter() - started
    logger.info("search: %d walk points and %d uniform points in %.1f s (%d measured, %d from the cache)",
                len(walk_points), len(uniform_points), result.seconds, result.computed, result.cached)
    return result


def _proxy_agreement(points: Sequence[Mapping[str, Any]]) -> dict[str, Any]:
    """How the predicted SNR (sum of layer-wise noises) ranks and matches the measured one over the walk points."""
    pairs = [(p["predicted_snr_db"], p["snr_db"]) for p in points
             if np.isfinite(p["predicted_snr_db"]) and np.isfinite(p["snr_db"])]
    spearman = None
    if len(pairs) >= 3:
        ranks = np.argsort(np.argsort(np.array(pairs), axis=0), axis=0).astype(float)
        if ranks[:, 0].std() > 0 and ranks[:, 1].std() > 0:
            spearman = float(np.corrcoef(ranks[:, 0], ranks[:, 1])[0, 1])
    diffs = [m - p for p, m in pairs]
    return {"spearman": spearman, "mean_measured_minus_predicted_db": float(np.mean(diffs)) if diffs else None,
            "pairs": len(pairs)}


def _compare(front: Sequence[dict[str, Any]], again: Sequence[Mapping[str, Any]],
             figures: Sequence[str]) -> dict[str, Any]:
    """Each front point's second quantization against its first: reproduced means equal figures and conversions.

    The figures are compared exactly (no tolerance: the same bits on the same data give the same map); the SNR's
    difference is recorded beside them.
    """
    for point, m in zip(front, again, strict=True):
        reproduced = all(m[k] == point[k] for k in figures) and m["adc_conversions"] == point["adc_conversions"]
        point["verification"] = {**{k: m[k] for k in (*figures, "snr_db", "adc_conversions", "energy_j")},
                                 "reproduced": reproduced}
        if not reproduced:
            name = f"step {point['step']}" if "step" in point else point["label"]
            logger.warning("search: front point %s re-quantized gives %s, not %s", name,
                           {k: m[k] for k in (*figures, "adc_conversions")},
                           {k: point[k] for k in (*figures, "adc_conversions")})
    count = sum(p["verification"]["reproduced"] for p in front)
    return {"points": len(front), "reproduced": count, "all_reproduced": count == len(front)}


def _verify(result: SearchResult, index: int, path: Path, initargs: tuple[Any, ...], mapname: str,
            mapsave_dir: str | os.PathLike[str] | None) -> dict[str, Any]:
    """Quantize the chosen point as ``mapname`` from its ``layer_bits`` alone and measure it again."""
    from maptools.quantization.api import quantize
    from maptools.quantization.cimmap.mapcost import map_cost

    _, shapes, calib, held_out, options, spec, params, metric, _ = initargs
    point = result.points[index]
    widest = (max(c[0] for c in result.data["candidates"]), max(c[1] for c in result.data["candidates"]))
    fp32 = evaluate.onnx_outputs(path, held_out)
    quantized = quantize(shapes, "cpu", path, mapname=mapname, calibset=calib, calib_steps=len(calib),
                         evalset=held_out, weight_bits=widest[0], activation_bits=widest[1],
                         layer_bits=result.layer_bits(index), mapsave_dir=mapsave_dir, threads=1, **options)
    figure = float(metric(fp32, evaluate.onnx_outputs(quantized.model_path, held_out)))
    adc = int(map_cost(mapname, spec, params, mapsave_dir=mapsave_dir).total("adc_conversions"))
    reproduced = figure == point["figure"] and adc == point["adc_conversions"]
    if not reproduced:
        logger.warning("search: the chosen point re-quantized as %r gives figure %s and %d ADC conversions, not "
                       "%s and %d", mapname, figure, adc, point["figure"], point["adc_conversions"])
    return {"mapname": mapname, "figure": figure, "adc_conversions": adc, "reproduced": reproduced}

