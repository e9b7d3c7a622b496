"""The analog cells of a crossbar as they are: :class:`DeviceModel`, the non-idealities of a simulated chip.

A :class:`~maptools.quantization.cim.spec.CIMSpec` fixes the arithmetic; a device model says how far the
analog array departs from it: finite on/off ratio, programming error, read noise, conductance drift (with
optional global drift compensation), IR drop on the wires and stuck-at faults. Every effect is off by
default, and a default model leaves the crossbar simulation bit-exact. The equations, the parameters'
sources and a worked Monte-Carlo are in :doc:`/cim` ("Device non-idealities"); the arrays are programmed
and read by :mod:`~maptools.quantization.cim.analog`.

Per-level parameters (``prog_sigma_*``, ``read_sigma_*``, ``drift_nu*``) take one number for every cell
level or a tuple with one entry per level ``D = 0 .. 2^c - 1`` of the spec's cells.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from typing import Any

import numpy as np

from maptools.errors import InvalidArgumentError, InvalidTypeError
from maptools.quantization.cim.spec import known_fields

__all__ = ["PCM_G_MAX", "PCM_T0", "PCM_T_READ", "DeviceModel"]

#: Largest programmable conductance of the PCM model, in microsiemens (IBM aihwkit ``PCMLikeNoiseModel``).
PCM_G_MAX = 25.0
#: Time of the last programming pulse the PCM drift is measured from, in seconds (Nandakumar et al. 2019).
PCM_T0 = 20.0
#: Width of a read pulse of the PCM read-noise model, in seconds (aihwkit, 250 ns).
PCM_T_READ = 250e-9

# fields that are a number or one number per cell level, with their lower bound
_PER_LEVEL = ("prog_sigma_abs", "prog_sigma_rel", "read_sigma_abs", "read_sigma_rel", "drift_nu", "drift_nu_std")
_NONNEGATIVE = ("prog_sigma_abs", "prog_sigma_rel", "read_sigma_abs", "read_sigma_rel", "drift_nu_std")


def _number(name: str, value: Any) -> float:
    if isinstance(value, bool) or not isinstance(value, int | float | np.integer | np.floating):
        raise InvalidTypeError(f"DeviceModel.{name}: got {value!r} ({type(value).__name__}), expected a number")
    if not math.isfinite(float(value)):
        raise InvalidArgumentError(f"DeviceModel.{name}: got {value!r}, expected a finite number")
    return float(value)


@dataclass(frozen=True)
class DeviceModel:
    """The analog non-idealities of a crossbar's cells and wires; every one off by default.

    Conductances are in microsiemens. A cell of level ``D`` (a ``c``-bit digit) is programmed to
    ``G_T(D) = G_min + D * (g_max - G_min) / (2^c - 1)`` with ``G_min = g_max / on_off_ratio``.

    Attributes:
        g_max: The conductance of the highest level, > 0 (25 uS: aihwkit's PCM model).
        on_off_ratio: ``g_max / G_min`` (> 1), or None for an off state of zero conductance.
        prog_sigma_abs: Programming error, absolute part (uS), per level or one for all.
        prog_sigma_rel: Programming error, relative part (fraction of ``G_T``), per level or one for all:
            ``G_p = max(G_T + (abs + rel * G_T) * z, 0)``, drawn once per chip.
        read_sigma_abs: Read noise, absolute part (uS), per level or one for all.
        read_sigma_rel: Read noise, relative part (fraction of the cell's conductance at read time), per
            level or one for all; drawn anew for every column read.
        drift_nu: Mean drift exponent ``nu`` per level (or one): ``G(t) = G_p * (t / t0)^-nu``.
        drift_nu_std: Cell-to-cell standard deviation of ``nu`` per level (or one).
        drift_t0: ``t0``, the time after programming the programmed conductance refers to (s, > 0).
        time: Seconds since programming at which the chip is read (None: at ``t0``, no drift); a time
            before ``t0`` reads as ``t0``.
        drift_compensation: Global drift compensation: the periphery divides each MAC's output by
            ``alpha = sum G(t) / sum G(t0)`` over the MAC's cells.
        ir_drop: ``r_wire / r_on``: the resistance of one wire segment between neighbouring cells over the
            on-state resistance ``1 / g_max``, >= 0 (first-order IR drop, see :doc:`/cim`).
        stuck_off_rate: Fraction of cells stuck at ``G_min`` (stuck-at-0), in [0, 1].
        stuck_on_rate: Fraction of cells stuck at ``g_max`` (stuck-at-1), in [0, 1].
    """

    g_max: float = PCM_G_MAX
    on_off_ratio: float | None = None
    prog_sigma_abs: float | tuple[float, ...] = 0.0
    prog_sigma_rel: float | tuple[float, ...] = 0.0
    read_sigma_abs: float | tuple[float, ...] = 0.0
    read_sigma_rel: float | tuple[float, ...] = 0.0
    drift_nu: float | tuple[float, ...] = 0.0
    drift_nu_std: float | tuple[float, ...] = 0.0
    drift_t0: float = PCM_T0
    time: float | None = None
    drift_compensation: bool = False
    ir_drop: float = 0.0
    stuck_off_rate: float = 0.0
    stuck_on_rate: float = 0.0

    def __post_init__(self) -> None:
        for name in _PER_LEVEL:
            value = getattr(self, name)
            if isinstance(value, list | tuple | np.ndarray):
                values = tuple(_number(name, v) for v in np.asarray(value, dtype=object).reshape(-1))
                if not values:
                    raise InvalidArgumentError(f"DeviceModel.{name}: got an empty sequence, expected a number or "
                                               "one number per cell level")
                bad = [v for v in values if name in _NONNEGATIVE and v < 0]
                object.__setattr__(self, name, values)
            else:
                values = (_number(name, value),)
                bad = [v for v in values if name in _NONNEGATIVE and v < 0]
                object.__setattr__(self, name, values[0])
            if bad:
                raise InvalidArgumentError(f"DeviceModel.{name}: got {value!r}, expected values >= 0")
        if _number("g_max", self.g_max) <= 0:
            raise InvalidArgumentError(f"DeviceModel.g_max: got {self.g_max!r}, expected a conductance > 0 (uS)")
        if self.on_off_ratio is not None and _number("on_off_ratio", self.on_off_ratio) <= 1:
            raise InvalidArgumentError(f"DeviceModel.on_off_ratio: got {self.on_off_ratio!r}, expected a number > 1 "
                                       "or None (an off state of zero conductance)")
        if _number("drift_t0", self.drift_t0) <= 0:
            raise InvalidArgumentError(f"DeviceModel.drift_t0: got {self.drift_t0!r}, expected seconds > 0")
        if self.time is not None and _number("time", self.time) < 0:
            raise InvalidArgumentError(f"DeviceModel.time: got {self.time!r}, expected seconds >= 0 or None")
        if not isinstance(self.drift_compensation, bool):
            raise InvalidTypeError(f"DeviceModel.drift_compensation: got {self.drift_compensation!r}, expected a "
                                   "bool")
        if _number("ir_drop", self.ir_drop) < 0:
            raise InvalidArgumentError(f"DeviceModel.ir_drop: got {self.ir_drop!r}, expected r_wire / r_on >= 0")
        for name in ("stuck_off_rate", "stuck_on_rate"):
            if not 0 <= _number(name, getattr(self, name)) <= 1:
                raise InvalidArgumentError(f"DeviceModel.{name}: got {getattr(self, name)!r}, expected a fraction "
                                           "in [0, 1]")
        if self.stuck_off_rate + self.stuck_on_rate > 1:
            raise InvalidArgumentError(f"DeviceModel.stuck_off_rate + stuck_on_rate: got {self.stuck_off_rate} + "
                                       f"{self.stuck_on_rate}, expected at most 1")

    # -- derived quantities ------------------------------------------------------------------------------
    @property
    def g_min(self) -> float:
        """The off-state conductance ``g_max / on_off_ratio`` (0 without an on/off ratio)."""
        return 0.0 if self.on_off_ratio is None else self.g_max / self.on_off_ratio

    @property
    def drift_factor_time(self) -> float:
        """``max(time, t0) / t0``: the ratio the drift power law is raised to ``-nu`` (1 without a time)."""
        return 1.0 if self.time is None else max(self.time, self.drift_t0) / self.drift_t0

    @property
    def ideal(self) -> bool:
        """Whether no effect is on: the crossbar is then simulated exactly, as without a device model."""
        drifts = self.drift_factor_time > 1 and any(v != 0 for name in ("drift_nu", "drift_nu_std")
                                                    for v in np.atleast_1d(getattr(self, name)))
        noisy = any(v != 0 for name in _NONNEGATIVE if name != "drift_nu_std"
                    for v in np.atleast_1d(getattr(self, name)))
        return (self.on_off_ratio is None and not noisy and not drifts and self.ir_drop == 0
                and self.stuck_off_rate == 0 and self.stuck_on_rate == 0)

    def per_level(self, name: str, cell_bits: int) -> np.ndarray:
        """A per-level parameter as an array of ``2^cell_bits`` entries (one per level ``D``).

        Raises:
            InvalidArgumentError: the parameter is a tuple of another length than the cells' levels.
        """
        if name not in _PER_LEVEL:
            raise InvalidArgumentError(f"name: got {name!r}, expected one of {', '.join(_PER_LEVEL)}")
        value = getattr(self, name)
        levels = 2**cell_bits
        if isinstance(value, tuple):
            if len(value) != levels:
                raise InvalidArgumentError(f"device.{name}: got {len(value)} values, expected one per level of "
                                           f"{cell_bits}-bit cells ({levels}) or a single number")
            return np.asarray(value, dtype=np.float64)
        return np.full(levels, float(value))

    def check(self, cell_bits: int) -> None:
        """Check that the per-level parameters fit cells of ``cell_bits`` bits (see :meth:`per_level`)."""
        for name in _PER_LEVEL:
            self.per_level(name, cell_bits)

    def target_conductance(self, cell_bits: int) -> np.ndarray:
        """``G_T(D)`` of every level ``D = 0 .. 2^c - 1``, in uS."""
        return self.g_min + np.arange(2**cell_bits) * ((self.g_max - self.g_min) / (2**cell_bits - 1))

    # -- conversions ----------------------------------------------------------------------------------------
    def replace(self, **changes: Any) -> DeviceModel:
        """A copy with some fields changed (validated like a new model)."""
        return dataclasses.replace(self, **changes)

    def to_dict(self) -> dict[str, Any]:
        """The fields as a JSON-serializable dict (per-level tuples as lists)."""
        return {k: list(v) if isinstance(v, tuple) else v for k, v in dataclasses.asdict(self).items()}

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> DeviceModel:
        """A model from :meth:`to_dict`'s form; missing fields take their defaults.

        Raises:
            InvalidTypeError: ``data`` is not a dict.
            InvalidArgumentError: An unknown field or an invalid value.
        """
        return cls(**{k: tuple(v) if isinstance(v, list) else v for k, v in known_fields(cls, data).items()})

    @classmethod
    def pcm(cls, cell_bits: int, time: float = PCM_T0, *, drift_compensation: bool = True,
            **changes: Any) -> DeviceModel:
        """IBM's phase-change memory model (Nandakumar et al. 2019, Joshi et al. 2020, as in aihwkit).

        Per level ``g_T = D / (2^c - 1)`` (normalized to ``g_max`` = 25 uS, off state 0):
        programming error ``max(-1.1731 g_T^2 + 1.9650 g_T + 0.2635, 0)`` uS; drift exponent mean
        ``clip(-0.0155 ln g_T + 0.0244, 0.049, 0.1)`` and spread ``clip(-0.0125 ln g_T - 0.0059, 0.008,
        0.045)`` from ``t0`` = 20 s; read noise ``Q_s sqrt(ln((t + t_read) / (2 t_read)))`` of the drifted
        conductance, ``Q_s = min(0.0088 / g_T^0.65, 0.2)``, ``t_read`` = 250 ns.

        Args:
            cell_bits: Bits per cell ``c`` of the crossbar (the levels the parameters are given for).
            time: Seconds since programming (20 s: right after programming).
            drift_compensation: Global drift compensation (on by default, as aihwkit recommends).
            changes: Other fields to set (e.g. ``ir_drop``).
        """
        if isinstance(cell_bits, bool) or not isinstance(cell_bits, int) or not 1 <= cell_bits <= 8:
            raise InvalidArgumentError(f"cell_bits: got {cell_bits!r}, expected an integer in 1..8")
        g = np.arange(2**cell_bits) / (2**cell_bits - 1)
        with np.errstate(divide="ignore"):
            log_g = np.log(g)
            q_s = np.minimum(0.0088 / np.where(g > 0, g, 1.0) ** 0.65, 0.2)
        q_s[g == 0] = 0.2
        prog = np.maximum(-1.1731 * g**2 + 1.9650 * g + 0.2635, 0.0)
        nu = np.clip(-0.0155 * log_g + 0.0244, 0.049, 0.1)
        nu_std = np.clip(-0.0125 * log_g - 0.0059, 0.008, 0.045)
        t = max(float(time), PCM_T0)
        read = q_s * math.sqrt(math.log((t + PCM_T_READ) / (2 * PCM_T_READ)))
        fields: dict[str, Any] = {
            "g_max": PCM_G_MAX, "prog_sigma_abs": tuple(prog.tolist()), "read_sigma_rel": tuple(read.tolist()),
            "drift_nu": tuple(nu.tolist()), "drift_nu_std": tuple(nu_std.tolist()), "drift_t0": PCM_T0,
            "time": float(time), "drift_compensation": drift_compensation,
        }
        fields.update(changes)
        return cls(**fields)
