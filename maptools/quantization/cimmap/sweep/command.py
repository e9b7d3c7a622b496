"""``maptools cim-sweep``: the command-line glue of :func:`~maptools.quantization.cimmap.sweep.grid.cim_sweep`."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from maptools.errors import InvalidArgumentError
from maptools.quantization.artifacts import MapContents, map_contents
from maptools.quantization.cim.device import DeviceModel
from maptools.quantization.cimmap.sweep.grid import cim_sweep, parse_float_list, parse_int_list
from maptools.quantization.cimmap.sweep.worker import Batch

__all__ = ["run_cli"]


def _folder_batches(folder: str, option: str, contents: MapContents, mean: Sequence[float],
                    std: Sequence[float]) -> list[Batch]:
    """The batches of a folder (:func:`~maptools.quantization.mapinputs.map_folder_inputs`) as numpy arrays."""
    from maptools.quantization.mapinputs import map_folder_inputs

    shapes = {name: list(shape) for name, shape in contents.manifest["settings"]["input_shapes"].items()}
    data = map_folder_inputs(contents.mapname, folder, option, mean, std, python_call="cim_sweep", shapes=shapes)
    return [{name: np.asarray(value.numpy() if hasattr(value, "numpy") else value) for name, value in b.items()}
            for b in data]


def run_cli(args: Any) -> int:
    """``maptools cim-sweep``: the sweep of :func:`cim_sweep` from the parsed arguments; prints the tables.

    Returns:
        0 (errors raise :class:`~maptools.errors.MaptoolsError`, which the command line turns into exit code 2).
    """
    if args.out is not None and not Path(args.out).parent.is_dir():
        raise InvalidArgumentError(f"--out: the folder of {args.out!r} does not exist")
    if args.plot is not None and not Path(args.plot).parent.is_dir():
        raise InvalidArgumentError(f"--plot: the folder of {args.plot!r} does not exist")
    grid = {"adc_bits": parse_int_list(args.adc_bits, "--adc-bits", 1, 16),
            "rows": parse_int_list(args.rows, "--rows", 1),
            "cell_bits": parse_int_list(args.cell_bits, "--cell-bits", 1, 8)}
    contents = map_contents(args.mapname, args.mapsave_dir)  # read once, before any folder (no map: exit 2)
    inputs = calib = None
    if args.inputs is not None:
        inputs = _folder_batches(args.inputs, "--inputs", contents, args.mean, args.std)
    if args.calib is not None:
        calib = _folder_batches(args.calib, "--calib", contents, args.mean, args.std)
    device = None
    if args.drift_nu is not None or args.drift_compensation:
        device = DeviceModel(drift_nu=args.drift_nu or 0.0, drift_compensation=args.drift_compensation)
    axes = {"prog_error": None if args.prog_error is None else parse_float_list(args.prog_error, "--prog-error"),
            "drift_time": None if args.drift_time is None else parse_float_list(args.drift_time, "--drift-time")}
    result = cim_sweep(contents, inputs, calib=calib, dac_bits=args.dac_bits, weight_encoding=args.encoding,
                       requant=args.requant, method=args.method, jobs=args.jobs, mapsave_dir=args.mapsave_dir,
                       batches=args.batches, seed=args.seed, device=device, chips=args.chips,
                       cluster=args.cluster, **axes, **grid)
    print(result.table())
    if args.out is not None:
        print(f"wrote {result.save(args.out)}")
    if args.plot is not None:
        print(f"wrote {result.plot(args.plot)}")
    return 0
