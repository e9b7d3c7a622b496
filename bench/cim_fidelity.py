"""Compute-in-memory fidelity of quantized maps: the measurements of docs/cim.rst ("Whole maps on crossbars").

Quantizes the bundled digits CNN and the mobile CNN at W8A8 and W4A4 (default recipe, calibrated on 32 batches
of 16 training digits), then sweeps each map with :func:`maptools.quantization.cimmap.cim_sweep`: ADC ranges
calibrated on all 1257 training digits and full-range ADCs, evaluated on the 540 held-out test digits (top-1
against the labels, agreement with FP32 and with the exact integer executor)::

    python bench/cim_fidelity.py --out /tmp/cim_fidelity --jobs 2
    python bench/cim_fidelity.py --out /tmp/cim_fidelity --jobs 2 --corpus efficientnet_lite1

``--resnet18`` sweeps torchvision's ResNet-18 (random weights, 224x224, W8A8 and W4A4 with the ``fast`` recipe on
8 random batches; 2 other random images evaluated, ADC ranges calibrated on 4 more) and tabulates the output SNR
against the exact integer executor. ``--corpus NAME`` sweeps a corpus ImageNet classifier instead (``make
corpus``; W8A8, 16 calibration feeds, 32 held-out evaluation feeds, a smaller grid). Each sweep writes
``<out>/<map>.json`` and ``<map>.png`` and prints its tables; the reStructuredText tables of the docs are
printed at the end.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np

from maptools.examples import digits, mobile
from maptools.quantization import quantize
from maptools.quantization.cimmap import cim_sweep
from maptools.quantization.cimmap.sweep import SweepPoint, SweepResult

MAPS = {"digits_w8a8": (digits.MODEL_PATH, 8), "digits_w4a4": (digits.MODEL_PATH, 4),
        "mobile_w8a8": (mobile.MODEL_PATH, 8), "mobile_w4a4": (mobile.MODEL_PATH, 4)}
DIGITS_GRID = {"adc_bits": range(3, 11), "rows": (64, 128, 256), "cell_bits": (1, 2)}
CORPUS_GRID = {"adc_bits": range(4, 10), "rows": (128, 256), "cell_bits": (2,)}


def _quantize_digits(mapsave: Path) -> None:
    train, _ = digits.load_split("train")
    batches = [train[i:i + 16] for i in range(0, len(train) - 15, 16)]
    for name, (model, bits) in MAPS.items():
        started = time.perf_counter()
        quantize({"input": list(digits.INPUT_SHAPE)}, "cpu", model, mapname=name, calibset=batches, calib_steps=32,
                 bit_width=bits, mapsave_dir=mapsave, analysis_steps=4)
        logging.info("quantized %s in %.1f s", name, time.perf_counter() - started)


def _sweep_digits(mapsave: Path, out: Path, jobs: int, grid: dict) -> dict[str, SweepResult]:
    train, _ = digits.load_split("train")
    test, labels = digits.load_split("test")
    results = {}
    for name in MAPS:
        result = cim_sweep(name, [test], calib=[train], labels=labels, jobs=jobs, mapsave_dir=mapsave, **grid)
        result.save(out / f"{name}.json")
        result.plot(out / f"{name}.png")
        print(result.table(), flush=True)
        results[name] = result
    return results


def _sweep_corpus(name: str, mapsave: Path, out: Path, jobs: int, grid: dict,
                  count: int = 32) -> dict[str, SweepResult]:
    sys.path.insert(0, str(Path(__file__).resolve().parent))
    from corpus import registry

    model = registry.get(name)
    calib = registry.inputs_for(model, "calib", count=16, seed=0)
    evaluation = registry.inputs_for(model, "eval", count=count, seed=0)
    started = time.perf_counter()
    quantize(model.input_shapes, "cpu", model.path, mapname=f"{name}_w8a8", calibset=calib, calib_steps=16,
             bit_width=8, mapsave_dir=mapsave, analysis_steps=1, evalset=evaluation[:1])
    logging.info("quantized %s in %.1f s", name, time.perf_counter() - started)
    result = cim_sweep(f"{name}_w8a8", evaluation, calib=calib, jobs=jobs, mapsave_dir=mapsave, **grid)
    result.save(out / f"{name}_w8a8.json")
    result.plot(out / f"{name}_w8a8.png")
    print(result.table(), flush=True)
    return {f"{name}_w8a8": result}


def _sweep_resnet18(mapsave: Path, out: Path, jobs: int, grid: dict) -> dict[str, SweepResult]:
    import torch
    import torchvision

    torch.manual_seed(0)
    model = torchvision.models.resnet18(weights=None).eval()
    path = out / "resnet18.onnx"
    torch.onnx.export(model, (torch.randn(1, 3, 224, 224),), str(path), input_names=["input"], output_names=["output"],
                      opset_version=13, dynamo=False)
    rng = np.random.default_rng(1)
    evaluation = [{"input": rng.standard_normal((1, 3, 224, 224)).astype(np.float32)} for _ in range(2)]
    calib = [{"input": rng.standard_normal((1, 3, 224, 224)).astype(np.float32)} for _ in range(4)]
    results = {}
    for bits in (8, 4):
        name = f"resnet18_w{bits}a{bits}"
        quantize({"input": [1, 3, 224, 224]}, "cpu", path, mapname=name, calibset=None, calib_steps=8, bit_width=bits,
                 recipe="fast", mapsave_dir=mapsave, analysis_steps=1)
        result = cim_sweep(name, evaluation, calib=calib, jobs=jobs, mapsave_dir=mapsave, **grid)
        result.save(out / f"{name}.json")
        print(result.table(), flush=True)
        results[name] = result
    return results


def _sweep_table(head: str, result: SweepResult, cell: Callable[[SweepPoint], str]) -> list[str]:
    """One list-table: a row per crossbar and ADC range, a column per ADC width, then ``= int from``."""
    lines = [head, "", ".. list-table::", "   :header-rows: 1", "", "   * - rows, cell bits, ADC range"]
    lines += [f"     - {b}" for b in result.adc_bits] + ["     - = int from"]
    for rows, cell_bits in result.geometries:
        for kind in ("calibrated", "full"):
            lines.append(f"   * - {rows}, {cell_bits}, {kind}")
            lines += [f"     - {cell(result.point(rows, cell_bits, b, kind))}" for b in result.adc_bits]
            ideal = result.ideal_from(rows, cell_bits, kind)
            lines.append(f"     - {'-' if ideal is None else ideal}")
    return [*lines, ""]


def _snr(point: SweepPoint) -> str:
    snr = point.metric("integer", "snr_db")
    return "-" if snr is None else "inf" if snr == float("inf") else f"{snr:.1f}"


def _pct(value: float | None) -> str:
    return "-" if value is None else f"{100 * value:.1f}"


def _top1(point: SweepPoint) -> str:
    return _pct(point.top1_labels if point.top1_labels is not None else point.metric("fp32", "top1"))


def snr_tables(results: dict[str, SweepResult]) -> str:
    """The docs' tables for maps without labels: output SNR (dB) against the exact integer executor per ADC width."""
    return "\n".join(line for name, result in results.items() for line in _sweep_table(
        f"{name}: output SNR (dB) against the exact integer executor", result, _snr))


