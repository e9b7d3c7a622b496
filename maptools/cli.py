"""The ``maptools`` command line (also ``python -m maptools``).

Sub-commands: ``quantize``, ``inspect``, ``verify`` and ``demo``. Exit codes: 0 success; 2 bad usage or
bad input (a one-line error on stderr, no traceback); 1 an unexpected internal error.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from maptools.errors import InvalidArgumentError, MaptoolsError

__all__ = ["main"]

logger = logging.getLogger("maptools.cli")


class _UsageError(Exception):
    pass


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> None:  # argparse would exit 2 with usage; keep one line
        raise _UsageError(f"{self.prog}: {message}")


def _input_spec(text: str) -> tuple[str, list[int]]:
    name, sep, dims = text.rpartition(":")
    if sep and name and dims.strip().lower() in ("", "scalar"):  # NAME: or NAME:scalar, a rank-0 input
        return name, []
    try:
        shape = [int(d) for d in dims.split(",")]
    except ValueError:
        shape = []
    if not sep or not name or not shape:
        raise argparse.ArgumentTypeError(
            f"--input: expected NAME:D0,D1,... such as input:1,3,224,224 (NAME: or NAME:scalar for a rank-0 "
            f"input), got {text!r}")
    return name, shape


def _floats(text: str) -> list[float]:
    try:
        values = [float(v) for v in text.split(",")]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated numbers, got {text!r}") from None
    if not all(np.isfinite(values)):
        raise argparse.ArgumentTypeError(f"expected finite numbers, got {text!r}")
    return values


def _positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}") from None
    if value <= 0:
        raise argparse.ArgumentTypeError(f"expected a positive integer (1 or more), got {text!r}")
    return value


def _stds(text: str) -> list[float]:
    values = _floats(text)
    if any(v <= 0 for v in values):
        raise argparse.ArgumentTypeError(f"expected standard deviations > 0 (they divide the pixels), got {text!r}")
    return values


def _build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="maptools", description="Low-bit quantization of ONNX models for CIM chips.")
    parser.add_argument("-v", "--verbose", action="count", default=0, help="more log output (-vv for PPQ's)")
    sub = parser.add_subparsers(dest="command", required=True, parser_class=_Parser)

    q = sub.add_parser("quantize", help="quantize an ONNX model into mapsave/<mapname>")
    q.add_argument("model", help="float ONNX model")
    q.add_argument("--input", action="append", type=_input_spec, required=True, metavar="NAME:SHAPE",
                   help="input name and shape, e.g. input:1,3,224,224 (repeat for several inputs)")
    q.add_argument("--mapname", required=True)
    q.add_argument("--bits", type=int, default=8, help="bit width of weights and activations (default 8)")
    q.add_argument("--weight-bits", type=int, default=None)
    q.add_argument("--act-bits", type=int, default=None)
    q.add_argument("--asymmetric", action="store_true", help="asymmetric (unsigned) activations")
    q.add_argument("--per-tensor", action="store_true", help="one weight scale per tensor")
    source = q.add_mutually_exclusive_group()
    source.add_argument("--calib-dir", help="ImageFolder directory of calibration images")
    source.add_argument("--calib-npy", help="directory of .npy calibration arrays")
    q.add_argument("--mean", type=_floats, default=(0.485, 0.456, 0.406), help="normalisation mean for --calib-dir")
    q.add_argument("--std", type=_stds, default=(0.229, 0.224, 0.225), help="normalisation std for --calib-dir")
    q.add_argument("--calib-steps", type=int, default=32)
    q.add_argument("--device", default="cpu")
    q.add_argument("--seed", type=int, default=0)
    q.add_argument("--recipe", default="default", choices=["fast", "default", "best"])
    q.add_argument("--observer", default=None,
                   help="activation observer: percentile, minmax, kl or mse (default: the recipe's)")
    q.add_argument("--unsigned-nonnegative", action=argparse.BooleanOptionalAction, default=None,
                   help="quantize never-negative activations over 0..2^b-1 (default: on for the default and best "
                        "recipes)")
    q.add_argument("--layerwise-analysis", action="store_true",
                   help="also measure each operator's error when quantized alone (one forward per operator)")
    q.add_argument("--mapsave-dir", default=None)

    i = sub.add_parser("inspect", help="list the quantized operators of a map")
    i.add_argument("mapname")
    i.add_argument("--json", action="store_true", help="machine-readable output")
    i.add_argument("--mapsave-dir", default=None)

    v = sub.add_parser("verify", help="compare FP32, PPQ, onnxruntime and the integer executor")
    v.add_argument("mapname")
    v.add_argument("--inputs", metavar="DIR", default=None,
                   help="folder of real inputs: .npy files (whole batches or single samples, as --calib-npy) or "
                        "images (class sub-folders or flat, as --calib-dir); batches of the map's input shape "
                        "(default: random standard-normal batches)")
    v.add_argument("--mean", type=_floats, default=(0.485, 0.456, 0.406),
                   help="normalisation mean for image --inputs, in [0,1] pixel scale (after ToTensor) "
                        "(default 0.485,0.456,0.406)")
    v.add_argument("--std", type=_stds, default=(0.229, 0.224, 0.225),
                   help="normalisation std for image --inputs, [0,1] pixel scale, each > 0 (default 0.229,0.224,0.225)")
    v.add_argument("--batches", type=_positive_int, default=None,
                   help="number of batches: with --inputs at most this many (default all), else random batches "
                        "(default 2)")
    v.add_argument("--mapsave-dir", default=None)

    d = sub.add_parser("demo", help="quantize the bundled digits CNN and compare top-1")
    d.add_argument("--bits", type=int, default=4)
    d.add_argument("--recipe", default="default", choices=["fast", "default", "best"])
    d.add_argument("--mapsave-dir", default=None)
    return parser


def _cmd_quantize(args: argparse.Namespace) -> int:
    from maptools.quantization import imagefolder_calibset, npy_calibset, quantize
    from maptools.quantization.engine.quiet import show_progress

    show_progress(sys.stderr.isatty())  # PPQ's calibration progress bars, on a terminal only

    shapes = dict(args.input)
    if len(shapes) != len(args.input):
        raise InvalidArgumentError("--input: the same input name was given twice")
    if not Path(args.model).is_file():
        raise InvalidArgumentError(f"model: file {args.model!r} does not exist; expected an .onnx model file")
    calibset = None
    if args.calib_dir:
        calibset = imagefolder_calibset(args.calib_dir, shapes, mean=args.mean, std=args.std, seed=args.seed)
    elif args.calib_npy:
        calibset = npy_calibset(args.calib_npy, shapes)
    result = quantize(shapes, args.device, args.model, mapname=args.mapname, calibset=calibset,
                      calib_steps=args.calib_steps, bit_width=args.bits, weight_bits=args.weight_bits,
                      activation_bits=args.act_bits, symmetrical=not args.asymmetric,
                      per_channel=not args.per_tensor, seed=args.seed, mapsave_dir=args.mapsave_dir,
                      recipe=args.recipe, observer=args.observer, layerwise_analysis=args.layerwise_analysis,
                      unsigned_nonnegative=args.unsigned_nonnegative)
    print(result.summary())
    return 0


def _range(values: np.ndarray | None) -> list[int] | None:
    if values is None or values.size == 0:
        return None
    return [int(values.min()), int(values.max())]


def _scale_text(scale: object) -> str:
    if scale is None:
        return "-"
    arr = np.asarray(scale, dtype=np.float64).reshape(-1)
    return f"{arr[0]:.4g}" if arr.size == 1 else f"{arr.min():.3g}..{arr.max():.3g}({arr.size})"


def _range_text(values: list[int] | None) -> str:
    return "-" if values is None else f"[{values[0]},{values[1]}]"


def _cmd_inspect(args: argparse.Namespace) -> int:
    from maptools.quantization import read_quantinfo, read_quantparams
    from maptools.quantization.artifacts import float_operators, map_directory, read_manifest

    info = read_quantinfo(args.mapname, args.mapsave_dir)
    params = read_quantparams(args.mapname, args.mapsave_dir)
    manifest = read_manifest(map_directory(args.mapname, args.mapsave_dir))
    floats = float_operators(args.mapname, args.mapsave_dir)
    rows = []
    for name, cfg in info.items():
        kind = "conv" if cfg.op_type in ("Conv", "ConvTranspose") else "gemm"
        first_in = next((t for t in cfg.inputs or [] if t is not None), None)
        first_out = cfg.outputs[0] if cfg.outputs else None
        rows.append({
            "node": name, "op_type": cfg.op_type, "input_bits": cfg.input_bits, "output_bits": cfg.output_bits,
            "input_scale": cfg.input_scale, "output_scale": cfg.output_scale,
            "input_range": None if first_in is None else [first_in.qmin, first_in.qmax],
            "output_range": None if first_out is None else [first_out.qmin, first_out.qmax],
            "weight_bits": cfg.weight_bits,
            "weight_scale": None if cfg.weight_scale is None else [float(v) for v in cfg.weight_scale],
            "weight_range": _range(params.get(f"{name}_{kind}_weight")),
            "bias_range": _range(params.get(f"{name}_{kind}_bias")),
        })
    if args.json:
        print(json.dumps({"manifest": manifest, "operators": rows, "float_operators": floats}, indent=2))
        return 0
    width = max([len("node")] + [len(row["node"]) for row in rows])
    header = f"{'node':{width}} {'type':18} {'in':>3} {'out':>3} {'in scale':>10} {'out scale':>10} " \
             f"{'in range':>10} {'out range':>10} {'w':>2} {'w scale':>22} {'w range':>12} {'bias range':>24}"
    print(header)
    print("-" * len(header))
    for row, cfg in zip(rows, info.values(), strict=True):
        print(f"{row['node']:{width}} {row['op_type'][:18]:18} {row['input_bits'] or '-':>3} "
              f"{row['output_bits'] or '-':>3} {_scale_text(row['input_scale']):>10} "
              f"{_scale_text(row['output_scale']):>10} {_range_text(row['input_range']):>10} "
              f"{_range_text(row['output_range']):>10} {row['weight_bits'] or '-':>2} "
              f"{_scale_text(cfg.weight_scale):>22} {str(row['weight_range'] or '-'):>12} "
              f"{str(row['bias_range'] or '-'):>24}")
    print(f"\noperators left in float: {len(floats)}")
    if floats:
        float_width = max(len("node"), *(len(f["node"]) for f in floats))
        print(f"{'node':{float_width}} type")
        for f in floats:
            print(f"{f['node']:{float_width}} {f['op_type']}")
    settings = manifest.get("settings", {})
    print(f"\n{len(rows)} quantized operators; model {manifest['model']['path']} (sha256 "
          f"{manifest['model']['sha256'][:12]}); W{settings.get('weight_bits')}A{settings.get('activation_bits')} "
          f"recipe {settings.get('recipe')}; maptools {manifest['versions']['maptools']}, "
          f"ppq {manifest['versions']['ppq']}")
    return 0


def _folder_inputs(args: argparse.Namespace) -> object:
    """The batches of ``verify --inputs DIR``: .npy files or images, shaped as the map's (single) input."""
    from maptools.quantization import imagefolder_calibset, npy_calibset
    from maptools.quantization.verify import map_input_shapes

    shapes = map_input_shapes(args.mapname, args.mapsave_dir)
    folder = Path(args.inputs)
    if not folder.is_dir():
        raise InvalidArgumentError(f"--inputs: {args.inputs!r} is not a directory; expected a folder of .npy files "
                                   "or images")
    if len(shapes) != 1:
        raise InvalidArgumentError(f"--inputs: map {args.mapname!r} has {len(shapes)} inputs {list(shapes)}; a folder "
                                   "of inputs serves single-input maps only (from Python, pass verify(inputs=...))")
    if any(folder.glob("*.npy")):
        batches = npy_calibset(folder, shapes)
    else:
        batches = imagefolder_calibset(folder, shapes, mean=args.mean, std=args.std)
    if len(batches) == 0:
        raise InvalidArgumentError(f"--inputs: {args.inputs!r} holds less than one batch of the map's input shape "
                                   f"{next(iter(shapes.values()))}")
    return batches


