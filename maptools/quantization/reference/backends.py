"""The MAC backend of the reference executor: how its crossbar MACs accumulate, exactly or on a crossbar.

The executor holds one backend object and asks it, once per mode, for the accumulation step of each MAC with
a constant weight (:meth:`MacBackend.accumulators`); it never lets the backend into its own state.
:class:`MacBackend` is the exact accumulation (optionally observed by a :data:`~.crossbar.MacHook`),
:class:`CrossbarBackend` the crossbar model of :mod:`~maptools.quantization.reference.crossbar` with a
spec, an ADC calibration and optionally a simulated chip's cells.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import onnx

from maptools.errors import InvalidArgumentError, InvalidTypeError
from maptools.quantization.cim.adc import AdcCalibration
from maptools.quantization.cim.analog import AnalogMac, SeedLike, check_device, child_seed
from maptools.quantization.cim.device import DeviceModel
from maptools.quantization.cim.mapcalibration import MapCalibration
from maptools.quantization.cim.spec import CIMSpec
from maptools.quantization.reference.crossbar import CimMode, MacAccumulator, MacHook, MacOperands
from maptools.quantization.reference.registry import attrs

__all__ = ["CrossbarBackend", "CrossbarMac", "MacBackend", "mac_backend"]

logger = logging.getLogger("maptools.quantization.reference.core")


@dataclass(frozen=True)
class CrossbarMac:
    """One MAC with a constant weight, as the executor hands it to a backend.

    Attributes:
        node: The ONNX node.
        operands: Its crossbar operands (:func:`~.crossbar.mac_operands`).
        weight: Its integer weight as stored in the map.
    """

    node: onnx.NodeProto
    operands: MacOperands
    weight: np.ndarray

    @property
    def depth(self) -> int:
        """The dot-product length ``K`` (see :func:`~maptools.quantization.cim.tiles.mac_matrix`)."""
        node, weight = self.node, self.weight
        if node.op_type == "Conv":
            return int(np.prod(weight.shape[1:]))
        if node.op_type == "ConvTranspose":
            group = int(attrs(node).get("group", 1))
            return int(weight.shape[0] // group * np.prod(weight.shape[2:]))
        if node.op_type == "Gemm" and int(attrs(node).get("transB", 0)):
            return int(weight.shape[1])
        return int(weight.shape[0])


class MacBackend:
    """Exact MACs: integer products summed exactly (:func:`~.mac.accumulate`), seen by ``hook`` if one is given.

    Args:
        hook: Called with every crossbar MAC's operands, weights and centred columns before it is accumulated
            (see :data:`~maptools.quantization.reference.crossbar.MacHook`); None for no hook.
    """

    #: The crossbar simulated (None: exact MACs).
    cim: CimMode | None = None
    #: The analog non-idealities of the simulated chip (None: exact cells).
    device: DeviceModel | None = None

    def __init__(self, hook: MacHook | None = None) -> None:
        self.hook = hook

    @property
    def requant_mode(self) -> str:
        """How MAC accumulators are requantized: ``'float'``, the exact mode's."""
        return "float"

    def accumulators(self, macs: Sequence[CrossbarMac], fingerprint: Callable[[], str]) -> dict[str, MacAccumulator]:
        """Node name -> the accumulation step of each MAC that does not use the exact :func:`~.mac.accumulate`.

        Args:
            macs: The executor's MACs with a constant weight, in graph order.
            fingerprint: The executor's crossbar fingerprint, computed when a check needs it.
        """
        if self.hook is None:
            return {}
        return {mac.node.name: MacAccumulator(mac.operands, None, self.hook) for mac in macs}


