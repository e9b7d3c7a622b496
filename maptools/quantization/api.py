"""The quantization stage: :func:`quantize` from a float ONNX model to the ``mapsave/<mapname>`` artifacts.

The pipeline: checks of every argument -> calibration data (:mod:`.calibration`) -> PPQ with the
low-bit quantizer (:mod:`.engine`) -> artifacts written atomically (:mod:`.artifacts`).
"""

from __future__ import annotations

import importlib.metadata
import logging
import math
import os
import random
import time
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

import numpy as np
import onnx

import maptools
from maptools.quantization import artifacts
from maptools.quantization.diagnostics import output_warnings
from maptools.quantization.model import check_input_shapes, first_and_last_macs, load_model, prepare_model
from maptools.quantization.records import QuantizationResult
from maptools.quantization.report import REPORT_JSON, REPORT_PNG, render_report
from maptools.quantization.validation import (
    check_bits,
    check_bool,
    check_device,
    check_layer_bits,
    check_positive_int,
    check_writable_dir,
)

__all__ = ["OBSERVERS", "RECIPES", "quantize"]

logger = logging.getLogger(__name__)

#: Activation observers (PPQ calibration algorithms) accepted by ``observer=``.
OBSERVERS = ("percentile", "minmax", "kl", "mse")
#: Recipe names accepted by ``recipe=`` (see :mod:`maptools.quantization.engine.recipes`).
RECIPES = ("fast", "default", "best")


def _version(package: str) -> str:
    try:
        return importlib.metadata.version(package)
    except importlib.metadata.PackageNotFoundError:
        return "unknown"


def _seed_everything(seed: int) -> None:
    import torch

    random.seed(seed)
    np.random.seed(seed % (2**32))
    torch.manual_seed(seed)


def _warnings(errors: Any, data: str) -> list[str]:
    return output_warnings(errors.output_snr_db, errors.part_snr_db, errors.fp32_span, errors.quant_span,
                           errors.isolated_snr_db, data)


def _parts_report(errors: Any) -> dict[str, dict[str, dict[str, float | str]]]:
    """report.json's ``output_parts``: output -> part -> SNR and cosine."""
    return {output: {part: {"snr_db": snr if math.isfinite(snr) else str(snr),
                            "cosine": errors.part_cosine[output][part]}
                     for part, snr in parts.items()}
            for output, parts in errors.part_snr_db.items()}


_SETTING_TYPE = ("setting: expected a PPQ QuantizationSetting (e.g. from maptools.quantization.engine.recipes."
                 "build_setting) or None, got {}")
_KL_UNSIGNED = ("unsigned_nonnegative: True cannot be used with {source} (PPQ's KL observer calibrates signed "
                "ranges only); choose another observer or drop unsigned_nonnegative")


def _applied_activation_choices(recipe: str, setting: Any, observer: str | None, unsigned: bool | None,
                                symmetrical: bool) -> tuple[str, bool]:
    """The activation observer and unsigned ranges a run applies: what the manifest records.

    PPQ calibrates every activation with the setting's ``calib_algorithm`` when it has one, else with each
    config's observer (the explicit ``observer``, else the recipe's, else ``percentile``). The recipe's
    unsigned ranges are turned off, with an INFO line, where they cannot apply; an explicit
    ``unsigned_nonnegative=True`` that cannot apply is an error.

    Args:
        recipe: The recipe name (``'custom'`` for a setting without a recipe).
        setting: The PPQ setting that will run.
        observer: The ``observer`` argument.
        unsigned: The ``unsigned_nonnegative`` argument.
        symmetrical: The ``symmetrical`` argument.

    Returns:
        ``(observer, unsigned_nonnegative)`` as applied.

    Raises:
        InvalidArgumentError: ``observer`` contradicts the setting's calibration algorithm, or
            ``unsigned_nonnegative=True`` meets the setting's ``kl`` calibration.
    """
    from maptools.quantization.engine.recipes import RECIPE_OBSERVERS, RECIPE_UNSIGNED

    forced = setting.quantize_activation_setting.calib_algorithm
    if forced is not None:
        forced = str(forced).lower()
        if observer is not None and observer != forced:
            raise maptools.InvalidArgumentError(
                f"observer: {observer!r} given, but setting.quantize_activation_setting.calib_algorithm is "
                f"{forced!r}, which PPQ applies to every activation; give only one of them (or the same)")
    applied = forced or observer or RECIPE_OBSERVERS.get(recipe) or "percentile"
    if unsigned and applied == "kl":
        raise maptools.InvalidArgumentError(_KL_UNSIGNED.format(
            source="setting.quantize_activation_setting.calib_algorithm='kl'"))
    if unsigned is None and RECIPE_UNSIGNED.get(recipe, False):
        reasons = (["symmetrical=False (asymmetric activations use 0..2^b-1 with a zero point)"] if not symmetrical
                   else []) + (["the kl observer (PPQ calibrates it on signed ranges only)"] if applied == "kl" else [])
        if reasons:
            logger.info("unsigned_nonnegative: the %r recipe's unsigned ranges for non-negative activations are off "
                        "with %s", recipe, " and ".join(reasons))
            return applied, False
        return applied, True
    return applied, bool(unsigned)