def _cmd_verify(args: argparse.Namespace) -> int:
    from maptools.quantization import verify

    inputs = _folder_inputs(args) if args.inputs is not None else None
    report = verify(args.mapname, inputs, mapsave_dir=args.mapsave_dir, batches=args.batches)
    print(report.table())
    if not report.ran_pairs:  # every execution but at most one failed: nothing was compared
        print(f"maptools verify: error: no pair of executions could run on map {args.mapname!r}; "
              + "; ".join(f"{e}: {r}" for e, r in report.failures.items()), file=sys.stderr)
        return 2
    return 0


def _cmd_demo(args: argparse.Namespace) -> int:
    from maptools.examples.demo import run_demo

    outcome = run_demo(bits=args.bits, recipe=args.recipe, mapsave_dir=args.mapsave_dir)
    for line in outcome.lines():
        print(line)
    return 0


_COMMANDS = {"quantize": _cmd_quantize, "inspect": _cmd_inspect, "verify": _cmd_verify, "demo": _cmd_demo}


def main(argv: Sequence[str] | None = None) -> int:
    """Run the command line; returns the exit code."""
    try:
        args = _build_parser().parse_args(argv)
    except _UsageError as exc:
        print(str(exc), file=sys.stderr)
        return 2
    level = logging.WARNING if args.verbose == 0 else logging.INFO if args.verbose == 1 else logging.DEBUG
    logging.basicConfig(level=level, format="%(levelname)s %(name)s: %(message)s")
    try:
        return _COMMANDS[args.command](args)
    except MaptoolsError as exc:
        print(f"maptools {args.command}: error: {' '.join(str(exc).split())}", file=sys.stderr)
        return 2
    except BrokenPipeError:  # output piped into `head` and the like
        sys.stdout = open(os.devnull, "w")  # noqa: SIM115
        return 0
    except KeyboardInterrupt:
        print("maptools: interrupted", file=sys.stderr)
        return 130
    except Exception as exc:  # an internal error: keep the traceback in the log for the bug report
        logger.debug("internal error", exc_info=True)
        print(f"maptools {args.command}: internal error: {type(exc).__name__}: {exc} (run with -vv for details)",
              file=sys.stderr)
        return 1


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
