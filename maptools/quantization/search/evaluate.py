"""One evaluation of the search, in a worker process: quantize an assignment, measure its figure and its cost.

The state (the float model, the data, the FP32 outputs, the settings) is set once per worker by
:func:`init_worker` (or by the search itself when it runs in its own process); every task then quantizes into
a temporary mapsave of the worker, runs ``quant_model.onnx`` in onnxruntime on the held-out batches, costs the
map on the crossbar (:func:`~maptools.quantization.cimmap.mapcost.map_cost`) and returns plain numbers.
"""

from __future__ import annotations

import atexit
import contextlib
import json
import logging
import shutil
import tempfile
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from maptools.quantization.cim.cost import CIMCostParams
from maptools.quantization.cim.spec import CIMSpec
from maptools.quantization.intmath import snr_db_of

__all__ = ["Batch", "Metric", "Outputs", "chain_noise", "init_worker", "measure", "onnx_outputs", "output_snr",
           "top1_agreement"]

logger = logging.getLogger(__name__)

Batch = dict[str, np.ndarray]
#: The outputs of one batch, in the model's output order.
Outputs = list[np.ndarray]
#: ``metric(fp32, quantized)``: a figure, higher is better, from the outputs of every held-out batch.
Metric = Callable[[Sequence[Outputs], Sequence[Outputs]], float]


def top1_agreement(fp32: Sequence[Outputs], quantized: Sequence[Outputs]) -> float:
    """Top-1 agreement with FP32 in % on the first class-score output ``[N, C]``; else the outputs' SNR in dB."""
    for index, out in enumerate(fp32[0]):
        if out.ndim == 2 and out.shape[1] > 1:
            ref = np.concatenate([batch[index] for batch in fp32]).argmax(1)
            got = np.concatenate([batch[index] for batch in quantized]).argmax(1)
            return float(100.0 * np.mean(ref == got))
    return output_snr(fp32, quantized)


def output_snr(fp32: Sequence[Outputs], quantized: Sequence[Outputs]) -> float:
    """The SNR in dB of every output of every batch against FP32: a continuous figure, so points seldom tie."""
    return snr_db_of([o for b in fp32 for o in b], [o for b in quantized for o in b])


def onnx_outputs(path: str | Path | bytes, batches: Sequence[Batch]) -> list[Outputs]:
    """onnxruntime's outputs of a model (its file, or its serialized bytes) on every batch (one thread)."""
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.log_severity_level = 3
    options.intra_op_num_threads = 1
    options.inter_op_num_threads = 1
    session = ort.InferenceSession(path if isinstance(path, bytes) else str(path), options,
                                   providers=["CPUExecutionProvider"])
    return [[np.asarray(o) for o in session.run(None, batch)] for batch in batches]


@dataclass
class _State:
    """What a worker needs: the float model, the data, its FP32 outputs, the settings."""

    model_path: Path
    shapes: dict[str, list[int]]
    calib: list[Batch]
    evalset: list[Batch]
    fp32: list[Outputs]
    options: dict[str, Any]
    spec: CIMSpec
    params: CIMCostParams
    metric: Metric
    workdir: Path
    front_metric: Metric | None = None


_STATE: _State | None = None


def init_worker(model: bytes, shapes: Mapping[str, Sequence[int]], calib: list[Batch], evalset: list[Batch],
                options: Mapping[str, Any], spec: CIMSpec, params: CIMCostParams, metric: Metric,
                front_metric: Metric | None = None) -> None:
    """Set this process's state: the model written to a private folder, the FP32 outputs of the held-out data.

    ``front_metric``: a second, finer figure every point is also measured with (the front is drawn over it).
    """
    global _STATE
    with contextlib.suppress(ImportError):
        from threadpoolctl import threadpool_limits

        threadpool_limits(1)
    workdir = Path(tempfile.mkdtemp(prefix="maptools-search-"))
    atexit.register(shutil.rmtree, workdir, True)
    model_path = workdir / "model.onnx"
    model_path.write_bytes(model)
    fp32 = onnx_outputs(model_path, evalset)
    _STATE = _State(model_path, {k: list(v) for k, v in shapes.items()}, calib, evalset, fp32, dict(options), spec,
                    params, metric, workdir, front_metric)


def _walk_up(tensors: Sequence[str], producers: Mapping[str, Any], macs: set[str]) -> tuple[set[str], set[str]]:
    """The non-MAC operators met walking upstream from ``tensors``, and the MACs that end the walk."""
    seen: set[str] = set()
    ends: set[str] = set()
    stack = [t for t in tensors if t]
    while stack:
        producer = producers.get(stack.pop())
        if producer is None or producer.name in seen:
            continue
        if producer.name in macs:
            ends.add(producer.name)
            continue
        seen.add(producer.name)
        stack.extend(t for t in producer.input if t)
    return seen, ends


