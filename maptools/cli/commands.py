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

#: ``quantize``'s Python argument names (and those of the calibration folder readers) -> its command line options.
_QUANTIZE_OPTIONS = {
    "onnx_path": "model", "input_shapes": "--input", "mapname": "--mapname", "bit_width": "--bits",
    "weight_bits": "--weight-bits", "activation_bits": "--act-bits", "calib_steps": "--calib-steps",
    "analysis_steps": "--analysis-steps", "first_last_bits": "--first-last-bits", "threads": "--threads",
    "device": "--device", "seed": "--seed", "recipe": "--recipe", "observer": "--observer",
    "unsigned_nonnegative": "--unsigned-nonnegative", "mapsave_dir": "--mapsave-dir", "cim": "--cim",
    "mean": "--mean", "std": "--std", "root": "--calib-dir", "calib_npy": "--calib-npy",
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
    options = {**_QUANTIZE_OPTIONS, **({"calibset": source} if source else {})}
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
    target = map_directory(args.mapname, args.mapsave_dir)
    replacing = target.is_dir()
    calibset = None
    if args.calib_dir:
        from maptools.quantization.calibration import imagefolder_calibset

        calibset = imagefolder_calibset(args.calib_dir, shapes, mean=args.mean, std=args.std, seed=args.seed)
    elif args.calib_npy:
        from maptools.quantization.calibration import npy_calibset

        calibset = npy_calibset(args.calib_npy, shapes)
    from maptools.quantization.diagnostics import advice_syntax

    with advice_syntax("cli"):  # warnings suggest --options, not keyword arguments
        result = quantize(shapes, args.device, args.model, mapname=args.mapname, calibset=calibset,
                          calib_steps=args.calib_steps, bit_width=args.bits, weight_bits=args.weight_bits,
                          activation_bits=args.act_bits, symmetrical=not args.asymmetric,
                          per_channel=not args.per_tensor, seed=args.seed, mapsave_dir=args.mapsave_dir,
                          recipe=args.recipe, observer=args.observer, layerwise_analysis=args.layerwise_analysis,
                          unsigned_nonnegative=args.unsigned_nonnegative, analysis_steps=args.analysis_steps,
                          threads=args.threads, first_last_bits=args.first_last_bits,
                          power_of_two=args.power_of_two, cim=args.cim, rounding=args.rounding,
                          time_budget=args.time_budget)
    if replacing:
        print(f"maptools quantize: replaced the earlier map {args.mapname!r} in {result.directory}", file=sys.stderr)
    print(result.summary())
    return 0


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
    from maptools.quantization.cim.sweep import run_cli

    return run_cli(args)


#: ``search``'s Python argument names -> its command line options.
_SEARCH_OPTIONS = {
    "onnx_path": "model", "input_shapes": "--input", "weight_bits": "--weight-bits", "activation_bits": "--act-bits",
    "budget_adc_fraction": "--budget-adc-fraction", "points": "--points", "mapname": "--mapname",
    "mapsave_dir": "--mapsave-dir", "cache_dir": "--cache", "cluster": "--cluster", "calibset": "--calib-dir",
    "evalset": "--calib-dir", "objective": "--objective",
}


def _cmd_search(args: argparse.Namespace) -> int:
    from maptools.quantization.search.command import run_cli

    with _cli_names(_SEARCH_OPTIONS):
        return run_cli(args)


_COMMANDS = {"quantize": _cmd_quantize, "inspect": _cmd_inspect, "verify": _cmd_verify, "demo": _cmd_demo,
             "cim-sweep": _cmd_cim_sweep, "search": _cmd_search}
#: Commands that print a progress line on stderr every :data:`HEARTBEAT_SECONDS` when it is not a terminal.
_LONG_COMMANDS = {"quantize", "verify", "demo", "cim-sweep", "search"}
