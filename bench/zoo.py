"""Model coverage across the torchvision zoo: quantize, export and run each model in onnxruntime.

Every model is built with random weights (``weights=None``: nothing is downloaded), exported to ONNX at
opset 13 with the legacy exporter, quantized by :func:`maptools.quantization.quantize` with random
calibration batches and ``recipe='fast'`` (calibration only, to keep 32 runs tractable on 2 cores), and
``quant_model.onnx`` is run in onnxruntime against the float model on the same random inputs.

Each (model, bits) run happens in its own subprocess, so its wall time and peak memory (``ru_maxrss`` of
that child, read with ``os.wait4``) are its own. A run exceeding ``--timeout`` seconds or
``--max-rss-gb`` GB of resident memory is killed and recorded as such.

Usage::

    python bench/zoo.py                                  # every model, W8A8 and W4A4
    python bench/zoo.py --models resnet18,alexnet --bits 4 --out /tmp/zoo.rst
    python bench/zoo.py --models densenet121 --merge      # re-run one model, keep the other rows

The table is written as an RST fragment (no title) to ``--out`` (default ``docs/benchmarks_zoo.rst``),
the raw results as JSON beside it (``--json``, default ``docs/benchmarks_zoo.json``: small, no models). With
``--merge`` only the ``--models`` x ``--bits`` rows are re-run; every other row is kept from that JSON, and the
table names the command that produced each group of rows.
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import signal
import subprocess
import sys
import tempfile
import time
import traceback
import warnings
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent

MODELS = (
    "resnet18", "resnet50", "mobilenet_v2", "mobilenet_v3_small", "shufflenet_v2_x1_0", "squeezenet1_1",
    "efficientnet_b0", "regnet_x_400mf", "mnasnet0_5", "densenet121", "googlenet", "vgg11_bn", "alexnet",
    "convnext_tiny", "vit_b_16", "lraspp_mobilenet_v3_large",
)


BN_NOTE = (", their BatchNorm statistics re-estimated on 8 random batches (with the initial statistics the "
           "activations of deep networks vanish: random-weight mobilenet_v2 outputs about 1e-9, below PPQ's minimum "
           "scale of 1e-8, so every quantized output is zero)")

#: Error substring -> explanation printed under the table when a run fails with it.
KNOWN_CAUSES = {
    "BatchNorm should have 4 parameters": (
        "densenet121: torch's exporter deduplicates equal initializers (the BatchNorm weights and biases of the "
        "same width) by routing them through ``Identity`` nodes, and PPQ's graph formatter requires every "
        "BatchNormalization parameter to be an initializer. The engine replaces each ``Identity(initializer)`` by a "
        "copy of the initializer before PPQ loads the graph; this failure means that work-around is missing."),
    "Resize_forward": (
        "lraspp_mobilenet_v3_large: its ``Resize`` nodes give ``sizes`` and leave ``roi``/``scales`` empty; PPQ's "
        "``Resize_forward`` calls ``.cpu()`` on the missing ``scales``. The engine puts empty initializers in "
        "those slots; this failure means that work-around is missing."),
    "operator type 'Mod'": (
        "vit_b_16: torch's ``scaled_dot_product_attention`` needs opset 14; at opset 14 the attention's shape "
        "arithmetic has ``Mod`` nodes, which PPQ cannot execute (maptools stops before calibrating, naming the "
        "node), and ``Slice`` nodes without ``axes``, which PPQ's ``Slice_forward`` mishandles (it takes the "
        "``starts`` values as axes). All of them only compute on shapes, and maptools folds them into constants "
        "when the model's input shapes are static (``fold_shape_computations`` in maptools/quantization/folding.py); "
        "this failure means the exported model has a dynamic dimension they depend on."),
}


# -- models -----------------------------------------------------------------------------------------
def build_model(name: str):
    """A torchvision model with random weights, in eval mode; dict outputs reduced to ``'out'``."""
    import torch
    import torchvision

    torch.manual_seed(0)
    if name == "googlenet":
        return torchvision.models.googlenet(weights=None, aux_logits=False, init_weights=True).eval()
    if name == "lraspp_mobilenet_v3_large":
        seg = torchvision.models.segmentation.lraspp_mobilenet_v3_large(weights=None, weights_backbone=None)

        class OutOnly(torch.nn.Module):
            def __init__(self, inner: torch.nn.Module) -> None:
                super().__init__()
                self.inner = inner

            def forward(self, x: torch.Tensor) -> torch.Tensor:
                return self.inner(x)["out"]

        return OutOnly(seg).eval()
    model = getattr(torchvision.models, name)(weights=None)
    if name.startswith("vit_"):  # torchvision zero-initialises the ViT head: the float output would be all zeros
        torch.nn.init.normal_(model.heads.head.weight, std=0.02)
    return model.eval()


def reestimate_batchnorm(model, size: int, steps: int = 8, batch: int = 4):
    """Recompute BatchNorm running statistics on random batches (cumulative average), then eval mode.

    With ``weights=None`` the running statistics are the identity (mean 0, variance 1), so in eval mode the
    activations of deep networks shrink or grow geometrically: random-weight mobilenet_v2 ends with outputs
    around 1e-9, below PPQ's minimum scale (1e-8), and any quantized model then outputs zeros. Statistics
    measured on the input distribution keep every layer's activations near unit scale, as in a trained model.
    """
    import torch

    norms = [m for m in model.modules() if isinstance(m, torch.nn.modules.batchnorm._BatchNorm)]
    if not norms:
        return model.eval()
    for module in norms:
        module.reset_running_stats()
        module.momentum = None
    model.train()
    generator = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for _ in range(steps):
            model(torch.randn(batch, 3, size, size, generator=generator))
    return model.eval()


def export_model(name: str, path: Path, size: int = 224, bn_reestimate: bool = True, opset: int = 13) -> Path:
    """Export ``name`` at ``opset`` (input ``'input'`` [1,3,size,size], output ``'output'``)."""
    import torch

    model = build_model(name)
    if bn_reestimate:
        model = reestimate_batchnorm(model, size)
    x = torch.randn(1, 3, size, size)
    path.parent.mkdir(parents=True, exist_ok=True)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(model, (x,), str(path), input_names=["input"], output_names=["output"],
                          opset_version=opset, dynamo=False)
    return path


def cosine(a, b) -> float:
    """Cosine similarity of two arrays, flattened (:func:`maptools.quantization.intmath.cosine`)."""
    import numpy as np

    from maptools.quantization.intmath import cosine_of

    return cosine_of(np.ravel(a), np.ravel(b))


def ort_session(path: Path, threads: int = 0):
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.log_severity_level = 3
    if threads:
        options.intra_op_num_threads = threads
    return ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])


# -- one run, in a subprocess ------------------------------------------------------------------------
def _essence(exc: BaseException) -> str:
    """The last frames of a traceback and the message, for the report."""
    frames = traceback.extract_tb(exc.__traceback__)
    inner = exc
    while inner.__cause__ is not None:  # the PPQ frame that actually failed
        inner = inner.__cause__
        frames = traceback.extract_tb(inner.__traceback__) or frames
    where = " <- ".join(f"{Path(f.filename).name}:{f.lineno} {f.name}" for f in reversed(frames[-3:]))
    return f"{type(exc).__name__}: {str(exc)[:600]} [{where}]"


def worker(args: argparse.Namespace) -> int:
    """Quantize one exported model at one bit width and write a JSON record to ``args.result``."""
    import numpy as np

    from maptools.quantization import quantize

    record: dict = {"model": args.model, "bits": args.bits, "status": "fail"}
    fp32_path = Path(args.fp32)
    size = args.size
    rng = np.random.default_rng(1234)
    inputs = [rng.standard_normal((1, 3, size, size)).astype(np.float32) for _ in range(args.eval_batches)]
    try:
        started = time.perf_counter()
        result = quantize({"input": [1, 3, size, size]}, "cpu", fp32_path, f"{args.model}_w{args.bits}",
                          calib_steps=args.calib_steps, bit_width=args.bits, recipe=args.recipe,
                          analysis_steps=args.analysis_steps, mapsave_dir=args.mapsave)
        record["quantize_s"] = time.perf_counter() - started
        record["ppq_cosine"] = float(next(iter(result.output_cosine.values())))
        import onnx

        quant = onnx.load(str(result.model_path))
        float_model = onnx.load(str(fp32_path))
        convs = [n.name or f"{n.op_type}_{i}" for i, n in enumerate(float_model.graph.node) if n.op_type == "Conv"]
        record["convs"] = len(convs)
        record["convs_quantized"] = sum(1 for name in convs if name in result.operators)
        record["quantized_ops"] = len(result.operators)
        record["qdq_nodes"] = sum(1 for n in quant.graph.node if n.op_type == "QuantizeLinear")
        float_sess, quant_sess = ort_session(fp32_path), ort_session(result.model_path)
        started = time.perf_counter()
        refs = [float_sess.run(None, {"input": x})[0] for x in inputs]
        outs = [quant_sess.run(None, {"input": x})[0] for x in inputs]
        record["ort_s"] = time.perf_counter() - started
        if any(r.shape != o.shape for r, o in zip(refs, outs, strict=True)):
            raise AssertionError(f"output shape {outs[0].shape} != FP32 {refs[0].shape}")
        record["fp32_rms"] = float(np.sqrt(np.mean(np.square(np.stack(refs), dtype=np.float64))))
        record["cosine"] = cosine(np.stack(refs), np.stack(outs))
        record["cosine_min"] = min(cosine(r, o) for r, o in zip(refs, outs, strict=True))
        record["status"] = "ok"
    except Exception as exc:  # recorded, not raised: the table lists it
        record["error"] = _essence(exc)
        record["error_type"] = type(exc).__name__
        record["traceback"] = traceback.format_exc()[-4000:]
    Path(args.result).write_text(json.dumps(record))
    return 0


def export_worker(args: argparse.Namespace) -> int:
    record: dict = {"model": args.model, "opset": 13}
    started = time.perf_counter()
    try:
        export_model(args.model, Path(args.fp32), args.size, not args.no_bn_reestimate)
        record["status"] = "ok"
    except Exception as exc:
        record["status"] = "fail"
        record["error"] = _essence(exc)
        if args.fallback_opset:  # how far the rest of the pipeline gets with a newer opset
            try:
                export_model(args.model, Path(args.fp32), args.size, not args.no_bn_reestimate, args.fallback_opset)
                record.update(status="ok", opset=args.fallback_opset, export_error=record.pop("error"))
            except Exception as again:
                record["error"] += f"; at opset {args.fallback_opset}: {_essence(again)}"
    record["export_s"] = time.perf_counter() - started
    Path(args.result).write_text(json.dumps(record))
    return 0


# -- the driver --------------------------------------------------------------------------------------
def _rss_kb(pid: int) -> int:
    try:
        with open(f"/proc/{pid}/status") as fh:
            for line in fh:
                if line.startswith("VmRSS:"):
                    return int(line.split()[1])
    except OSError:
        pass
    return 0


def run_child(argv: list[str], timeout: float, max_rss_gb: float, log) -> dict:
    """Run ``argv`` in a child process (own process group); return wall time, peak RSS and how it ended."""
    started = time.perf_counter()
    proc = subprocess.Popen(argv, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    limit_kb = max_rss_gb * 1024 * 1024
    killed = None
    peak_seen = 0
    while True:
        pid, status, usage = os.wait4(proc.pid, os.WNOHANG)
        if pid:
            break
        elapsed = time.perf_counter() - started
        rss = _rss_kb(proc.pid)
        peak_seen = max(peak_seen, rss)
        if killed is None and elapsed > timeout:
            killed = f"timeout: still running after {timeout:.0f} s"
        elif killed is None and rss > limit_kb:
            killed = f"memory: resident set above {max_rss_gb:.0f} GB ({rss / 2**20:.1f} GB)"
        if killed is not None:
            os.killpg(proc.pid, signal.SIGKILL)
            pid, status, usage = os.wait4(proc.pid, 0)
            break
        time.sleep(0.25)
    proc.returncode = os.waitstatus_to_exitcode(status)
    return {"wall_s": time.perf_counter() - started, "peak_rss_mb": max(usage.ru_maxrss, peak_seen) / 1024,
            "returncode": proc.returncode, "killed": killed}


def _fmt(value, spec: str, missing: str = "--") -> str:
    return missing if value is None else format(value, spec)


def _short_reason(rec: dict) -> str:
    if rec.get("killed"):
        return rec["killed"]
    if rec.get("error"):
        message = rec["error"].split(" [")[0]
        return message[:160] + ("..." if len(message) > 160 else "")
    if rec.get("returncode"):
        return f"worker exited with code {rec['returncode']}"
    return ""


def _producers(records: list[dict], command: str) -> str:
    """Which command produced which rows: the most frequent one first, the others with the models they re-ran."""
    by_command: dict[str, list[str]] = {}
    for rec in records:
        models = by_command.setdefault(rec.get("command") or command, [])
        if rec["model"] not in models:
            models.append(rec["model"])
    ordered = sorted(by_command.items(), key=lambda item: -sum(r.get("command", command) == item[0]
                                                                for r in records))
    if not ordered:
        return f"``{command}``"
    text = f"``{ordered[0][0]}``"
    for other, models in ordered[1:]:
        text += f", the rows of {', '.join(models)} by ``{other}``"
    return text


def write_rst(records: list[dict], out: Path, command: str, settings: dict) -> None:
    lines = [
        f"Produced by {_producers(records, command)} ({settings['total_min']:.0f} min of quantization runs) "
        "on a 2-core CPU machine "
        f"(torch {settings['torch']}, PPQ 0.6.6, onnxruntime {settings['ort']}).",
        "",
        f"Models have random weights (``weights=None``){settings['bn']} and are exported at opset 13 (unless "
        "the last column gives another opset). Quantization: "
        f"``recipe='{settings['recipe']}'`` (calibration only, to keep the runs tractable), "
        f"{settings['calib_steps']} random calibration batches of 1x3x{settings['size']}x{settings['size']}, "
        f"symmetric per-channel, percentile observer, ``analysis_steps={settings['analysis_steps']}``. "
        f"*Cosine* compares ``quant_model.onnx`` with the float model, both run in onnxruntime on the same "
        f"{settings['eval_batches']} random inputs (drawn apart from the calibration data). With random "
        "weights and random inputs the cosine is a consistency check of the quantized graph, not an accuracy "
        "figure. *Time* is the wall time of the whole child process (imports, quantization, artifacts, "
        "onnxruntime runs); *quantize* is that of ``quantize()`` alone; *peak RSS* is the child's ``ru_maxrss``. "
        f"Limits per run: {settings['timeout']:.0f} s and {settings['max_rss_gb']:.0f} GB.",
        "",
        ".. list-table:: torchvision zoo, W8A8 and W4A4",
        "   :header-rows: 1",
        "   :widths: 22 6 7 9 8 8 8 9 30",
        "",
        "   * - Model",
        "     - Bits",
        "     - Result",
        "     - Cosine vs FP32",
        "     - Convs quantized",
        "     - Quantize (s)",
        "     - Time (s)",
        "     - Peak RSS (MB)",
        "     - Failure reason, notes",
    ]
    for rec in records:
        convs = f"{rec['convs_quantized']}/{rec['convs']}" if "convs" in rec else "--"
        reason = _short_reason(rec) if rec["status"] != "ok" else ""
        if rec.get("note"):
            note = rec["note"] if len(rec["note"]) <= 150 else rec["note"][:150] + "...)"
            reason = "; ".join(r for r in (note, reason) if r)
        reason = reason.replace("*", r"\*").replace("`", "'").replace("|", r"\|")
        lines += [
            f"   * - {rec['model']}",
            f"     - W{rec['bits']}A{rec['bits']}",
            f"     - {'pass' if rec['status'] == 'ok' else 'FAIL'}",
            f"     - {_fmt(rec.get('cosine'), '.4f')}",
            f"     - {convs}",
            f"     - {_fmt(rec.get('quantize_s'), '.1f')}",
            f"     - {_fmt(rec.get('wall_s'), '.1f')}",
            f"     - {_fmt(rec.get('peak_rss_mb'), '.0f')}",
            f"     - {reason}" if reason else "     -",
        ]
    causes = [(key, text) for key, text in KNOWN_CAUSES.items()
              if any(key in (r.get("error", "") + r.get("note", "")) for r in records)]
    if causes:
        lines += ["", "Causes of the failures above (PPQ 0.6.6):", ""]
        lines += [f"* {text}" for _, text in causes]
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text("\n".join(lines) + "\n")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--models", default=",".join(MODELS), help="comma-separated model names")
    parser.add_argument("--bits", default="8,4", help="comma-separated bit widths (WnAn)")
    parser.add_argument("--out", default=str(ROOT / "docs" / "benchmarks_zoo.rst"), help="RST fragment to write")
    parser.add_argument("--json", default=None,
                        help="raw results (default: beside --out, e.g. docs/benchmarks_zoo.json)")
    parser.add_argument("--size", type=int, default=224, help="input height and width")
    parser.add_argument("--calib-steps", type=int, default=8)
    parser.add_argument("--eval-batches", type=int, default=4)
    parser.add_argument("--analysis-steps", type=int, default=1)
    parser.add_argument("--recipe", default="fast")
    parser.add_argument("--rerender", metavar="COMMAND", default=None,
                        help="only rewrite the table from the --json results, naming COMMAND as the producer "
                             "of rows that do not record theirs")
    parser.add_argument("--resume", action="store_true",
                        help="keep the --json results of --models x --bits and run only the missing pairs")
    parser.add_argument("--merge", action="store_true",
                        help="keep the --json results of every other model/bits pair, re-run --models x --bits "
                             "and write the table with all of them")
    parser.add_argument("--fallback-opset", type=int, default=14,
                        help="opset tried when the opset-13 export fails (0: none); noted in the table")
    parser.add_argument("--no-bn-reestimate", action="store_true",
                        help="keep the initial BatchNorm statistics (degenerate for some models)")
    parser.add_argument("--timeout", type=float, default=600.0, help="seconds per run before it is killed")
    parser.add_argument("--max-rss-gb", type=float, default=16.0, help="resident memory per run before it is killed")
    parser.add_argument("--workdir", default=None, help="exported models and maps (default: a temporary dir)")
    parser.add_argument("--worker", choices=("export", "quantize"), help=argparse.SUPPRESS)
    parser.add_argument("--model", help=argparse.SUPPRESS)
    parser.add_argument("--fp32", help=argparse.SUPPRESS)
    parser.add_argument("--mapsave", help=argparse.SUPPRESS)
    parser.add_argument("--result", help=argparse.SUPPRESS)
    parser.add_argument("--bits-one", dest="bits_one", type=int, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    json_path = Path(args.json) if args.json else Path(args.out).with_suffix(".json")
    if args.worker == "export":
        return export_worker(args)
    if args.worker == "quantize":
        args.bits = args.bits_one
        return worker(args)
    if args.rerender:  # the table again from the --json results (e.g. after a change of this script)
        import onnxruntime
        import torch

        order = {m: i for i, m in enumerate(MODELS)}
        records = sorted(json.loads(json_path.read_text()),
                         key=lambda r: (order.get(r["model"], len(order)), -r["bits"]))
        settings = {"bn": "" if args.no_bn_reestimate else BN_NOTE, "recipe": args.recipe,
                    "calib_steps": args.calib_steps, "size": args.size, "analysis_steps": args.analysis_steps,
                    "eval_batches": args.eval_batches, "timeout": args.timeout, "max_rss_gb": args.max_rss_gb,
                    "total_min": sum(r.get("wall_s", 0.0) for r in records) / 60, "torch": torch.__version__,
                    "ort": onnxruntime.__version__}
        write_rst(records, Path(args.out), args.rerender, settings)
        return 0

    models = [m.strip() for m in args.models.split(",") if m.strip()]
    unknown = [m for m in models if m not in MODELS]
    if unknown:
        parser.error(f"unknown models {unknown}; known: {', '.join(MODELS)}")
    bits = [int(b) for b in args.bits.split(",") if b.strip()]
    out = Path(args.out)
    command = "python bench/zoo.py" + "".join(f" {shlex.quote(a)}" for a in (argv if argv is not None
                                                                                else sys.argv[1:]))
    tmp = tempfile.TemporaryDirectory(prefix="maptools-zoo-") if args.workdir is None else None
    work = Path(args.workdir) if args.workdir else Path(tmp.name)
    work.mkdir(parents=True, exist_ok=True)
    common = [sys.executable, str(Path(__file__).resolve())]
    previous = json.loads(json_path.read_text()) if (args.resume or args.merge) and json_path.exists() else []
    wanted = {(m, b) for m in models for b in bits}
    records: list[dict] = [r for r in previous if (r["model"], r["bits"]) in wanted] if args.resume else []
    kept: list[dict] = [r for r in previous if (r["model"], r["bits"]) not in wanted] if args.merge else []
    done = {(r["model"], r["bits"]) for r in records}
    # with --merge, the old rows of the pairs being re-run stay in the JSON until replaced (an interrupted
    # run loses nothing)
    replaced = [r for r in previous if (r["model"], r["bits"]) in wanted - done] if args.merge else []
    log_path = work / "children.log"
    with open(log_path, "ab") as log:
        for model in models:
            if all((model, b) in done for b in bits):
                continue
            tag = "" if args.no_bn_reestimate else "_bn"
            fp32 = work / "models" / f"{model}_{args.size}{tag}.onnx"
            if not fp32.exists():
                res = work / f"{model}.export.json"
                run = run_child(common + ["--worker", "export", "--model", model, "--fp32", str(fp32),
                                          "--size", str(args.size), "--result", str(res)]
                                + (["--no-bn-reestimate"] if args.no_bn_reestimate else [])
                                + ["--fallback-opset", str(args.fallback_opset)],
                                args.timeout, args.max_rss_gb, log)
                exported = json.loads(res.read_text()) if res.exists() else {"status": "fail", **run}
                print(f"[zoo] export {model}: {exported.get('status')} in {run['wall_s']:.1f} s "
                      f"{exported.get('error', '')}", flush=True)
                if exported.get("opset", 13) != 13:
                    (work / "models" / f"{model}.note").write_text(
                        f"exported at opset {exported['opset']}: the opset-13 export fails ("
                        + exported["export_error"].split(" [")[0] + ")")
                if exported.get("status") != "ok":
                    for b in bits:
                        records.append({"model": model, "bits": b, "status": "fail", "command": command,
                                        "error": "export failed: " + str(exported.get("error") or run["killed"]),
                                        **run})
                    continue
            for b in bits:
                if (model, b) in done:
                    continue
                res = work / f"{model}_w{b}.json"
                res.unlink(missing_ok=True)
                run = run_child(common + ["--worker", "quantize", "--model", model, "--fp32", str(fp32),
                                          "--bits-one", str(b), "--size", str(args.size),
                                          "--calib-steps", str(args.calib_steps), "--recipe", args.recipe,
                                          "--analysis-steps", str(args.analysis_steps),
                                          "--eval-batches", str(args.eval_batches),
                                          "--mapsave", str(work / "mapsave"), "--result", str(res)],
                                args.timeout, args.max_rss_gb, log)
                rec = json.loads(res.read_text()) if res.exists() else {"model": model, "bits": b, "status": "fail"}
                rec.update(run, command=command)
                note = work / "models" / f"{model}.note"
                if note.exists():
                    rec["note"] = note.read_text()
                if run["killed"]:
                    rec["status"] = "fail"
                records.append(rec)
                print(f"[zoo] {model} W{b}A{b}: {rec['status']} cos={_fmt(rec.get('cosine'), '.4f')} "
                      f"time={run['wall_s']:.1f}s rss={run['peak_rss_mb']:.0f}MB {_short_reason(rec)}", flush=True)
                json_path.parent.mkdir(parents=True, exist_ok=True)
                new = {(r["model"], r["bits"]) for r in records}
                json_path.write_text(json.dumps(
                    kept + records + [r for r in replaced if (r["model"], r["bits"]) not in new], indent=1))
                # the map directories are only needed while the child checks them
                import shutil

                shutil.rmtree(work / "mapsave" / f"{model}_w{b}", ignore_errors=True)
    import onnxruntime
    import torch

    settings = {"bn": "" if args.no_bn_reestimate else BN_NOTE, "recipe": args.recipe,
                "calib_steps": args.calib_steps, "size": args.size,
                "analysis_steps": args.analysis_steps, "eval_batches": args.eval_batches, "timeout": args.timeout,
                "max_rss_gb": args.max_rss_gb, "total_min": 0.0, "torch": torch.__version__,
                "ort": onnxruntime.__version__}
    order = {m: i for i, m in enumerate(MODELS if args.merge else models)}
    records = sorted(kept + records, key=lambda r: (order.get(r["model"], len(order)), -r["bits"]))
    settings["total_min"] = sum(r.get("wall_s", 0.0) for r in records) / 60
    write_rst(records, out, command, settings)
    json_path.write_text(json.dumps(records, indent=1))
    print(f"[zoo] wrote {out} and {json_path}", flush=True)
    if tmp is not None:
        tmp.cleanup()
    return 0


if __name__ == "__main__":
    sys.exit(main())
