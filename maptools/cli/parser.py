"""The argument parser of the ``maptools`` command line: :func:`_build_parser` and the option types it uses.

Bad usage raises :class:`_UsageError` (one line, turned into exit code 2 by :func:`maptools.cli.main`).
"""

from __future__ import annotations

import argparse
from collections.abc import Callable

import numpy as np

from maptools.errors import MaptoolsError
from maptools.quantization.config import IMAGENET_MEAN, IMAGENET_STD, OPTIONS, RECIPES, Option
from maptools.quantization.validation import (
    MAX_BATCHES,
    MAX_SEED,
    MAX_THREADS,
    check_batch_memory,
    check_batches,
    check_jobs,
    check_seed,
)


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
    if all(d > 0 for d in shape):  # float32, the random batches' type; non-positive dims: quantize names them
        _checked("--input", check_batch_memory, {name: shape}, {name: 4}, "--input")
    return name, shape


def _checked(option: str, check: Callable[..., object], *args: object) -> object:
    """``check(*args)``, its :class:`MaptoolsError` (whose message starts ``option: ``) as argparse's type error."""
    try:
        return check(*args)
    except MaptoolsError as exc:
        raise argparse.ArgumentTypeError(str(exc).removeprefix(f"{option}: ")) from None


def _int(text: str) -> int:
    try:
        return int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected an integer, got {text!r}") from None


def _limited(option: str, check: Callable[[object, str], int],
             parse: Callable[[str], int] = _int) -> Callable[[str], int]:
    """The argparse type of an integer option: ``parse`` the text, then ``check(value, option)`` its range."""

    def convert(text: str) -> int:
        return int(_checked(option, check, parse(text), option))  # type: ignore[call-overload]

    return convert


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


def _cim_spec(text: str) -> object:
    """``--cim KEY=VALUE,...``: a CIMSpec; a bad item names itself and the valid keys."""
    import dataclasses

    from maptools.quantization.cim.spec import CIMSpec
    from maptools.quantization.config import check_cim

    keys = ", ".join(f.name for f in dataclasses.fields(CIMSpec))
    try:
        return check_cim(CIMSpec.parse(text), [])
    except MaptoolsError as exc:
        raise argparse.ArgumentTypeError(f"{exc} (in {text!r}; valid keys: {keys}; e.g. "
                                         "rows=256,cell_bits=2,adc_bits=6,dac_bits=1,weight_encoding=differential,"
                                         "requant=fixed_point)") from None


def _stds(text: str) -> list[float]:
    values = _floats(text)
    if any(v <= 0 for v in values):
        raise argparse.ArgumentTypeError(f"expected standard deviations > 0 (they divide the pixels), got {text!r}")
    return values


def _option_type(opt: Option, spelling: str) -> Callable[[str], object]:
    """The argparse type of a table option: its text parsed, then checked as ``quantize`` checks it."""
    assert opt.parse is not None

    def convert(text: str) -> object:
        try:
            value = opt.parse(text)  # type: ignore[misc]
        except ValueError as exc:
            raise argparse.ArgumentTypeError(f"expected {opt.metavar or 'a value'}, got {text!r} ({exc})") from None
        except MaptoolsError as exc:
            raise argparse.ArgumentTypeError(str(exc)) from None
        try:
            return opt.check(value, spelling)
        except MaptoolsError as exc:
            raise argparse.ArgumentTypeError(str(exc).removeprefix(f"{spelling}: ").removeprefix(f"{opt.name}: ")
                                             ) from None

    return convert


def add_config_options(parser: argparse.ArgumentParser) -> None:
    """Every option of :data:`~maptools.quantization.config.OPTIONS`, with its help and default, each given one
    landing in ``args.<name>`` (options not given are absent: ``quantize`` applies their defaults)."""
    for opt in OPTIONS:
        common = {"dest": opt.name, "default": argparse.SUPPRESS}
        if opt.is_flag:
            parser.add_argument(opt.flag, action="store_const", const=True, help=opt.cli_help(), **common)
            negatives = ["--no-" + opt.flag.removeprefix("--"), *([opt.negative] if opt.negative else [])]
            parser.add_argument(*negatives, action="store_const", const=False,
                                help=f"the opposite of {opt.flag} ({opt.default_words()})",
                                **common)
            continue
        for spelling in (opt.flag, *opt.aliases):
            text = opt.cli_help() if spelling == opt.flag else f"older spelling of {opt.flag} ({opt.default_words()})"
            convert = _cim_spec if opt.group == "cim" else _option_type(opt, spelling)  # the hint of valid keys
            parser.add_argument(spelling, type=convert, metavar=opt.metavar or opt.name.upper()
                                if not opt.choices else "{" + ",".join(opt.choices) + "}",
                                required=opt.cli_required and spelling == opt.flag, help=text, **common)


