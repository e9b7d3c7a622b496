"""Real trained models: maptools against raw PPQ and onnxruntime's ``quantize_static``, on the task metric.

Every model of the corpus (``bench/corpus``: a YOLOv8n-style detector, MTCNN's three networks, a Paddle
text-orientation classifier, an ImageNet EfficientNet-Lite1 and their dynamo / Paddle2ONNX / tf2onnx-style
variants) is quantized at each bit pair, unmodified, from the same calibration feeds (natural photographs,
detector scenes, face crops or rendered text: ``registry.inputs_for(model, 'calib', ...)``) by:

* maptools ``quantize`` with each requested recipe, evaluated by onnxruntime on ``quant_model.onnx``;
* raw PPQ 0.6.6 (its TensorRT quantizer at these bits, PPQ's plain setting), evaluated by its simulation;
  on the model as given, and where PPQ cannot load or run it, again on the graph maptools prepared for it
  (opset 13, its rewrites), marked so;
* onnxruntime's ``quantize_static`` (QDQ, per-channel s8/s4 weights, u8 activations) with MinMax and
  Percentile calibration, the better of the two reported (W8A8 and W4A8 only).

and compared with the FP32 model on held-out feeds (``'eval'``: other photographs, other scenes) with the
model's task metric (``bench/corpus/tasks.py``): top-1 agreement on all crops / on the crops FP32 is
confident about (top-1 probability > 0.5) / mean KL divergence for classifiers; the share of FP32 detections
matched by class with IoU >= 0.5 for the detector; the IoU of the face-positive cells for P-Net; the face
decision agreement for R-Net and O-Net. The SNR of the first output is given beside it. Models the corpus
marks unsupported (silero-vad) must be refused with a clear error; the table says how.

Usage::

    python bench/real_models.py                       # writes docs/benchmarks_real.rst (+ .json)
    python bench/real_models.py --models nudenet_320n --bits 8/8 --recipes default,best --out /tmp/r.rst
    python bench/real_models.py --models efficientnet_lite1 --bits 4/8 --recipes best --calib-from eval  # see below

``--calib-from eval`` calibrates on other feeds of the evaluation sources (seed :data:`EVAL_SOURCE_CALIB_SEED`:
for photographs other random crops of the evaluation photographs), never the evaluated feeds themselves: it measures
how much a method depends on calibration data like the evaluation data, not a protocol to report.
"""

from __future__ import annotations

import argparse
import dataclasses
import functools
import json
import logging
import os
import platform
import re
import shlex
import sys
import tempfile
import time
import traceback
from collections.abc import Callable, Sequence
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "bench"))

from corpus import registry, tasks  # noqa: E402
from peers import raw_setting, run_ort, run_raw_ppq  # noqa: E402

from maptools.quantization import quantize  # noqa: E402
from maptools.quantization.model import (  # noqa: E402
    check_input_shapes,
    first_and_last_macs,
    load_model,
    output_operators,
    prepare_model,
)

DEFAULT_OUT = ROOT / "docs" / "benchmarks_real.rst"
Feed = dict[str, np.ndarray]
Outputs = list[list[np.ndarray]]


def _session(path: Path) -> ort.InferenceSession:
    options = ort.SessionOptions()
    options.log_severity_level = 3
    options.intra_op_num_threads = 1
    return ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])


def headline(model: registry.CorpusModel, metrics: dict[str, float]) -> tuple[str, float]:
    """The task metric as a table cell, and the number to rank methods by (higher is better)."""
    if model.task == "classifier":
        return (f"{metrics['top1_agreement']:.3f} / {metrics['confident_agreement']:.3f} / "
                f"{metrics['mean_kl']:.3f}", metrics["top1_agreement"] - metrics["mean_kl"])
    if model.task == "yolov8":
        return (f"{metrics['recall']:.3f} ({metrics['cand_detections']:.0f}/{metrics['ref_detections']:.0f})",
                metrics["recall"])
    if model.task == "mtcnn_pnet":
        return f"IoU {metrics['iou']:.3f}", metrics["iou"]
    if model.task == "layout":
        return (f"{metrics['recall']:.3f} / {metrics['precision']:.3f} ({metrics['cand_detections']:.0f}/"
                f"{metrics['ref_detections']:.0f})", metrics["recall"] + metrics["precision"])
    if model.task == "text_rec":
        return (f"{metrics['same_strings']:.0f}/{metrics['lines']:.0f} / {metrics['step_agreement']:.3f}",
                metrics["string_agreement"])
    return f"{metrics['decision_agreement']:.3f}", metrics["decision_agreement"]


