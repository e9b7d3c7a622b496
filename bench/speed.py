"""Speed and memory of ``quantize`` on resnet18 against raw PPQ, onnxruntime's ``quantize_static`` and FP32.

Measured on torchvision's resnet18 (random weights, opset 13) with 32 calibration batches of 1x3x224x224
standard-normal noise:

* maptools ``quantize`` at W8A8 and W4A4, ``recipe='fast'`` with ``analysis_steps=1`` (the work raw PPQ
  does, plus maptools' checks, artifacts and a one-batch graph-wise error analysis; the layer-wise
  analysis is opt-in and off) and ``recipe='default'`` (``analysis_steps=4``: the end-to-end default);
  maptools calibrates with the speed-ups of ``maptools.quantization.engine.speedups`` (same artifacts to
  the bit);
* the raw PPQ API with the same settings: ``load_onnx_graph`` + ``dispatch_graph(TRT_INT8)`` +
  maptools' ``LowBitQuantizer`` + ``TorchExecutor`` + ``quantizer.quantize`` (TensorRT setting) +
  ``export_ppq_graph(..., ONNXRUNTIME)``, plain PPQ (none of maptools' speed-ups);
* onnxruntime's ``quantize_static`` (QDQ, per-channel, symmetric int8, MinMax and Percentile), run by
  ``bench/_ort_quant.py`` in the project's own environment (the one maptools runs in);
* the floor: 32 FP32 forwards of the float model in onnxruntime (session creation included).

Every measurement runs in a fresh subprocess; *work* is the time of the measured call inside it (imports
excluded), *process* the child's whole wall time, *peak RSS* its ``ru_maxrss`` (``os.wait4``). Repetitions
are interleaved across configurations and the medians reported; ratios come from the same run.

Usage::

    python bench/speed.py             # 3 repetitions, writes docs/benchmarks_speed.rst
    python bench/speed.py --quick     # 1 repetition
    python bench/speed.py --profile fast   # cProfile of one maptools quantize (W8A8), top functions
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
import warnings
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
SHAPE = (1, 3, 224, 224)


# -- workers (run in the child processes) ------------------------------------------------------------
def _calib_batches(steps: int, seed: int = 0):
    """The batches maptools draws for ``calibset=None`` (same generator, same order)."""
    import torch

    generator = torch.Generator().manual_seed(seed)
    return [{"input": torch.randn(SHAPE, generator=generator, dtype=torch.float32)} for _ in range(steps)]


def work_maptools(args: argparse.Namespace) -> dict:
    import maptools.quantization.engine  # noqa: F401  (PPQ imported before the clock starts)
    from maptools.quantization import quantize

    started = time.perf_counter()
    result = quantize({"input": list(SHAPE)}, "cpu", args.model, f"speed_{args.recipe}_w{args.bits}",
                      calib_steps=args.steps, bit_width=args.bits, recipe=args.recipe,
                      analysis_steps=args.analysis_steps, mapsave_dir=args.workdir)
    work = time.perf_counter() - started
    report = json.loads((result.directory / "report.json").read_text())
    return {"work_s": work, "stages": report.get("timings_seconds", {})}


def work_ppq(args: argparse.Namespace) -> dict:
    import contextlib
    import io

    import torch

    with contextlib.redirect_stdout(io.StringIO()), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        from ppq.api import dispatch_graph, export_ppq_graph, load_onnx_graph
        from ppq.api.setting import QuantizationSettingFactory
        from ppq.core import TargetPlatform
        from ppq.executor import TorchExecutor

        from maptools.quantization.engine.quantizer import LowBitQuantizer, LowBitSpec

    torch.manual_seed(0)
    started = time.perf_counter()
    batches = _calib_batches(args.steps)
    with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(io.StringIO()), \
            warnings.catch_warnings():
        warnings.simplefilter("ignore")
        setting = QuantizationSettingFactory.trt_setting()
        graph = load_onnx_graph(onnx_import_file=args.model)
        graph = dispatch_graph(graph=graph, platform=TargetPlatform.TRT_INT8, dispatcher=setting.dispatcher,
                               dispatching_table=setting.dispatching_table)
        quantizer = LowBitQuantizer(graph=graph, spec=LowBitSpec(weight_bits=args.bits, activation_bits=args.bits))
        executor = TorchExecutor(graph=graph, device="cpu")

        def collate(batch):
            return {name: tensor.to("cpu") for name, tensor in batch.items()}

        quantizer.quantize(inputs=collate(batches[0]), calib_dataloader=batches, executor=executor,
                           setting=setting, calib_steps=len(batches), collate_fn=collate)
        export_ppq_graph(graph=graph, platform=TargetPlatform.ONNXRUNTIME,
                         graph_save_to=str(Path(args.workdir) / f"ppq_w{args.bits}.onnx"))
    return {"work_s": time.perf_counter() - started}


def work_fp32(args: argparse.Namespace) -> dict:
    import numpy as np
    import onnxruntime as ort

    feeds = [{"input": b["input"].numpy()} for b in _calib_batches(args.steps)]
    started = time.perf_counter()
    options = ort.SessionOptions()
    options.log_severity_level = 3
    session = ort.InferenceSession(args.model, options, providers=["CPUExecutionProvider"])
    outs = [session.run(None, feed)[0] for feed in feeds]
    work = time.perf_counter() - started
    assert np.isfinite(np.stack(outs)).all()
    return {"work_s": work}


def work_profile(args: argparse.Namespace) -> dict:
    """cProfile one maptools quantize (``--recipe``) or raw PPQ run (``--recipe ppq``); print the top functions."""
    import cProfile
    import pstats

    import maptools.quantization.engine  # noqa: F401  (PPQ imported before profiling)

    target = work_ppq if args.recipe == "ppq" else work_maptools
    prof = Path(args.workdir) / f"quantize_{args.recipe}_w{args.bits}.prof"
    profiler = cProfile.Profile()
    profiler.enable()
    record = target(args)
    profiler.disable()
    profiler.dump_stats(str(prof))
    stats = pstats.Stats(str(prof), stream=sys.stderr).strip_dirs().sort_stats("cumulative")
    stats.print_stats(60)
    stats.sort_stats("tottime").print_stats(30)
    return {**record, "profile": str(prof)}


WORKERS = {"maptools": work_maptools, "ppq": work_ppq, "fp32": work_fp32, "profile": work_profile}


# -- the driver --------------------------------------------------------------------------------------
def run_child(argv: list[str], log) -> dict:
    """Run a child to completion; its JSON record (last stdout line) plus wall time and peak RSS."""
    started = time.perf_counter()
    proc = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=log, cwd=str(ROOT))
    out = proc.stdout.read()
    proc.stdout.close()
    _, status, usage = os.wait4(proc.pid, 0)
    proc.returncode = os.waitstatus_to_exitcode(status)
    wall = time.perf_counter() - started
    if proc.returncode != 0:
        raise RuntimeError(f"{' '.join(argv)} exited with {proc.returncode}; see the log")
    record = json.loads(out.decode().strip().splitlines()[-1])
    record.update(process_s=wall, cpu_s=usage.ru_utime + usage.ru_stime, peak_rss_mb=usage.ru_maxrss / 1024)
    return record


def export_resnet18(path: Path) -> Path:
    import torch
    import torchvision

    torch.manual_seed(0)
    model = torchvision.models.resnet18(weights=None).eval()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(model, (torch.randn(SHAPE),), str(path), input_names=["input"], output_names=["output"],
                          opset_version=13, dynamo=False)
    return path


def configurations(args: argparse.Namespace, with_ort: bool, model: Path, work: Path) -> dict:
    """Label -> argv of every measured configuration."""
    me = [sys.executable, str(Path(__file__).resolve()), "--model", str(model), "--steps", str(args.steps),
          "--workdir", str(work)]
    configs: dict[str, list[str]] = {}
    for bits in (8, 4):
        configs[f"maptools fast W{bits}A{bits}"] = me + ["--worker", "maptools", "--recipe", "fast",
                                                         "--bits", str(bits), "--analysis-steps", "1"]
        configs[f"raw PPQ W{bits}A{bits}"] = me + ["--worker", "ppq", "--bits", str(bits)]
        configs[f"maptools default W{bits}A{bits}"] = me + ["--worker", "maptools", "--recipe", "default",
                                                            "--bits", str(bits), "--analysis-steps", "4"]
    if with_ort:
        for method in ("MinMax", "Percentile"):
            configs[f"quantize_static {method} W8A8"] = [
                sys.executable, str(HERE / "_ort_quant.py"), str(model), str(work / f"ort_{method}.onnx"),
                "--method", method, "--steps", str(args.steps), "--shape", ",".join(map(str, SHAPE))]
    configs["FP32 floor (32 forwards)"] = me + ["--worker", "fp32"]
    return configs


def _median(values: list[float]) -> float:
    return statistics.median(values)


def write_rst(rows: dict, out: Path, command: str, meta: dict) -> None:
    def med(label: str, key: str = "work_s") -> float | None:
        runs = rows.get(label)
        return _median([r[key] for r in runs]) if runs else None

    floor = med("FP32 floor (32 forwards)")
    lines = [
        f"Produced by ``{command}``: resnet18 (random weights, opset 13), {meta['steps']} calibration batches of "
        f"{'x'.join(map(str, SHAPE))}, CPU ({meta['cores']} cores, torch {meta['torch']} with "
        f"{meta['threads']} threads, PPQ 0.6.6, onnx {meta['onnx']}, onnxruntime {meta['onnxruntime']}, protobuf "
        f"{meta['protobuf']}), median of {meta['reps']} "
        f"run{'s' if meta['reps'] > 1 else ''} (``default`` recipe: {min(meta['default_reps'], meta['reps'])}), "
        "each in a fresh process, repetitions interleaved. The machine was shared with other jobs, so wall times "
        "are noisy; CPU times (user + system of the whole child) are steadier.",
        "",
        "*Work* is the wall time of the measured call (imports excluded): ``quantize()`` for maptools; load, "
        "dispatch, quantize and export for raw PPQ; ``quantize_static`` for onnxruntime; session creation plus "
        "the forwards for the floor. *CPU* and *peak RSS* are the child's (``os.wait4``). ``fast`` runs use "
        "``analysis_steps=1``; ``default`` runs use the defaults (``recipe='default'``, ``analysis_steps=4``). "
        "Both leave the layer-wise analysis off (its default) and calibrate with maptools' speed-ups (weights "
        "fake-quantized once rather than on every forward, ``torch.topk`` for the percentile observer: the same "
        "artifacts to the bit); raw PPQ runs plain. Ratios are of work times.",
        "",
        ".. list-table:: quantize on resnet18, 32 batches",
        "   :header-rows: 1",
        "   :widths: 32 9 9 9 9 11 11",
        "",
        "   * - Configuration",
        "     - Work (s)",
        "     - Process (s)",
        "     - CPU (s)",
        "     - Peak RSS (MB)",
        "     - vs raw PPQ",
        "     - vs FP32 floor",
    ]
    for label in rows:
        work = med(label)
        if work is None:
            continue
        bits = "W4A4" if "W4A4" in label else "W8A8"
        raw = med(f"raw PPQ {bits}") if label.startswith("maptools") else None
        cpu = med(label, "cpu_s") if all("cpu_s" in r for r in rows[label]) else None
        lines += [
            f"   * - {label}",
            f"     - {work:.1f}",
            f"     - {med(label, 'process_s'):.1f}",
            f"     - {cpu:.1f}" if cpu is not None else "     - --",
            f"     - {med(label, 'peak_rss_mb'):.0f}",
            f"     - {work / raw:.2f}x" if raw else "     - --",
            f"     - {work / floor:.0f}x" if floor else "     - --",
        ]
    lines.append("")
    fast8, raw8 = med("maptools fast W8A8"), med("raw PPQ W8A8")
    fast4, raw4 = med("maptools fast W4A4"), med("raw PPQ W4A4")
    summary = []
    if fast8 and raw8 and fast4 and raw4:
        summary.append(f"maptools ``fast`` takes {fast8 / raw8:.2f}x raw PPQ's time at W8A8 and {fast4 / raw4:.2f}x "
                       "at W4A4 on the same work (target: at most 1.10x)")
        cpu = {label: med(label, "cpu_s") for label in ("maptools fast W8A8", "raw PPQ W8A8", "maptools fast W4A4",
                                                        "raw PPQ W4A4")}
        if all(cpu.values()):
            summary[-1] += (f"; in CPU time {cpu['maptools fast W8A8'] / cpu['raw PPQ W8A8']:.2f}x and "
                            f"{cpu['maptools fast W4A4'] / cpu['raw PPQ W4A4']:.2f}x")
        summary[-1] += "."
    default8 = med("maptools default W8A8")
    for method in ("MinMax", "Percentile"):
        ort = med(f"quantize_static {method} W8A8")
        if ort and fast8:
            extra = f", ``default`` {default8 / ort:.0f}x" if default8 else ""
            summary.append(f"Against ``quantize_static`` {method} ({ort:.1f} s): maptools ``fast`` W8A8 "
                           f"{fast8 / ort:.1f}x{extra}.")
    stages = [r.get("stages") for r in rows.get("maptools default W8A8", []) if r.get("stages")]
    if stages:
        names = list(stages[0])
        parts = ", ".join(f"{n.replace('_', ' ')} {_median([s[n] for s in stages]):.1f} s" for n in names)
        summary.append(f"Stages of ``default`` W8A8 (from ``report.json``): {parts}.")
    lines += summary and [" ".join(summary), ""]
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text("\n".join(lines))


def _stack_versions() -> dict[str, str]:
    """Installed versions of onnx, onnxruntime and protobuf (the stack quantize_static shares with maptools)."""
    from importlib.metadata import version

    return {name: version(name) for name in ("onnx", "onnxruntime", "protobuf")}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="1 repetition instead of 3")
    parser.add_argument("--reps", type=int, default=None, help="repetitions (default 3, 1 with --quick)")
    parser.add_argument("--steps", type=int, default=32, help="calibration batches")
    parser.add_argument("--default-reps", type=int, default=1,
                        help="repetitions of the (slow) recipe='default' runs, at most --reps")
    parser.add_argument("--out", default=str(ROOT / "docs" / "benchmarks_speed.rst"), help="RST fragment to write")
    parser.add_argument("--no-ort", action="store_true", help="skip onnxruntime's quantize_static")
    parser.add_argument("--only", default=None, help="comma-separated substrings: measure matching labels only")
    parser.add_argument("--profile", choices=("fast", "default", "ppq"), default=None,
                        help="cProfile one maptools quantize with this recipe, or raw PPQ (W8A8), instead of "
                             "benchmarking")
    parser.add_argument("--workdir", default=None, help="model, maps and logs (default: a temporary dir)")
    parser.add_argument("--rerender", metavar="COMMAND", default=None,
                        help="only rewrite the table from --workdir's speed.json, naming COMMAND as its producer")
    parser.add_argument("--worker", choices=tuple(WORKERS), help=argparse.SUPPRESS)
    parser.add_argument("--model", help=argparse.SUPPRESS)
    parser.add_argument("--recipe", default="fast", help=argparse.SUPPRESS)
    parser.add_argument("--bits", type=int, default=8, help=argparse.SUPPRESS)
    parser.add_argument("--analysis-steps", type=int, default=1, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.worker:
        record = WORKERS[args.worker](args)
        print(json.dumps(record), flush=True)
        return 0

    reps = args.reps or (1 if args.quick else 3)
    if args.rerender:  # the table again from --workdir's speed.json (e.g. after a change of this script)
        import torch

        rows = json.loads((Path(args.workdir) / "speed.json").read_text())
        meta = {"steps": args.steps, "reps": max(len(v) for v in rows.values()), "default_reps": args.default_reps,
                "cores": os.cpu_count(), "torch": torch.__version__, "threads": torch.get_num_threads(),
                **_stack_versions()}
        write_rst(rows, Path(args.out), args.rerender, meta)
        return 0
    command = "python bench/speed.py" + "".join(f" {shlex.quote(a)}" for a in (argv if argv is not None
                                                                                  else sys.argv[1:]))
    tmp = tempfile.TemporaryDirectory(prefix="maptools-speed-") if args.workdir is None else None
    work = Path(args.workdir) if args.workdir else Path(tmp.name)
    work.mkdir(parents=True, exist_ok=True)
    model = work / "resnet18.onnx"
    if not model.exists():
        export_resnet18(model)
    with open(work / "children.log", "ab") as log:
        if args.profile:
            me = [sys.executable, str(Path(__file__).resolve()), "--model", str(model), "--steps", str(args.steps),
                  "--workdir", str(work), "--worker", "profile", "--recipe", args.profile, "--bits", "8",
                  "--analysis-steps", "1" if args.profile == "fast" else "4"]
            subprocess.run(me, check=True, cwd=str(ROOT))
            return 0
        configs = configurations(args, not args.no_ort, model, work)
        if args.only:
            wanted = [w.strip() for w in args.only.split(",")]
            configs = {k: v for k, v in configs.items() if any(w in k for w in wanted)}
        rows: dict[str, list[dict]] = {label: [] for label in configs}
        for rep in range(reps):  # interleaved, so drifting load hits every configuration alike
            for label, child in configs.items():
                if rep >= args.default_reps and "default" in label:
                    continue
                record = run_child(child, log)
                rows[label].append(record)
                print(f"[speed] rep {rep + 1}/{reps} {label}: work {record['work_s']:.1f} s, process "
                      f"{record['process_s']:.1f} s, peak RSS {record['peak_rss_mb']:.0f} MB", flush=True)
                (work / "speed.json").write_text(json.dumps(rows, indent=1))
    import torch

    meta = {"steps": args.steps, "reps": reps, "default_reps": args.default_reps, "cores": os.cpu_count(),
            "torch": torch.__version__, "threads": torch.get_num_threads(), **_stack_versions()}
    write_rst(rows, Path(args.out), command, meta)
    print(f"[speed] wrote {args.out}", flush=True)
    if tmp is not None:
        tmp.cleanup()
    return 0


if __name__ == "__main__":
    sys.exit(main())