class CrossbarBackend(MacBackend):
    """Every MAC with a constant weight on the crossbar ``spec``, with calibrated ADC ranges and simulated cells.

    Args:
        spec: The crossbar.
        adc: The ADC calibration of a spec with ``adc_range='calibrated'`` (and ``adc_bits`` set): a
            :class:`~maptools.quantization.cim.mapcalibration.MapCalibration` or a dict node name ->
            :class:`~maptools.quantization.cim.adc.AdcCalibration`; ignored otherwise.
        device: The analog cells' non-idealities; None or an ideal model for exact cells. Crossbar MAC ``i``
            (graph order) of the chip draws from ``child_seed(seed, i)``.
        seed: The chip's seed (an int or a SeedSequence).
        hook: As :class:`MacBackend`.

    Raises:
        InvalidTypeError: ``spec`` is not a CIMSpec, ``adc`` of the wrong type, ``device`` or ``seed`` of the
            wrong type.
        InvalidArgumentError: a device whose per-level parameters do not fit the spec's cells.
    """

    def __init__(self, spec: CIMSpec, adc: MapCalibration | Mapping[str, AdcCalibration] | None = None, *,
                 device: DeviceModel | None = None, seed: SeedLike = 0, hook: MacHook | None = None) -> None:
        super().__init__(hook)
        calibrations = _calibrations(adc)
        chip = check_device(device, seed, spec)
        self.cim = CimMode(spec, dict(calibrations))
        self.device = None if chip is None else device
        self._chip = chip
        self._seed = seed
        self._made_on = getattr(adc, "fingerprint", "")

    @property
    def requant_mode(self) -> str:
        """The spec's ``requant``."""
        assert self.cim is not None
        return self.cim.spec.requant

    def accumulators(self, macs: Sequence[CrossbarMac], fingerprint: Callable[[], str]) -> dict[str, MacAccumulator]:
        """As :meth:`MacBackend.accumulators`, each MAC on the crossbar (every ADC calibration checked first).

        Raises:
            InvalidArgumentError: a calibrated spec without a calibration for every crossbar MAC, or one made
                for another map.
        """
        mode = self.cim
        assert mode is not None
        if mode.calibrated and self._made_on and self._made_on != fingerprint():
            raise InvalidArgumentError("adc: the ADC calibration was made on another map (its crossbar weights or "
                                       "operands differ from this one's); calibrate this map")
        found = {}
        for index, mac in enumerate(macs):
            mode.calibration(mac.operands, mac.depth)
            analog = None if self._chip is None else AnalogMac(self._chip, mode.spec, child_seed(self._seed, index))
            found[mac.node.name] = self.accumulator(mac, mode, analog)
        logger.debug("CIM mode %s on %d crossbar MACs", mode.spec, len(found))
        return found

    def accumulator(self, mac: CrossbarMac, mode: CimMode, analog: AnalogMac | None) -> MacAccumulator:
        """The accumulation step of one crossbar MAC, on ``analog`` cells (None: exact cells)."""
        return MacAccumulator(mac.operands, mode, self.hook, analog)


def _calibrations(adc: Any) -> Mapping[str, AdcCalibration]:
    calibrations = getattr(adc, "adc", adc) or {}
    if not isinstance(calibrations, Mapping):
        raise InvalidTypeError(f"adc: got {type(adc).__name__}, expected a MapCalibration, a dict node name -> "
                               "AdcCalibration, or None")
    return calibrations


def mac_backend(cim: CIMSpec | None, adc: MapCalibration | Mapping[str, AdcCalibration] | None = None, *,
                hook: MacHook | None = None, device: DeviceModel | None = None, seed: SeedLike = 0) -> MacBackend:
    """The backend of the executor's ``cim``, ``adc``, ``device`` and ``seed`` arguments.

    Raises:
        InvalidTypeError: ``cim`` is True (that reads a map's calibration: for loading) or not a CIMSpec;
            ``adc``, ``device`` or ``seed`` of the wrong type.
        InvalidArgumentError: a device without ``cim``, or one that does not fit the spec's cells.
    """
    if cim is True:
        raise InvalidTypeError("cim=True reads the map's CIM calibration: use ReferenceExecutor.load(mapname, "
                               "cim=True) or simulate(mapname, inputs, cim=True); here pass a CIMSpec or None")
    if cim is not None and not isinstance(cim, CIMSpec):
        raise InvalidTypeError(f"cim: got {type(cim).__name__}, expected None, a CIMSpec or (when loading a "
                               "map) True")
    if cim is None:
        _calibrations(adc)
        check_device(device, seed, None)
        return MacBackend(hook)
    return CrossbarBackend(cim, adc, device=device, seed=seed, hook=hook)
