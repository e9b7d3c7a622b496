"""One MAC's crossbars on one simulated chip: :class:`AnalogMac`, cells programmed once and read with noise.

:func:`~maptools.quantization.cim.arithmetic.cim_accumulate` takes an :class:`AnalogMac` (``analog=``) to run
its partial sums through the analog cells of a :class:`~maptools.quantization.cim.device.DeviceModel`
instead of the exact digits. On the first call it programs every cell of the MAC (programming error,
drift to the read time, stuck-at faults, IR drop: drawn once, the chip's own); every later call reads the
same cells with fresh read noise. The equations are in :doc:`/cim` ("Device non-idealities").

Randomness comes from numpy Generators seeded from one :class:`numpy.random.SeedSequence` (never the
global RNG), one independent stream per effect, so the same seed gives the same chip and the same reads
in any process, and switching one effect on does not change the draws of another.
"""

from __future__ import annotations

import hashlib
import logging
from dataclasses import dataclass
from typing import Protocol

import numpy as np

from maptools.errors import InvalidArgumentError, InvalidTypeError
from maptools.quantization.cim.device import DeviceModel
from maptools.quantization.cim.slicing import WeightFormat
from maptools.quantization.cim.spec import CIMSpec
from maptools.quantization.cim.tiles import crossbar_column
from maptools.quantization.intmath import round_half_even

__all__ = ["AnalogMac", "SeedLike", "check_device", "child_seed", "seed_sequence"]

logger = logging.getLogger(__name__)


class _Prepared(Protocol):
    """What the cells need of a MAC's checked operands (the arithmetic's own prepared operands have these)."""

    w: np.ndarray  # (..., M, K) int64 weights
    fmt: WeightFormat
    tiles: list[np.ndarray]  # per row tile: (..., signs*S*M, rows_t) cell digits
    dtype: type

#: A seed: a non-negative integer or a :class:`numpy.random.SeedSequence`.
SeedLike = int | np.random.SeedSequence

# one independent stream per effect (the last entry of the spawn key)
_STREAMS = {"program": 0, "drift": 1, "stuck": 2, "read": 3}


def seed_sequence(seed: SeedLike, name: str = "seed") -> np.random.SeedSequence:
    """``seed`` as a SeedSequence (an int ``s`` is ``SeedSequence(s)``).

    Raises:
        InvalidTypeError: not an int or a SeedSequence.
        InvalidArgumentError: a negative int.
    """
    if isinstance(seed, np.random.SeedSequence):
        return seed
    if isinstance(seed, bool) or not isinstance(seed, int | np.integer):
        raise InvalidTypeError(f"{name}: got {seed!r} ({type(seed).__name__}), expected a non-negative integer or a "
                               "numpy.random.SeedSequence")
    if seed < 0:
        raise InvalidArgumentError(f"{name}: got {seed}, expected a non-negative integer")
    return np.random.SeedSequence(int(seed))


def child_seed(seed: SeedLike, *keys: int) -> np.random.SeedSequence:
    """The child of ``seed`` at ``keys`` (its spawn key extended), independent of what was spawned before."""
    parent = seed_sequence(seed)
    return np.random.SeedSequence(parent.entropy, spawn_key=(*parent.spawn_key, *keys),
                                  pool_size=parent.pool_size)


def check_device(device: DeviceModel | None, seed: SeedLike, cim: CIMSpec | bool | None) -> DeviceModel | None:
    """The device model a chip simulation applies (None for none, or an ideal one), checked with its seed.

    ``cim=True`` (a map's own spec, not read yet) checks everything but the fit to the cells.

    Raises:
        InvalidTypeError: ``device`` is not a DeviceModel, or a bad ``seed``.
        InvalidArgumentError: a device without a crossbar spec, or per-level parameters that do not fit its cells.
    """
    seed_sequence(seed)
    if device is None:
        return None
    if not isinstance(device, DeviceModel):
        raise InvalidTypeError(f"device: got {type(device).__name__}, expected None or a DeviceModel")
    if cim is True:
        return device
    if not isinstance(cim, CIMSpec):
        raise InvalidArgumentError(f"device: given with cim={cim!r}, expected a crossbar to act on: pass "
                                   "cim=CIMSpec(...) (or cim=True for the map's own)")
    device.check(cim.cell_bits)
    return None if device.ideal else device