METRIC_NAMES = {
    "classifier": "top-1 agreement all / confident / mean KL",
    "yolov8": "recall of FP32 detections (matched class, IoU >= 0.5) (detections made / FP32's)",
    "mtcnn_pnet": "IoU of face-positive cells (p > 0.6)",
    "mtcnn_rnet": "face decision agreement (p > 0.7)",
    "mtcnn_onet": "face decision agreement (p > 0.7)",
    "layout": "recall / precision of FP32's boxes after rapid_layout's decoding (class, IoU >= 0.5) (boxes / FP32's)",
    "text_rec": "lines read as FP32 reads them (rapidocr's CTC decoding) / per-step argmax agreement",
}


def measure(model: registry.CorpusModel, ref: Outputs, labels: np.ndarray | None,
            run: Callable[[], Outputs]) -> dict:
    """Run one method; its metrics against FP32, or the error it stopped with."""
    started = time.perf_counter()
    try:
        cand = run()
    except Exception as exc:  # a peer that cannot handle the model: recorded, not fatal
        logging.getLogger("real_models").debug("failed", exc_info=True)
        return {"error": f"{type(exc).__name__}: {' '.join(str(exc).split())[:300]}",
                "seconds": time.perf_counter() - started}
    seconds = time.perf_counter() - started
    metrics = tasks.evaluate(model, ref, cand, labels)
    cell, score = headline(model, metrics)
    return {"cell": cell, "score": score, "snr_db": tasks.snr_db([o[0] for o in ref], [o[0] for o in cand]),
            "seconds": seconds, "metrics": metrics}


def prepared_copy(model: registry.CorpusModel, workdir: Path) -> Path:
    """The graph maptools hands PPQ (opset 13, named nodes, PPQ rewrites), saved for raw PPQ."""
    from maptools.quantization.engine.rewrites import ppq_compatible

    loaded = load_model(model.path)
    proto = ppq_compatible(prepare_model(loaded, check_input_shapes(model.input_shapes, loaded)))
    path = workdir / f"{model.name}_prepared.onnx"
    import onnx

    onnx.save(proto, str(path))
    return path


def _setting(default: object, text: str) -> object:
    """A learned-rounding setting parsed from a recipe's ``key=value`` in the type of its default."""
    if isinstance(default, bool):
        if text.lower() not in ("true", "false", "1", "0"):
            raise ValueError(f"a learned-rounding switch takes true or false, not {text!r}")
        return text.lower() in ("true", "1")
    return type(default)(text)


#: Recipe suffixes that keep some layers at 8 bits (see :func:`kept_at_8`), or the first at 4-bit weights.
KEEP8 = ("+conv8", "+ungrouped8", "+firstlast8", "+first8", "+last8", "+first4", "+out8", "+outmap")


def kept_at_8(recipe: str, proto: onnx.ModelProto, activation_bits: int = 8,
              weight_bits: int = 8) -> tuple[str, dict[str, int | tuple[int, int]] | None, int | None]:
    """The recipe without its 8-bit suffix, and the ``layer_bits`` and ``first_last_bits`` that suffix asks.

    ``+conv8``: every Conv and the first and last MAC at 8 bits; ``+ungrouped8``: the same but the grouped
    (depthwise) Convs (what the summary advises for a CNN + transformer network below 8-bit weights);
    ``+firstlast8`` / ``+first8`` / ``+last8``: the first and last MAC / the first / the last only; ``+first4``: the
    first MAC at 4-bit weights and ``activation_bits`` (``best`` keeps it at 8-bit weights otherwise); ``+out8`` /
    ``+outmap``: the operators that write the outputs (:func:`~maptools.quantization.model.output_operators`) at
    ``weight_bits`` and 8-bit / ``activation_bits`` activations (what ``default`` and ``best`` do below 8-bit
    activations / undone: ``default+outmap`` is every tensor at the bits asked).
    """
    from maptools.quantization.diagnostics import cnn_transformer_convolutions

    keep8 = next((suffix for suffix in KEEP8 if recipe.endswith(suffix)), "")
    layer_bits: dict[str, int | tuple[int, int]] | None = None
    if keep8 == "+first4":
        layer_bits = {first_and_last_macs(proto)[0]: (4, activation_bits)}
    elif keep8 in ("+out8", "+outmap"):
        layer_bits = dict.fromkeys(output_operators(proto), (weight_bits, 8 if keep8 == "+out8" else activation_bits))
    elif keep8 in ("+conv8", "+ungrouped8"):
        layer_bits = dict.fromkeys(cnn_transformer_convolutions(proto, grouped=keep8 == "+conv8"), 8)
    elif keep8 in ("+first8", "+last8"):
        ends = first_and_last_macs(proto)
        layer_bits = {ends[0] if keep8 == "+first8" else ends[-1]: 8}
    first_last_bits = 8 if keep8 in ("+conv8", "+ungrouped8", "+firstlast8") else None
    return recipe.removesuffix(keep8), layer_bits, first_last_bits


