"""The worked Monte-Carlo of docs/cim.rst ("Device non-idealities"): the digits CNN at W8A8 on noisy chips.

Quantizes the bundled digits CNN at W8A8 (default recipe, 32 batches of 16 training digits), calibrates 8-bit
ADC ranges on the 1257 training digits for 256-row crossbars of 2-bit cells, then runs
:func:`maptools.quantization.cimmap.monte_carlo` for each device below on the held-out test digits: top-1
agreement with the exact integer executor, per chip, and its distribution::

    python bench/cim_device.py --out /tmp/cim_device --chips 8 --images 540 --jobs 1

Writes ``<out>/cim_device.json`` and prints the reStructuredText table of the docs.
"""

from __future__ import annotations

import argparse
import json
import logging
import time
from pathlib import Path

from maptools.examples import digits
from maptools.quantization import quantize, simulate
from maptools.quantization.cim import CIMSpec, DeviceModel
from maptools.quantization.cimmap import Top1Agreement, calibrate_map, monte_carlo

MAP = "digits_w8a8"
SPEC = CIMSpec(rows=256, cell_bits=2, adc_bits=8, adc_range="calibrated")
DAY, YEAR = 86400.0, 365 * 86400.0
DEVICES: dict[str, DeviceModel] = {
    "programming error 2 %": DeviceModel(prog_sigma_rel=0.02),
    "programming error 5 %": DeviceModel(prog_sigma_rel=0.05),
    "programming error 10 %": DeviceModel(prog_sigma_rel=0.10),
    "read noise 2 %": DeviceModel(read_sigma_rel=0.02),
    "stuck-at 0.1 % off, 0.1 % on": DeviceModel(stuck_off_rate=0.001, stuck_on_rate=0.001),
    "IR drop r_wire/r_on 2.5e-5": DeviceModel(ir_drop=2.5e-5),
    "IR drop r_wire/r_on 2.5e-4": DeviceModel(ir_drop=2.5e-4),
    "IR drop r_wire/r_on 1e-3": DeviceModel(ir_drop=1e-3),
    "PCM, 20 s": DeviceModel.pcm(2, 20.0),
    "PCM, 1 day, no compensation": DeviceModel.pcm(2, DAY, drift_compensation=False),
    "PCM, 1 day": DeviceModel.pcm(2, DAY),
    "PCM, 1 year": DeviceModel.pcm(2, YEAR),
}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--chips", type=int, default=8)
    parser.add_argument("--images", type=int, default=540)
    parser.add_argument("--jobs", type=int, default=1)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--only", default="", help="run only the devices whose name contains this text")
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    args.out.mkdir(parents=True, exist_ok=True)
    mapsave = args.out / "mapsave"
    train, _ = digits.load_split("train")
    test, labels = digits.load_split("test")
    test, labels = test[:args.images], labels[:args.images]
    quantize({"input": list(digits.INPUT_SHAPE)}, "cpu", digits.MODEL_PATH, mapname=MAP, bit_width=8,
             calibset=[train[i:i + 16] for i in range(0, len(train) - 15, 16)], calib_steps=32,
             mapsave_dir=mapsave, analysis_steps=4)
    calibration = calibrate_map(MAP, [train], SPEC, mapsave_dir=mapsave)
    exact = simulate(MAP, test, mapsave_dir=mapsave)["logits"]
    ideal = simulate(MAP, test, mapsave_dir=mapsave, cim=SPEC, adc=calibration)["logits"]
    metric = Top1Agreement(exact)
    rows = {"ideal cells": {"mean": metric({"logits": ideal}), "std": 0.0, "worst": metric({"logits": ideal}),
                            "seconds": 0.0}}
    print(f"exact top-1 {float((exact.argmax(1) == labels).mean()):.4f}; ideal cells agreement "
          f"{rows['ideal cells']['mean']:.4f}", flush=True)
    for name, device in DEVICES.items():
        if args.only not in name:
            continue
        started = time.perf_counter()
        result = monte_carlo(MAP, test, cim=SPEC, adc=calibration, device=device, chips=args.chips, metric=metric,
                             seed=args.seed, jobs=args.jobs, mapsave_dir=mapsave)
        rows[name] = result.to_dict()
        print(f"{name}: {result} ({time.perf_counter() - started:.0f} s)", flush=True)
    (args.out / "cim_device.json").write_text(json.dumps({"spec": str(SPEC), "images": args.images,
                                                          "chips": args.chips, "rows": rows}, indent=1))
    print("\n.. list-table::\n   :header-rows: 1\n\n   * - Device\n     - Mean\n     - Std\n     - Worst")
    for name, row in rows.items():
        print(f"   * - {name}\n     - {100 * row['mean']:.1f} %\n     - {100 * row['std']:.1f}\n"
              f"     - {100 * row['worst']:.1f} %")


if __name__ == "__main__":
    main()
