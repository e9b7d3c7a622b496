"""The worked Monte-Carlo of docs/cim.rst ("Device non-idealities"): the digits CNN at W8A8 on noisy chips.

Quantizes the bundled digits CNN at W8A8 (default recipe, 32 batches of 16 training digits), calibrates 8-bit
ADC ranges on the 1257 training digits for 256-row crossbars of 2-bit cells, then runs
:func:`maptools.quantization.cimmap.monte_carlo` for each device below on the held-out test digits: top-1
agreement with the exact integer executor, per chip, and its distribution::

    python bench/cim_device.py --out /tmp/cim_device --chips 8 --images 540 --jobs 1

Writes ``<out>/cim_device.json`` and prints the reStructuredText table of the docs.

``--mapping`` measures instead how the weight bits are best put on cells (docs/cim.rst, "Mapping weight bits to
noisy cells"): the digits W4A4 and W8A8 maps on 256-row crossbars with 8-bit calibrated ADCs, for each weight
encoding (differential pair, offset code) x cell bits (1, 2, 4) x PCM programming error (x0.5, x1, x2 of
:meth:`DeviceModel.pcm`'s, with its read noise and drift, compensated) x read time (20 s, 1 day)::

    python bench/cim_device.py --mapping --out /tmp/cim_mapping --chips 8 --images 96 --calib-images 256 --jobs 2

Writes ``<out>/cim_mapping.json`` (with the predicted relative programming-error variance of each mapping,
:func:`~maptools.quantization.cim.cellerror.mapping_error_table`) and prints the table.
"""

from __future__ import annotations

import argparse
import json
import logging
import time
from pathlib import Path

import numpy as np

from maptools.examples import digits
from maptools.quantization import quantize, simulate
from maptools.quantization.cim import CIMSpec, DeviceModel
from maptools.quantization.cim.cellerror import mapping_error_table
from maptools.quantization.cim.spec import WEIGHT_ENCODINGS
from maptools.quantization.cimmap import Top1Agreement, calibrate_map, monte_carlo
from maptools.quantization.reference import ReferenceExecutor

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


MAPPING_CELL_BITS = (1, 2, 4)
MAPPING_PROG_SCALES = (0.5, 1.0, 2.0)
MAPPING_TIMES = {"20 s": 20.0, "1 day": DAY}


def mapping_device(cell_bits: int, prog_scale: float, time_s: float) -> DeviceModel:
    """The PCM model of ``cell_bits``-bit cells at ``time_s``, its programming error scaled by ``prog_scale``."""
    pcm = DeviceModel.pcm(cell_bits, time_s)
    return pcm.replace(prog_sigma_abs=tuple(prog_scale * v for v in pcm.prog_sigma_abs))


def predicted_error(mapname: str, mapsave: Path, prog_scale: float) -> dict[str, float]:
    """The relative programming-error variance of each mapping, averaged over the map's crossbar MACs."""
    executor = ReferenceExecutor.load(mapname, mapsave_dir=mapsave)
    tables = [mapping_error_table(executor.mac_weights(node).weight, ops.weight_bits,
                                  lambda c: mapping_device(c, prog_scale, 20.0), cell_bits=MAPPING_CELL_BITS,
                                  weight_min=ops.weight_min) for node, ops in executor.crossbar_operands()]
    return {f"{e} c={c}": sum(t[e, c] for t in tables) / len(tables) for e, c in tables[0]}


