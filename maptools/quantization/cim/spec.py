"""The parameters of a compute-in-memory crossbar: :class:`CIMSpec`.

A spec is a frozen, validated value. It is built in Python, parsed from the one-line form the command line
uses, or read back from JSON:

.. code-block:: python

    from maptools.quantization.cim import CIMSpec

    spec = CIMSpec.parse("rows=256,cell_bits=2,adc_bits=6,dac_bits=1,weight_encoding=offset")
    spec.full_scale                            # 768: the largest partial sum one column can carry
    CIMSpec.from_dict(spec.to_dict()) == spec  # True
    CIMSpec.parse(str(spec)) == spec           # True: str() is the parseable form

Every invalid value raises :class:`~maptools.errors.InvalidArgumentError` (a value of the wrong type
:class:`~maptools.errors.InvalidTypeError`) whose message names the field, what was given and what is
expected.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any

from maptools.errors import InvalidArgumentError, InvalidTypeError

__all__ = ["ADC_RANGES", "INT_RANGES", "MAX_ARRAY_SIZE", "REQUANT_MODES", "WEIGHT_ENCODINGS", "CIMSpec"]

#: The signed weight encodings, ``'differential'`` (w = w+ - w-) and ``'offset'`` (w + 2^(b-1) stored unsigned).
WEIGHT_ENCODINGS: tuple[str, ...] = ("differential", "offset")
#: The ADC ranges, ``'calibrated'`` (one range per row tile, weight slice and input plane, chosen on data,
#: see :mod:`~maptools.quantization.cim.calibrate`) and ``'full'`` (the worst-case partial sum).
ADC_RANGES: tuple[str, ...] = ("calibrated", "full")
#: The requantization arithmetics (see :mod:`~maptools.quantization.cim.requant`).
REQUANT_MODES: tuple[str, ...] = ("float", "fixed_point", "power_of_two")

#: Most rows and columns of one array: 64 times the 1024 x 1024 of the largest crossbars built; it keeps a
#: column's worst-case partial sum (:attr:`CIMSpec.full_scale`) below 2^32, exact in the float64 and int64
#: arithmetic of :mod:`~maptools.quantization.cim.arithmetic`.
MAX_ARRAY_SIZE = 65536
#: Field -> (smallest, largest) of the integer fields; ``adc_bits`` may also be None.
INT_RANGES: dict[str, tuple[int, int]] = {
    "rows": (1, MAX_ARRAY_SIZE),
    "cols": (1, MAX_ARRAY_SIZE),
    "cell_bits": (1, 8),
    "dac_bits": (1, 8),
    "adc_bits": (1, 16),
}
_CHOICES: dict[str, tuple[str, ...]] = {
    "weight_encoding": WEIGHT_ENCODINGS,
    "adc_range": ADC_RANGES,
    "requant": REQUANT_MODES,
}
_NONE_WORDS = ("none", "ideal")


@dataclass(frozen=True)
class CIMSpec:
    """One crossbar design: array size, cell, DAC and ADC precision, encodings and requantization.

    Attributes:
        rows: Crossbar rows R (word lines, 1..65536): the longest dot product one array sums in one step.
            Longer dot products are split into row tiles.
        cols: Crossbar columns C (bit lines, 1..65536), each with its own ADC conversion.
        cell_bits: Bits c stored per cell (1..8): a weight is split into slices of c bits over several
            columns.
        dac_bits: Bits d an input DAC applies per cycle (1..8; 1 is bit-serial): an input is split into
            planes of d bits.
        adc_bits: Bits a of the ADC digitizing each column's partial sum (1..16), or None for an ideal,
            exact ADC.
        weight_encoding: ``'differential'`` (a positive and a negative column per slice) or ``'offset'``
            (``w + 2^(b-1)`` stored, ``2^(b-1) * sum(x)`` subtracted digitally).
        adc_range: ``'full'`` (the ADC spans the worst-case partial sum :attr:`full_scale`, or ``2^a - 1`` if
            larger) or
            ``'calibrated'`` (ranges chosen on calibration data, an
            :class:`~maptools.quantization.cim.adc.AdcCalibration`).
        requant: How the accumulator is requantized: ``'float'`` (float64 multiply, round half to even),
            ``'fixed_point'`` (int32 multiplier and shift) or ``'power_of_two'`` (shift only).
    """

    rows: int = 256
    cols: int = 256
    cell_bits: int = 2
    dac_bits: int = 1
    adc_bits: int | None = None
    weight_encoding: str = "differential"
    adc_range: str = "full"
    requant: str = "float"

    def __post_init__(self) -> None:
        for name, (low, high) in INT_RANGES.items():
            value = getattr(self, name)
            if name == "adc_bits" and value is None:
                continue
            expected = f"an integer in {low}..{high}"
            if name == "adc_bits":
                expected += " or None (ideal ADC)"
            if isinstance(value, bool) or not isinstance(value, int):
                raise InvalidTypeError(f"CIMSpec.{name}: got {value!r} ({type(value).__name__}), expected {expected}")
            if not low <= value <= high:
                raise InvalidArgumentError(f"CIMSpec.{name}: got {value}, expected {expected}")
        for name, choices in _CHOICES.items():
            value = getattr(self, name)
            if value not in choices:
                raise InvalidArgumentError(
                    f"CIMSpec.{name}: got {value!r}, expected one of {', '.join(repr(c) for c in choices)}"
                )

    # -- derived quantities ------------------------------------------------------------------------------
    @property
    def full_scale(self) -> int:
        """The worst-case partial sum of one column, ``rows * (2^c - 1) * (2^d - 1)``.

        An ADC with ``adc_range='full'`` spans ``max(full_scale, 2^a - 1)`` (one code per integer once it has
        enough levels).
        """
        return self.rows * (2**self.cell_bits - 1) * (2**self.dac_bits - 1)

    @property
    def adc_levels(self) -> int | None:
        """The largest ADC code, ``2^a - 1`` (None for an ideal ADC)."""
        return None if self.adc_bits is None else 2**self.adc_bits - 1

    @property
    def lossless_adc_bits(self) -> int:
        """The fewest ADC bits at which a full-range ADC is exact, ``ceil(log2(full_scale + 1))``.

        With that many bits the full-range ADC has a step of exactly 1 and recovers every partial sum.
        """
        return int(self.full_scale).bit_length()

    # -- conversions ----------------------------------------------------------------------------------------
    def replace(self, **changes: Any) -> CIMSpec:
        """A copy with some fields changed (validated like a new spec)."""
        return dataclasses.replace(self, **changes)

    def to_dict(self) -> dict[str, Any]:
        """The fields as a JSON-serializable dict (``adc_bits`` None for an ideal ADC)."""
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> CIMSpec:
        """A spec from :meth:`to_dict`'s form; missing fields take their defaults.

        Raises:
            InvalidTypeError: ``data`` is not a dict.
            InvalidArgumentError: An unknown field or an invalid value.
        """
        return cls(**known_fields(cls, data))

    @classmethod
    def parse(cls, text: str) -> CIMSpec:
        """A spec from a comma-separated ``field=value`` list, e.g. ``"rows=256,cell_bits=2,adc_bits=6"``.

        Whitespace around items is ignored, missing fields take their defaults, ``adc_bits=none`` (or
        ``ideal``) is an ideal ADC, and an empty string is the default spec.

        Raises:
            InvalidTypeError: ``text`` is not a string.
            InvalidArgumentError: An item without ``=``, an unknown or repeated field, a value that is not
                an integer where one is expected, or an invalid value. The message quotes the item.
        """
        if not isinstance(text, str):
            raise InvalidTypeError(f"CIM spec: got {type(text).__name__}, expected a string like "
                                   f"'rows=256,cell_bits=2,adc_bits=6'")
        fields: dict[str, Any] = {}
        for item in (part.strip() for part in text.split(",")):
            if not item:
                continue
            key, sep, raw = (s.strip() for s in item.partition("="))
            if not sep or not key:
                raise InvalidArgumentError(f"CIM spec item {item!r}: expected field=value")
            if key not in _field_names():
                raise InvalidArgumentError(
                    f"CIM spec item {item!r}: unknown field {key!r}, expected one of {', '.join(_field_names())}"
                )
            if key in fields:
                raise InvalidArgumentError(f"CIM spec item {item!r}: field {key!r} given twice")
            fields[key] = _parse_value(key, raw, item)
        return cls(**fields)

    def __str__(self) -> str:
        """The :meth:`parse`-able form, every field spelled out."""
        return ",".join(f"{k}={'none' if v is None else v}" for k, v in self.to_dict().items())


def known_fields(cls: type, data: Any) -> dict[str, Any]:
    """``data``, a dict of some of the dataclass ``cls``'s fields, checked for ``cls.from_dict``.

    Raises:
        InvalidTypeError: ``data`` is not a dict.
        InvalidArgumentError: An unknown field.
    """
    if not isinstance(data, dict):
        raise InvalidTypeError(f"{cls.__name__}.from_dict: got {type(data).__name__}, expected a dict")
    names = [f.name for f in dataclasses.fields(cls)]
    unknown = sorted(set(data) - set(names))
    if unknown:
        raise InvalidArgumentError(f"{cls.__name__}.from_dict: unknown field(s) {', '.join(map(repr, unknown))}, "
                                   f"expected some of {', '.join(names)}")
    return dict(data)


def _field_names() -> tuple[str, ...]:
    return tuple(f.name for f in dataclasses.fields(CIMSpec))


def _parse_value(key: str, raw: str, item: str) -> Any:
    """One value of :meth:`CIMSpec.parse`: an int for the integer fields, the word for the others."""
    if key in _CHOICES:
        return raw
    if key == "adc_bits" and raw.lower() in _NONE_WORDS:
        return None
    try:
        return int(raw, 10)
    except ValueError:
        extra = " or 'none'" if key == "adc_bits" else ""
        raise InvalidArgumentError(f"CIM spec item {item!r}: {key} must be an integer{extra}, got {raw!r}") from None
