"""The bodies of the ``maptools`` sub-commands, each importing what it calls on first use.

Argument checks come before any heavy import: torch and PPQ are imported only by a ``quantize`` run that can go
ahead.
"""

from __future__ import annotations

import argparse
import contextlib
import re
import sys
from collections.abc import Iterator, Mapping
from pathlib import Path

from maptools.errors import InvalidArgumentError, MaptoolsError
from maptools.quantization.config import OPTIONS, option_named

#: ``quantize``'s Python argument names (and those of the calibration folder readers) -> its command line options.
_QUANTIZE_OPTIONS = {
    **{opt.name: opt.flag for opt in OPTIONS}, "onnx_path": "model", "input_shapes": "--input", "mean": "--mean",
    "std": "--std",
}


@contextlib.contextmanager
def _cli_names(options: Mapping[str, str]) -> Iterator[None]:
    """Errors raised within name the command line option, not the Python argument (``--calib-dir``, not ``root``).

    The argument a :class:`~maptools.MaptoolsError` message starts with (``root: ...``, ``input_shapes['x']:
    ...``) is replaced by its option; the error keeps its type.
    """
    try:
        yield
    except MaptoolsError as exc:
        message = str(exc)
        match = re.match(r"([A-Za-z_]+)(?=[\[:])", message)
        if match is None or match[1] not in options:
            raise
        raise type(exc)(options[match[1]] + message[match.end():]) from exc


def _cmd_quantize(args: argparse.Namespace) -> int:
    source = "--calib-dir" if args.calib_dir else "--calib-npy" if args.calib_npy else None
    evaluation = "--eval-dir" if args.eval_dir else "--eval-npy" if args.eval_npy else None
    options = {**_QUANTIZE_OPTIONS, **({"calibset": source} if source else {}),
               **({"evalset": evaluation} if evaluation else {})}
    with _cli_names(options):
        return _quantize(args)


def _quantize(args: argparse.Namespace) -> int:
    # the argument checks come first: torch and PPQ are imported only for a run that can go ahead
    from maptools.quantization import quantize
    from maptools.quantization.artifacts import map_directory
    from maptools.quantization.progress import show_progress  # not the engine's module: that imports PPQ

    show_progress(sys.stderr.isatty())  # PPQ's calibration progress bars, on a terminal only

    shapes = dict(args.input)
    if len(shapes) != len(args.input):
        raise InvalidArgumentError("--input: the same input name was given twice")
    if not Path(args.model).is_file():
        raise InvalidArgumentError(f"model: file {args.model!r} does not exist; expected an .onnx model file")
    options = {opt.name: getattr(args, opt.name) for opt in OPTIONS if hasattr(args, opt.name)}
    target = map_directory(args.mapname, options.get("mapsave_dir"))
    replacing = target.is_dir()
    seed = options.get("seed", option_named("seed").default)
    calibset = _folder_batches(args.calib_dir, args.calib_npy, ("--calib-dir", "--calib-npy"), shapes, args, seed)
    evalset = _folder_batches(args.eval_dir, args.eval_npy, ("--eval-dir", "--eval-npy"), shapes, args, seed)
    from maptools.quantization.diagnostics import advice_syntax

    with advice_syntax("cli"):  # warnings suggest --options, not keyword arguments
        result = quantize(shapes, options.pop("device", option_named("device").default), args.model,
                          calibset=calibset, evalset=evalset, **options)
    if replacing:
        print(f"maptools quantize: replaced the earlier map {args.mapname!r} in {result.directory}", file=sys.stderr)
    print(result.summary())
    return 0


def _folder_batches(images: str | None, arrays: str | None, flags: tuple[str, str], shapes: dict[str, list[int]],
                    args: argparse.Namespace, seed: int) -> object:
    """The batches of an image folder (``--calib-dir``, ``--eval-dir``) or an .npy folder, or None."""
    with _cli_names({"root": flags[0], "calib_npy": flags[1]}):
        if images:
            from maptools.quantization.calibfolders import imagefolder_calibset

            return imagefolder_calibset(images, shapes, mean=args.mean, std=args.std, seed=seed)
        if arrays:
            from maptools.quantization.calibfolders import npy_calibset

            return npy_calibset(arrays, shapes)
    return None


def _cmd_inspect(args: argparse.Namespace) -> int:
    from maptools.quantization.inspection import inspect_map, listing_json, listing_table

    listing = inspect_map(args.mapname, args.mapsave_dir, cim=args.cim)
    print(listing_json(listing) if args.json else listing_table(listing))
    return 0


def _cmd_verify(args: argparse.Namespace) -> int:
    from maptools.quantization import verify
    from maptools.quantization.artifacts import map_contents
    from maptools.quantization.mapinputs import map_folder_inputs

    contents = map_contents(args.mapname, args.mapsave_dir)  # the one snapshot of the map this command reads
    inputs = None
    if args.inputs is not None:
        shapes = {name: list(shape) for name, shape in contents.manifest["settings"]["input_shapes"].items()}
        inputs = map_folder_inputs(args.mapname, args.inputs, "--inputs", args.mean, args.std, shapes=shapes)
    report = verify(contents, inputs, batches=args.batches)
    print(report.table())
    if not report.ran_pairs:  # every execution but at most one failed: nothing was compared
        print(f"maptools verify: error: no pair of executions could run on map {args.mapname!r}; "
              + "; ".join(f"{e}: {r}" for e, r in report.failures.items()), file=sys.stderr)
        return 2
    if report.errors:  # an execution that should have run did not: the verification is incomplete
        print(f"maptools verify: error: map {args.mapname!r} was not fully verified; "
              + "; ".join(f"{e} could not run: {r}" for e, r in report.errors.items()), file=sys.stderr)
        return 3
    return 0


def _cmd_demo(args: argparse.Namespace) -> int:
    from maptools.examples.demo import run_demo

    outcome = run_demo(bits=args.bits, recipe=args.recipe, mapsave_dir=args.mapsave_dir)
    for line in outcome.lines():
        print(line)
    return 0


def _cmd_cim_sweep(args: argparse.Namespace) -> int:
    from maptools.quantization.cimmap.sweep import run_cli

    return run_cli(args)


#: ``search``'s Python argument names -> its command line options.
_SEARCH_OPTIONS = {
    "onnx_path": "model", "input_shapes": "--input", "weight_bits": "--weight-bits", "activation_bits": "--act-bits",
    "budget_adc_fraction": "--budget-adc-fraction", "points": "--points", "mapname": "--mapname",
    "layerwise_batches": "--layerwise-batches", "mapsave_dir": "--mapsave-dir", "cache_dir": "--cache",
    "cluster": "--cluster", "calibset": "--calib-dir", "evalset": "--calib-dir", "objective": "--objective",
    "front_metric": "--front-figure", "verify_front": "--verify-front",
}


def _cmd_search(args: argparse.Namespace) -> int:
    from maptools.quantization.search.command import run_cli

    with _cli_names(_SEARCH_OPTIONS):
        return run_cli(args)


_COMMANDS = {"quantize": _cmd_quantize, "inspect": _cmd_inspect, "verify": _cmd_verify, "demo": _cmd_demo,
             "cim-sweep": _cmd_cim_sweep, "search": _cmd_search}
#: Commands that print a progress line on stderr every :data:`HEARTBEAT_SECONDS` when it is not a terminal.
_LONG_COMMANDS = {"quantize", "verify", "demo", "cim-sweep", "search"}
