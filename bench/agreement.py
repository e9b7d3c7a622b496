"""Bit-true agreement of the artifacts: PPQ's simulation vs onnxruntime vs the integer reference executor.

For the bundled digits CNN at W8A8, W4A4, W3A3 and asymmetric W4A4 and the bundled mobile CNN (HardSwish,
squeeze-excite Sigmoid gates, ReLU6) at W8A8, W4A4 and W4A4 with the stem and the first residual Add at 8
bits (all calibrated on 32 batches of 16 training digits, evaluated on the 540 held-out digits), and
torchvision resnet18 (random weights, 8 random calibration batches, 4 random inputs) at W8A8 and W4A4, run
:func:`maptools.quantization.verify` and tabulate, per pair, the share of output elements within one output
quantization step, the SNR, and top-1.

Usage: ``python bench/agreement.py [--out docs/benchmarks_agreement.rst] [--skip-resnet]``
"""

from __future__ import annotations

import argparse
import logging
import sys
import tempfile
import time
import warnings
from pathlib import Path

import numpy as np
import torch

from maptools.examples import digits, mobile
from maptools.quantization import quantize, verify

CASES = [("W8A8", 8, True), ("W4A4", 4, True), ("W3A3", 3, True), ("W4A4 asym", 4, False)]
MOBILE_CASES = [("W8A8", 8, True), ("W4A4", 4, True), ("W4A4 mixed", 4, True)]
#: layer_bits of the mobile CNN's "mixed" row: 8-bit stem and first residual Add in a 4-bit map
MOBILE_MIXED = {"/stem/stem.0/Conv": (8, 8), "/block1/Add": (4, 8)}
PAIRS = [("ppq", "onnxruntime"), ("ppq", "integer"), ("onnxruntime", "integer")]


def fmt_snr(value: float) -> str:
    return "exact" if value == float("inf") else f"{value:.1f}"


def run(out: Path | None, skip_resnet: bool) -> str:
    rows = []
    train, _ = digits.load_split("train")
    images, labels = digits.load_split("test")
    calib = [{"input": train[i:i + 16]} for i in range(0, 16 * 32, 16)]
    tests = [{"input": images[i:i + 60]} for i in range(0, 540, 60)]
    models = [("digits CNN", case) for case in CASES] + [("mobile CNN", case) for case in MOBILE_CASES]
    if not skip_resnet:
        models += [("resnet18", ("W8A8", 8, True)), ("resnet18", ("W4A4", 4, True)),
                   ("resnet18", ("W4A4 unsigned", 4, True))]
    with tempfile.TemporaryDirectory() as tmp:
        r18 = Path(tmp) / "resnet18.onnx"
        for model, (label, bits, symmetric) in models:
            started = time.perf_counter()
            mapname = f"{model.split()[0]}_{label.replace(' ', '_')}"
            if model == "resnet18":
                if not r18.exists():
                    import torchvision

                    torch.manual_seed(0)
                    with warnings.catch_warnings():
                        warnings.simplefilter("ignore")
                        torch.onnx.export(torchvision.models.resnet18(weights=None).eval(),
                                          torch.randn(1, 3, 224, 224), str(r18), input_names=["input"],
                                          output_names=["output"], opset_version=13, dynamo=False)
                quantize({"input": [1, 3, 224, 224]}, "cpu", r18, mapname=mapname, calib_steps=8, bit_width=bits,
                         symmetrical=symmetric, mapsave_dir=tmp, recipe="fast",
                         unsigned_nonnegative="unsigned" in label)
                report = verify(mapname, None, mapsave_dir=tmp, batches=4)
                top1 = "-"
            else:
                path = digits.MODEL_PATH if model == "digits CNN" else mobile.MODEL_PATH
                quantize({"input": list(digits.INPUT_SHAPE)}, "cpu", path, mapname=mapname,
                         calibset=calib, calib_steps=32, bit_width=bits, symmetrical=symmetric, mapsave_dir=tmp,
                         layer_bits=MOBILE_MIXED if "mixed" in label else None)
                report = verify(mapname, tests, mapsave_dir=tmp)
                top1 = " / ".join(f"{100 * np.mean(report.outputs[e]['logits'].argmax(1) == labels):.2f}"
                                  for e in ("fp32", "ppq", "onnxruntime", "integer"))
            cells = []
            for ref, cand in PAIRS:
                pair = report.get(ref, cand)
                cells.append(f"{100 * pair.within_one_step:.2f}% / {fmt_snr(pair.snr_db)}")
            rows.append([model, label, *cells, top1, f"{time.perf_counter() - started:.0f}"])
            print(" | ".join(rows[-1]), flush=True)
    header = ["model", "bits", "PPQ vs ORT", "PPQ vs integer", "ORT vs integer",
              "top-1 FP32 / PPQ / ORT / integer (%)", "seconds"]
    widths = [max(len(str(r[i])) for r in [header, *rows]) for i in range(len(header))]
    line = " ".join("=" * w for w in widths)
    table = [line, " ".join(h.ljust(w) for h, w in zip(header, widths, strict=True)), line]
    table += [" ".join(str(c).ljust(w) for c, w in zip(r, widths, strict=True)) for r in rows]
    table.append(line)
    text = ("Each cell: share of output elements within one output quantization step / SNR in dB "
            "(\"exact\": identical outputs). ORT is onnxruntime 1.22 on ``quant_model.onnx`` with default "
            "session options. The digits and mobile CNN rows use the ``default`` recipe (MSE observer; with "
            "symmetric activations, never-negative outputs on the unsigned range) and 32 batches of 16 "
            "training digits; *mixed* keeps the mobile CNN's stem Conv and first residual Add at 8-bit "
            "activations (``layer_bits``) in a W4A4 map; the resnet18 rows (random weights) use "
            "``recipe='fast'`` and 8 random batches, "
            "*unsigned* adding ``unsigned_nonnegative=True``.\n\n" + "\n".join(table)
            + "\n\nMade with ``python bench/agreement.py``.\n")
    if out is not None:
        out.write_text(text)
    return text


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=Path("docs/benchmarks_agreement.rst"))
    parser.add_argument("--skip-resnet", action="store_true")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.WARNING)
    print(run(args.out, args.skip_resnet))
    return 0


if __name__ == "__main__":
    sys.exit(main())
