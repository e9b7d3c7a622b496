"""The stages of :func:`~maptools.quantization.quantize`, each a function of what the earlier ones made.

1. :meth:`QuantizeOptions.check <maptools.quantization.options.QuantizeOptions.check>`: every argument;
2. :func:`load`: the model loaded and prepared for PPQ (:mod:`.model`), the per-layer bits resolved;
3. :func:`calibration_data`: the calibration batches and those the error is measured on (:mod:`.calibration`);
4. :func:`configure_engine`: the PPQ setting and the choices it applies (PPQ is imported only now), and
   :func:`run_engine`: PPQ with the low-bit quantizer (:mod:`.engine`);
5. :func:`extract`: the records, the integers, the QDQ model and PPQ's state;
6. :func:`analyse`: the graph-wise error and the warnings (:mod:`.diagnostics`);
7. :func:`cim_content`: with ``cim=``, the crossbar content (ADC calibration, records' ``cim`` fields, weight
   slices, integer multipliers) computed from the in-memory artifacts (:mod:`.cimmap.content`);
8. :func:`artifact_files`: the manifest, the files and the report (:mod:`.report`), written by
   :func:`~maptools.quantization.mapdir.write_map`.
"""

from __future__ import annotations

import contextlib
import dataclasses
import importlib.metadata
import logging
import math
import random
from collections.abc import Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import numpy as np
import onnx

import maptools
from maptools.errors import CalibrationError, ModelError
from maptools.quantization import artifacts
from maptools.quantization.diagnostics import (
    Advice,
    cnn_transformer_convolutions,
    fit_warnings,
    output_warnings,
    sequence_outputs,
)
from maptools.quantization.floatops import float_summary
from maptools.quantization.model import (
    LoadedModel,
    check_input_shapes,
    first_and_last_macs,
    load_model,
    output_operators,
    prepare_model,
)
from maptools.quantization.options import QuantizeOptions, check_setting_type
from maptools.quantization.report import render_report
from maptools.quantization.validation import check_batch_memory

if TYPE_CHECKING:
    import os

    from maptools.quantization.cimmap.content import CimContent
    from maptools.quantization.engine import PPQSession
    from maptools.quantization.engine.analysis import ErrorAnalysis

__all__ = [
    "CalibrationData",
    "Extracted",
    "Prepared",
    "analyse",
    "artifact_files",
    "calibration_data",
    "cim_content",
    "configure_engine",
    "extract",
    "load",
    "run_engine",
    "seeded_cuda_devices",
    "seeded_globals",
]

logger = logging.getLogger(__name__)


@dataclass
class Prepared:
    """The model of a run: as loaded, its checked input shapes, and prepared for PPQ."""

    model: LoadedModel
    shapes: dict[str, tuple[int, ...]]
    proto: onnx.ModelProto


@dataclass
class CalibrationData:
    """The batches of a run.

    Attributes:
        batches: The calibration batches.
        held_out: The batches the error is measured on.
        analysis_data: What ``held_out`` is: ``'random (held-out)'``, ``'held-out'``, ``'in-sample'`` or
            ``'evalset'``.
        calibration: ``'random'`` or ``'user'``.
        held_out_samples: Samples in ``held_out``.
    """

    batches: Sequence[Any]
    held_out: Sequence[Any]
    analysis_data: str
    calibration: str
    held_out_samples: int = 0


@dataclass
class Extracted:
    """What a quantized session gives the map: records, integers, QDQ model and PPQ's state."""

    quantinfo: dict[str, Any]
    quantparams: dict[str, np.ndarray | None]
    qdq: onnx.ModelProto
    state: dict[str, Any]
    float_operators: list[dict[str, str]]
    rounding: list[dict[str, Any]] = field(default_factory=list)
    #: Tensors given per-channel scales (name -> spread of their channel ranges, see ``engine.channelwise``).
    channel_scaled: dict[str, float] = field(default_factory=dict)


def load(options: QuantizeOptions, onnx_path: str | os.PathLike,
         input_shapes: Mapping[str, Sequence[int]]) -> tuple[Prepared, QuantizeOptions]:
    """Load and prepare the model; the options with ``layer_bits`` checked against it, ``first_last_bits``, the
    recipe's first-layer weights and output activations added."""
    model = load_model(onnx_path)
    shapes = check_input_shapes(input_shapes, model)
    proto = prepare_model(model, shapes)
    options = options.with_layer_bits([node.name for node in proto.graph.node], first_and_last_macs(proto),
                                      output_operators(proto))
    if options.config.calibration.analysis_steps is None:
        from maptools.quantization.calibration import default_analysis_steps

        options = options.replace(analysis_steps=default_analysis_steps(shapes))
    return Prepared(model, shapes, proto), options


