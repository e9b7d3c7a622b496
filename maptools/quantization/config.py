"""The public, typed configuration of :func:`~maptools.quantization.quantize`: :class:`QuantizeConfig`.

Every option is declared once, as a field of one small frozen group (:class:`BitsConfig`,
:class:`CalibrationConfig`, :class:`RecipeConfig`, :class:`OutputConfig`, :class:`RunConfig`, and the crossbar,
a :class:`~maptools.quantization.cim.spec.CIMSpec`), with its descriptor (:class:`Option`: help, check, command
line flag, choices, manifest entry). :data:`OPTIONS`, the table of those descriptors, is what the rest derives
from: the groups' checks, ``quantize``'s keyword arguments, the ``maptools quantize`` options and their help, and
the manifest's ``settings``. Adding an option is a field in its group, its use in a pipeline stage, and its docs.

Checking imports neither torch nor PPQ.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from maptools.errors import InvalidArgumentError, InvalidTypeError, MaptoolsError
from maptools.quantization.cim.slicing import weight_format
from maptools.quantization.cim.spec import CIMSpec
from maptools.quantization.mapdir import check_mapname
from maptools.quantization.validation import (
    MAX_BATCHES,
    MAX_BITS,
    MAX_SEED,
    MAX_THREADS,
    MIN_BITS,
    check_batches,
    check_bits,
    check_bool,
    check_device,
    check_layer_bits,
    check_seed,
    check_threads,
)

__all__ = [
    "GROUPS",
    "IMAGENET_MEAN",
    "IMAGENET_STD",
    "OBSERVERS",
    "OPTIONS",
    "RECIPES",
    "ROUNDINGS",
    "WEIGHT_OBSERVERS",
    "BitsConfig",
    "CalibrationConfig",
    "Option",
    "OutputConfig",
    "QuantizeConfig",
    "RecipeConfig",
    "RunConfig",
    "check_cim",
    "check_time_budget",
]

#: Activation observers (PPQ calibration algorithms) accepted by ``observer=``.
OBSERVERS = ("percentile", "minmax", "kl", "mse")
#: Recipe names accepted by ``recipe=`` (see :mod:`maptools.quantization.engine.recipes`).
RECIPES = ("fast", "default", "best")
#: How weights are rounded to their integers: to the nearest, or learned on the calibration data (AdaRound).
ROUNDINGS = ("nearest", "learned")
#: How weight scales are chosen (see :func:`~maptools.quantization.engine.quantizer.weight_scales`).
WEIGHT_OBSERVERS = ("ppq", "minmax", "mse")
#: ImageNet's per-channel normalisation, in [0,1] pixel scale: the default of the image calibration readers.
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


@dataclass(frozen=True)
class Option:
    """One option of ``quantize``: where it lives, how it is checked, shown on the command line and recorded.

    Attributes:
        name: The keyword argument (and the group's field).
        group: The :class:`QuantizeConfig` field holding it (``'bits'``, ..., ``'cim'``).
        default: The default value.
        help: One line for the command line's help (its default is appended).
        check: ``check(value, argument) -> value``: raises a :class:`~maptools.MaptoolsError` naming
            ``argument``, what was given and what is expected; returns the normalised value.
        flag: The command line option (``--bit-width``).
        aliases: Older command line spellings that still work (``--bits``).
        negative: For a bool, the flag that sets False (``--per-tensor``); None: ``--no-<flag>``.
        parse: Command line text -> value (before ``check``); None for a bool flag.
        choices: The accepted values, when a closed set.
        metavar: The command line placeholder.
        default_text: How the help states the default, when the value alone does not say it.
        recorded: Whether the manifest's ``settings`` hold it.
        recorded_when_changed: Recorded only when not at its default (an option added later: the manifests
            of maps that do not change it stay as they were).
        cli_required: Whether ``maptools quantize`` requires it.
    """

    name: str
    group: str
    default: Any
    help: str
    check: Callable[[Any, str], Any]
    flag: str
    aliases: tuple[str, ...] = ()
    negative: str | None = None
    parse: Callable[[str], Any] | None = None
    choices: tuple[Any, ...] | None = None
    metavar: str | None = None
    default_text: str | None = None
    recorded: bool = True
    recorded_when_changed: bool = False
    cli_required: bool = False

    @property
    def is_flag(self) -> bool:
        """A bool option: ``--flag`` / ``--no-flag`` on the command line."""
        return self.parse is None

    def default_words(self) -> str:
        """How the command line's help states the default: ``'default 8'``, ``'default: the recipe's'``."""
        if self.default_text is not None:
            return f"default: {self.default_text}"
        return "default " + (("on" if self.default else "off") if self.is_flag else
                             "none" if self.default is None else str(self.default))

    def cli_help(self) -> str:
        """The help line with its default."""
        return f"{self.help} ({'required' if self.cli_required else self.default_words()})"

    def to_json(self, value: Any) -> Any:
        """The value as the manifest records it."""
        if isinstance(value, CIMSpec):
            return value.to_dict()
        if self.name == "layer_bits":
            return {name: list(bits) for name, bits in value.items()}
        return value

    def from_json(self, value: Any) -> Any:
        """The value a manifest recorded, as the option takes it."""
        if self.group == "cim" and value is not None:
            return CIMSpec.from_dict(value)
        if self.name == "layer_bits":
            return {name: tuple(bits) for name, bits in value.items()}
        return value


def option(default: Any, help: str, check: Callable[[Any, str], Any], **descriptor: Any) -> Any:
    """A group's field with its :class:`Option` descriptor (``flag`` defaults to ``--<name with dashes>``)."""
    return field(default=default, metadata={"option": (help, check, descriptor)})


def _optional(check: Callable[[Any, str], Any]) -> Callable[[Any, str], Any]:
    return lambda value, argument: None if value is None else check(value, argument)


def _choice(choices: Sequence[Any], none_means: str | None = None) -> Callable[[Any, str], Any]:
    def check(value: Any, argument: str) -> Any:
        if value is None and none_means is not None:
            return None
        if value not in choices:
            extra = " or None" if none_means is not None else ""
            raise InvalidArgumentError(f"{argument}: expected one of {list(choices)}{extra}, got {value!r}")
        return value
    return check


def _layer_bits(value: Any, argument: str) -> dict[str, tuple[int, int]]:
    return check_layer_bits(value)


def _any_str(value: Any, argument: str) -> Any:
    return value


def check_time_budget(value: object, argument: str = "time_budget") -> float | None:
    """``time_budget``: None or a positive finite number of seconds, as a float.

    Raises:
        InvalidTypeError: not a number.
        InvalidArgumentError: not positive and finite.
    """
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise InvalidTypeError(f"{argument}: expected None or a number of seconds, got {value!r} "
                               f"({type(value).__name__})")
    if not math.isfinite(value) or value <= 0:
        raise InvalidArgumentError(f"{argument}: expected a positive finite number of seconds, got {value!r}")
    return float(value)


def check_cim(cim: object, weight_bits: Sequence[int], argument: str = "cim") -> CIMSpec | None:
    """Check a ``cim`` argument: None, a :class:`CIMSpec`, or a mapping of its fields.

    Args:
        cim: The argument.
        weight_bits: Every weight bit width the map may use (one output channel's columns must fit in an array).
        argument: The name errors give.

    Raises:
        InvalidTypeError: ``cim`` is neither.
        InvalidArgumentError: a bad field, ``adc_range='calibrated'`` without ``adc_bits``, or arrays narrower
            than one output channel's columns.
    """
    if cim is None:
        return None
    if isinstance(cim, Mapping):
        try:
            cim = CIMSpec.from_dict(dict(cim))
        except MaptoolsError as exc:
            raise type(exc)(f"{argument}: {exc}") from None
    if not isinstance(cim, CIMSpec):
        raise InvalidTypeError(f"{argument}: got {type(cim).__name__} ({cim!r:.80}), expected None or a "
                               "maptools.quantization.CIMSpec (or a mapping of its fields), e.g. "
                               "CIMSpec.parse('rows=256,cell_bits=2,adc_bits=6')")
    if cim.adc_range == "calibrated" and cim.adc_bits is None:
        raise InvalidArgumentError(f"{argument}: got adc_range='calibrated' with adc_bits=None ({cim}), expected "
                                   "adc_bits set (an ideal ADC has no range to calibrate) or adc_range='full'")
    for bits in sorted(set(weight_bits)):
        needed = weight_format(bits, cim).columns_per_weight
        if cim.cols < needed:
            raise InvalidArgumentError(f"{argument}: got cols={cim.cols}, expected at least {needed} (the columns "
                                       f"of one {bits}-bit {cim.weight_encoding} weight in {cim.cell_bits}-bit cells)")
    return cim


def _cim_field(value: Any, argument: str) -> CIMSpec | None:
    return check_cim(value, [], argument)


def _int(text: str) -> int:
    return int(text)


def _float(text: str) -> float:
    return float(text)


def _str(text: str) -> str:
    return text


def parse_layer_bits(text: str) -> dict[str, int | tuple[int, int]]:
    """``NAME=BITS,NAME=W:A,...`` -> ``layer_bits``: a node at BITS, or at W-bit weights and A-bit activations."""
    result: dict[str, int | tuple[int, int]] = {}
    for item in text.split(","):
        name, sep, bits = item.strip().rpartition("=")
        weights, colon, activations = bits.partition(":")
        if not sep or not name:
            raise ValueError(f"expected NAME=BITS or NAME=W:A items separated by commas, got {item!r}")
        result[name] = (int(weights), int(activations)) if colon else int(weights)
    return result


_BITS = f"{MIN_BITS}..{MAX_BITS}"


class _Group:
    """A group of options: each field checked (and normalised) by its :class:`Option` when the group is built."""

    def __post_init__(self) -> None:
        group = next(name for name, cls in GROUPS.items() if type(self) is cls)
        for opt in OPTIONS:
            if opt.group == group:
                object.__setattr__(self, opt.name, opt.check(getattr(self, opt.name), opt.name))


@dataclass(frozen=True)
class BitsConfig(_Group):
    """How wide the integers are, and how they are ranged."""

    bit_width: int = option(8, f"bit width of weights and activations, {_BITS}", check_bits, parse=_int,
                            aliases=("--bits",), metavar="B")
    weight_bits: int | None = option(None, f"weight bit width, {_BITS}", _optional(check_bits), parse=_int,
                                     metavar="B", default_text="--bit-width")
    activation_bits: int | None = option(None, f"activation bit width, {_BITS}", _optional(check_bits), parse=_int,
                                         aliases=("--act-bits",), metavar="B", default_text="--bit-width")
    layer_bits: Mapping[str, int | tuple[int, int]] | None = option(
        None, "per-node bits: NAME=BITS or NAME=W:A (weight and activation bits), comma-separated", _layer_bits,
        parse=parse_layer_bits, metavar="NAME=BITS,...")
    first_last_bits: int | None = option(
        None, "keep the first and the last Conv/Gemm/MatMul at B bits, weights and activations",
        _optional(check_bits), parse=_int, metavar="B", default_text="off", recorded=False)
    symmetrical: bool = option(True, "symmetric (signed) activations; --asymmetric: unsigned with a zero point",
                               check_bool, aliases=("--asymmetric",), negative="--asymmetric",
                               default_text="on, symmetric")
    per_channel: bool = option(True, "one weight scale per output channel; --per-tensor: one per tensor", check_bool,
                               negative="--per-tensor", default_text="on, per channel")
    unsigned_nonnegative: bool | None = option(
        None, "quantize never-negative activations over 0..2^b-1, not with --asymmetric or --observer kl",
        _optional(check_bool), default_text="the recipe's, on for default and best, off for fast")
    power_of_two: bool = option(False, "every scale a power of two, for requantization by shifts", check_bool)
    channel_activations: bool = option(
        True, "per-channel activation scales for a tensor only depthwise Convs read whose channel ranges spread over "
        "100x (format 2.2); off with --cim, whose crossbar takes one input scale per MAC", check_bool,
        negative="--per-tensor-activations", recorded_when_changed=True)


@dataclass(frozen=True)
class CalibrationConfig(_Group):
    """The batches ranges are calibrated and the error is measured on."""

    calib_steps: int = option(32, f"number of calibration batches, 8 to {MAX_BATCHES}", check_batches, parse=_int,
                              metavar="N")
    observer: str | None = option(None, "activation observer", _choice(OBSERVERS, "the recipe's"), parse=_str,
                                  choices=OBSERVERS,
                                  default_text="the recipe's, mse for default and best, percentile for fast")
    analysis_steps: int | None = option(
        None, "number of batches the graph-wise error (report.json, summary) is measured on, held out after the "
        "first --calib-steps ones", _optional(check_batches), parse=_int, metavar="N",
        default_text="enough for 32 samples, at least 4")
    layerwise_analysis: bool = option(
        False, "also measure each operator's error when quantized alone, one forward per operator", check_bool)
    layerwise_batches: int = option(
        1, "number of held-out batches the layer-wise error is accumulated over (one forward per operator and "
        "batch)", check_batches, parse=_int, metavar="N")
    seed: int = option(0, f"seed of the random calibration data, the image shuffle and every generator, 0 to "
                          f"{MAX_SEED}", check_seed, parse=_int, metavar="N")


@dataclass(frozen=True)
class RecipeConfig(_Group):
    """Which passes run and the choices maptools makes in them."""

    recipe: str | None = option(None, "quantization recipe (see the guide)", _choice(RECIPES, "default"), parse=_str,
                                choices=RECIPES, default_text="default")
    rounding: str | None = option(
        None, "weight rounding: nearest, or learned on the calibration data (AdaRound)", _choice(ROUNDINGS, "recipe"),
        parse=_str, choices=ROUNDINGS, default_text="the recipe's, learned for best at 2-6-bit weights, else nearest")
    time_budget: float | None = option(None, "seconds learned rounding may take; its iterations are scaled to fit",
                                       check_time_budget, parse=_float, metavar="SECONDS", default_text="no limit")
    weight_observer: str | None = option(
        None, "how weight scales are chosen: ppq (PPQ's min-max), minmax (per-channel absolute max) or mse "
        "(the clipping of least squared error)", _choice(WEIGHT_OBSERVERS, "recipe"), parse=_str,
        choices=WEIGHT_OBSERVERS, default_text="the recipe's, minmax for default, mse for best, ppq for fast")


@dataclass(frozen=True)
class OutputConfig(_Group):
    """Where the map goes."""

    mapname: str = option("newmap", "map name; results go to <mapsave>/<mapname>/",
                          lambda value, argument: check_mapname(value), parse=_str, cli_required=True,
                          recorded=False)
    mapsave_dir: str | None = option(None, "directory holding the maps", _any_str, parse=_str, metavar="DIR",
                                     default_text="$MAPTOOLS_MAPSAVE, else ./mapsave", recorded=False)


@dataclass(frozen=True)
class RunConfig(_Group):
    """Where and with how many threads it runs."""

    device: str = option("cpu", "cpu, cuda or cuda:N", lambda value, argument: check_device(value), parse=_str)
    threads: int | None = option(None, f"torch CPU threads while quantizing, 1 to {MAX_THREADS}",
                                 _optional(check_threads), parse=_int, metavar="N",
                                 default_text="1: the fastest for calibration on small batches, and steady beside "
                                              "other jobs")


#: The groups of :class:`QuantizeConfig`, field name -> type.
GROUPS: dict[str, type] = {"bits": BitsConfig, "calibration": CalibrationConfig, "recipe": RecipeConfig,
                           "output": OutputConfig, "run": RunConfig}

_CIM_HELP = ("also make the map for a compute-in-memory crossbar, e.g. rows=256,cell_bits=2,adc_bits=6,dac_bits=1,"
             "weight_encoding=differential,requant=fixed_point; keys rows, cols, cell_bits, dac_bits, adc_bits (none: "
             "ideal), weight_encoding (differential, offset), adc_range (full, calibrated: ranges calibrated on the "
             "calibration batches), requant (float, fixed_point, power_of_two), as CIMSpec.parse")


def _table() -> tuple[Option, ...]:
    rows = []
    for group, cls in GROUPS.items():
        for f in dataclasses.fields(cls):
            help_text, check, descriptor = f.metadata["option"]
            descriptor = {"flag": "--" + f.name.replace("_", "-"), **descriptor}
            rows.append(Option(f.name, group, f.default, help_text, check, **descriptor))
    rows.append(Option("cim", "cim", None, _CIM_HELP, _cim_field, "--cim", parse=CIMSpec.parse,
                       metavar="KEY=VALUE,..."))
    return tuple(rows)


#: Every option of ``quantize``, in the order of its checks.
OPTIONS: tuple[Option, ...] = _table()
_BY_NAME = {opt.name: opt for opt in OPTIONS}


@dataclass(frozen=True)
class QuantizeConfig:
    """Every option of one ``quantize`` run, in groups; each group checks its fields when built.

    ``QuantizeConfig.from_options(bit_width=4, recipe='best')`` builds one from ``quantize``'s keyword
    arguments; :meth:`replace` changes some; :meth:`settings` is what the manifest records and
    :meth:`from_settings` reads it back.

    Raises:
        maptools.MaptoolsError: a subclass naming the first bad option, and what is expected.
    """

    bits: BitsConfig = field(default_factory=BitsConfig)
    calibration: CalibrationConfig = field(default_factory=CalibrationConfig)
    recipe: RecipeConfig = field(default_factory=RecipeConfig)
    output: OutputConfig = field(default_factory=OutputConfig)
    run: RunConfig = field(default_factory=RunConfig)
    cim: CIMSpec | None = None

    def __post_init__(self) -> None:
        for name, cls in GROUPS.items():
            if not isinstance(getattr(self, name), cls):
                raise InvalidTypeError(f"{name}: expected a {cls.__name__}, got {type(getattr(self, name)).__name__}")
        bits = self.bits
        object.__setattr__(self, "cim", check_cim(self.cim, [
            bits.weight_bits or bits.bit_width, *(w for w, _ in bits.layer_bits.values()),
            *([bits.first_last_bits] if bits.first_last_bits is not None else [])]))
        if bits.unsigned_nonnegative and not bits.symmetrical:
            raise InvalidArgumentError(
                "unsigned_nonnegative: True needs symmetric activations, but symmetrical=False was given (asymmetric "
                "activations already use the unsigned range 0..2^b-1, with a zero point); drop one of the two")
        if bits.unsigned_nonnegative and self.calibration.observer == "kl":
            raise InvalidArgumentError(KL_UNSIGNED.format(source="observer='kl'"))

    @classmethod
    def from_options(cls, base: QuantizeConfig | None = None, **options: Any) -> QuantizeConfig:
        """``base`` (default: every default) with ``options`` (``quantize``'s keyword arguments) replaced.

        Raises:
            InvalidArgumentError: an option that is not one of :data:`OPTIONS`.
            maptools.MaptoolsError: a subclass naming the first bad value.
        """
        base = base if base is not None else cls()
        unknown = sorted(set(options) - set(_BY_NAME))
        if unknown:
            raise InvalidArgumentError(f"{unknown[0]}: not an option of quantize; expected one of {sorted(_BY_NAME)}")
        changes: dict[str, Any] = {}
        for name in GROUPS:
            mine = {key: value for key, value in options.items() if _BY_NAME[key].group == name}
            if mine:
                changes[name] = dataclasses.replace(getattr(base, name), **mine)
        if "cim" in options:
            changes["cim"] = options["cim"]
        return dataclasses.replace(base, **changes) if changes else base

    def replace(self, **options: Any) -> QuantizeConfig:
        """This configuration with some options (by their names, as ``quantize``'s keyword arguments) replaced."""
        return QuantizeConfig.from_options(self, **options)

    def values(self) -> Iterator[tuple[Option, Any]]:
        """Every option with its value, in :data:`OPTIONS`' order."""
        for opt in OPTIONS:
            yield opt, self.cim if opt.group == "cim" else getattr(getattr(self, opt.group), opt.name)

    def as_options(self) -> dict[str, Any]:
        """Option name -> value: the keyword arguments of ``quantize`` that give this configuration."""
        return {opt.name: value for opt, value in self.values()}

    def settings(self) -> dict[str, Any]:
        """The manifest's ``settings`` of these options (the run adds its own facts: input shapes, batches...).

        A None crossbar is left out: a map without ``cim.json`` has no ``cim`` setting; so is an option
        recorded only when changed (:attr:`Option.recorded_when_changed`) at its default.
        """
        return {opt.name: opt.to_json(value) for opt, value in self.values()
                if opt.recorded and not (opt.group == "cim" and value is None)
                and not (opt.recorded_when_changed and value == opt.default)}

    @classmethod
    def from_settings(cls, settings: Mapping[str, Any]) -> QuantizeConfig:
        """The configuration a manifest's ``settings`` recorded (what the run applied; a ``'custom'`` recipe,
        a PPQ setting of the caller's, reads as None)."""
        options = {opt.name: opt.from_json(settings[opt.name]) for opt in OPTIONS
                   if opt.recorded and opt.name in settings}
        if options.get("recipe") == "custom":
            options["recipe"] = None
        return cls.from_options(**options)


#: The error of ``unsigned_nonnegative=True`` with a KL calibration.
KL_UNSIGNED = ("unsigned_nonnegative: True cannot be used with {source} (PPQ's KL observer calibrates signed "
               "ranges only); choose another observer or drop unsigned_nonnegative")


def option_named(name: str) -> Option:
    """The descriptor of option ``name``."""
    return _BY_NAME[name]