def mapping_grid(args: argparse.Namespace, train: np.ndarray, test: np.ndarray) -> None:
    """The encoding x cell bits x programming error x time grid of ``--mapping`` (see the module docstring).

    Runs one (programming error, time) pair after the other over every map and mapping, so that a run cut
    short leaves a complete comparison of the mappings at the settings it reached.
    """
    mapsave = args.out / "mapsave"
    rows: list[dict] = []
    predicted: dict[str, dict] = {}
    metrics, calibrations, ideal = {}, {}, {}
    for bits in (4, 8):
        name = f"digits_w{bits}a{bits}"
        quantize({"input": list(digits.INPUT_SHAPE)}, "cpu", digits.MODEL_PATH, mapname=name, bit_width=bits,
                 calibset=[train[i:i + 16] for i in range(0, len(train) - 15, 16)], calib_steps=32,
                 mapsave_dir=mapsave, analysis_steps=4)
        metrics[name] = Top1Agreement(simulate(name, test, mapsave_dir=mapsave)["logits"])
        predicted[name] = {f"x{scale}": predicted_error(name, mapsave, scale) for scale in MAPPING_PROG_SCALES}
        print(f"{name} predicted relative programming-error variance: {predicted[name]}", flush=True)
        for encoding in WEIGHT_ENCODINGS:
            for cells in MAPPING_CELL_BITS:
                spec = SPEC.replace(cell_bits=cells, weight_encoding=encoding)
                calibrations[name, spec] = calibrate_map(name, [train[:args.calib_images]], spec,
                                                         mapsave_dir=mapsave)
                ideal[name, spec] = metrics[name](simulate(name, test, mapsave_dir=mapsave, cim=spec,
                                                           adc=calibrations[name, spec]))
    for scale in MAPPING_PROG_SCALES:
        for when, seconds in MAPPING_TIMES.items():
            for name, spec in calibrations:
                started = time.perf_counter()
                device = mapping_device(spec.cell_bits, scale, seconds)
                result = monte_carlo(name, test, cim=spec, adc=calibrations[name, spec], device=device,
                                     chips=args.chips, metric=metrics[name], seed=args.seed, jobs=args.jobs,
                                     mapsave_dir=mapsave)
                row = {"map": name, "encoding": spec.weight_encoding, "cell_bits": spec.cell_bits,
                       "prog_scale": scale, "time": when, "ideal_cells": ideal[name, spec], **result.to_dict(),
                       "seconds": time.perf_counter() - started}
                rows.append(row)
                print(f"{name} {spec.weight_encoding} c={spec.cell_bits} prog x{scale} {when}: {result} "
                      f"({row['seconds']:.0f} s)", flush=True)
                (args.out / "cim_mapping.json").write_text(json.dumps(
                    {"spec": str(SPEC), "images": args.images, "calib_images": args.calib_images,
                     "chips": args.chips, "seed": args.seed, "rows": rows, "predicted_relative_variance": predicted},
                    indent=1))
    print_mapping_table(rows)


def print_mapping_table(rows: list[dict]) -> None:
    """The reStructuredText table of ``--mapping``'s rows: agreement mean +- std (points) per mapping."""
    print("\n.. list-table::\n   :header-rows: 1\n\n   * - Map\n     - Prog. error\n     - Time")
    print("".join(f"     - {e[:4]} c={c}\n" for e in WEIGHT_ENCODINGS for c in MAPPING_CELL_BITS), end="")
    print("     - Best (highest mean)")
    keys = sorted({(r["map"], r["prog_scale"], r["time"]) for r in rows}, key=lambda k: (k[0], k[1], k[2] != "20 s"))
    for key in keys:
        cells = {(r["encoding"], r["cell_bits"]): r for r in rows if (r["map"], r["prog_scale"], r["time"]) == key}
        print(f"   * - {key[0]}\n     - x{key[1]}\n     - {key[2]}")
        for e in WEIGHT_ENCODINGS:
            for c in MAPPING_CELL_BITS:
                r = cells.get((e, c))
                print("     - " + ("" if r is None else f"{100 * r['mean']:.1f} +- {100 * r['std']:.1f}"))
        best = max(cells.values(), key=lambda r: r["mean"])
        print(f"     - {best['encoding']}, {best['cell_bits']}-bit cells")


def mapping_table_from_json(path: Path) -> None:
    """Print the table of a (possibly partial) ``cim_mapping.json``."""
    print_mapping_table(json.loads(Path(path).read_text())["rows"])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, help="the output directory (required unless --table)")
    parser.add_argument("--chips", type=int, default=8)
    parser.add_argument("--images", type=int, default=540)
    parser.add_argument("--jobs", type=int, default=1)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--only", default="", help="run only the devices whose name contains this text")
    parser.add_argument("--mapping", action="store_true", help="the weight-to-cell mapping grid instead")
    parser.add_argument("--table", type=Path, help="only print the table of this cim_mapping.json")
    parser.add_argument("--calib-images", type=int, default=1257, help="training digits of --mapping's ADC ranges")
    args = parser.parse_args()
    if args.table:
        mapping_table_from_json(args.table)
        return
    if args.out is None:
        parser.error("--out is required (unless --table)")
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    args.out.mkdir(parents=True, exist_ok=True)
    mapsave = args.out / "mapsave"
    train, _ = digits.load_split("train")
    test, labels = digits.load_split("test")
    test, labels = test[:args.images], labels[:args.images]
    if args.mapping:
        mapping_grid(args, train, test)
        return
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