def calibration_data(options: QuantizeOptions, prepared: Prepared, calibset: Iterable[Any] | None,
                     evalset: Iterable[Any] | None) -> CalibrationData:
    """The calibration batches and the held-out ones (see ``quantize``'s ``calibset`` and ``evalset``).

    Raises:
        CalibrationError: fewer calibration batches than PPQ needs.
        InvalidArgumentError: the batches of a folder to decode take more than the available memory.
    """
    from maptools.quantization.calibfolders import FolderBatches
    from maptools.quantization.calibration import MIN_CALIB_BATCHES, batch_samples, prepare_calibset, random_calibset

    model, shapes = prepared.model, prepared.shapes
    calib_steps, analysis_steps = options.config.calibration.calib_steps, options.config.calibration.analysis_steps
    if calibset is None:
        if calib_steps < MIN_CALIB_BATCHES:
            raise CalibrationError(
                f"calib_steps: {calib_steps} given, but PPQ needs at least {MIN_CALIB_BATCHES} calibration batches"
            )
        seed = options.config.calibration.seed
        batches = random_calibset(shapes, calib_steps, seed)
        held_out, analysis_data = random_calibset(shapes, analysis_steps, seed + 1), "random (held-out)"
        calibration = "random"
    else:
        if isinstance(calibset, FolderBatches):  # the checked batches are kept: decoded files must fit in memory
            check_batch_memory(shapes, {i.name: i.dtype.itemsize for i in model.inputs}, "calib_steps",
                               batches=min(len(calibset), calib_steps + analysis_steps))
        batches = prepare_calibset(calibset, model, shapes, calib_steps + analysis_steps)
        batches, held_out = batches[:calib_steps], batches[calib_steps:]
        if len(batches) < calib_steps:
            logger.warning(
                "calibset: holds %d batches, fewer than calib_steps=%d; calibrating on those %d batches",
                len(batches), calib_steps, len(batches))
        if len(batches) < MIN_CALIB_BATCHES:
            raise CalibrationError(
                f"calibset: holds {len(batches)} batches, but PPQ needs at least {MIN_CALIB_BATCHES} calibration "
                "batches; give more batches")
        analysis_data = "held-out" if held_out else "in-sample"
        held_out = held_out or batches[:analysis_steps]
        calibration = "user"
    if evalset is not None:
        held_out = prepare_calibset(evalset, model, shapes, analysis_steps, argument="evalset", minimum=1)
        analysis_data = "evalset"
    return CalibrationData(batches, held_out, analysis_data, calibration, batch_samples(held_out))


@contextlib.contextmanager
def seeded_globals(seed: int) -> Iterator[None]:
    """Seed Python's, numpy's and torch's global generators for PPQ (which draws from them), and give the
    caller's states back afterwards: a ``quantize`` call leaves the process's random streams as it found them.

    ``torch.manual_seed`` also reseeds every CUDA device's generator, so those are given back too
    (:func:`seeded_cuda_devices`)."""
    import torch

    saved = random.getstate(), np.random.get_state()
    with torch.random.fork_rng(devices=seeded_cuda_devices(), device_type="cuda"):
        random.seed(seed)
        np.random.seed(seed % (2**32))
        torch.manual_seed(seed)
        try:
            yield
        finally:
            random.setstate(saved[0])
            np.random.set_state(saved[1])


def seeded_cuda_devices() -> list[int]:
    """The CUDA devices whose generators ``torch.manual_seed`` reseeds: every visible one, none without CUDA."""
    import torch

    return list(range(torch.cuda.device_count())) if torch.cuda.is_available() else []


def configure_engine(options: QuantizeOptions, data: CalibrationData) -> tuple[QuantizeOptions, Any]:
    """The PPQ setting that will run (the expert's or the recipe's) and the options it applies.

    Raises:
        InvalidTypeError: ``setting`` is not a PPQ ``QuantizationSetting``.
        InvalidArgumentError: see :meth:`QuantizeOptions.applied`.
    """
    from maptools.quantization.engine.recipes import build_setting
    from maptools.quantization.engine.threads import DEFAULT_THREADS

    if options.setting is not None:
        from maptools.quantization.engine.facade import QuantizationSetting

        check_setting_type(options.setting, QuantizationSetting)
        setting = options.setting
    else:
        config = options.config
        setting = build_setting(options.recipe, config.run.device, len(data.batches),
                                observer=config.calibration.observer, activation_bits=config.bits.activation_bits)
    options = options.applied(setting, DEFAULT_THREADS)
    return options, setting