def recipe_parts(recipe: str) -> tuple[str, str | None, dict[str, object], int]:
    """A recipe name split into the recipe, the rounding, learned rounding's settings and the run's seed.

    ``seed`` is quantize's (learned rounding runs with it, whatever ``RoundingSettings.seed`` says).
    """
    from maptools.quantization.engine import learned_rounding

    name, *extra = recipe.split(":")
    changes = {key: _setting(getattr(learned_rounding.DEFAULTS, key), value)
               for key, value in (item.split("=") for item in extra[1:])}
    return name, extra[0] if extra else None, changes, int(changes.pop("seed", 0))


def _run_maptools(model: registry.CorpusModel, calib: Sequence[Feed], evaluate: Sequence[Feed], w_bits: int,
                  a_bits: int, recipe: str, workdir: Path, threads: int | None = None) -> Outputs:
    """maptools' quantize; onnxruntime's outputs of ``quant_model.onnx`` on the evaluation feeds.

    ``recipe`` may name a rounding and learned rounding's settings after colons: ``best:nearest``,
    ``best:learned:iterations=500:sample=512`` (fields of :class:`~maptools.quantization.engine.learned_rounding.
    RoundingSettings`; ``seed=`` is quantize's, :func:`recipe_parts`), and end in one of :data:`KEEP8`
    (:func:`kept_at_8`). ``threads``: quantize's torch threads (None: its default, one).
    """
    from maptools.quantization.engine import learned_rounding

    plain, layer_bits, first_last_bits = recipe, None, None
    if recipe.endswith(KEEP8):
        loaded = load_model(model.path)
        plain, layer_bits, first_last_bits = kept_at_8(
            recipe, prepare_model(loaded, check_input_shapes(model.input_shapes, loaded)), a_bits, w_bits)
    name, rounding, changes, seed = recipe_parts(plain)
    saved = learned_rounding.DEFAULTS
    learned_rounding.DEFAULTS = dataclasses.replace(saved, **changes)
    try:
        result = quantize(model.input_shapes, "cpu", model.path,
                          mapname=f"{model.name}_{re.sub('[^A-Za-z0-9_.-]', '_', recipe)}", calibset=calib,
                          calib_steps=len(calib), weight_bits=w_bits, activation_bits=a_bits, recipe=name,
                          rounding=rounding, mapsave_dir=workdir, evalset=evaluate[:4], layer_bits=layer_bits,
                          first_last_bits=first_last_bits, seed=seed, threads=threads)
    finally:
        learned_rounding.DEFAULTS = saved
    session = _session(result.model_path)
    return [session.run(None, feed) for feed in evaluate]


#: Seed of the calibration feeds drawn from the evaluation sources (``--calib-from eval``); the evaluated feeds use 1.
EVAL_SOURCE_CALIB_SEED = 8


def calibration_feeds(model: registry.CorpusModel, count: int, source: str = "calib") -> list[dict]:
    """The calibration feeds: the ``calib`` split (seed 0), or with ``source='eval'`` other feeds of the evaluation
    split (seed :data:`EVAL_SOURCE_CALIB_SEED`)."""
    if source not in ("calib", "eval"):
        raise ValueError(f"calibration source must be 'calib' or 'eval', got {source!r}")
    return registry.inputs_for(model, source, count=count, seed=0 if source == "calib" else EVAL_SOURCE_CALIB_SEED)


