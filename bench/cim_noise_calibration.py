"""Noise-aware ADC calibration, measured: digits W8A8 on noisy chips, ranges calibrated on exact vs noisy sums.

Quantizes the bundled digits CNN at W8A8 as ``bench/cim_device.py`` does, collects the partial-sum histograms
of the training digits on 256-row crossbars of 2-bit cells once on exact cells and once per programming error
on a simulated chip of that device (``collect_histograms(..., device=, seed=)``, a chip other than the ones
evaluated), chooses MSE ranges for each ADC width, and runs :func:`maptools.quantization.cimmap.monte_carlo` on
the held-out digits with each calibration: top-1 agreement with the exact integer executor over the chips::

    python bench/cim_noise_calibration.py --out /tmp/cim_noise_calibration --chips 8 --images 270 --jobs 2

Writes ``<out>/cim_noise_calibration.json`` and prints the reStructuredText table of the docs.
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
from maptools.quantization.cimmap import Top1Agreement, monte_carlo
from maptools.quantization.cimmap.mapcal import collect_histograms

MAP = "digits_w8a8"
SPEC = CIMSpec(rows=256, cell_bits=2)
#: The chip the noisy sums are calibrated on (the evaluated chips are child_seed(--seed, i)).
CALIBRATION_SEED = 1000


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--chips", type=int, default=8)
    parser.add_argument("--images", type=int, default=270)
    parser.add_argument("--jobs", type=int, default=1)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--adc-bits", default="6,7,8")
    parser.add_argument("--prog-error", default="0.02,0.05")
    args = parser.parse_args()
    logging.basicConfig(level=logging.WARNING, format="%(asctime)s %(message)s")
    args.out.mkdir(parents=True, exist_ok=True)
    mapsave = args.out / "mapsave"
    train, _ = digits.load_split("train")
    test, _ = digits.load_split("test")
    test = test[:args.images]
    if not (mapsave / MAP / "manifest.json").exists():
        quantize({"input": list(digits.INPUT_SHAPE)}, "cpu", digits.MODEL_PATH, mapname=MAP, bit_width=8,
                 calibset=[train[i:i + 16] for i in range(0, len(train) - 15, 16)], calib_steps=32,
                 mapsave_dir=mapsave, analysis_steps=4)
    metric = Top1Agreement(simulate(MAP, test, mapsave_dir=mapsave)["logits"])
    exact_histograms = collect_histograms(MAP, [train], SPEC, mapsave_dir=mapsave)
    rows = []
    for error in (float(v) for v in args.prog_error.split(",")):
        device = DeviceModel(prog_sigma_rel=error)
        noisy_histograms = collect_histograms(MAP, [train], SPEC, mapsave_dir=mapsave, device=device,
                                              seed=CALIBRATION_SEED)
        for bits in (int(v) for v in args.adc_bits.split(",")):
            row = {"prog_error": error, "adc_bits": bits}
            for name, histograms in (("exact", exact_histograms), ("noisy", noisy_histograms)):
                calibration = histograms.calibration(bits)
                started = time.perf_counter()
                result = monte_carlo(MAP, test, cim=calibration.spec, adc=calibration, device=device,
                                     chips=args.chips, metric=metric, seed=args.seed, jobs=args.jobs,
                                     mapsave_dir=mapsave)
                row[name] = {"mean": result.mean, "std": result.std, "worst": result.worst,
                             "values": result.values.tolist(), "seconds": time.perf_counter() - started}
            rows.append(row)
            print(f"prog {error:g}, {bits} bits: exact-sum ranges {row['exact']['mean']:.4f} "
                  f"+- {row['exact']['std']:.4f} (worst {row['exact']['worst']:.4f}); noisy-sum ranges "
                  f"{row['noisy']['mean']:.4f} +- {row['noisy']['std']:.4f} (worst {row['noisy']['worst']:.4f})",
                  flush=True)
    (args.out / "cim_noise_calibration.json").write_text(json.dumps(
        {"spec": str(SPEC), "images": args.images, "chips": args.chips, "seed": args.seed,
         "calibration_seed": CALIBRATION_SEED, "rows": rows}, indent=1))
    print("\n.. list-table::\n   :header-rows: 1\n\n   * - Programming error\n     - ADC bits\n"
          "     - Ranges of exact sums: mean ± std (worst)\n     - Ranges of noisy sums: mean ± std (worst)")
    for row in rows:
        cells = [f"{100 * row[k]['mean']:.1f} ± {100 * row[k]['std']:.1f} ({100 * row[k]['worst']:.1f}) %"
                 for k in ("exact", "noisy")]
        print(f"   * - {100 * row['prog_error']:g} %\n     - {row['adc_bits']}\n     - {cells[0]}\n     - {cells[1]}")


if __name__ == "__main__":
    main()