def run_engine(options: QuantizeOptions, setting: Any, prepared: Prepared, data: CalibrationData) -> PPQSession:
    """Load the prepared model into PPQ and quantize it on the calibration batches (global generators seeded
    with ``options.seed`` meanwhile, see :func:`seeded_globals`)."""
    from maptools.quantization.engine import LowBitSpec, PPQSession

    config = options.config
    spec = LowBitSpec.from_config(config)
    rounding = None
    if config.recipe.rounding == "learned":
        from maptools.quantization.engine import learned_rounding

        rounding = dataclasses.replace(learned_rounding.DEFAULTS, time_budget=config.recipe.time_budget,
                                       device=config.run.device, seed=config.calibration.seed)
    with seeded_globals(config.calibration.seed):
        session = PPQSession.from_onnx(prepared.proto, spec, config.run.device, setting, threads=config.run.threads)
        # the crossbar model takes one input scale per MAC: no per-channel activation scales with cim=
        session.quantize(data.batches, rounding, channel_scales=config.bits.channel_activations and config.cim is None)
    return session


def extract(session: PPQSession, prepared: Prepared) -> Extracted:
    """The records, the integers, the QDQ model and PPQ's state of a quantized session.

    Raises:
        ModelError: PPQ quantized no MAC operator.
    """
    quantinfo = session.quantinfo()
    if not any(record.weight_bits is not None for record in quantinfo.values()):
        # PPQ's dispatcher keeps some graphs entirely in float (one Conv that is both the first and the last
        # operator): artifacts without a single quantized MAC would map nothing
        raise ModelError(
            f"onnx_path: PPQ quantized no Conv/Gemm/MatMul of {prepared.model.path} ({len(quantinfo)} operators "
            "quantized); a graph of a single operator is kept in float, add the layers around it"
        )
    quantparams = session.quantparams()
    qdq = session.export_qdq(io_like=prepared.model.proto)
    return Extracted(quantinfo, quantparams, qdq, session.to_state(quantparams), session.float_operators(),
                     [record.to_dict() for record in session.rounding_results], dict(session.channel_scaled))


#: The analysis data a map's fit to its calibration data is measured against (user data other than the calibration
#: batches; random held-out batches say nothing of real inputs).
FITTED_AGAINST = ("held-out", "evalset")


def _warnings(errors: ErrorAnalysis, data: CalibrationData, advice: Advice, sequences: list[str]) -> list[str]:
    return output_warnings(errors.output_snr_db, errors.part_snr_db, errors.fp32_span, errors.quant_span,
                           errors.isolated_snr_db, data.analysis_data, advice, sequences)


def analyse(options: QuantizeOptions, session: PPQSession, data: CalibrationData,
            prepared: Prepared) -> tuple[ErrorAnalysis, list[str]]:
    """The graph-wise error on the held-out batches and the warnings; layer-wise too when an output is wrecked."""
    advice = Advice(weight_bits=options.config.bits.weight_bits, activation_bits=options.config.bits.activation_bits,
                    layer_bits=dict(options.config.bits.layer_bits), first_and_last=first_and_last_macs(prepared.proto),
                    recipe=options.recipe if options.setting is None else None,
                    random_calibration=data.calibration == "random",
                    convolutions=cnn_transformer_convolutions(prepared.proto))
    calibration = options.config.calibration
    errors = session.error_analysis(data.held_out, layerwise=calibration.layerwise_analysis,
                                    layerwise_batches=calibration.layerwise_batches)
    sequences = sequence_outputs(prepared.proto)
    warnings = _warnings(errors, data, advice, sequences)
    if warnings and not errors.isolated_snr_db:  # name the operators to blame
        layerwise = session.layerwise(data.held_out[:calibration.layerwise_batches])
        errors.isolated_snr_db, errors.isolated_cosine = layerwise
        warnings = _warnings(errors, data, advice, sequences)
    if data.analysis_data in FITTED_AGAINST:  # as many calibration batches as held-out ones
        from maptools.quantization.calibration import batch_samples

        fitted = data.batches[:len(data.held_out)]
        errors.calibration_snr_db = session.output_snr(fitted)
        warnings += fit_warnings(errors.calibration_snr_db, errors.output_snr_db, data.analysis_data,
                                 min(data.held_out_samples, batch_samples(fitted)))
    return errors, warnings


