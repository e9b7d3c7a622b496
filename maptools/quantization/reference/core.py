"""The entry point of the integer reference executor: :func:`simulate`, one call that loads and runs a map.

The executor it loads is :class:`~maptools.quantization.reference.executor.ReferenceExecutor`.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from typing import Any, Literal, overload

import numpy as np

from maptools.quantization.cim.adc import AdcCalibration
from maptools.quantization.cim.analog import SeedLike
from maptools.quantization.cim.device import DeviceModel
from maptools.quantization.cim.mapcalibration import MapCalibration
from maptools.quantization.cim.spec import CIMSpec
from maptools.quantization.reference.executor import ReferenceExecutor

__all__ = ["simulate"]


@overload
def simulate(mapname: str, inputs: Mapping[str, Any] | Any, *, mapsave_dir: str | os.PathLike | None = ...,
             return_integers: Literal[False] = ..., cim: CIMSpec | Mapping[str, Any] | bool | None = ...,
             adc: MapCalibration | Mapping[str, AdcCalibration] | None = ..., device: DeviceModel | None = ...,
             seed: SeedLike = ...) -> dict[str, np.ndarray]: ...


@overload
def simulate(mapname: str, inputs: Mapping[str, Any] | Any, *, mapsave_dir: str | os.PathLike | None = ...,
             return_integers: Literal[True], cim: CIMSpec | Mapping[str, Any] | bool | None = ...,
             adc: MapCalibration | Mapping[str, AdcCalibration] | None = ..., device: DeviceModel | None = ...,
             seed: SeedLike = ...) -> tuple[dict[str, np.ndarray], dict[str, np.ndarray]]: ...


def simulate(
    mapname: str,
    inputs: Mapping[str, Any] | Any,
    *,
    mapsave_dir: str | os.PathLike | None = None,
    return_integers: bool = False,
    cim: CIMSpec | Mapping[str, Any] | bool | None = None,
    adc: MapCalibration | Mapping[str, AdcCalibration] | None = None,
    device: DeviceModel | None = None,
    seed: SeedLike = 0,
) -> dict[str, np.ndarray] | tuple[dict[str, np.ndarray], dict[str, np.ndarray]]:
    """Run a quantized map with integer arithmetic, as the chip would.

    Reads only ``mapsave/<mapname>`` (``quant_model.onnx``, ``quantinfo.pkl``, ``quantparams.pkl``); see
    the module documentation for the exact semantics. To run many batches, load once with
    :meth:`ReferenceExecutor.load` and call :meth:`ReferenceExecutor.run`.

    Args:
        mapname: The map name given to ``quantize``.
        inputs: Graph input name -> float array (numpy array or torch tensor), e.g. ``{'input': images}``;
            a bare array is accepted for a single-input model. The batch size may differ from the one used
            for calibration when the model's batch axis is dynamic.
        mapsave_dir: The mapsave directory (default ``$MAPTOOLS_MAPSAVE`` or ``./mapsave``).
        return_integers: Also return every operator's integer output.
        cim: None (default) for exact MACs; a :class:`~maptools.quantization.cim.spec.CIMSpec` to run every
            MAC with a constant weight through the crossbar model and requantize in the spec's ``requant``
            arithmetic (see :mod:`~maptools.quantization.reference.crossbar`), or a mapping of its fields, as
            ``quantize``'s ``cim``; True (here only: ``quantize`` makes the crossbar) for the map's own spec
            and ADC calibration (its ``cim.json``).
        adc: For a spec with ``adc_bits`` set and ``adc_range='calibrated'``: the ADC calibration
            (a :class:`~maptools.quantization.cim.mapcalibration.MapCalibration`, e.g. from
            :func:`~maptools.quantization.cimmap.mapcal.calibrate_map`); None for the map's stored one.
        device: With ``cim``: the analog non-idealities of the chip
            (:class:`~maptools.quantization.cim.device.DeviceModel`): its cells are programmed once, then read
            with noise (see :mod:`~maptools.quantization.cim.analog`). None (or a model with every effect off)
            for exact cells.
        seed: The chip's seed (an int or a :class:`numpy.random.SeedSequence`): the same seed gives the same
            chip and the same outputs, in any process.

    Returns:
        With ``return_integers=False``: ``outputs``, a dict graph output name -> float32 array (the
        dequantized graph output, ``scale * (q - zero_point)``).

        With ``return_integers=True``: a tuple ``(outputs, integers)`` where ``integers`` is a dict node name
        -> integer array: the output of every operator of the model (node names as in ``quantinfo.pkl``;
        the inserted QuantizeLinear/Clip/DequantizeLinear nodes are not included) held at the quantization
        of its ``quantinfo`` record ``outputs[0]``, i.e. in ``[qmin, qmax]`` of that record, in the smallest
        numpy integer dtype that holds the range (``int8`` for signed 8-bit and below, ``uint8`` for
        unsigned...). An operator without a record that passes integers through (an unquantized
        ``Reshape``, say) keeps its input's quantization; operators with a float output are left out.

    Raises:
        MapNotFoundError: no such map.
        ArtifactError: a file is missing, modified or corrupt, or the three files disagree.
        UnsupportedOperatorError: the graph holds an operator the executor cannot run (raised before any
            computation; the message names the node and its operator type).
        InvalidArgumentError: a bare array for a multi-input model, missing or unknown input names, or an
            input of the wrong rank; a ``device`` without ``cim`` or with per-level parameters that do not
            fit the spec's cells.
        InvalidTypeError: an input is neither a numpy array nor a torch tensor; a ``device`` or ``seed`` of
            the wrong type.
    """
    if isinstance(cim, Mapping):
        cim = CIMSpec.from_dict(dict(cim))
    executor = ReferenceExecutor.load(mapname, mapsave_dir, cim=cim, adc=adc, device=device, seed=seed)
    return executor.run(inputs, return_integers=return_integers)
