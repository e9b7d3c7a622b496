"""The CIM-mode plumbing of :class:`~maptools.quantization.reference.ReferenceExecutor`.

:class:`CimModeMixin` gives the executor its crossbar nodes, their operands and weights, the
:attr:`~CimModeMixin.fingerprint` of the crossbars, and the switch between exact MACs and the crossbar model
(:meth:`~CimModeMixin.with_cim`; see :mod:`~maptools.quantization.reference.crossbar`).
"""

from __future__ import annotations

import copy
import logging
from collections.abc import Callable, Mapping
from typing import TYPE_CHECKING

import numpy as np
import onnx

from maptools.errors import InvalidArgumentError, InvalidTypeError
from maptools.quantization.cim.adc import AdcCalibration
from maptools.quantization.cim.analog import AnalogMac, SeedLike, check_device, child_seed
from maptools.quantization.cim.device import DeviceModel
from maptools.quantization.cim.spec import CIMSpec
from maptools.quantization.reference.crossbar import (
    CimMode,
    MacAccumulator,
    MacHook,
    MacOperands,
    crossbar_fingerprint,
    mac_operands,
)
from maptools.quantization.reference.mac import MacWeights
from maptools.quantization.reference.registry import attrs, describe

if TYPE_CHECKING:
    from maptools.quantization.cim.mapcal import MapCalibration
    from maptools.quantization.reference.executor import ReferenceExecutor

__all__ = ["CimModeMixin"]

logger = logging.getLogger("maptools.quantization.reference.core")


