"""onnxruntime's ``quantize_static`` on a float ONNX model, timed: the helper of ``bench/speed.py``.

Runs in the project's own environment as a separate process (it imports nothing but onnxruntime, onnx and
numpy, so its timing carries no torch or PPQ import). Calibration data are ``--steps`` batches of
standard-normal noise drawn with numpy from ``--seed``. Prints one JSON record on the last line of stdout.

Usage::

    python bench/_ort_quant.py MODEL.onnx OUT.onnx --method MinMax --steps 32
"""

from __future__ import annotations

import argparse
import json
import sys
import time


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="Time onnxruntime quantize_static (QDQ, per-channel).")
    parser.add_argument("model")
    parser.add_argument("output")
    parser.add_argument("--method", choices=("MinMax", "Percentile", "Entropy", "Distribution"), default="MinMax")
    parser.add_argument("--steps", type=int, default=32)
    parser.add_argument("--shape", default="1,3,224,224")
    parser.add_argument("--input", default="input")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--bits", type=int, choices=(4, 8), default=8)
    args = parser.parse_args(argv)

    import numpy as np
    import onnxruntime
    from onnxruntime.quantization import (
        CalibrationDataReader,
        CalibrationMethod,
        QuantFormat,
        QuantType,
        quantize_static,
    )

    shape = tuple(int(d) for d in args.shape.split(","))

    class Reader(CalibrationDataReader):
        def __init__(self) -> None:
            rng = np.random.default_rng(args.seed)
            self._batches = iter([{args.input: rng.standard_normal(shape).astype(np.float32)}
                                  for _ in range(args.steps)])

        def get_next(self):
            return next(self._batches, None)

    qtype = QuantType.QInt8 if args.bits == 8 else QuantType.QInt4
    started = time.perf_counter()
    # symmetric activations and per-channel symmetric weights: the settings maptools uses
    quantize_static(args.model, args.output, Reader(), quant_format=QuantFormat.QDQ, per_channel=True,
                    activation_type=qtype, weight_type=qtype,
                    calibrate_method=getattr(CalibrationMethod, args.method),
                    extra_options={"ActivationSymmetric": True, "WeightSymmetric": True,
                                   "CalibTensorRangeSymmetric": True, "CalibMovingAverage": False},
                    calibration_providers=["CPUExecutionProvider"])
    seconds = time.perf_counter() - started
    print(json.dumps({"work_s": seconds, "onnxruntime": onnxruntime.__version__}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
