"""A crossbar MAC's place on the chip, as its record's ``cim`` field holds it: typed here, plain data in the pickle.

:class:`CrossbarPlacement` is what
:attr:`OperatorQuantConfig.cim <maptools.quantization.records.OperatorQuantConfig.cim>` holds for a crossbar
MAC of a map quantized with ``cim=`` (format 2.1). ``quantinfo.pkl`` keeps it as the dict of
:meth:`CrossbarPlacement.to_dict`, so the restricted unpickler needs no new class and the bytes are those of a
plain-data field; :meth:`CrossbarPlacement.from_dict` checks that dict (every key, every type) when a record is
unpickled. The fields are documented in :doc:`/cim` (the table of what ``quantize(..., cim=)`` writes).

The spec and the ADC ranges live in ``cim.json`` only; :attr:`CrossbarPlacement.spec` and
:attr:`AdcGains.ranges` are None in a map written by this maptools and hold the copies that 1.2 maps made
(or what :func:`~maptools.quantization.cimmap.content.resolve_record_cim` fills in from ``cim.json``).

This module imports nothing from maptools but the errors.
"""

from __future__ import annotations

import dataclasses
import math
import typing
from collections.abc import Mapping
from dataclasses import dataclass
from functools import cache
from typing import Any

from maptools.errors import ArtifactError

__all__ = ["AdcGains", "CrossbarLayout", "CrossbarPlacement", "Grid", "RequantKeys"]

#: Largest absolute integer a placement may hold (int32, as every integer of a record).
_INT_LIMIT = 1 << 31

#: Integers per (row tile, weight slice, input plane).
Grid = tuple[tuple[tuple[int, ...], ...], ...]
_FloatGrid = tuple[tuple[tuple[float, ...], ...], ...]


@dataclass(frozen=True)
class CrossbarLayout:
    """A MAC's tiling on the crossbars (:func:`~maptools.quantization.cim.tiles.tile_layout`), as numbers."""

    op_type: str
    weight_shape: tuple[int, ...]
    trans_b: bool
    weight_bits: int
    weight_min: int
    encoding: str
    signs: int
    slices: int
    cell_bits: int
    offset: int
    columns_per_weight: int
    groups: int
    out_channels: int
    depth: int
    row_tiles: int
    channels_per_array: int
    col_tiles: int
    arrays: int
    utilization: float


@dataclass(frozen=True)
class AdcGains:
    """A MAC's ADC: ``levels = 2^bits - 1`` and the fixed-point gains ``g = round(r / levels * 2^fraction_bits)``
    per (row tile, weight slice, input plane), derived from the ranges ``r`` of ``cim.json``.

    ``ranges`` is None in a map of format 2.1 (the ranges are in ``cim.json``); 1.2 maps copied them here.
    """

    bits: int
    range: str
    levels: int
    fraction_bits: int
    gains: Grid
    ranges: _FloatGrid | None = None


@dataclass(frozen=True)
class RequantKeys:
    """The ``quantparams.pkl`` keys of a MAC's int32 requantization multipliers and shifts, and their mode."""

    mode: str
    multiplier: str
    shift: str


@dataclass(frozen=True)
class CrossbarPlacement:
    """A crossbar MAC's record entry: its tile layout, ADC gains and the ``quantparams.pkl`` keys it refers to.

    Attributes:
        file: The file holding the spec and the ADC ranges (``cim.json``).
        input_planes: ``P = ceil(input_bits / dac_bits)``.
        layout: The tile layout.
        adc: The ADC gains; None for an ideal ADC.
        weight_slices: The ``quantparams.pkl`` key of the weight's cell digits.
        requant: The requantization keys; None where the MAC is requantized in float.
        spec: None (the spec is in ``cim.json``); the copy of the spec's fields a 1.2 map made.
    """

    file: str
    input_planes: int
    layout: CrossbarLayout
    adc: AdcGains | None
    weight_slices: str
    requant: RequantKeys | None
    spec: dict[str, Any] | None = None

    def to_dict(self) -> dict[str, Any]:
        """The plain data ``quantinfo.pkl`` holds (lists for tuples; ``spec`` and ``ranges`` only when set)."""
        return _plain(self)

    @classmethod
    def from_dict(cls, data: Any, where: str = "cim") -> CrossbarPlacement:
        """The placement of a record's plain data, every key and type checked.

        Raises:
            ArtifactError: naming the key (``where`` and the path to it), what it holds and what was expected.
        """
        return _build(cls, data, where)