def _mac_depth(node: onnx.NodeProto, weight: np.ndarray) -> int:
    """The dot-product length ``K`` of a crossbar MAC (see :func:`~maptools.quantization.cim.mapping.mac_matrix`)."""
    if node.op_type == "Conv":
        return int(np.prod(weight.shape[1:]))
    if node.op_type == "ConvTranspose":
        group = int(attrs(node).get("group", 1))
        return int(weight.shape[0] // group * np.prod(weight.shape[2:]))
    if node.op_type == "Gemm" and int(attrs(node).get("transB", 0)):
        return int(weight.shape[1])
    return int(weight.shape[0])


class CimModeMixin:
    """The crossbar nodes and the CIM mode of a :class:`~maptools.quantization.reference.ReferenceExecutor`.

    Uses the executor's prepared nodes (``_nodes``, ``_states``, ``_mac_states``) and :meth:`record`.
    """

    @property
    def crossbar_nodes(self) -> list[onnx.NodeProto]:
        """The MAC nodes with a constant, quantized weight: those a CIM chip runs on crossbars."""
        return [node for node, state in zip(self._nodes, self._states, strict=True) if isinstance(state, MacWeights)]

    def mac_weights(self, node: onnx.NodeProto) -> MacWeights:
        """The integer weight and bias of a crossbar node (one of :attr:`crossbar_nodes`).

        Raises:
            InvalidArgumentError: not a crossbar node of this executor.
        """
        state = self._mac_states.get(node.name)
        if state is None:
            raise InvalidArgumentError(f"{describe(node)} is not a MAC with a constant weight of this map")
        return state

    def crossbar_operands(self) -> list[tuple[onnx.NodeProto, MacOperands]]:
        """Every crossbar node with its operands (:func:`~.crossbar.mac_operands`), in graph order."""
        return [(node, mac_operands(node, self.record(node))) for node in self.crossbar_nodes]

    @property
    def fingerprint(self) -> str:
        """The SHA-256 of every crossbar MAC's operands and weights (:func:`~.crossbar.crossbar_fingerprint`).

        An ADC calibration records the fingerprint of the executor it was made on, and is refused by an
        executor of another one.
        """
        return crossbar_fingerprint((ops, self.mac_weights(node).weight) for node, ops in self.crossbar_operands())

    def _configure(self, cim: CIMSpec | None, adc: MapCalibration | Mapping[str, AdcCalibration] | None,
                   hook: MacHook | None, device: DeviceModel | None = None, seed: SeedLike = 0) -> None:
        if cim is True:
            raise InvalidTypeError("cim=True reads the map's CIM calibration: use ReferenceExecutor.load(mapname, "
                                   "cim=True) or simulate(mapname, inputs, cim=True); here pass a CIMSpec or None")
        if cim is not None and not isinstance(cim, CIMSpec):
            raise InvalidTypeError(f"cim: got {type(cim).__name__}, expected None, a CIMSpec or (when loading a "
                                   "map) True")
        calibrations: Mapping[str, AdcCalibration] = getattr(adc, "adc", adc) or {}
        if not isinstance(calibrations, Mapping):
            raise InvalidTypeError(f"adc: got {type(adc).__name__}, expected a MapCalibration, a dict node name -> "
                                   "AdcCalibration, or None")
        chip = check_device(device, seed, cim)
        self.cim = None if cim is None else CimMode(cim, dict(calibrations))
        self.mac_hook = hook
        self.device = None if chip is None else device
        made_on = getattr(adc, "fingerprint", "")
        if self.cim is not None and self.cim.calibrated and made_on and made_on != self.fingerprint:
            raise InvalidArgumentError("adc: the ADC calibration was made on another map (its crossbar weights or "
                                       "operands differ from this one's); calibrate this map")
        self._accumulators = {}
        if self.cim is None and hook is None:
            return  # exact MACs through mac.accumulate, as always
        for index, node in enumerate(self.crossbar_nodes):
            record = self.record(node)
            operands = mac_operands(node, record)
            if self.cim is not None:
                self.cim.calibration(operands, _mac_depth(node, self.mac_weights(node).weight))
            analog = None if chip is None else AnalogMac(chip, self.cim.spec, child_seed(seed, index))
            self._accumulators[node.name] = MacAccumulator(operands, self.cim, hook, analog)
        if self.cim is not None:
            logger.debug("CIM mode %s on %d crossbar MACs", self.cim.spec, len(self._accumulators))

    def with_cim(self, cim: CIMSpec | None, adc: MapCalibration | Mapping[str, AdcCalibration] | None = None, *,
                 mac_hook: MacHook | None = None, device: DeviceModel | None = None,
                 seed: SeedLike = 0) -> ReferenceExecutor:
        """A copy of this executor in another mode, sharing the loaded map (nothing is re-read or re-checked).

        Args:
            cim: None for exact MACs, or a CIMSpec (see the class arguments).
            adc: The ADC calibration of a calibrated spec (see the class arguments).
            mac_hook: Called with the operands, integer weights and centred columns of every crossbar MAC
                before it is accumulated (see :data:`~maptools.quantization.reference.crossbar.MacHook`); it
                must not modify them. None for no hook.
            device: The analog cells' non-idealities (needs ``cim``); None or an ideal model for exact cells.
                Each call makes a new chip: its cells are programmed on their first run and kept for the
                following ones (see :mod:`~maptools.quantization.cim.analog`).
            seed: The chip's seed (an int or a SeedSequence); crossbar MAC ``i`` (graph order) draws from
                ``child_seed(seed, i)``.

        Raises:
            InvalidArgumentError: as the class, or a device without ``cim`` or whose per-level parameters do
                not fit the spec's cells.
            InvalidTypeError: as the class, or a ``device`` or ``seed`` of the wrong type.
        """
        twin = copy.copy(self)
        twin._configure(cim, adc, mac_hook, device, seed)
        return twin

    def mac_accumulator(self, node: onnx.NodeProto) -> Callable[[np.ndarray, np.ndarray], np.ndarray] | None:
        """The accumulation step of a MAC node: None for the exact :func:`~.mac.accumulate`, else the crossbar's."""
        return self._accumulators.get(node.name)

    @property
    def requant_mode(self) -> str:
        """How MAC accumulators are requantized: ``'float'`` (exact mode), else the CIM spec's ``requant``."""
        return "float" if self.cim is None else self.cim.spec.requant