def rst_tables(results: dict[str, SweepResult]) -> str:
    """The docs' tables: top-1 per ADC width (calibrated / full) and the widths that reach the exact result."""
    lines = []
    for name, result in results.items():
        labels = result.reference.get("labels", {})
        head = f"{name}: " + (f"FP32 {_pct(labels.get('fp32'))} %, exact integer {_pct(labels.get('integer'))} % "
                              "top-1 on the labels; " if labels else "")
        out = next(iter(result.points[0].outputs))
        head += f"exact integer vs FP32 top-1 agreement {_pct(result.reference[out]['top1'])} %"
        lines += _sweep_table(head, result, _top1)
    return "\n".join(lines)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, required=True, help="folder for the JSON results and plots")
    parser.add_argument("--mapsave-dir", type=Path, default=None, help="where the maps go (default: <out>/mapsave)")
    parser.add_argument("--jobs", type=int, default=None, help="worker processes (default: the CPUs)")
    parser.add_argument("--corpus", default=None, help="sweep this corpus classifier instead of the digits maps")
    parser.add_argument("--resnet18", action="store_true", help="sweep torchvision's ResNet-18 (random weights)")
    parser.add_argument("--eval", type=int, default=32, help="evaluation feeds of --corpus (default: 32)")
    parser.add_argument("--adc-bits", default=None, help="ADC widths FIRST-LAST (default: the grid above)")
    parser.add_argument("--rows", default=None, help="crossbar rows, comma-separated (default: the grid above)")
    parser.add_argument("--cell-bits", default=None, help="cell bits, comma-separated (default: the grid above)")
    parser.add_argument("--skip-quantize", action="store_true", help="reuse the maps already in --mapsave-dir")
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    logging.getLogger("maptools.ppq").setLevel(logging.WARNING)
    args.out.mkdir(parents=True, exist_ok=True)
    mapsave = args.mapsave_dir or args.out / "mapsave"
    started = time.perf_counter()
    grid = dict(CORPUS_GRID if args.corpus or args.resnet18 else DIGITS_GRID)
    if args.adc_bits:
        first, last = (int(b) for b in args.adc_bits.split("-"))
        grid["adc_bits"] = range(first, last + 1)
    if args.rows:
        grid["rows"] = tuple(int(r) for r in args.rows.split(","))
    if args.cell_bits:
        grid["cell_bits"] = tuple(int(c) for c in args.cell_bits.split(","))
    if args.resnet18:
        results = _sweep_resnet18(mapsave, args.out, args.jobs, grid)
    elif args.corpus:
        results = _sweep_corpus(args.corpus, mapsave, args.out, args.jobs, grid, args.eval)
    else:
        if not args.skip_quantize:
            _quantize_digits(mapsave)
        results = _sweep_digits(mapsave, args.out, args.jobs, grid)
    print(snr_tables(results) if args.resnet18 or args.corpus else rst_tables(results))
    summary = {name: {"seconds": r.seconds, "jobs": r.jobs, "points": len(r.points)} for name, r in results.items()}
    print(json.dumps(summary), f"total {time.perf_counter() - started:.0f} s")
    return 0


if __name__ == "__main__":
    np.set_printoptions(precision=4)
    sys.exit(main())