def quantize(
    input_shapes: Mapping[str, Sequence[int]],
    device: str,
    onnx_path: str | os.PathLike,
    mapname: str = "newmap",
    calibset: Iterable[Any] | None = None,
    calib_steps: int = 32,
    *,
    bit_width: int = 8,
    symmetrical: bool = True,
    per_channel: bool = True,
    seed: int = 0,
    mapsave_dir: str | os.PathLike | None = None,
    setting: Any = None,
    weight_bits: int | None = None,
    activation_bits: int | None = None,
    layer_bits: Mapping[str, int | tuple[int, int]] | None = None,
    observer: str | None = None,
    recipe: str | None = None,
    unsigned_nonnegative: bool | None = None,
    analysis_steps: int = 4,
    layerwise_analysis: bool = False,
    evalset: Iterable[Any] | None = None,
    threads: int | None = None,
    first_last_bits: int | None = None,
) -> QuantizationResult:
    """Quantize a float ONNX model with PPQ and write ``mapsave/<mapname>``.

    Args:
        input_shapes: Input name -> shape, e.g. ``{'input': [1, 3, 224, 224]}``. Every graph input needs
            one; dynamic dims of the ONNX are resolved by these shapes.
        device: ``'cpu'`` or ``'cuda'`` (a GPU must be present for ``'cuda'``).
        onnx_path: The float ONNX model.
        mapname: Name of the map; results go to ``<mapsave>/<mapname>/``.
        calibset: None to calibrate on ``calib_steps`` random batches drawn with ``seed``; else an
            iterable of batches, each a dict input name -> ``torch.Tensor`` or numpy array (a bare tensor
            for single-input models), e.g. from :func:`~maptools.quantization.imagefolder_calibset`.
        calib_steps: Number of calibration batches (at least 8, PPQ's minimum).
        bit_width: Bit width of every quantized tensor (2 to 8), unless ``weight_bits`` /
            ``activation_bits`` / ``layer_bits`` say otherwise.
        symmetrical: Symmetric (signed) activations; False for asymmetric (unsigned, with zero point).
            Weights are always symmetric.
        per_channel: One weight scale per output channel (else one per tensor).
        seed: Seed of the random calibration data and of every random generator used.
        mapsave_dir: Where maps are saved; default ``$MAPTOOLS_MAPSAVE`` or ``./mapsave``.
        setting: Expert override: a full PPQ ``QuantizationSetting`` whose passes run instead of the recipe's
            (see ``recipe``). Its ``quantize_activation_setting.calib_algorithm``, when set, calibrates every
            activation (an explicit ``observer`` must then be the same).
        weight_bits: Weight bit width (default ``bit_width``).
        activation_bits: Activation bit width (default ``bit_width``).
        layer_bits: Per-node overrides: node name -> bits, or ``(weight_bits, activation_bits)``.
        observer: Activation calibration algorithm: one of :data:`OBSERVERS`, or None for the recipe's
            (``mse`` for ``'default'`` and ``'best'``, ``percentile`` for ``'fast'`` and a ``setting`` without
            a recipe), or the ``setting``'s calibration algorithm when it sets one. The manifest records the
            one applied.
        unsigned_nonnegative: Quantize activations that cannot be negative (ReLU, ReLU6, sigmoid outputs...)
            over ``0 .. 2^b-1`` rather than ``-2^(b-1) .. 2^(b-1)-1``, zero point 0 either way. It needs
            symmetric activations and another observer than ``kl`` (PPQ calibrates ``kl`` on signed ranges
            only): True together with ``symmetrical=False`` or the ``kl`` observer is an error naming both.
            None for the recipe's choice: on for ``'default'`` and ``'best'``, off for ``'fast'`` and a
            ``setting`` without a recipe; a recipe's choice is turned off with ``symmetrical=False`` or the
            ``kl`` observer (logged at INFO). The manifest records what was applied.
        recipe: ``'fast'``, ``'default'`` or ``'best'`` (see :mod:`maptools.quantization.engine.recipes`), or
            None: ``'default'``, or with ``setting`` PPQ's own choices (recorded as ``'custom'``). With
            ``setting``, a recipe contributes its choices made in maptools (activation observer, unsigned
            ranges, weight scales) while the passes are the setting's: ``recipe='default'`` with
            ``build_setting('default', ...)`` plus equalization is the default recipe plus equalization.
        analysis_steps: Number of batches the graph-wise error is measured on, held out from calibration
            (see ``evalset``).
        layerwise_analysis: Also measure the layer-wise error (the graph outputs when one operator alone
            is quantized) and write it to ``report.json``. Off by default: it costs one forward of the
            whole graph per quantized operator (on the first analysis batch); it is measured anyway when
            an output gets a warning, to name the operators to blame.
        evalset: Batches (the form of ``calibset``) to measure the graph-wise error on. Without it the error
            is measured on the batches of ``calibset`` after the first ``calib_steps`` (up to
            ``analysis_steps`` of them; give a calibset longer than ``calib_steps``, as an ImageFolder
            usually is), or, with random calibration, on ``analysis_steps`` other random batches; when the
            calibset has no batch beyond ``calib_steps``, on the calibration batches themselves, which
            ``report.json`` and the summary say ("in-sample") since it overstates the accuracy.
        first_last_bits: Keep the first and the last MAC operator (Conv/Gemm/MatMul with a constant weight, in
            graph order) at this many bits, weights and activations, the usual way to protect a network's most
            sensitive layers; a ``layer_bits`` entry for either wins. Recorded in the manifest's ``layer_bits``.
        threads: torch CPU threads while quantizing; None for 1, measured the fastest for PPQ's
            calibration on small batches and the one that holds its speed beside other CPU-bound jobs (see
            :mod:`maptools.quantization.engine.threads`).

    Returns:
        The paths written, the per-operator configs and the graph-wise error.

    Raises:
        maptools.MaptoolsError: a subclass naming the bad argument, raised before anything is written;
            or :class:`~maptools.EngineError` when PPQ fails (naming the node when known).
    """
    started = time.perf_counter()
    # -- 1. check every argument before doing any work --------------------------------------------
    device = check_device(device)
    mapname = artifacts.check_mapname(mapname)
    calib_steps = check_positive_int(calib_steps, "calib_steps")
    bit_width = check_bits(bit_width, "bit_width")
    w_bits = check_bits(weight_bits, "weight_bits") if weight_bits is not None else bit_width
    a_bits = check_bits(activation_bits, "activation_bits") if activation_bits is not None else bit_width
    symmetrical = check_bool(symmetrical, "symmetrical")
    per_channel = check_bool(per_channel, "per_channel")
    seed = check_positive_int(seed, "seed", minimum=0)
    analysis_steps = check_positive_int(analysis_steps, "analysis_steps")
    layerwise_analysis = check_bool(layerwise_analysis, "layerwise_analysis")
    threads = check_positive_int(threads, "threads") if threads is not None else None
    overrides = check_layer_bits(layer_bits)
    if first_last_bits is not None:
        first_last_bits = check_bits(first_last_bits, "first_last_bits")
    if observer is not None and observer not in OBSERVERS:
        raise maptools.InvalidArgumentError(f"observer: expected one of {list(OBSERVERS)} or None, got {observer!r}")
    if recipe is not None and recipe not in RECIPES:
        raise maptools.InvalidArgumentError(f"recipe: expected one of {list(RECIPES)} or None, got {recipe!r}")
    recipe_name = recipe if recipe is not None else "custom" if setting is not None else "default"
    if setting is not None and not hasattr(setting, "quantize_activation_setting"):  # isinstance once PPQ is in
        raise maptools.InvalidTypeError(_SETTING_TYPE.format(type(setting).__name__))
    if unsigned_nonnegative is not None:
        unsigned_nonnegative = check_bool(unsigned_nonnegative, "unsigned_nonnegative")
    if unsigned_nonnegative and not symmetrical:
        raise maptools.InvalidArgumentError(
            "unsigned_nonnegative: True needs symmetric activations, but symmetrical=False was given (asymmetric "
            "activations already use the unsigned range 0..2^b-1, with a zero point); drop one of the two")
    if unsigned_nonnegative and observer == "kl":
        raise maptools.InvalidArgumentError(_KL_UNSIGNED.format(source="observer='kl'"))
    target = artifacts.map_directory(mapname, mapsave_dir)
    check_writable_dir(target.parent, "mapsave_dir")
    model = load_model(onnx_path)
    shapes = check_input_shapes(input_shapes, model)
    prepared = prepare_model(model, shapes)
    unknown = sorted(set(overrides) - {node.name for node in prepared.graph.node})
    if unknown:
        raise maptools.InvalidArgumentError(f"layer_bits: nodes {unknown} are not in the model")
    if first_last_bits is not None:
        for name in first_and_last_macs(prepared):
            overrides.setdefault(name, (first_last_bits, first_last_bits))
    # -- 2. the calibration data (torch from here on) ---------------------------------------------
    import torch

    from maptools.quantization.calibration import MIN_CALIB_BATCHES, prepare_calibset, random_calibset

    if calibset is None:
        if calib_steps < MIN_CALIB_BATCHES:
            raise maptools.CalibrationError(
                f"calib_steps: {calib_steps} given, but PPQ needs at least {MIN_CALIB_BATCHES} calibration batches"
            )
        batches = random_calibset(shapes, calib_steps, seed)
        held_out, analysis_data = random_calibset(shapes, analysis_steps, seed + 1), "random (held-out)"
        calibration = "random"
    else:
        batches = prepare_calibset(calibset, model, shapes, calib_steps + analysis_steps)
        batches, held_out = batches[:calib_steps], batches[calib_steps:]
        if len(batches) < calib_steps:
            logger.warning("calibset: holds %d batches, fewer than calib_steps=%d; calibrating on those %d batches",
                           len(batches), calib_steps, len(batches))
        if len(batches) < MIN_CALIB_BATCHES:
            raise maptools.CalibrationError(
                f"calibset: holds {len(batches)} batches, but PPQ needs at least {MIN_CALIB_BATCHES} calibration "
                "batches; give more batches")
        analysis_data = "held-out" if held_out else "in-sample"
        held_out = held_out or batches[:analysis_steps]
        calibration = "user"
    if evalset is not None:
        held_out = prepare_calibset(evalset, model, shapes, analysis_steps, argument="evalset", minimum=1)
        analysis_data = "evalset"
    # -- 3. the PPQ engine (imported only now) ---------------------------------------------------
    from maptools.quantization.engine import LowBitSpec, PPQSession
    from maptools.quantization.engine.recipes import RECIPE_WEIGHT_OBSERVERS, build_setting

    if setting is not None:
        from ppq.api.setting import QuantizationSetting  # PPQ is imported by now

        if not isinstance(setting, QuantizationSetting):
            raise maptools.InvalidTypeError(_SETTING_TYPE.format(type(setting).__name__))
        ppq_setting = setting
    else:
        ppq_setting = build_setting(recipe_name, device, len(batches), observer=observer, activation_bits=a_bits)
    observer, unsigned_nonnegative = _applied_activation_choices(
        recipe_name, ppq_setting, observer, unsigned_nonnegative, symmetrical)
    spec = LowBitSpec(weight_bits=w_bits, activation_bits=a_bits, symmetrical=symmetrical,
                      per_channel=per_channel, layer_bits=overrides, observer=observer,
                      unsigned_nonnegative=unsigned_nonnegative,
                      weight_observer=RECIPE_WEIGHT_OBSERVERS.get(recipe_name, "ppq"))
    _seed_everything(seed)
    logger.info("quantizing %s as %r: W%dA%d, %s, %d %s calibration batches on %s",
                model.path, mapname, w_bits, a_bits, recipe_name, len(batches), calibration, device)
    timings = {"validation_and_data": time.perf_counter() - started}
    mark = time.perf_counter()
    from maptools.quantization.engine.threads import DEFAULT_THREADS

    threads = threads or DEFAULT_THREADS
    session = PPQSession.from_onnx(prepared, spec, device, ppq_setting, threads=threads)
    session.quantize(batches)
    timings["ppq_quantization"], mark = time.perf_counter() - mark, time.perf_counter()
    quantinfo = session.quantinfo()
    if not any(record.weight_bits is not None for record in quantinfo.values()):
        # PPQ's dispatcher keeps some graphs entirely in float (one Conv that is both the first and the last
        # operator): artifacts without a single quantized MAC would map nothing
        raise maptools.ModelError(
            f"onnx_path: PPQ quantized no Conv/Gemm/MatMul of {model.path} ({len(quantinfo)} operators "
            "quantized); a graph of a single operator is kept in float, add the layers around it"
        )
    quantparams = session.quantparams()
    qdq = session.export_qdq(io_like=model.proto)
    state = session.to_state(quantparams)
    timings["extraction_and_export"], mark = time.perf_counter() - mark, time.perf_counter()
    errors = session.error_analysis(held_out, layerwise=layerwise_analysis)
    warnings = _warnings(errors, analysis_data)
    if warnings and not errors.isolated_snr_db:  # name the operators to blame
        errors.isolated_snr_db, errors.isolated_cosine = session.layerwise(held_out[0])
        warnings = _warnings(errors, analysis_data)
    timings["error_analysis"] = time.perf_counter() - mark
    for name, snr in errors.output_snr_db.items():
        logger.info("graph-wise error of output %r on %s data: SNR %.2f dB, cosine %.5f", name, analysis_data, snr,
                    errors.output_cosine[name])
    for warning in warnings:
        logger.warning("%s", warning)
    # -- 4. the artifacts, written atomically -----------------------------------------------------
    manifest = {
        "mapname": mapname,
        "versions": {"maptools": maptools.__version__, "ppq": _version("ppq"), "torch": torch.__version__,
                     "onnx": onnx.__version__, "numpy": np.__version__, "protobuf": _version("protobuf"),
                     "onnxruntime": _version("onnxruntime")},
        "model": {"path": str(model.path), "sha256": model.sha256},
        "settings": {
            "input_shapes": {k: list(v) for k, v in shapes.items()}, "device": device,
            "weight_bits": w_bits, "activation_bits": a_bits, "bit_width": bit_width,
            "symmetrical": symmetrical, "per_channel": per_channel, "observer": observer,
            "weight_observer": spec.weight_observer,
            "unsigned_nonnegative": unsigned_nonnegative,
            "recipe": recipe_name, "ppq_setting": "custom" if setting is not None else "recipe",
            "layer_bits": {k: list(v) for k, v in overrides.items()},
            "calibration": calibration, "calib_steps": calib_steps, "calib_batches": len(batches), "seed": seed,
            "layerwise_analysis": layerwise_analysis, "analysis_steps": analysis_steps, "threads": threads,
        },
    }
    files = {
        artifacts.QUANTINFO: artifacts.dump_pickle(quantinfo),
        artifacts.QUANTPARAMS: artifacts.dump_pickle(quantparams),
        artifacts.QUANTMODEL: qdq.SerializeToString(),
        artifacts.PPQSTATE: artifacts.dump_json(state),
    }
    files.update(render_report(mapname, manifest["settings"], timings, errors.output_snr_db, errors.output_cosine,
                               errors.layer_snr_db, errors.layer_cosine,
                               {name: cfg.op_type for name, cfg in quantinfo.items()},
                               errors.isolated_snr_db, errors.isolated_cosine,
                               extra={"analysis": {"data": analysis_data, "batches": len(held_out)},
                                      "output_parts": _parts_report(errors), "warnings": warnings}))
    artifacts.write_map(target, files, manifest)
    result = QuantizationResult(
        mapname=mapname, directory=target, quantinfo_path=target / artifacts.QUANTINFO,
        quantparams_path=target / artifacts.QUANTPARAMS, model_path=target / artifacts.QUANTMODEL,
        manifest_path=target / artifacts.MANIFEST, operators=quantinfo, output_snr_db=errors.output_snr_db,
        output_cosine=errors.output_cosine, layer_snr_db=errors.layer_snr_db, seconds=time.perf_counter() - started,
        report_path=target / REPORT_JSON, plot_path=target / REPORT_PNG, warnings=warnings,
        analysis_data=analysis_data, part_snr_db=errors.part_snr_db,
    )
    logger.info("wrote %s in %.1f s", target, result.seconds)
    return result
