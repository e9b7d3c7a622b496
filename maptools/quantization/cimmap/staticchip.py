"""A chip whose cells do not change between reads, simulated in torch: :class:`StaticChipBackend`.

Without read noise everything a device model does to a chip is drawn once (programming error, drift to the
read time, stuck-at faults, IR drop: :class:`~maptools.quantization.cim.analog.AnalogMac`, the same draws for
the same seed), so each row tile of a MAC is a fixed matrix of effective conductances. This backend programs
the cells exactly as the numpy path does, then computes each tile's column partial sums as one float32 matrix
product over large blocks of positions (torch's BLAS), and the ADC and the shift-and-add in torch, in the
numpy path's float64 arithmetic. With exact cells (integer conductances) the result is the numpy path's bit for
bit; with noisy cells the partial sums agree to float32 rounding (the products' summation order is the BLAS
library's), so an ADC code can differ where a partial sum lies on a rounding boundary.

torch is imported by this module only: the executor and the rest of :mod:`~maptools.quantization.cimmap` stay
numpy-only (``monte_carlo(..., static=True)`` imports it on demand).
"""

from __future__ import annotations

import dataclasses
import logging
import math
from collections.abc import Callable, Mapping

import numpy as np
import torch

from maptools.errors import InvalidArgumentError
from maptools.quantization.cim.adc import ADC_FRACTION_BITS, AdcCalibration
from maptools.quantization.cim.analog import AnalogMac, SeedLike
from maptools.quantization.cim.arithmetic import (
    PreparedMac,
    ShiftAdd,
    dac_codes,
    offset_corrections,
    prepare_mac,
    shift_add,
)
from maptools.quantization.cim.device import DeviceModel
from maptools.quantization.cim.mapcalibration import MapCalibration
from maptools.quantization.cim.spec import CIMSpec
from maptools.quantization.reference.backends import CrossbarBackend, CrossbarMac
from maptools.quantization.reference.crossbar import CimMode, MacAccumulator, MacOperands, fold_batch

__all__ = ["BLOCK_ELEMENTS", "StaticChipBackend", "StaticMac"]

logger = logging.getLogger(__name__)

#: Partial sums of one row tile and block of positions (float32, and their float64 ADC codes): bounds the memory.
BLOCK_ELEMENTS = 1 << 23


def _read_noise(device: DeviceModel) -> bool:
    return any(v != 0 for name in ("read_sigma_abs", "read_sigma_rel") for v in np.atleast_1d(getattr(device, name)))