def chain_noise(graph: Any, macs: Sequence[str], entries: Mapping[str, float]) -> dict[str, dict[str, float]]:
    """Each MAC's share of the layer-wise noise of the non-MAC operators between it and its neighbouring MACs.

    From each MAC, every input is followed upstream through the operators that are not MACs (Q/DQ pairs, ReLU,
    HardSwish, the squeeze-excitation's pooling, Mul and Add, a Flatten) until a MAC or a graph input; every
    operator met with a noise of its own (``entries``: node -> noise-to-signal power) is on that MAC's input
    chain. Its rounding is set by the bits of the MACs on both sides: the reader's (which requantizes the tensor
    to its own activation bits) and the producer's (whose layer_bits a fused activation or gate inherits). So
    its noise is shared equally among its readers (``input``) and its producers, the MACs its own upstream walk
    ends at (``output``): the sum over the MACs counts it once, and lowering the bits on either side costs it.
    """
    producers = {out: node for node in graph.node for out in node.output}
    by_name = {node.name: node for node in graph.node}
    mac_set = set(macs)
    readers: dict[str, list[str]] = {}
    for name in macs:
        node = by_name.get(name)
        seen, _ = _walk_up(list(node.input) if node is not None else [], producers, mac_set)
        for op in seen:
            if entries.get(op, 0.0) > 0:
                readers.setdefault(op, []).append(name)
    shares = {name: {"input": 0.0, "output": 0.0} for name in macs}
    for op in sorted(readers):
        _, sources = _walk_up(list(by_name[op].input), producers, mac_set)
        share = entries[op] / (len(readers[op]) + len(sources))
        for name in readers[op]:
            shares[name]["input"] += share
        for name in sources:
            shares[name]["output"] += share
    return shares


def _isolated_nsr(report: Path, model: Path, nodes: Sequence[str]) -> dict[str, dict[str, float]]:
    """Each MAC's noise: the outputs' noise-to-signal power when only it, or only its neighbours, are quantized.

    ``own``: PPQ's layer-wise figure of the MAC (report.json's ``layerwise_snr_db``). ``input`` and ``output``: the
    MAC's shares of the same figures of the operators on its input chains and on its readers' (:func:`chain_noise`):
    PPQ books the quantization of the tensors between MACs on those operators, so without them a layer's activation
    bits would look free.
    """
    import onnx

    def nsr_of(snr: float | None) -> float:
        return 0.0 if snr is None else float(10.0 ** (-float(snr) / 10.0))  # None: an infinite SNR (no noise)

    entries = {e["node"]: nsr_of(e.get("layerwise_snr_db")) for e in json.loads(report.read_text())["operators"]}
    graph = onnx.load(str(model), load_external_data=False).graph
    shares = chain_noise(graph, nodes, entries)
    return {name: {"own": entries.get(name, 0.0), **shares[name]} for name in nodes}


def measure(weight_bits: int, activation_bits: int, layer_bits: Mapping[str, tuple[int, int]] | None,
            layerwise: int) -> dict[str, Any]:
    """Quantize at ``W{weight_bits}A{activation_bits}`` with ``layer_bits`` overrides; figure, SNR and cost.

    Returns:
        ``figure``, ``front_figure`` (only with a front metric), ``snr_db`` (onnxruntime against FP32 on the
        held-out batches), ``adc_conversions`` and
        ``energy_j`` per sample on the crossbar, ``layers`` (node -> ``adc_conversions``, ``energy_j`` and, with
        ``layerwise`` (a number of held-out batches, 0 for none), ``nsr``: the output noise-to-signal power
        when only that layer, its weights and its input, is quantized, ``nsr_input`` and ``nsr_output``: the
        parts of the operators before and after it, :func:`_isolated_nsr`).
    """
    from maptools.quantization.api import quantize
    from maptools.quantization.cimmap.mapcost import map_cost

    state = _STATE
    assert state is not None, "init_worker was not called in this process"
    with tempfile.TemporaryDirectory(dir=state.workdir) as mapsave:
        result = quantize(state.shapes, "cpu", state.model_path, mapname="point", calibset=state.calib,
                          calib_steps=len(state.calib), evalset=state.evalset, weight_bits=weight_bits,
                          activation_bits=activation_bits, layer_bits=dict(layer_bits or {}) or None,
                          layerwise_analysis=bool(layerwise), layerwise_batches=max(int(layerwise), 1),
                          mapsave_dir=mapsave, threads=1, **state.options)
        cost = map_cost("point", state.spec, state.params, mapsave_dir=mapsave)
        quantized = onnx_outputs(result.model_path, state.evalset)
        layers: dict[str, dict[str, float]] = {
            layer.node: {"adc_conversions": layer.adc_conversions, "energy_j": layer.total_energy_j}
            for layer in cost.layers}
        if layerwise:
            for node, noise in _isolated_nsr(result.report_path, result.model_path, list(layers)).items():
                layers[node].update(nsr=noise["own"] + noise["input"] + noise["output"], nsr_input=noise["input"],
                                    nsr_output=noise["output"])
    figures = {"figure": float(state.metric(state.fp32, quantized))}
    if state.front_metric is not None:
        figures["front_figure"] = float(state.front_metric(state.fp32, quantized))
    return {**figures,
            "snr_db": output_snr(state.fp32, quantized),
            "adc_conversions": int(cost.total("adc_conversions")), "energy_j": float(cost.total("energy_j")),
            "layers": layers}