def cim_content(options: QuantizeOptions, data: CalibrationData, extracted: Extracted) -> CimContent | None:
    """With ``options.config.cim``: the map's crossbar content, computed from the in-memory artifacts; else None.

    The integer reference executor is built from ``extracted`` (nothing is written yet) and, for a spec with
    calibrated ADC ranges, calibrates them on the first
    :data:`~maptools.quantization.cimmap.content.CIM_CALIB_BATCHES` calibration batches (those PPQ calibrated on).
    ``extracted`` is updated in place: the records gain their ``cim`` field and ``quantparams`` the weight slices
    and requantization multipliers.
    """
    if options.config.cim is None:
        return None
    from maptools.quantization.cimmap.content import map_cim_content

    content = map_cim_content(extracted.qdq, extracted.quantinfo, extracted.quantparams, options.config.cim,
                              data.batches)
    extracted.quantinfo, extracted.quantparams = content.quantinfo, content.quantparams
    return content


def _version(package: str) -> str:
    try:
        return importlib.metadata.version(package)
    except importlib.metadata.PackageNotFoundError:
        return "unknown"


def _parts_report(errors: ErrorAnalysis) -> dict[str, dict[str, dict[str, float | str]]]:
    """report.json's ``output_parts``: output -> part -> SNR and cosine."""
    return {output: {part: {"snr_db": snr if math.isfinite(snr) else str(snr),
                            "cosine": errors.part_cosine[output][part]}
                     for part, snr in parts.items()}
            for output, parts in errors.part_snr_db.items()}


def artifact_files(options: QuantizeOptions, prepared: Prepared, data: CalibrationData, extracted: Extracted,
                   errors: ErrorAnalysis, warnings: list[str], timings: Mapping[str, float],
                   cim: CimContent | None = None) -> tuple[dict[str, bytes], dict[str, Any]]:
    """The files of the map (file name -> bytes, the report included) and its manifest.

    With ``cim`` (:func:`cim_content`), ``cim.json`` is among the files and the settings record the crossbar
    (``cim``, the spec's fields) and the batches its ADC ranges were calibrated on (``cim_calib_batches``);
    without it, nothing of either appears.
    """
    import torch

    settings = options.settings(prepared.shapes, data.calibration, len(data.batches))
    if cim is not None:
        settings["cim_calib_batches"] = cim.calib_batches
    manifest = {
        "mapname": options.config.output.mapname,
        "versions": {"maptools": maptools.__version__, "ppq": _version("ppq"), "torch": torch.__version__,
                     "onnx": onnx.__version__, "numpy": np.__version__, "protobuf": _version("protobuf"),
                     "onnxruntime": _version("onnxruntime")},
        "model": {"path": str(prepared.model.path), "sha256": prepared.model.sha256},
        "settings": settings,
    }
    if extracted.channel_scaled:  # records with per-channel activation scales: a minor bump of the format
        manifest["format_version"] = artifacts.CHANNEL_FORMAT_VERSION
    files = {
        artifacts.QUANTINFO: artifacts.dump_pickle(extracted.quantinfo),
        artifacts.QUANTPARAMS: artifacts.dump_pickle(extracted.quantparams),
        artifacts.QUANTMODEL: extracted.qdq.SerializeToString(),
        artifacts.PPQSTATE: artifacts.dump_json(extracted.state),
    }
    analysis = {"data": data.analysis_data, "batches": len(data.held_out), "samples": data.held_out_samples}
    if errors.calibration_snr_db:
        analysis["calibration_output_snr_db"] = {name: snr if math.isfinite(snr) else str(snr)
                                                 for name, snr in errors.calibration_snr_db.items()}
    extra: dict[str, Any] = {"analysis": analysis,
                             "output_parts": _parts_report(errors),
                             "float_operators": float_summary(extracted.float_operators), "warnings": warnings}
    if extracted.rounding:
        extra["learned_rounding"] = extracted.rounding
    if extracted.channel_scaled:  # tensor -> the spread of its channel ranges (largest over smallest)
        extra["channel_scales"] = {name: round(ratio, 1) if math.isfinite(ratio) else None
                                   for name, ratio in extracted.channel_scaled.items()}
    if cim is not None:
        files[artifacts.CIM_FILE] = cim.calibration.to_json()
        if cim.cost is not None:
            extra["cim_cost"] = cim.cost.to_dict()
    files.update(render_report(options.config.output.mapname, settings, timings, errors.output_snr_db,
                               errors.output_cosine, errors.layer_snr_db, errors.layer_cosine,
                               {name: cfg.op_type for name, cfg in extracted.quantinfo.items()},
                               errors.isolated_snr_db, errors.isolated_cosine,
                               extra=extra))
    return files, manifest
