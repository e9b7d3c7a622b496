"""Speed of ``quantize`` on a trained ImageNet classifier against raw PPQ and onnxruntime, quiet and beside load.

Measured on EfficientNet-Lite1 (the corpus' ImageNet classifier, 240x240, ``bench/corpus``) with 32 calibration
feeds of natural photographs (batch 1), at W8A8:

* maptools ``quantize`` with ``recipe='default'`` (its defaults: 4 held-out analysis batches, one torch thread)
  and ``recipe='fast'``;
* raw PPQ 0.6.6 with its plain TensorRT setting (``load_onnx_graph``, ``dispatch_graph``, PPQ's TensorRT
  quantizer, ``TorchExecutor``, ``quantize``, ONNX Runtime export), with one torch thread as PPQ is run by hand,
  and with torch's default threads;
* onnxruntime's ``quantize_static`` (QDQ, per-channel, MinMax) in the same environment;
* the floor: 32 FP32 forwards in onnxruntime.

Each configuration runs in a fresh process, first on a quiet machine, then beside two CPU-bound processes
(busy loops, started before and stopped after the measured child): a quantizer runs beside other jobs (sweeps
over bit widths, CI, the mapper), so its speed has to hold there. *Work* is the wall time of the measured call
(imports excluded); repetitions are interleaved and medians reported.

Usage::

    python bench/speed.py                    # 3 repetitions, writes docs/benchmarks_speed.rst
    python bench/speed.py --reps 1 --out /tmp/speed.rst
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
MODEL = "efficientnet_lite1"
sys.path.insert(0, str(HERE))


# -- workers (run in the child processes) ------------------------------------------------------------
def _feeds(steps: int):
    from corpus import registry

    return registry.inputs_for(registry.get(MODEL), "calib", count=steps, seed=0)


def work_maptools(args: argparse.Namespace) -> dict:
    from corpus import registry

    import maptools.quantization.engine  # noqa: F401  (PPQ imported before the clock starts)
    from maptools.quantization import quantize

    model = registry.get(MODEL)
    feeds = _feeds(args.steps + 4)
    started = time.perf_counter()
    result = quantize(model.input_shapes, "cpu", model.path, f"speed_{args.recipe}", calibset=feeds,
                      calib_steps=args.steps, bit_width=8, recipe=args.recipe, mapsave_dir=args.workdir)
    work = time.perf_counter() - started
    report = json.loads((result.directory / "report.json").read_text())
    return {"work_s": work, "stages": report.get("timings_seconds", {})}


def work_ppq(args: argparse.Namespace) -> dict:
    import torch
    from corpus import registry
    from peers import raw_setting

    from maptools.quantization.engine.facade import import_ppq
    from maptools.quantization.engine.quiet import ppq_silenced

    import_ppq()
    from ppq.api import dispatch_graph, export_ppq_graph, load_onnx_graph
    from ppq.core import TargetPlatform
    from ppq.executor import TorchExecutor
    from ppq.quantization.quantizer import TensorRTQuantizer

    if args.ppq_threads:
        torch.set_num_threads(args.ppq_threads)
    model = registry.get(MODEL)
    batches = [{k: torch.from_numpy(v) for k, v in feed.items()} for feed in _feeds(args.steps)]
    started = time.perf_counter()
    with ppq_silenced():
        setting = raw_setting("PPQ trt")
        graph = load_onnx_graph(onnx_import_file=str(model.path))
        graph = dispatch_graph(graph=graph, platform=TargetPlatform.TRT_INT8, dispatcher=setting.dispatcher,
                               dispatching_table=setting.dispatching_table)
        quantizer = TensorRTQuantizer(graph=graph)
        executor = TorchExecutor(graph=graph, device="cpu")
        quantizer.quantize(inputs=batches[0], calib_dataloader=batches, executor=executor, setting=setting,
                           calib_steps=len(batches), collate_fn=lambda batch: batch)
        export_ppq_graph(graph=graph, platform=TargetPlatform.ONNXRUNTIME,
                         graph_save_to=str(Path(args.workdir) / "ppq_w8.onnx"))
    return {"work_s": time.perf_counter() - started, "threads": torch.get_num_threads()}


def work_ort(args: argparse.Namespace) -> dict:
    from corpus import registry
    from onnxruntime.quantization import (
        CalibrationDataReader,
        CalibrationMethod,
        QuantFormat,
        QuantType,
        quantize_static,
    )

    model = registry.get(MODEL)
    feeds = _feeds(args.steps)

    class Reader(CalibrationDataReader):
        def __init__(self) -> None:
            self._feeds = iter(feeds)

        def get_next(self):
            return next(self._feeds, None)

    started = time.perf_counter()
    quantize_static(str(model.path), str(Path(args.workdir) / "ort.onnx"), Reader(), quant_format=QuantFormat.QDQ,
                    per_channel=True, activation_type=QuantType.QUInt8, weight_type=QuantType.QInt8,
                    calibrate_method=CalibrationMethod.MinMax, calibration_providers=["CPUExecutionProvider"])
    return {"work_s": time.perf_counter() - started}


def work_fp32(args: argparse.Namespace) -> dict:
    import onnxruntime as ort
    from corpus import registry

    feeds = _feeds(args.steps)
    started = time.perf_counter()
    options = ort.SessionOptions()
    options.log_severity_level = 3
    session = ort.InferenceSession(str(registry.get(MODEL).path), options, providers=["CPUExecutionProvider"])
    for feed in feeds:
        session.run(None, feed)
    return {"work_s": time.perf_counter() - started}


WORKERS = {"maptools": work_maptools, "ppq": work_ppq, "ort": work_ort, "fp32": work_fp32}


# -- the driver --------------------------------------------------------------------------------------
def run_child(argv: list[str], log) -> dict:
    """Run a child to completion; its JSON record (last stdout line) plus wall time, CPU time and peak RSS."""
    started = time.perf_counter()
    proc = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=log, cwd=str(ROOT))
    out = proc.stdout.read()
    proc.stdout.close()
    _, status, usage = os.wait4(proc.pid, 0)
    if os.waitstatus_to_exitcode(status) != 0:
        raise RuntimeError(f"{' '.join(argv)} failed; see the log")
    record = json.loads(out.decode().strip().splitlines()[-1])
    record.update(process_s=time.perf_counter() - started, cpu_s=usage.ru_utime + usage.ru_stime,
                  peak_rss_mb=usage.ru_maxrss / 1024)
    return record


class Busy:
    """``count`` CPU-bound processes (busy loops) for the duration of a ``with`` block."""

    def __init__(self, count: int) -> None:
        self.count, self.procs = count, []

    def __enter__(self) -> Busy:
        self.procs = [subprocess.Popen([sys.executable, "-c", "while True: pass"]) for _ in range(self.count)]
        time.sleep(0.5)
        return self

    def __exit__(self, *exc) -> None:
        for proc in self.procs:
            proc.kill()
            proc.wait()


def configurations(args: argparse.Namespace, work: Path) -> dict[str, list[str]]:
    """Label -> argv of every measured configuration."""
    me = [sys.executable, str(Path(__file__).resolve()), "--steps", str(args.steps), "--workdir", str(work)]
    return {
        "maptools default W8A8": me + ["--worker", "maptools", "--recipe", "default"],
        "maptools fast W8A8": me + ["--worker", "maptools", "--recipe", "fast"],
        "raw PPQ W8A8, 1 thread": me + ["--worker", "ppq", "--ppq-threads", "1"],
        "raw PPQ W8A8, torch's threads": me + ["--worker", "ppq"],
        "quantize_static MinMax W8A8": me + ["--worker", "ort"],
        f"FP32 floor ({args.steps} forwards)": me + ["--worker", "fp32"],
    }


def write_rst(rows: dict, out: Path, command: str, meta: dict) -> None:
    """The table: work seconds quiet and busy, and the ratios to raw PPQ's one-thread run."""
    def med(label: str, condition: str, key: str = "work_s") -> float | None:
        runs = [r[key] for r in rows.get(condition, {}).get(label, [])]
        return statistics.median(runs) if runs else None

    raw = {c: med("raw PPQ W8A8, 1 thread", c) for c in ("quiet", "busy")}
    lines = [
        f"Produced by ``{command}``: {MODEL} (trained, 240x240), {meta['steps']} calibration feeds of natural "
        f"photographs (batch 1), W8A8, on {meta['cores']} CPU cores (torch {meta['torch']}, PPQ 0.6.6, onnx "
        f"{meta['onnx']}, onnxruntime {meta['onnxruntime']}), median of {meta['reps']} run(s) per condition, each "
        "in a fresh process, repetitions interleaved. *Busy*: two CPU-bound processes (busy loops) run beside the "
        "measured one. *Work* is the measured call's wall time (imports excluded); the ratios are to raw PPQ's "
        "one-thread run in the same condition.",
        "",
        ".. list-table::",
        "   :header-rows: 1",
        "",
        "   * - Configuration\n     - Work, quiet (s)\n     - vs raw PPQ\n     - Work, busy (s)\n     - vs raw PPQ"
        "\n     - CPU, quiet (s)\n     - Peak RSS (MB)",
    ]
    for label in rows.get("quiet", {}):
        quiet, busy = med(label, "quiet"), med(label, "busy")
        cells = [label, f"{quiet:.1f}" if quiet else "--",
                 f"{quiet / raw['quiet']:.2f}x" if quiet and raw["quiet"] else "--",
                 f"{busy:.1f}" if busy else "--", f"{busy / raw['busy']:.2f}x" if busy and raw["busy"] else "--",
                 f"{med(label, 'quiet', 'cpu_s'):.1f}", f"{med(label, 'quiet', 'peak_rss_mb'):.0f}"]
        lines.append("   * - " + "\n     - ".join(cells))
    lines.append("")
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text("\n".join(lines))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--reps", type=int, default=3, help="repetitions per configuration and condition")
    parser.add_argument("--steps", type=int, default=32, help="calibration feeds")
    parser.add_argument("--busy", type=int, default=2, help="CPU-bound processes beside the busy runs")
    parser.add_argument("--out", default=str(ROOT / "docs" / "benchmarks_speed.rst"), help="RST fragment to write")
    parser.add_argument("--only", default=None, help="comma-separated substrings: measure matching labels only")
    parser.add_argument("--workdir", default=None, help="maps and logs (default: a temporary dir)")
    parser.add_argument("--worker", choices=tuple(WORKERS), help=argparse.SUPPRESS)
    parser.add_argument("--recipe", default="default", help=argparse.SUPPRESS)
    parser.add_argument("--ppq-threads", type=int, default=0, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.worker:
        print(json.dumps(WORKERS[args.worker](args)), flush=True)
        return 0
    command = "python bench/speed.py" + "".join(f" {shlex.quote(a)}" for a in (argv or sys.argv[1:]))
    tmp = tempfile.TemporaryDirectory(prefix="maptools-speed-") if args.workdir is None else None
    work = Path(args.workdir or tmp.name)
    work.mkdir(parents=True, exist_ok=True)
    configs = configurations(args, work)
    if args.only:
        wanted = [w.strip() for w in args.only.split(",")]
        configs = {k: v for k, v in configs.items() if any(w in k for w in wanted)}
    rows: dict[str, dict[str, list[dict]]] = {"quiet": {k: [] for k in configs}, "busy": {k: [] for k in configs}}
    with open(work / "children.log", "ab") as log:
        for rep in range(args.reps):
            for condition in ("quiet", "busy"):
                for label, child in configs.items():
                    if condition == "busy":
                        with Busy(args.busy):
                            record = run_child(child, log)
                    else:
                        record = run_child(child, log)
                    rows[condition][label].append(record)
                    print(f"[speed] rep {rep + 1}/{args.reps} {condition:5s} {label}: work {record['work_s']:.1f} s",
                          flush=True)
                    (work / "speed.json").write_text(json.dumps(rows, indent=1))
    from importlib.metadata import version

    import torch

    meta = {"steps": args.steps, "reps": args.reps, "cores": os.cpu_count(), "torch": torch.__version__,
            "onnx": version("onnx"), "onnxruntime": version("onnxruntime")}
    write_rst(rows, Path(args.out), command, meta)
    print(f"[speed] wrote {args.out}", flush=True)
    if tmp is not None:
        tmp.cleanup()
    return 0


if __name__ == "__main__":
    sys.exit(main())