class StaticMac(MacAccumulator):
    """The accumulation step of one crossbar MAC on a static chip (or on exact cells), in torch.

    The weights, their cells and the ADC plan are set up on the first call and reused by every later one.

    Args:
        operands: The node's crossbar operands.
        mode: The crossbar and its ADC ranges.
        analog: The node's cells on the chip (programmed on the first call), or None for exact cells.
        compiled: Fuse the ADC and the shift-and-add with ``torch.compile`` (needs a C++ compiler; its first
            call in a process compiles for minutes, or seconds from inductor's cache).
    """

    def __init__(self, operands: MacOperands, mode: CimMode, analog: AnalogMac | None, compiled: bool = False) -> None:
        super().__init__(operands, mode, None, analog)
        self.compiled = compiled
        self._weights: np.ndarray | None = None
        self._prep: PreparedMac | None = None
        self._plan: ShiftAdd | None = None
        self._g: list[torch.Tensor] = []
        self._compensation = 1.0

    def _setup(self, weights: np.ndarray, columns: np.ndarray) -> tuple[PreparedMac, ShiftAdd]:
        if self._weights is not None:
            if weights is not self._weights and not np.array_equal(weights, self._weights):
                raise InvalidArgumentError("static chip: this MAC was set up with other weights; use one StaticMac "
                                           "per MAC")
            assert self._prep is not None and self._plan is not None
            return self._prep, self._plan
        mode = self.mode
        assert mode is not None
        prep = prepare_mac(weights, columns, spec=mode.spec, **self.operands.kwargs())
        plan = shift_add(prep, mode.spec, mode.calibration(self.operands, int(np.shape(weights)[-1])))
        if self.analog is None:
            tiles = prep.tiles
        else:
            self.analog.program(prep)
            tiles = self.analog.conductances()
            self._compensation = self.analog.compensation
        self._g = [torch.from_numpy(np.ascontiguousarray(g)) for g in tiles]
        self._weights, self._prep, self._plan = weights, prep, plan
        return prep, plan

    def __call__(self, weights: np.ndarray, columns: np.ndarray) -> np.ndarray:
        """The int64 accumulator ``(..., M, P)`` of ``weights (..., M, K)`` and ``columns (..., K, P)``."""
        folded, unfold = fold_batch(weights, columns)
        prep, plan = self._setup(weights, folded)
        u = dac_codes(folded, prep.inp)
        acc = self._shift_add(prep, plan, u)
        return unfold(offset_corrections(acc, dataclasses.replace(prep, u=u)))

    def _shift_add(self, prep: PreparedMac, plan: ShiftAdd, u: np.ndarray) -> np.ndarray:
        """Steps 5 to 7 of :mod:`~maptools.quantization.cim.arithmetic` in torch, rounded once (float64 sums)."""
        mode = self.mode
        assert mode is not None
        spec, fmt, inp = mode.spec, prep.fmt, prep.inp
        lead = tuple(np.broadcast_shapes(prep.w.shape[:-2], u.shape[:-2]))
        m, positions, rows = prep.w.shape[-2], u.shape[-1], spec.rows
        nd = len(lead)
        # the DAC planes of every code, (2^a, P): one gather makes a block's planes, (..., K, n, P)
        shifts = torch.arange(inp.planes, dtype=torch.int64) * inp.dac_bits
        table = ((torch.arange(2**inp.bits).reshape(-1, 1) >> shifts) & (2**inp.dac_bits - 1)).to(self._g[0].dtype)
        codes = torch.from_numpy(u)
        coef = torch.from_numpy(plan.coef).reshape(fmt.signs, fmt.slices, 1, 1, inp.planes)
        if plan.gains is None:
            weights_t = [coef] * len(self._g)
        else:
            weights_t = [coef * torch.from_numpy(plan.gains[t]).reshape(1, fmt.slices, 1, 1, inp.planes)
                         for t in range(len(self._g))]
        assert plan.ranges is None or spec.adc_levels is not None
        levels = float(spec.adc_levels or 0)
        adc_steps = [None if plan.ranges is None else
                     torch.from_numpy(plan.ranges[t] / levels).reshape(1, fmt.slices, 1, 1, inp.planes)
                     for t in range(len(self._g))]
        per_position = max(1, math.prod(lead) * fmt.columns_per_weight * m * inp.planes)
        step = max(1, BLOCK_ELEMENTS // per_position)
        acc = torch.zeros((*lead, m, positions), dtype=torch.float64)
        kernel = _kernel(self.compiled)
        for start in range(0, positions, step):
            stop = min(positions, start + step)
            n = stop - start
            planes = table[codes[..., start:stop]]
            for t, g in enumerate(self._g):
                k0 = t * rows
                block = planes[..., k0:k0 + g.shape[-1], :, :]
                psum = torch.matmul(g, block.reshape(*block.shape[:-2], n * inp.planes))
                psum = psum.reshape(*psum.shape[:-2], fmt.signs, fmt.slices, m, n, inp.planes)
                acc[..., start:stop] += kernel(psum, adc_steps[t], weights_t[t], levels, nd)
        if self._compensation != 1.0:
            acc *= self._compensation
        if plan.gains is not None:
            acc *= 2.0**-ADC_FRACTION_BITS  # exact: a power of two
        return torch.floor(acc + 0.5).to(torch.int64).numpy()


def _adc_shift_add(psum: torch.Tensor, adc_step: torch.Tensor | None, weights: torch.Tensor, levels: float,
                   lead: int) -> torch.Tensor:
    """One tile's ADC codes (or the partial sums themselves) times their shift-and-add weights, summed, float64.

    ``psum (..., signs, S, M, n, P)`` float32; the ADC is :func:`~maptools.quantization.cim.adc.adc_codes`'
    ``clip(round_half_even(p / step), 0, L)`` in float64; the sum of integers below ``2^53`` is exact in any order.
    """
    values = psum.to(torch.float64)
    if adc_step is not None:
        values = torch.clamp(torch.round(values / adc_step), 0.0, levels)
    return (values * weights).sum(dim=(lead, lead + 1, lead + 4))


_COMPILED: list = []


def _kernel(compiled: bool) -> Callable[..., torch.Tensor]:
    """:func:`_adc_shift_add`, fused into one loop by ``torch.compile`` when ``compiled`` (made once a process)."""
    if not compiled:
        return _adc_shift_add
    if not _COMPILED:
        _COMPILED.append(torch.compile(_adc_shift_add, dynamic=True))
    return _COMPILED[0]


class StaticChipBackend(CrossbarBackend):
    """Every crossbar MAC of a map on one static chip (no read noise), or on exact cells, computed in torch.

    The same chip as :class:`~maptools.quantization.reference.backends.CrossbarBackend` for the same
    ``device`` and ``seed`` (crossbar MAC ``i`` draws from ``child_seed(seed, i)``), faster; see the module
    docstring for how far their numbers agree.

    Args:
        spec: The crossbar.
        adc: The ADC calibration of a calibrated spec.
        device: The device model (no read noise); None or an ideal model for exact cells.
        seed: The chip's seed.
        compiled: As :class:`StaticMac`.

    Raises:
        InvalidArgumentError: a device with read noise, or as :class:`CrossbarBackend`.
    """

    def __init__(self, spec: CIMSpec, adc: MapCalibration | Mapping[str, AdcCalibration] | None = None, *,
                 device: DeviceModel | None = None, seed: SeedLike = 0, compiled: bool = False) -> None:
        super().__init__(spec, adc, device=device, seed=seed)
        self.compiled = compiled
        if self._chip is not None and _read_noise(self._chip):
            raise InvalidArgumentError(f"device: read_sigma_abs={self._chip.read_sigma_abs!r}, read_sigma_rel="
                                       f"{self._chip.read_sigma_rel!r}, expected 0 for a static chip (read noise "
                                       "changes every read: use the numpy CrossbarBackend)")

    def accumulator(self, mac: CrossbarMac, mode: CimMode, analog: AnalogMac | None) -> MacAccumulator:
        """As :meth:`CrossbarBackend.accumulator`, a :class:`StaticMac`."""
        return StaticMac(mac.operands, mode, analog, self.compiled)
