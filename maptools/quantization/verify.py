"""``verify``: the same inputs through FP32, PPQ's simulation, onnxruntime and the integer executor.

It answers "do the artifacts say what was simulated?": per graph output and for each pair of the four
executions it reports SNR, cosine similarity, top-1 agreement and, between quantized executions, the
fraction of elements within one output quantization step.
"""

from __future__ import annotations

import itertools
import logging
import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from maptools.errors import ArtifactError
from maptools.quantization import artifacts
from maptools.quantization.calibration import random_calibset
from maptools.quantization.model import model_sha256
from maptools.quantization.reference import ReferenceExecutor

__all__ = ["EXECUTIONS", "PairMetrics", "VerifyReport", "compare", "verify"]

logger = logging.getLogger(__name__)

#: The four executions compared, in report order.
EXECUTIONS = ("fp32", "ppq", "onnxruntime", "integer")
_QUANTIZED = {"ppq", "onnxruntime", "integer"}


@dataclass
class PairMetrics:
    """Agreement of two executions on one graph output.

    Attributes:
        output: Graph output name.
        reference: Name of the reference execution.
        candidate: Name of the compared execution.
        snr_db: ``10 log10(|ref|^2 / |ref - cand|^2)``.
        cosine: Cosine similarity.
        top1_agreement: Fraction of samples with the same argmax along axis 1, for class-score outputs only
            (shape ``[N, C]`` with ``C > 1``); None for any other output (a detector's ``[1, 22, 2100]``, a
            segmentation map, a scalar), where an argmax along axis 1 means nothing.
        within_one_step: Fraction of elements within one output quantization step (quantized pairs only).
    """

    output: str
    reference: str
    candidate: str
    snr_db: float
    cosine: float
    top1_agreement: float | None
    within_one_step: float | None


@dataclass
class VerifyReport:
    """Result of :func:`verify`.

    Attributes:
        mapname: The map verified.
        samples: Number of input samples (batch elements) compared.
        pairs: One :class:`PairMetrics` per output and pair of executions.
        outputs: The raw outputs: execution name -> output name -> array.
    """

    mapname: str
    samples: int
    pairs: list[PairMetrics] = field(default_factory=list)
    outputs: dict[str, dict[str, np.ndarray]] = field(default_factory=dict)

    def get(self, reference: str, candidate: str, output: str | None = None) -> PairMetrics:
        """The metrics of one pair (of the first output unless ``output`` is given)."""
        for pair in self.pairs:
            if (pair.reference, pair.candidate) == (reference, candidate) and output in (None, pair.output):
                return pair
        raise KeyError(f"no pair {reference} vs {candidate} for output {output!r}")

    def table(self) -> str:
        """A plain-text table of every pair."""
        lines = [f"verify {self.mapname!r} on {self.samples} samples",
                 f"{'output':16} {'reference':12} {'candidate':12} {'SNR dB':>8} {'cosine':>9} {'top-1':>7} "
                 f"{'<=1 step':>9}"]
        for p in self.pairs:
            top1 = "-" if p.top1_agreement is None else f"{100 * p.top1_agreement:.1f}%"
            step = "-" if p.within_one_step is None else f"{100 * p.within_one_step:.2f}%"
            lines.append(f"{p.output[:16]:16} {p.reference:12} {p.candidate:12} {p.snr_db:8.2f} {p.cosine:9.5f} "
                         f"{top1:>7} {step:>9}")
        return "\n".join(lines)


def compare(reference: np.ndarray, candidate: np.ndarray, step: float | None = None) -> dict[str, float | None]:
    """SNR (dB), cosine, top-1 agreement and fraction within ``step`` of two arrays of the same shape.

    Args:
        reference: The reference output.
        candidate: The compared output, same shape.
        step: The output quantization step, or None to leave ``within`` out.

    Returns:
        ``{"snr_db", "cosine", "top1", "within"}``. ``top1`` (the fraction of rows with the same argmax) is
        only computed for class scores, arrays of shape ``[N, C]`` with ``C > 1``, and is None otherwise;
        ``within`` is None without ``step``.
    """
    r = np.asarray(reference, dtype=np.float64)
    c = np.asarray(candidate, dtype=np.float64)
    noise = float(np.sum((r - c) ** 2))
    signal = float(np.sum(r * r))
    snr = float("inf") if noise == 0 else (float("-inf") if signal == 0 else float(10 * np.log10(signal / noise)))
    denom = float(np.linalg.norm(r) * np.linalg.norm(c))
    cos = float(np.sum(r * c) / denom) if denom > 0 else float(noise == 0)
    top1 = float(np.mean(r.argmax(axis=1) == c.argmax(axis=1))) if r.ndim == 2 and r.shape[1] > 1 else None
    within = float(np.mean(np.abs(r - c) <= step * (1 + 1e-6) + 1e-12)) if step is not None else None
    return {"snr_db": snr, "cosine": cos, "top1": top1, "within": within}