#: The key order of each class's dict: as maps have always held them (a 1.2 map's copies in their places).
_KEYS: dict[type, tuple[str, ...]] = {
    CrossbarPlacement: ("spec", "file", "input_planes", "layout", "adc", "weight_slices", "requant"),
    AdcGains: ("bits", "range", "levels", "fraction_bits", "ranges", "gains"),
}
#: Fields left out of the dict when None (the copies 1.2 maps made).
_OPTIONAL_COPIES = frozenset({"spec", "ranges"})


@cache
def _hints(cls: type) -> dict[str, Any]:
    return typing.get_type_hints(cls)


def _keys(cls: type) -> tuple[str, ...]:
    return _KEYS.get(cls, tuple(f.name for f in dataclasses.fields(cls)))


def _plain(value: Any) -> Any:
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return {key: _plain(getattr(value, key)) for key in _keys(type(value))
                if not (key in _OPTIONAL_COPIES and getattr(value, key) is None)}
    if isinstance(value, tuple):
        return [_plain(item) for item in value]
    return value


def _shown(value: Any) -> str:
    return "null" if value is None else f"{type(value).__name__} {str(value)[:40]}"


def _build(cls: type, data: Any, where: str) -> Any:
    if not isinstance(data, Mapping):
        raise ArtifactError(f"{where} is {_shown(data)}, expected a mapping of {cls.__name__}'s fields")
    fields = {f.name: f for f in dataclasses.fields(cls)}
    unknown = sorted(str(key) for key in data if key not in fields)
    if unknown:
        raise ArtifactError(f"{where}: unknown key(s) {unknown[:5]}, expected {sorted(fields)}")
    values = {}
    for name, field in fields.items():
        if name not in data:
            if field.default is dataclasses.MISSING:
                raise ArtifactError(f"{where}: key {name!r} is missing")
            continue
        values[name] = _value(_hints(cls)[name], data[name], f"{where}.{name}")
    return cls(**values)


def _value(hint: Any, value: Any, where: str) -> Any:
    """``value`` checked against ``hint`` (tuples built from lists); nesting follows the hint, not the data."""
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if origin in (typing.Union, type(int | None)):
        if value is None and type(None) in args:
            return None
        (inner,) = [arg for arg in args if arg is not type(None)]
        return _value(inner, value, where)
    if dataclasses.is_dataclass(hint):
        return _build(hint, value, where)
    if origin is tuple:
        if not isinstance(value, (list, tuple)):
            raise ArtifactError(f"{where} is {_shown(value)}, expected a list")
        return tuple(_value(args[0], item, f"{where}[{index}]") for index, item in enumerate(value))
    if origin is dict:  # a 1.2 map's copy of the spec: a flat mapping of the spec's fields
        if not isinstance(value, Mapping) or not all(
                isinstance(k, str) and (v is None or isinstance(v, (str, int, float))) for k, v in value.items()):
            raise ArtifactError(f"{where} is {_shown(value)}, expected a flat mapping of the CIM spec's fields")
        return value
    if hint is bool:
        ok = isinstance(value, bool)
    elif hint is int:
        ok = isinstance(value, int) and not isinstance(value, bool) and abs(value) < _INT_LIMIT
    elif hint is float:
        ok = isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)
    elif hint is str:
        ok = isinstance(value, str)
    else:  # pragma: no cover - a hint this module does not use
        raise TypeError(f"{where}: unsupported type {hint!r}")
    if not ok:
        raise ArtifactError(f"{where} is {_shown(value)}, expected {hint.__name__}")
    return value