_MAPSAVE_HELP = "directory holding the maps (default: $MAPTOOLS_MAPSAVE, else ./mapsave)"
_MEAN_HELP = ("normalisation mean per channel (one value or one per channel) in [0,1] pixel scale, i.e. after "
              f"ToTensor divides the 0..255 pixels by 255 (default: ImageNet's {','.join(map(str, IMAGENET_MEAN))})")
_STD_HELP = ("normalisation standard deviation per channel in the same [0,1] pixel scale, every entry > 0 (default: "
             f"ImageNet's {','.join(map(str, IMAGENET_STD))})")


_CLUSTER_HELP = ("run the points on the Dask distributed cluster of this scheduler, e.g. tcp://10.0.0.5:8786, "
                 "with the same results as the local pool (default: local worker processes)")


def _build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="maptools", description="Low-bit quantization of ONNX models for CIM chips.")
    parser.add_argument("-v", "--verbose", action="count", default=0,
                        help="more log output on stderr: -v INFO, -vv DEBUG with PPQ's own output (default: warnings "
                             "only)")
    sub = parser.add_subparsers(dest="command", required=True, parser_class=_Parser)

    q = sub.add_parser("quantize", help="quantize an ONNX model into mapsave/<mapname>")
    q.add_argument("model", help="float ONNX model file")
    q.add_argument("--input", action="append", type=_input_spec, required=True, metavar="NAME:SHAPE",
                   help="input name and shape in elements, e.g. input:1,3,224,224; NAME: or NAME:scalar for a rank-0 "
                        "input; repeat for every input (required)")
    source = q.add_mutually_exclusive_group()
    source.add_argument("--calib-dir", metavar="DIR",
                        help="calibrate on images: an ImageFolder (one sub-folder per class) or a flat folder "
                             "(default: none, random data)")
    source.add_argument("--calib-npy", metavar="DIR",
                        help="calibrate on a folder of .npy arrays, whole batches or single samples (default: none, "
                             "random data)")
    q.add_argument("--mean", type=_floats, default=IMAGENET_MEAN, metavar="M[,M,M]",
                   help=_MEAN_HELP + "; for --calib-dir")
    q.add_argument("--std", type=_stds, default=IMAGENET_STD, metavar="S[,S,S]",
                   help=_STD_HELP + "; for --calib-dir")
    evaluation = q.add_mutually_exclusive_group()
    evaluation.add_argument("--eval-dir", metavar="DIR",
                            help="measure the graph-wise error on these images (quantize's evalset), read as "
                                 "--calib-dir (default: none, the batches after the calibration ones)")
    evaluation.add_argument("--eval-npy", metavar="DIR",
                            help="measure the graph-wise error on these .npy arrays (quantize's evalset), read as "
                                 "--calib-npy (default: none, the batches after the calibration ones)")
    add_config_options(q)

    i = sub.add_parser("inspect", help="list the quantized operators of a map")
    i.add_argument("mapname", help="the map to show")
    i.add_argument("--json", action="store_true", help="machine-readable output (default: off, a table)")
    i.add_argument("--cim", type=_cim_spec, default=None, metavar="KEY=VALUE,...",
                   help="show the crossbar cost of every MAC on this crossbar, as quantize --cim (default: the map's "
                        "own crossbar when it has cim.json, else no cost)")
    i.add_argument("--mapsave-dir", default=None, metavar="DIR", help=_MAPSAVE_HELP)

    v = sub.add_parser("verify", help="compare FP32, PPQ, onnxruntime and the integer executor")
    v.add_argument("mapname", help="the map to verify")
    v.add_argument("--inputs", metavar="DIR", default=None,
                   help="folder of real inputs: .npy files (whole batches or single samples, as --calib-npy) or "
                        "images (class sub-folders or flat, as --calib-dir), in batches of the map's input shape "
                        "(default: none, random standard-normal batches)")
    v.add_argument("--mean", type=_floats, default=IMAGENET_MEAN, metavar="M[,M,M]",
                   help=_MEAN_HELP + "; for image --inputs")
    v.add_argument("--std", type=_stds, default=IMAGENET_STD, metavar="S[,S,S]",
                   help=_STD_HELP + "; for image --inputs")
    v.add_argument("--batches", type=_limited("--batches", check_batches, _positive_int), default=None, metavar="N",
                   help=f"number of batches, 1 to {MAX_BATCHES}: with --inputs at most this many (default: all), "
                        "else the number of random batches (default: 2)")
    v.add_argument("--mapsave-dir", default=None, metavar="DIR", help=_MAPSAVE_HELP)

    d = sub.add_parser("demo", help="quantize the bundled digits CNN and compare top-1")
    d.add_argument("--bits", type=int, default=4, help="bit width of weights and activations, 2..8 (default 4)")
    d.add_argument("--recipe", default="default", choices=RECIPES,
                   help="quantization recipe (default: default)")
    d.add_argument("--mapsave-dir", default=None, metavar="DIR", help=_MAPSAVE_HELP)

    c = sub.add_parser("cim-sweep", help="agreement of a map on a grid of CIM crossbars (ADC bits x rows x cell bits)")
    c.add_argument("mapname", help="the map to sweep")
    c.add_argument("--adc-bits", default="4-10", metavar="LIST", help="ADC bits, e.g. 4-10 or 4,6,8 (default 4-10)")
    c.add_argument("--rows", default="128,256,512", metavar="LIST", help="crossbar rows (default 128,256,512)")
    c.add_argument("--cell-bits", default="1,2,4", metavar="LIST", help="bits per cell (default 1,2,4)")
    c.add_argument("--dac-bits", type=_positive_int, default=1, metavar="N", help="bits per DAC cycle (default 1)")
    c.add_argument("--encoding", default="differential", choices=["differential", "offset"],
                   help="signed weight encoding (default differential)")
    c.add_argument("--requant", default="float", choices=["float", "fixed_point", "power_of_two"],
                   help="requantization arithmetic (default float)")
    c.add_argument("--method", default="mse", choices=["mse", "percentile"], help="ADC calibration (default mse)")
    c.add_argument("--inputs", metavar="DIR", default=None,
                   help="evaluation inputs: .npy files or images, as verify --inputs (default: random standard-normal "
                        "batches of the map's input shapes)")
    c.add_argument("--calib", metavar="DIR", default=None,
                   help="ADC calibration inputs, like --inputs (default: the --inputs, else other random batches)")
    c.add_argument("--mean", type=_floats, default=IMAGENET_MEAN, metavar="M[,M,M]", help=_MEAN_HELP)
    c.add_argument("--std", type=_stds, default=IMAGENET_STD, metavar="S[,S,S]", help=_STD_HELP)
    c.add_argument("--batches", type=_limited("--batches", check_batches, _positive_int), default=2, metavar="N",
                   help=f"random batches, 1 to {MAX_BATCHES} (default 2)")
    c.add_argument("--seed", type=_limited("--seed", check_seed), default=0,
                   help=f"seed of the random batches, 0 to {MAX_SEED} (default 0)")
    c.add_argument("--jobs", type=_limited("--jobs", check_jobs, _positive_int), default=None, metavar="N",
                   help=f"worker processes, 1 to {MAX_THREADS} (default: the number of CPUs)")
    c.add_argument("--cluster", default=None, metavar="ADDRESS", help=_CLUSTER_HELP)
    c.add_argument("--prog-error", default=None, metavar="LIST",
                   help="device axis: relative programming errors (DeviceModel.prog_sigma_rel), e.g. 0,0.02,0.05; "
                        "every point then runs on --chips chips (default: exact cells)")
    c.add_argument("--drift-time", default=None, metavar="LIST",
                   help="device axis: seconds since programming (DeviceModel.time), e.g. 20,86400; needs --drift-nu "
                        "(default: no drift axis)")
    c.add_argument("--drift-nu", type=float, default=None, metavar="NU",
                   help="drift exponent of every cell (DeviceModel.drift_nu), e.g. 0.05 (default: no drift)")
    c.add_argument("--drift-compensation", action="store_true",
                   help="global drift compensation (DeviceModel.drift_compensation; default off)")
    c.add_argument("--chips", type=_positive_int, default=8, metavar="N",
                   help="chips per device point, chip i seeded from --seed and i (default 8)")
    c.add_argument("--out", default=None, metavar="FILE.json", help="write every point's metrics (default: none)")
    c.add_argument("--plot", default=None, metavar="FILE.png", help="plot agreement vs ADC bits (default: none)")
    c.add_argument("--mapsave-dir", default=None, metavar="DIR", help=_MAPSAVE_HELP)

    s = sub.add_parser("search", help="per-layer bits under a crossbar budget: a front of accuracy against ADC "
                                      "conversions, and the best point within the budget")
    s.add_argument("model", help="float ONNX model file")
    s.add_argument("--input", action="append", type=_input_spec, required=True, metavar="NAME:SHAPE",
                   help="input name and shape, e.g. input:1,3,224,224; repeat for every input (required)")
    s.add_argument("--weight-bits", default="2,4,6,8", metavar="LIST",
                   help="the chip's allowed weight bits, 2..8 (default 2,4,6,8)")
    s.add_argument("--act-bits", default="4,8", metavar="LIST",
                   help="the chip's allowed activation bits, 2..8 (default 4,8)")
    s.add_argument("--cim", type=_cim_spec, default="rows=256,cell_bits=2,adc_bits=8", metavar="KEY=VALUE,...",
                   help="the crossbar the cost is counted on, as quantize --cim (default rows=256,cell_bits=2,"
                        "adc_bits=8)")
    s.add_argument("--budget-adc-fraction", type=float, default=0.7, metavar="F",
                   help="the budget: ADC conversions per sample as a fraction of uniform at the widest bits, in "
                        "(0, 1] (default 0.7)")
    s.add_argument("--objective", default="adc_conversions", choices=["adc_conversions", "energy_j"],
                   help="the cost the greedy walk lowers (default adc_conversions)")
    s.add_argument("--points", type=_positive_int, default=10, metavar="N",
                   help="walk points to quantize and measure, >= 2 (default 10)")
    s.add_argument("--layerwise-batches", type=int, default=8, metavar="N",
                   help="held-out batches the layer-wise sensitivities are accumulated over (default 8)")
    s.add_argument("--front-figure", default=None, choices=["snr"],
                   help="draw the front over the outputs' SNR against FP32 where the top-1 agreement ties (the "
                        "choice under the budget stays on the agreement; default: the front is over it)")
    s.add_argument("--verify-front", action="store_true",
                   help="quantize every front point again from its bits and check its figures and ADC conversions "
                        "(default: off)")
    source = s.add_mutually_exclusive_group()
    source.add_argument("--calib-dir", metavar="DIR",
                        help="images (ImageFolder or flat): the first --calib-steps batches calibrate, the next "
                             "--eval-steps are held out (default: random data)")
    source.add_argument("--calib-npy", metavar="DIR",
                        help="the same from a folder of .npy arrays (default: none, random data)")
    s.add_argument("--mean", type=_floats, default=(0.485, 0.456, 0.406), metavar="M[,M,M]",
                   help=_MEAN_HELP + "; for --calib-dir")
    s.add_argument("--std", type=_stds, default=(0.229, 0.224, 0.225), metavar="S[,S,S]",
                   help=_STD_HELP + "; for --calib-dir")
    s.add_argument("--calib-steps", type=_limited("--calib-steps", check_batches), default=32, metavar="N",
                   help=f"calibration batches, 8 to {MAX_BATCHES} (default 32)")
    s.add_argument("--eval-steps", type=_limited("--eval-steps", check_batches, _positive_int), default=8,
                   metavar="N", help="held-out batches the figure and the sensitivities are measured on (default 8)")
    s.add_argument("--recipe", default="default", choices=["fast", "default", "best"],
                   help="quantization recipe of every point (default: default)")
    s.add_argument("--seed", type=_limited("--seed", check_seed), default=0,
                   help=f"seed of the random data and of quantization, 0 to {MAX_SEED} (default 0)")
    s.add_argument("--mapname", default=None,
                   help="write the chosen point as this map and check it reproduces its figure (default: none)")
    s.add_argument("--cache", default=None, metavar="DIR",
                   help="cache of measured points, so a killed search resumes (default: $MAPTOOLS_SEARCH_CACHE, "
                        "else ~/.cache/maptools-search)")
    s.add_argument("--no-cache", action="store_true", help="measure every point, cache nothing (default: off)")
    s.add_argument("--jobs", type=_limited("--jobs", check_jobs, _positive_int), default=None, metavar="N",
                   help=f"worker processes, 1 to {MAX_THREADS} (default: the number of CPUs)")
    s.add_argument("--cluster", default=None, metavar="ADDRESS", help=_CLUSTER_HELP)
    s.add_argument("--out", default=None, metavar="FILE.json", help="write the front as JSON (default: none)")
    s.add_argument("--plot", default=None, metavar="FILE.png", help="plot the front (default: none)")
    s.add_argument("--mapsave-dir", default=None, metavar="DIR", help=_MAPSAVE_HELP)
    return parser