def _batches(inputs: Any, shapes: Mapping[str, Sequence[int]], seed: int, count: int) -> list[dict[str, np.ndarray]]:
    if inputs is None:
        return [{k: v.numpy() for k, v in b.items()} for b in random_calibset(shapes, count, seed)]
    items = inputs if isinstance(inputs, list) else [inputs]
    names = list(shapes)
    result = []
    for item in items:
        if not isinstance(item, Mapping):
            item = {names[0]: item}
        result.append({k: np.asarray(v.numpy() if hasattr(v, "numpy") else v, dtype=np.float32)
                       for k, v in item.items()})
    return result


def _output_steps(quantinfo: Mapping[str, Any], output_names: Sequence[str]) -> dict[str, float | None]:
    steps: dict[str, float | None] = dict.fromkeys(output_names)
    for record in quantinfo.values():
        for tq in record.outputs:
            if tq is not None and tq.name in steps:
                steps[tq.name] = tq.scale
    return steps


def verify(mapname: str, inputs: Any = None, *, mapsave_dir: str | os.PathLike | None = None,
           batches: int = 2) -> VerifyReport:
    """Run FP32, PPQ's simulation, onnxruntime on ``quant_model.onnx`` and the integer executor on the same inputs.

    Args:
        mapname: The map to verify.
        inputs: A batch (dict input name -> array, or an array for single-input models), a list of batches,
            or None for ``batches`` calibration-like random batches (standard normal, the shapes of the map).
        mapsave_dir: The mapsave directory.
        batches: Number of random batches when ``inputs`` is None.

    Returns:
        The per-output metrics of every pair of executions.

    Raises:
        MapNotFoundError: no such map.
        ArtifactError: a file is missing or modified, or the original float model moved or changed.
    """
    import onnxruntime as ort

    from maptools.quantization.engine import PPQSession

    directory = artifacts.map_directory(mapname, mapsave_dir)
    quantinfo = artifacts.read_quantinfo(mapname, mapsave_dir)
    manifest = artifacts.read_manifest(directory)
    model_path = Path(manifest["model"]["path"])
    if not model_path.is_file():
        raise ArtifactError(f"the float model {model_path} recorded in {directory / artifacts.MANIFEST} is gone; "
                            "verify needs it to run FP32")
    if model_sha256(model_path) != manifest["model"]["sha256"]:
        raise ArtifactError(f"the float model {model_path} changed since map {mapname!r} was made; re-run quantize")
    shapes = manifest["settings"]["input_shapes"]
    data = _batches(inputs, shapes, int(manifest["settings"]["seed"]) + 1, batches)
    session = PPQSession.from_bytes(artifacts.read_artifact_bytes(mapname, artifacts.PPQGRAPH, mapsave_dir))
    qdq_bytes = artifacts.read_artifact_bytes(mapname, artifacts.QUANTMODEL, mapsave_dir)
    options = ort.SessionOptions()
    options.log_severity_level = 3
    fp32 = ort.InferenceSession(str(model_path), options, providers=["CPUExecutionProvider"])
    quant = ort.InferenceSession(qdq_bytes, options, providers=["CPUExecutionProvider"])
    executor = ReferenceExecutor.load(mapname, mapsave_dir)
    names = [o.name for o in fp32.get_outputs()]
    runs: dict[str, dict[str, list[np.ndarray]]] = {e: {n: [] for n in names} for e in EXECUTIONS}
    import torch

    for batch in data:
        results = {
            "fp32": dict(zip(names, fp32.run(names, batch), strict=True)),
            "ppq": session.forward({k: torch.from_numpy(v) for k, v in batch.items()}),
            "onnxruntime": dict(zip(names, quant.run(names, batch), strict=True)),
            "integer": executor.run(batch),
        }
        for execution, outputs in results.items():
            for name in names:
                runs[execution][name].append(np.asarray(outputs[name]))
    merged = {e: {n: np.concatenate(v) for n, v in outs.items()} for e, outs in runs.items()}
    steps = _output_steps(quantinfo, names)
    report = VerifyReport(mapname=mapname, samples=int(sum(next(iter(b.values())).shape[0] for b in data)),
                          outputs=merged)
    for name in names:
        for ref, cand in itertools.combinations(EXECUTIONS, 2):
            step = steps[name] if {ref, cand} <= _QUANTIZED else None
            m = compare(merged[ref][name], merged[cand][name], step)
            report.pairs.append(PairMetrics(name, ref, cand, m["snr_db"], m["cosine"], m["top1"], m["within"]))
    logger.info("%s", report.table())
    return report
