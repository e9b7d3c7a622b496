"""The Monte-Carlo of docs/cim.rst ("A Monte-Carlo of EfficientNet-Lite1"): 32 chips of the corpus Lite1 at W8A8.

Quantizes the corpus' EfficientNet-Lite1 at W8A8 (``default`` recipe, 16 calibration crops), calibrates 8-bit ADC
ranges for 256-row crossbars of 2-bit cells on 8 of them, picks the first ``--crops`` of the 400 held-out crops
FP32 is confident about (top-1 probability > 0.5), and runs :func:`maptools.quantization.cimmap.monte_carlo` on
static chips (``static='compiled'``: torch, the ADC fused by ``torch.compile``) for PCM cells
(:meth:`DeviceModel.pcm`, read noise off, global drift compensation on) with the programming error scaled by
each of ``--prog-scales``, read at 20 s and 1 day. The figure is the top-1 agreement with FP32 on those crops::

    OMP_NUM_THREADS=1 python bench/cim_montecarlo_lite1.py --out /tmp/lite1_mc --chips 32 --crops 3 --jobs 2

Writes ``<out>/lite1_montecarlo.json`` (each chip's value, wall and CPU seconds of every setting, the CPU seconds
of the worker processes included) and prints the reStructuredText table. The map, the calibration and the crops
are kept in ``<out>`` and reused by a second run.
"""

from __future__ import annotations

import argparse
import json
import logging
import resource
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from corpus import registry, tasks  # noqa: E402

from maptools.quantization import quantize, simulate  # noqa: E402
from maptools.quantization.cim import CIMSpec, DeviceModel  # noqa: E402
from maptools.quantization.cim.mapcalibration import MapCalibration  # noqa: E402
from maptools.quantization.cimmap import Top1Agreement, calibrate_map, monte_carlo  # noqa: E402

MODEL, MAP = "efficientnet_lite1", "lite1_w8a8"
SPEC = CIMSpec(rows=256, cell_bits=2, adc_bits=8, adc_range="calibrated")
TIMES = {"20 s": 20.0, "1 day": 86400.0}


def device(prog_scale: float, seconds: float) -> DeviceModel:
    """PCM 2-bit cells read ``seconds`` after programming, programming error x ``prog_scale``, no read noise."""
    pcm = DeviceModel.pcm(SPEC.cell_bits, seconds)
    return pcm.replace(prog_sigma_abs=tuple(prog_scale * v for v in pcm.prog_sigma_abs), read_sigma_rel=0.0)


def cpu_seconds() -> float:
    """CPU seconds of this process and of its finished children (the pool's workers)."""
    own, children = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
    return own.ru_utime + own.ru_stime + children.ru_utime + children.ru_stime


def prepare(out: Path, crops: int) -> tuple[MapCalibration, np.ndarray, np.ndarray]:
    """The map, its ADC calibration, and the confident held-out crops with their FP32 logits (cached in ``out``)."""
    mapsave = out / "mapsave"
    model = registry.get(MODEL)
    calib = registry.inputs_for(model, "calib", count=16, seed=0)
    if not (mapsave / MAP / "manifest.json").exists():
        quantize(model.input_shapes, "cpu", model.path, mapname=MAP, calibset=calib, calib_steps=16, bit_width=8,
                 mapsave_dir=mapsave, analysis_steps=1, evalset=calib[:1])
    if not (out / "adc.json").exists():
        calibrate_map(MAP, calib[:8], SPEC, mapsave_dir=mapsave).save(out / "adc.json")
    if not (out / "confident.npz").exists():
        import onnxruntime

        feeds = registry.inputs_for(model, "eval", count=400, seed=0)
        session = onnxruntime.InferenceSession(str(model.path), providers=["CPUExecutionProvider"])
        logits = np.concatenate([session.run(None, feed)[0] for feed in feeds])
        sure = np.flatnonzero(tasks.softmax(logits).max(axis=-1) > 0.5)
        np.savez(out / "confident.npz", index=sure, logits=logits[sure],
                 inputs=np.concatenate([feeds[i]["input"] for i in sure]))
    data = np.load(out / "confident.npz")
    logging.info("%d of 400 held-out crops are confident; using %d", data["index"].size, crops)
    return MapCalibration.load(out / "adc.json"), data["inputs"][:crops], data["logits"][:crops]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--chips", type=int, default=32)
    parser.add_argument("--crops", type=int, default=3)
    parser.add_argument("--jobs", type=int, default=2)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--prog-scales", default="0.25,0.5,1", help="programming-error scales of the PCM model")
    parser.add_argument("--times", default=",".join(TIMES), help="read times, of: " + ", ".join(TIMES))
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    args.out.mkdir(parents=True, exist_ok=True)
    mapsave = args.out / "mapsave"
    calibration, inputs, fp32 = prepare(args.out, args.crops)
    metric = Top1Agreement(fp32)
    batches = [inputs[i:i + 1] for i in range(len(inputs))]
    exact = np.concatenate([simulate(MAP, b, mapsave_dir=mapsave)["logits"] for b in batches])  # batch-1 map
    ideal = np.concatenate([simulate(MAP, b, mapsave_dir=mapsave, cim=SPEC, adc=calibration)["logits"]
                            for b in batches])
    record: dict = {"spec": str(SPEC), "crops": len(inputs), "chips": args.chips, "seed": args.seed,
                    "jobs": args.jobs, "exact_map": metric({"logits": exact}), "ideal_cells": metric({"logits": ideal}),
                    "rows": []}
    print(f"confident-crop agreement with FP32: exact map {record['exact_map']:.3f}, ideal cells "
          f"{record['ideal_cells']:.3f}", flush=True)
    started, cpu0 = time.perf_counter(), cpu_seconds()
    for scale in (float(s) for s in args.prog_scales.split(",")):
        for when in args.times.split(","):
            wall, cpu = time.perf_counter(), cpu_seconds()
            result = monte_carlo(MAP, batches, cim=SPEC, adc=calibration, device=device(scale, TIMES[when]),
                                 chips=args.chips, metric=metric, seed=args.seed, jobs=args.jobs,
                                 mapsave_dir=mapsave, static="compiled")
            row = {"prog_scale": scale, "time": when, **result.to_dict(), "wall_s": time.perf_counter() - wall,
                   "cpu_s": cpu_seconds() - cpu}
            record["rows"].append(row)
            record.update(wall_s=time.perf_counter() - started, cpu_s=cpu_seconds() - cpu0)
            (args.out / "lite1_montecarlo.json").write_text(json.dumps(record, indent=1))
            print(f"prog x{scale} {when}: {result} ({row['wall_s']:.0f} s wall, {row['cpu_s']:.0f} s CPU)",
                  flush=True)
    print(f"total {record['wall_s']:.0f} s wall, {record['cpu_s']:.0f} s CPU")
    print("\n.. list-table::\n   :header-rows: 1\n\n   * - Programming error\n     - Read at\n     - Mean\n"
          "     - Std\n     - Worst")
    for row in record["rows"]:
        print(f"   * - x{row['prog_scale']:g}\n     - {row['time']}\n     - {100 * row['mean']:.1f} %\n"
              f"     - {100 * row['std']:.1f}\n     - {100 * row['worst']:.1f} %")


if __name__ == "__main__":
    main()
