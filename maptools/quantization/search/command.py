"""``maptools search``: the command-line glue of :func:`~maptools.quantization.search.run.search`."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

from maptools.errors import InvalidArgumentError

__all__ = ["run_cli"]


def _data(args: Any, shapes: dict[str, list[int]]) -> tuple[list[Any], list[Any]]:
    """The calibration batches and the held-out ones after them, from the folder, else random (seed ``--seed``)."""
    wanted = args.calib_steps + args.eval_steps
    if args.calib_dir or args.calib_npy:
        if args.calib_dir:
            from maptools.quantization.calibfolders import imagefolder_calibset

            folder = imagefolder_calibset(args.calib_dir, shapes, mean=args.mean, std=args.std, seed=args.seed)
            option = "--calib-dir"
        else:
            from maptools.quantization.calibfolders import npy_calibset

            folder = npy_calibset(args.calib_npy, shapes)
            option = "--calib-npy"
        if len(folder) < wanted:
            raise InvalidArgumentError(f"{option}: {len(folder)} batches in {args.calib_dir or args.calib_npy!r}, "
                                       f"expected at least --calib-steps + --eval-steps = {wanted}")
        batches = [folder[i] for i in range(wanted)]
    else:
        generator = np.random.default_rng(args.seed)
        batches = [{n: generator.standard_normal(s).astype(np.float32) for n, s in shapes.items()}
                   for _ in range(wanted)]
    return batches[:args.calib_steps], batches[args.calib_steps:]


def run_cli(args: Any) -> int:
    """``maptools search``: prints the table; writes the JSON, the plot and the chosen map when asked.

    Returns:
        0 (errors raise :class:`~maptools.errors.MaptoolsError`, which the command line turns into exit code 2).
    """
    from maptools.quantization.cimmap.sweep import parse_int_list
    from maptools.quantization.search.evaluate import output_snr
    from maptools.quantization.search.run import search

    shapes = dict(args.input)
    if len(shapes) != len(args.input):
        raise InvalidArgumentError("--input: the same input name was given twice")
    for option, value in (("--out", args.out), ("--plot", args.plot)):
        if value is not None and not Path(value).parent.is_dir():
            raise InvalidArgumentError(f"{option}: the folder of {value!r} does not exist")
    weight_bits = parse_int_list(args.weight_bits, "--weight-bits", 2, 8)
    activation_bits = parse_int_list(args.act_bits, "--act-bits", 2, 8)
    if not Path(args.model).is_file():
        raise InvalidArgumentError(f"model: file {args.model!r} does not exist; expected an .onnx model file")
    calib, held_out = _data(args, shapes)
    result = search(args.model, shapes, calib, held_out, weight_bits=weight_bits, activation_bits=activation_bits,
                    spec=args.cim, objective=args.objective, points=args.points,
                    budget_adc_fraction=args.budget_adc_fraction, layerwise_batches=args.layerwise_batches,
                    front_metric=output_snr if args.front_figure == "snr" else None, verify_front=args.verify_front,
                    front_metric_name=None if args.front_figure is None else "output SNR against FP32 (dB)",
                    mapname=args.mapname,
                    mapsave_dir=args.mapsave_dir, cache_dir=None if args.no_cache else (args.cache or True),
                    jobs=args.jobs, cluster=args.cluster, recipe=args.recipe, seed=args.seed)
    print(result.table())
    print(f"{result.computed} points measured, {result.cached} from the cache, in {result.seconds:.1f} s")
    if args.out is not None:
        print(f"wrote {result.save(args.out)}")
    if args.plot is not None:
        print(f"wrote {result.plot(args.plot)}")
    return 0