#: The installed packages whose versions a row's figures depend on (the data's decoding and resizing included):
#: a fresh environment can move learned rounding's figures with the same code and seed (benchmarks).
STACK = ("ppq", "torch", "numpy", "scipy", "pillow", "opencv-python-headless", "onnx", "onnxruntime", "protobuf")


def stack_versions() -> dict[str, str]:
    """The version of every installed package of :data:`STACK`."""
    from importlib.metadata import PackageNotFoundError, version

    versions = {}
    for name in STACK:
        try:
            versions[name] = version(name)
        except PackageNotFoundError:
            continue
    return versions


def cpu_model() -> str:
    """The CPU's model name (its vector width sets the order of float sums, so learned integers can differ)."""
    try:
        lines = Path("/proc/cpuinfo").read_text().splitlines()
    except OSError:
        return platform.processor() or platform.machine()
    name = next((line.split(":", 1)[1].strip() for line in lines if line.startswith("model name")), platform.machine())
    flags = next((set(line.split(":", 1)[1].split()) for line in lines if line.startswith("flags")), set())
    widest = next((flag for flag in ("avx512f", "avx2", "avx", "sse4_2") if flag in flags), None)
    return f"{name} ({widest})" if widest else name


def feeds_digest(feeds: Sequence[Feed]) -> str:
    """The first 16 hex digits of the feeds' SHA-256 (:func:`~maptools.quantization.search.cache.data_digest`, the
    search cache's key): equal digests, equal data."""
    from maptools.quantization.search.cache import data_digest

    return data_digest(feeds)[:16]


def run_model(model: registry.CorpusModel, bits: Sequence[tuple[int, int]], recipes: Sequence[str],
              peers: Sequence[str], calib_count: int, eval_count: int, workdir: Path,
              raw_settings: Sequence[str] = ("PPQ trt",), ort_methods: Sequence[str] = ("MinMax", "Percentile"),
              done: dict[tuple[str, str, str], dict] | None = None,
              on_row: Callable[[dict], None] | None = None, calib_from: str = "calib",
              threads: int | None = None) -> list[dict]:
    """Every method at every bit pair on one model.

    ``done`` holds rows measured earlier, keyed by (model, bits, method): they are kept, not run again.
    ``on_row`` is called with each new row as soon as it is measured (to save progress).
    ``calib_from``: where the calibration feeds come from (:func:`calibration_feeds`).
    ``threads``: maptools' ``quantize`` threads (the peers keep one).
    """
    done = done or {}
    calib = calibration_feeds(model, calib_count, calib_from)
    evaluate, labels = registry.labeled_inputs(model, "eval", count=eval_count, seed=1)
    data = {"calib_sha256": feeds_digest(calib), "eval_sha256": feeds_digest(evaluate)}
    rows: list[dict] = []
    if model.expected != "quantizes":
        result = measure(model, [], None, lambda: quantize(model.input_shapes, "cpu", model.path, mapname=model.name,
                                                           calibset=calib, calib_steps=len(calib),
                                                           mapsave_dir=workdir))
        rows.append({"model": model.name, "bits": "-", "method": "maptools", **result})
        print(f"[real] {model.name}: {result.get('error', 'quantized although expected unsupported')}", flush=True)
        return rows
    fp32 = _session(model.path)
    ref = [fp32.run(None, feed) for feed in evaluate]
    prepared: Path | None = None
    for w_bits, a_bits in bits:
        methods: dict[str, Callable[[], Outputs]] = {}
        for recipe in recipes:
            methods[f"maptools {recipe}"] = functools.partial(_run_maptools, model, calib, evaluate, w_bits, a_bits,
                                                              recipe, workdir, threads)
        if "raw" in peers:
            for setting in raw_settings:
                methods[f"raw {setting}"] = functools.partial(run_raw_ppq, model.path, w_bits, a_bits,
                                                              raw_setting(setting), calib, evaluate)
        if "ort" in peers and a_bits == 8:
            for method in ort_methods:
                methods[f"ORT {method}"] = functools.partial(run_ort, model.path, w_bits, a_bits, method, calib,
                                                             evaluate)
        for name, run in methods.items():
            key = (model.name, f"W{w_bits}A{a_bits}", name)
            if key in done:
                rows.append(done[key])
                print(f"[real] {model.name} W{w_bits}A{a_bits} {name:24s} kept from --resume", flush=True)
                continue
            result = measure(model, ref, labels, run)
            if name.startswith("raw ") and "error" in result:  # again on maptools' prepared graph, to compare
                prepared = prepared or prepared_copy(model, workdir)
                retry = measure(model, ref, labels, functools.partial(run_raw_ppq, prepared, w_bits, a_bits,
                                                                      raw_setting(name[4:]), calib, evaluate))
                if "error" not in retry:
                    result = {**retry, "note": f"on maptools' prepared graph; as given: {result['error']}"}
            rows.append({"model": model.name, "bits": f"W{w_bits}A{a_bits}", "method": name, **result, **data})
            if on_row is not None:
                on_row(rows[-1])
            shown = result.get("cell", result.get("error"))
            print(f"[real] {model.name} W{w_bits}A{a_bits} {name:24s} {shown}  SNR "
                  f"{result.get('snr_db', float('nan')):.1f} dB  {result['seconds']:.1f} s", flush=True)
    return rows


