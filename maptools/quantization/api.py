"""The quantization stage: :func:`quantize` from a float ONNX model to the ``mapsave/<mapname>`` artifacts.

``quantize`` runs the stages of :mod:`maptools.quantization.pipeline`: checks of every argument
(:class:`~maptools.quantization.options.QuantizeOptions`) -> the model loaded and prepared -> calibration data
(:mod:`.calibration`) -> PPQ with the low-bit quantizer (:mod:`.engine`) -> records and export -> error
analysis -> report -> artifacts written atomically (:mod:`.mapdir`).
"""

from __future__ import annotations

import logging
import os
import time
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

from maptools.quantization import artifacts, pipeline
from maptools.quantization.config import QuantizeConfig
from maptools.quantization.options import QuantizeOptions
from maptools.quantization.records import QuantizationResult

__all__ = ["quantize"]

logger = logging.getLogger(__name__)


def quantize(
    input_shapes: Mapping[str, Sequence[int]],
    device: str,
    onnx_path: str | os.PathLike,
    mapname: str | None = None,
    calibset: Iterable[Any] | None = None,
    calib_steps: int | None = None,
    *,
    config: QuantizeConfig | None = None,
    setting: Any = None,
    evalset: Iterable[Any] | None = None,
    **options: Any,
) -> QuantizationResult:
    """Quantize a float ONNX model with PPQ and write ``mapsave/<mapname>``.

    The options (every keyword argument but ``config``, ``setting``, ``calibset`` and ``evalset``) are those of
    :class:`~maptools.quantization.config.QuantizeConfig`, by name; ``config`` gives them all at once, and the
    keyword arguments given beside it replace its values (``device`` always, ``mapname`` and ``calib_steps``
    when not None). The defaults below are the config's.

    Args:
        config: The options as a :class:`~maptools.quantization.QuantizeConfig` (default: every default).
        input_shapes: Input name -> shape, e.g. ``{'input': [1, 3, 224, 224]}``. Every graph input needs
            one; dynamic dims of the ONNX are resolved by these shapes.
        device: ``'cpu'`` or ``'cuda'`` (a GPU must be present for ``'cuda'``); it replaces the config's.
        onnx_path: The float ONNX model.
        mapname: Name of the map; results go to ``<mapsave>/<mapname>/``; None for the config's.
        calibset: None to calibrate on ``calib_steps`` random batches drawn with ``seed``; else an
            iterable of batches, each a dict input name -> ``torch.Tensor`` or numpy array (a bare tensor
            for single-input models), e.g. from :func:`~maptools.quantization.imagefolder_calibset`.
        calib_steps: Number of calibration batches (at least 8, PPQ's minimum); None for the config's.
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
        weight_observer: How weight scales are chosen: ``'ppq'`` (PPQ's min-max), ``'minmax'`` (each channel's
            absolute maximum) or ``'mse'`` (the clipping of least squared error); None for the recipe's
            (:data:`~maptools.quantization.options.RECIPE_WEIGHT_OBSERVERS`). Recorded in the manifest.
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
            ranges, weight scales, the first MAC's 8-bit weights, the outputs' 8-bit activations) while the
            passes are the setting's: ``recipe='default'`` with ``build_setting('default', ...)`` plus equalization
            is the default recipe plus equalization. Below 8-bit weights ``'best'`` keeps the first MAC operator's
            weights at 8 bits; below 8-bit activations ``'default'`` and ``'best'`` keep the operators that write
            the model's outputs (the last MAC operator on each path to an output and those after it) at 8-bit
            activations, unless ``layer_bits`` or ``first_last_bits`` names
            them (both recorded in the manifest's ``layer_bits``).
        analysis_steps: Number of batches the graph-wise error is measured on, held out from calibration
            (see ``evalset``); None: enough for 32 samples, at least 4 batches
            (:func:`~maptools.quantization.calibration.default_analysis_steps`). The summary says how many
            samples were measured, and warns when fewer than 32: the SNR of a few samples can be several dB
            off.
        layerwise_analysis: Also measure the layer-wise error (the graph outputs when one operator alone
            is quantized) and write it to ``report.json``. Off by default: it costs one forward of the
            whole graph per quantized operator (on the first ``layerwise_batches`` analysis batches); it is
            measured anyway when an output gets a warning, to name the operators to blame.
        layerwise_batches: Number of analysis batches the layer-wise error is accumulated over (default 1).
        evalset: Batches (the form of ``calibset``) to measure the graph-wise error on. Without it the error
            is measured on the batches of ``calibset`` after the first ``calib_steps`` (up to
            ``analysis_steps`` of them; give a calibset longer than ``calib_steps``, as an ImageFolder
            usually is), or, with random calibration, on ``analysis_steps`` other random batches; when the
            calibset has no batch beyond ``calib_steps``, on the calibration batches themselves, which
            ``report.json`` and the summary say ("in-sample") since it overstates the accuracy.
        first_last_bits: Keep the first and the last MAC operator (Conv/Gemm/MatMul with a constant weight, in
            graph order) at this many bits, weights and activations, the usual way to protect a network's most
            sensitive layers; a ``layer_bits`` entry for either wins. Recorded in the manifest's ``layer_bits``.
        power_of_two: Make every scale (activations, weights, and so biases) a power of two, rounded up from the
            calibrated one (PPQ's ``POWER_OF_2`` policy), for hardware that requantizes by shifting only: the
            multiplier ``s_in * s_w / s_out`` of every requantization is then a power of two.
        channel_activations: Per-channel activation scales (default True) for a tensor only depthwise Convs read
            whose channel ranges spread over 100x: exact in the chip's integer arithmetic, where the input step
            of channel ``c`` joins the depthwise Conv's per-channel requantization multiplier
            (:mod:`maptools.quantization.engine.channelwise`); recorded in the records' ``TensorQuant.axis``
            and the QDQ model (format 2.2). Off with ``cim``. Recorded in the manifest only when False.
        cim: None (default) for a map as always; a :class:`~maptools.quantization.CIMSpec` (or a mapping of its
            fields, as ``simulate``'s ``cim``) to make the map
            for that compute-in-memory crossbar as well. After PPQ, the integer reference executor is built from
            the artifacts in memory; for ``adc_range='calibrated'`` (``adc_bits`` must then be set) the ADC ranges
            of every crossbar MAC are calibrated on the first 8 calibration batches
            (:data:`~maptools.quantization.cimmap.content.CIM_CALIB_BATCHES`). Written with the map, in the same
            atomic write: ``cim.json`` (the spec and the ADC calibration, listed in the manifest), each
            crossbar MAC record's ``cim`` field (tile layout, per-tile ADC parameters), the weight slices in
            ``quantparams.pkl`` and, for ``requant`` other than ``'float'``, the int32 multipliers and shifts;
            the manifest's settings record the spec (``cim``) and the format version is 2.1. Then
            ``simulate(mapname, inputs, cim=True)`` runs the map on that crossbar. See :doc:`/cim`.
        rounding: How weights are rounded to their integers: ``'nearest'``, or ``'learned'`` (AdaRound: per layer,
            learned on the calibration data to keep the layer's output, see
            :mod:`maptools.quantization.engine.learned_rounding`); None for the recipe's: ``'learned'`` for
            ``'best'`` when a weight bit width is 2 to 6 (at 8-bit activations LSQ then trains activation scales
            and biases only; below 8-bit activations ``best`` runs no LSQ), else ``'nearest'``. Recorded in
            the manifest; ``report.json``'s ``learned_rounding`` gives each layer's error before and after.
        time_budget: Seconds learned rounding may take (None: no limit); each layer's iterations are scaled
            to fit. Recorded in the manifest.
        threads: torch CPU threads while quantizing; None for 1, the fastest for PPQ's calibration on small
            batches (why: :ref:`guide-threads`).

    Returns:
        The paths written, the per-operator configs and the graph-wise error.

    Raises:
        maptools.MaptoolsError: a subclass naming the bad argument, raised before anything is written;
            :class:`~maptools.NotAMapError` when ``<mapsave>/<mapname>`` exists and is not a map maptools
            wrote (checked before the model is loaded; nothing there is touched);
            :class:`~maptools.MapWriteError` when the OS refuses the write (the earlier map is unchanged);
            or :class:`~maptools.EngineError` when PPQ fails (naming the node when known).
    """
    started = time.perf_counter()
    given = {name: value for name, value in (("device", device), ("mapname", mapname), ("calib_steps", calib_steps))
             if value is not None}
    options = QuantizeOptions.check(QuantizeConfig.from_options(config, **given, **options), setting)
    artifacts.check_replaceable(options.target)  # a folder that is not a map: refused before PPQ runs
    prepared, options = pipeline.load(options, onnx_path, input_shapes)
    data = pipeline.calibration_data(options, prepared, calibset, evalset)
    options, ppq_setting = pipeline.configure_engine(options, data)
    logger.info("quantizing %s as %r: W%dA%d, %s, %d %s calibration batches on %s",
                prepared.model.path, options.config.output.mapname, options.config.bits.weight_bits,
                options.config.bits.activation_bits, options.recipe, len(data.batches), data.calibration,
                options.config.run.device)
    timings = {"validation_and_data": time.perf_counter() - started}
    mark = time.perf_counter()
    from maptools.quantization.engine.threads import compute_threads  # torch is imported by now

    with compute_threads(options.config.run.threads):  # every stage that computes, not only PPQ's calibration
        session = pipeline.run_engine(options, ppq_setting, prepared, data)
        timings["ppq_quantization"], mark = time.perf_counter() - mark, time.perf_counter()
        if session.rounding_results:  # part of ppq_quantization
            timings["learned_rounding"] = sum(record.seconds for record in session.rounding_results)
        extracted = pipeline.extract(session, prepared)
        timings["extraction_and_export"], mark = time.perf_counter() - mark, time.perf_counter()
        errors, warnings = pipeline.analyse(options, session, data, prepared)
        timings["error_analysis"], mark = time.perf_counter() - mark, time.perf_counter()
        cim_content = pipeline.cim_content(options, data, extracted)
        if cim_content is not None:
            timings["cim"] = time.perf_counter() - mark
    for name, snr in errors.output_snr_db.items():
        logger.info("graph-wise error of output %r on %s data: SNR %.2f dB, cosine %.5f", name, data.analysis_data,
                    snr, errors.output_cosine[name])
    for warning in warnings:
        logger.warning("%s", warning)
    files, manifest = pipeline.artifact_files(options, prepared, data, extracted, errors, warnings, timings,
                                              cim_content)
    target = options.target
    artifacts.write_map(target, files, manifest)
    result = QuantizationResult(
        mapname=options.config.output.mapname, directory=target, quantinfo_path=target / artifacts.QUANTINFO,
        quantparams_path=target / artifacts.QUANTPARAMS, model_path=target / artifacts.QUANTMODEL,
        manifest_path=target / artifacts.MANIFEST, operators=extracted.quantinfo, output_snr_db=errors.output_snr_db,
        output_cosine=errors.output_cosine, layer_snr_db=errors.layer_snr_db, seconds=time.perf_counter() - started,
        report_path=target / artifacts.REPORT_JSON, plot_path=target / artifacts.REPORT_PNG, warnings=warnings,
        analysis_data=data.analysis_data, part_snr_db=errors.part_snr_db, analysis_samples=data.held_out_samples,
        float_operators=extracted.float_operators,
        cim_path=None if cim_content is None else target / artifacts.CIM_FILE,
    )
    logger.info("wrote %s in %.1f s", target, result.seconds)
    return result