@dataclass
class _Tile:
    """The programmed cells of one row tile: effective conductances in digit units and read variances."""

    g: np.ndarray        # (..., signs*S*M, rows_t): G_e / dG - G_min / dG (the digit it reads as)
    read_var: np.ndarray | None  # same shape: the read-noise variance per cell (digit units), None without


class AnalogMac:
    """The crossbars of one MAC on one chip (see the module docstring).

    Args:
        device: The device model.
        spec: The crossbar (its ``cell_bits`` must fit the device's per-level parameters).
        seed: The seed of this MAC on this chip.

    Raises:
        InvalidTypeError: ``device`` is not a DeviceModel, ``spec`` not a CIMSpec, or a bad seed type.
        InvalidArgumentError: per-level parameters of another number of levels than the spec's cells.
    """

    def __init__(self, device: DeviceModel, spec: CIMSpec, seed: SeedLike) -> None:
        if not isinstance(device, DeviceModel):
            raise InvalidTypeError(f"device: got {type(device).__name__}, expected a DeviceModel")
        if not isinstance(spec, CIMSpec):
            raise InvalidTypeError(f"spec: got {type(spec).__name__}, expected a CIMSpec")
        device.check(spec.cell_bits)
        self.device = device
        self.spec = spec
        self.seed = seed_sequence(seed)
        self._read = np.random.default_rng(child_seed(self.seed, _STREAMS["read"]))
        self._tiles: list[_Tile] | None = None
        self._weights_id = ""
        #: The factor the periphery multiplies the MAC's output by: ``1 / alpha`` with global drift
        #: compensation, else 1 (set when the cells are programmed).
        self.compensation = 1.0

    @property
    def programmed(self) -> bool:
        """Whether the cells have been programmed (on the first :meth:`partial_sums`)."""
        return self._tiles is not None

    def program(self, prep: _Prepared) -> None:
        """Program the MAC's cells from its digits (once; later calls check that the weights are the same).

        Raises:
            InvalidArgumentError: the MAC was programmed with other weights.
        """
        digest = hashlib.sha256(np.ascontiguousarray(prep.w).tobytes() + repr(prep.w.shape).encode()).hexdigest()
        if self._tiles is not None:
            if digest != self._weights_id:
                raise InvalidArgumentError("analog: this AnalogMac was programmed with other weights; use one "
                                           "AnalogMac per MAC")
            return
        dev = self.device
        streams = {name: np.random.default_rng(child_seed(self.seed, key)) for name, key in _STREAMS.items()
                   if name != "read"}
        fmt = prep.fmt
        m = prep.w.shape[-2]
        sign, slc, chan = np.unravel_index(np.arange(fmt.signs * fmt.slices * m), (fmt.signs, fmt.slices, m))
        columns = crossbar_column(fmt, max(1, self.spec.cols // fmt.columns_per_weight), chan, slc, sign)
        tiles, total_t, total_0 = [], 0.0, 0.0
        for digits in prep.tiles:
            g_t, g_0, read_var = self._program_tile(digits, columns, streams)
            # the partial sums' dtype (float32 below 2^24): a noiseless cell's g rounds to its digit exactly
            tiles.append(_Tile(g_t.astype(prep.dtype), None if read_var is None else read_var.astype(prep.dtype)))
            total_t += float(g_t.sum(dtype=np.float64))
            total_0 += float(g_0.sum(dtype=np.float64))
        if dev.drift_compensation and total_t > 0 and total_0 > 0:
            self.compensation = total_0 / total_t
        self._tiles = tiles
        self._weights_id = digest
        logger.debug("AnalogMac: programmed %d row tiles, drift compensation x %.6g", len(tiles), self.compensation)

    def _program_tile(self, digits: np.ndarray, columns: np.ndarray,
                      streams: dict[str, np.random.Generator]) -> tuple[np.ndarray, np.ndarray, np.ndarray | None]:
        """Programmed cells of one tile: (g at read time, g at t0, read variance), digit units, offset removed.

        The conductances enter with ``G_min`` removed (the periphery subtracts the reference current
        ``G_min * sum u``), so that a noiseless cell reads as its digit.
        """
        dev, cells = self.device, self.spec.cell_bits
        d = round_half_even(digits).astype(np.intp)
        step = (dev.g_max - dev.g_min) / (2**cells - 1)
        target = dev.target_conductance(cells)[d]
        sigma = dev.per_level("prog_sigma_abs", cells)[d] + dev.per_level("prog_sigma_rel", cells)[d] * target
        g = target
        if np.any(sigma):
            g = np.maximum(target + sigma * streams["program"].standard_normal(d.shape), 0.0)
        g_0 = g
        ratio = dev.drift_factor_time
        nu_mean, nu_std = dev.per_level("drift_nu", cells), dev.per_level("drift_nu_std", cells)
        if ratio > 1 and (np.any(nu_mean) or np.any(nu_std)):
            nu = nu_mean[d] + nu_std[d] * streams["drift"].standard_normal(d.shape)
            g = g * ratio ** (-nu)
        if dev.stuck_off_rate or dev.stuck_on_rate:
            u = streams["stuck"].random(d.shape)
            off, on = u < dev.stuck_off_rate, (u >= dev.stuck_off_rate) & (u < dev.stuck_off_rate + dev.stuck_on_rate)
            g, g_0 = (np.where(off, dev.g_min, np.where(on, dev.g_max, x)) for x in (g, g_0))
        if dev.ir_drop:
            # wire segments from the row's driver (left) and to the column's ADC (bottom of the array)
            rows = digits.shape[-1]
            segments = (columns[:, None] + 1) + (self.spec.rows - np.arange(rows))[None, :]
            g, g_0 = (x / (1.0 + dev.ir_drop * (x / dev.g_max) * segments) for x in (g, g_0))
        read_sigma = dev.per_level("read_sigma_abs", cells)[d] + dev.per_level("read_sigma_rel", cells)[d] * g
        read_var = (read_sigma / step) ** 2 if np.any(read_sigma) else None
        offset = dev.g_min / step
        return g / step - offset, g_0 / step - offset, read_var

    def conductances(self) -> list[np.ndarray]:
        """Each row tile's programmed cells in digit units, ``(..., signs*S*M, rows_t)`` (the partial sums' dtype).

        What a read returns without read noise: the static state of the chip, for a faster backend to multiply.

        Raises:
            InvalidArgumentError: the cells are not programmed yet, or the device has read noise (each read
                differs).
        """
        if self._tiles is None:
            raise InvalidArgumentError("analog: the cells are not programmed yet (program(prep) first)")
        if any(tile.read_var is not None for tile in self._tiles):
            raise InvalidArgumentError("device: has read noise (read_sigma_abs or read_sigma_rel > 0), expected "
                                       "none for static conductances: every read of a noisy cell differs")
        return [tile.g for tile in self._tiles]

    def partial_sums(self, prep: _Prepared, t: int, planes: np.ndarray) -> np.ndarray:
        """Analog partial sums of row tile ``t``, ``(..., signs, S, M, planes, n)`` in digit units.

        Summed in the exact path's dtype (float32 below ``2^24``: its rounding is far below any noise, and a
        noiseless cell is its digit exactly), and returned in it: the ADC casts them to float64 exactly.

        Args:
            prep: The MAC's prepared operands (:func:`~maptools.quantization.cim.arithmetic.cim_accumulate`).
            t: The row tile.
            planes: The DAC planes of a block of positions, ``(..., K, planes, n)``.

        The cells are programmed on the first call; :meth:`program` checks the weights of later calls.
        """
        if self._tiles is None:
            self.program(prep)
        assert self._tiles is not None
        tile = self._tiles[t]
        k0 = t * self.spec.rows
        block = planes[..., k0:k0 + tile.g.shape[-1], :, :]
        n_planes, n = block.shape[-2:]
        flat = block.reshape(*block.shape[:-2], n_planes * n).astype(tile.g.dtype, copy=False)
        psum = np.matmul(tile.g, flat)
        if tile.read_var is not None:
            # the column's read-noise std sqrt(sum_k var_k u_k^2); 1-bit DAC planes are 0 or 1, so u^2 = u
            std = np.matmul(tile.read_var, flat if self.spec.dac_bits == 1 else flat * flat)
            np.sqrt(std, out=std)
            noise = self._read.standard_normal(psum.shape, dtype=psum.dtype)
            noise *= std
            psum += noise
        fmt = prep.fmt
        return psum.reshape(*psum.shape[:-2], fmt.signs, fmt.slices, prep.w.shape[-2], n_planes, n)
