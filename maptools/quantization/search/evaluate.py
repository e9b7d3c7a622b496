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

__all__ = ["Batch", "Metric", "Outputs", "init_worker", "measure", "onnx_outputs", "top1_agreement"]

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
    return snr_db_of([o for b in fp32 for o in b], [o for b in quantized for o in b])


def onnx_outputs(path: str | Path, batches: Sequence[Batch]) -> list[Outputs]:
    """onnxruntime's outputs of a model on every batch (one thread)."""
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.log_severity_level = 3
    options.intra_op_num_threads = 1
    options.inter_op_num_threads = 1
    session = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
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


_STATE: _State | None = None


def init_worker(model: bytes, shapes: Mapping[str, Sequence[int]], calib: list[Batch], evalset: list[Batch],
                options: Mapping[str, Any], spec: CIMSpec, params: CIMCostParams, metric: Metric) -> None:
    """Set this process's state: the model written to a private folder, the FP32 outputs of the held-out data."""
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
                    params, metric, workdir)


def _isolated_nsr(report: Path, model: Path, nodes: Sequence[str]) -> dict[str, dict[str, float]]:
    """Each MAC's noise: the outputs' noise-to-signal power when only it, or only its input's producer, is quantized.

    ``own``: PPQ's layer-wise figure of the MAC (report.json's ``layerwise_snr_db``). ``input``: the same figure of
    the operator whose output the MAC reads (through Q/DQ pairs and operators without noise of their own, such as
    a Flatten), when it is not a MAC: PPQ books the quantization of a MAC's input on that operator (a ReLU, an Add,
    a pooling), so without it a layer's activation bits would look free.
    """
    import onnx

    def nsr_of(snr: float | None) -> float:
        return 0.0 if snr is None else float(10.0 ** (-float(snr) / 10.0))  # None: an infinite SNR (no noise)

    entries = {e["node"]: nsr_of(e.get("layerwise_snr_db")) for e in json.loads(report.read_text())["operators"]}
    graph = onnx.load(str(model), load_external_data=False).graph
    producers = {out: node for node in graph.node for out in node.output}
    by_name = {node.name: node for node in graph.node}
    macs = set(nodes)
    noise = {}
    for name in nodes:
        upstream = 0.0
        node = by_name.get(name)
        tensor = node.input[0] if node is not None and node.input else None
        for _ in range(16):  # a short chain of Q/DQ and noiseless operators
            producer = producers.get(tensor) if tensor is not None else None
            if producer is None or producer.name in macs:
                break
            if producer.name in entries and entries[producer.name] > 0:
                upstream = entries[producer.name]
                break
            tensor = producer.input[0] if producer.input else None
        noise[name] = {"own": entries.get(name, 0.0), "input": upstream}
    return noise


def measure(weight_bits: int, activation_bits: int, layer_bits: Mapping[str, tuple[int, int]] | None,
            layerwise: bool) -> dict[str, Any]:
    """Quantize at ``W{weight_bits}A{activation_bits}`` with ``layer_bits`` overrides; figure, SNR and cost.

    Returns:
        ``figure``, ``snr_db`` (onnxruntime against FP32 on the held-out batches), ``adc_conversions`` and
        ``energy_j`` per sample on the crossbar, ``layers`` (node -> ``adc_conversions``, ``energy_j`` and, with
        ``layerwise``, ``nsr``: the output noise-to-signal power when only that layer, its weights and its
        input, is quantized, and ``nsr_input``: the input's part, :func:`_isolated_nsr`).
    """
    from maptools.quantization.api import quantize
    from maptools.quantization.cimmap.mapcost import map_cost

    state = _STATE
    assert state is not None, "init_worker was not called in this process"
    with tempfile.TemporaryDirectory(dir=state.workdir) as mapsave:
        result = quantize(state.shapes, "cpu", state.model_path, mapname="point", calibset=state.calib,
                          calib_steps=len(state.calib), evalset=state.evalset, weight_bits=weight_bits,
                          activation_bits=activation_bits, layer_bits=dict(layer_bits or {}) or None,
                          layerwise_analysis=layerwise, mapsave_dir=mapsave, threads=1, **state.options)
        cost = map_cost("point", state.spec, state.params, mapsave_dir=mapsave)
        quantized = onnx_outputs(result.model_path, state.evalset)
        layers: dict[str, dict[str, float]] = {
            layer.node: {"adc_conversions": layer.adc_conversions, "energy_j": layer.total_energy_j}
            for layer in cost.layers}
        if layerwise:
            for node, noise in _isolated_nsr(result.report_path, result.model_path, list(layers)).items():
                layers[node].update(nsr=noise["own"] + noise["input"], nsr_input=noise["input"])
    return {"figure": float(state.metric(state.fp32, quantized)),
            "snr_db": snr_db_of([o for b in state.fp32 for o in b], [o for b in quantized for o in b]),
            "adc_conversions": int(cost.total("adc_conversions")), "energy_j": float(cost.total("energy_j")),
            "layers": layers}