def _best_of(cells: dict[str, dict], prefix: str) -> dict | None:
    """The best row of the methods whose name starts with ``prefix`` (its name in ``row['best_of']``)."""
    named = {name: row for name, row in cells.items() if name.startswith(prefix)}
    scored = {name: row for name, row in named.items() if "score" in row}
    if not scored:
        return next(iter(named.values()), None)
    name = max(scored, key=lambda n: (scored[n]["score"], scored[n]["snr_db"]))
    return {**scored[name], "best_of": name[len(prefix):]}


def _cell(row: dict | None) -> str:
    if row is None:
        return "--"
    if "error" in row:
        return f"fails: {row['error'][:90]}"
    text = f"{row['cell']}, {row['snr_db']:.1f} dB"
    if row.get("best_of"):
        text += f" ({row['best_of']})"
    if row.get("note"):
        text += " (†)"
    return text


def render(rows: list[dict], command: str, meta: dict) -> str:
    """The RST fragment: one row per model and bit pair."""
    methods = list(dict.fromkeys(row["method"] for row in rows if row["method"].startswith("maptools ")))
    header = ["Model", "Metric", "Bits", *[f"``{m.split()[1]}``" for m in methods], "raw PPQ (best setting)",
              "onnxruntime (best method)"]
    lines = [f"Produced by ``{command}`` ({meta['calib']} calibration feeds, {meta['eval']} held-out evaluation "
             f"feeds per model, batch 1; {meta['cores']} CPU cores, torch {meta['torch']} with 1 thread, PPQ 0.6.6, "
             f"onnx {meta['onnx']}, onnxruntime {meta['onnxruntime']}; {meta['minutes']:.0f} min). Each cell: "
             "the task metric against FP32, then the SNR of the first output in dB; quantization seconds in the "
             "JSON beside this file. † raw PPQ could not load or run the model as given (reason in the JSON) and "
             "was run on the graph maptools prepared for it (opset 13, its rewrites).", "",
             ".. list-table::", "   :header-rows: 1", ""]
    lines.append("   * - " + "\n     - ".join(header))
    grouped: dict[tuple[str, str], dict[str, dict]] = {}
    for row in rows:
        grouped.setdefault((row["model"], row["bits"]), {})[row["method"]] = row
    for (model_name, bits), cells in grouped.items():
        model = registry.get(model_name)
        if bits == "-":
            error = cells["maptools"].get("error", "quantized")
            values = [model_name, "(expected unsupported)", "-", f"refused: {error[:160]}"]
            values += ["" for _ in header[len(values):]]
        else:
            values = [model_name, METRIC_NAMES.get(model.task, "output SNR"), bits,
                      *[_cell(cells.get(m)) for m in methods], _cell(_best_of(cells, "raw ")),
                      _cell(_best_of(cells, "ORT "))]
        lines.append("   * - " + "\n     - ".join(values))
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--models", default=None, help="comma-separated corpus names (default: all)")
    parser.add_argument("--bits", default="8/8,4/8", help="W/A pairs, e.g. 8/8,4/8,4/4")
    parser.add_argument("--recipes", default="default", help="maptools recipes, comma-separated")
    parser.add_argument("--peers", default="raw,ort", help="raw (PPQ), ort (quantize_static), or none")
    parser.add_argument("--raw-settings", default="PPQ trt",
                        help="raw PPQ settings, comma-separated: 'PPQ trt', 'PPQ +equalization', 'PPQ +LSQ'")
    parser.add_argument("--ort-methods", default="MinMax,Percentile", help="quantize_static calibration methods")
    parser.add_argument("--calib", type=int, default=32, help="calibration feeds per model")
    parser.add_argument("--eval", type=int, default=64, help="held-out evaluation feeds per model")
    parser.add_argument("--calib-from", choices=("calib", "eval"), default="calib",
                        help="calibrate on the calibration split (the protocol) or on other feeds of the evaluation "
                             "sources (to measure the dependence on calibration data)")
    parser.add_argument("--threads", type=int, default=None,
                        help="torch threads of maptools' quantize (default: one, as quantize's default)")
    parser.add_argument("--out", default=str(DEFAULT_OUT), help="RST fragment to write ('-': none)")
    parser.add_argument("--workdir", default=None, help="maps and prepared graphs (default: a temporary dir)")
    parser.add_argument("--resume", default=None,
                        help="a JSON of an interrupted run: its rows are kept, only the missing ones are measured "
                             "(progress is saved to OUT's .json.partial after every row)")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    torch.set_num_threads(1)
    names = args.models.split(",") if args.models else [m.name for m in registry.models()]
    missing = [name for name in names if not registry.available(name)]
    if missing:
        print(f"[real] not in the corpus cache: {missing}; run `python bench/corpus/fetch.py`", file=sys.stderr)
        return 2
    bits = [tuple(int(b) for b in pair.split("/")) for pair in args.bits.split(",")]
    recipes = [r for r in args.recipes.split(",") if r]
    peers = [] if args.peers == "none" else args.peers.split(",")
    command = "python bench/real_models.py" + "".join(f" {shlex.quote(a)}" for a in (argv or sys.argv[1:]))
    started = time.perf_counter()
    tmp = tempfile.TemporaryDirectory(prefix="maptools-real-") if args.workdir is None else None
    workdir = Path(args.workdir or tmp.name)
    workdir.mkdir(parents=True, exist_ok=True)
    rows: list[dict] = []
    done: dict[tuple[str, str, str], dict] = {}
    resumed_minutes = 0.0
    if args.resume:
        earlier = json.loads(Path(args.resume).read_text())
        done = {(row["model"], row["bits"], row["method"]): row for row in earlier["rows"] if "error" not in row}
        resumed_minutes = earlier.get("meta", {}).get("minutes", 0.0)
        command = earlier.get("command", command)
    partial = Path(args.out).with_suffix(".json.partial") if args.out != "-" else None
    saved: list[dict] = list(done.values())

    def save(row: dict) -> None:
        saved.append(row)
        if partial is not None:
            minutes = resumed_minutes + (time.perf_counter() - started) / 60
            partial.write_text(json.dumps({"command": command, "meta": {"minutes": minutes}, "rows": saved},
                                          indent=1, default=float) + "\n")

    for name in names:
        try:
            rows += run_model(registry.get(name), bits, recipes, peers, args.calib, args.eval, workdir,
                              raw_settings=args.raw_settings.split(","), ort_methods=args.ort_methods.split(","),
                              done=done, on_row=save, calib_from=args.calib_from, threads=args.threads)
        except Exception:  # a broken model must not lose the others' rows
            traceback.print_exc()
            rows.append({"model": name, "bits": "-", "method": "maptools", "error": "benchmark crashed"})
    from importlib.metadata import version

    meta = {"calib": args.calib, "calib_from": args.calib_from, "eval": args.eval, "cores": os.cpu_count(),
            "torch": torch.__version__,
            "onnx": version("onnx"), "onnxruntime": version("onnxruntime"), "packages": stack_versions(),
            "cpu": cpu_model(),
            "minutes": resumed_minutes + (time.perf_counter() - started) / 60}
    if args.out != "-":
        out = Path(args.out)
        out.write_text(render(rows, command, meta))
        out.with_suffix(".json").write_text(json.dumps({"command": command, "meta": meta, "rows": rows}, indent=1,
                                                       default=float) + "\n")
        print(f"[real] wrote {out}", flush=True)
        if partial is not None:
            partial.unlink(missing_ok=True)
    if tmp is not None:
        tmp.cleanup()
    return 0


if __name__ == "__main__":
    sys.exit(main())
