"""What :func:`~maptools.quantization.quantize` was asked for and what it applied: :class:`QuantizeOptions`.

The keyword arguments of ``quantize`` are checked once, before anything is loaded or written
(:meth:`QuantizeOptions.check`); the model then resolves the per-layer bits
(:meth:`QuantizeOptions.with_layer_bits`), and the PPQ setting that will run decides the activation
observer and the unsigned ranges applied (:meth:`QuantizeOptions.applied`). The manifest's ``settings``
are :meth:`QuantizeOptions.settings` of the applied options.

The recipes' choices made in maptools (:data:`RECIPE_OBSERVERS`, :data:`RECIPE_UNSIGNED`,
:data:`RECIPE_WEIGHT_OBSERVERS`) live here, as plain data, so that checking arguments imports neither torch
nor PPQ; :mod:`maptools.quantization.engine.recipes` builds the PPQ settings and explains the choices.
"""

from __future__ import annotations

import dataclasses
import logging
import math
import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from maptools.errors import InvalidArgumentError, InvalidTypeError
from maptools.quantization.cim.slicing import weight_format
from maptools.quantization.cim.spec import CIMSpec
from maptools.quantization.mapdir import check_mapname, map_directory
from maptools.quantization.validation import (
    check_batches,
    check_bits,
    check_bool,
    check_device,
    check_layer_bits,
    check_seed,
    check_threads,
    check_writable_dir,
)

__all__ = [
    "LEARNED_ROUNDING_BITS",
    "OBSERVERS",
    "RECIPES",
    "RECIPE_OBSERVERS",
    "RECIPE_UNSIGNED",
    "RECIPE_WEIGHT_OBSERVERS",
    "ROUNDINGS",
    "QuantizeOptions",
    "check_time_budget",
]

logger = logging.getLogger(__name__)

#: Activation observers (PPQ calibration algorithms) accepted by ``observer=``.
OBSERVERS = ("percentile", "minmax", "kl", "mse")
#: Recipe names accepted by ``recipe=`` (see :mod:`maptools.quantization.engine.recipes`).
RECIPES = ("fast", "default", "best")
#: Activation observer each recipe calibrates with; None means the ``observer`` given to ``quantize``.
RECIPE_OBSERVERS: dict[str, str | None] = {"fast": None, "default": "mse", "best": "mse"}
#: Whether each recipe quantizes non-negative activations over the unsigned range (see ``quantize``).
RECIPE_UNSIGNED: dict[str, bool] = {"fast": False, "default": True, "best": True}
#: How each recipe chooses weight scales (see :func:`~maptools.quantization.engine.quantizer.weight_scales`).
RECIPE_WEIGHT_OBSERVERS: dict[str, str] = {"fast": "ppq", "default": "minmax", "best": "mse"}

#: How weights are rounded to their integers: to the nearest, or learned on the calibration data (AdaRound, see
#: :mod:`maptools.quantization.engine.learned_rounding`).
ROUNDINGS = ("nearest", "learned")
#: Weight bit widths at which ``recipe='best'`` learns the rounding (wider weights keep nearest rounding).
LEARNED_ROUNDING_BITS = (2, 6)

_SETTING_TYPE = ("setting: expected a PPQ QuantizationSetting (e.g. from maptools.quantization.engine.recipes."
                 "build_setting) or None, got {}")
_KL_UNSIGNED = ("unsigned_nonnegative: True cannot be used with {source} (PPQ's KL observer calibrates signed "
                "ranges only); choose another observer or drop unsigned_nonnegative")


def check_cim(cim: object, weight_bits: Sequence[int]) -> CIMSpec | None:
    """Check ``quantize``'s ``cim`` argument.

    Args:
        cim: None or a :class:`~maptools.quantization.cim.spec.CIMSpec`.
        weight_bits: Every weight bit width the run may use (one output channel's columns must fit in an array).

    Raises:
        InvalidTypeError: ``cim`` is not a CIMSpec.
        InvalidArgumentError: ``adc_range='calibrated'`` without ``adc_bits``, or arrays narrower than one
            output channel's columns.
    """
    if cim is None:
        return None
    if not isinstance(cim, CIMSpec):
        raise InvalidTypeError(f"cim: got {type(cim).__name__} ({cim!r:.80}), expected None or a "
                               "maptools.quantization.cim.CIMSpec, e.g. "
                               "CIMSpec.parse('rows=256,cell_bits=2,adc_bits=6')")
    if cim.adc_range == "calibrated" and cim.adc_bits is None:
        raise InvalidArgumentError(f"cim: got adc_range='calibrated' with adc_bits=None ({cim}), expected adc_bits "
                                   "set (an ideal ADC has no range to calibrate) or adc_range='full'")
    for bits in sorted(set(weight_bits)):
        needed = weight_format(bits, cim).columns_per_weight
        if cim.cols < needed:
            raise InvalidArgumentError(f"cim: got cols={cim.cols}, expected at least {needed} (the columns of one "
                                       f"{bits}-bit {cim.weight_encoding} weight in {cim.cell_bits}-bit cells)")
    return cim


def check_time_budget(value: object) -> float | None:
    """``time_budget``: None or a positive number of seconds, as a float.

    Raises:
        InvalidTypeError: not a number.
        InvalidArgumentError: not positive and finite.
    """
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise InvalidTypeError(f"time_budget: expected None or a number of seconds, got {value!r} "
                               f"({type(value).__name__})")
    if not math.isfinite(value) or value <= 0:
        raise InvalidArgumentError(f"time_budget: expected a positive finite number of seconds, got {value!r}")
    return float(value)


def check_setting_type(setting: Any, setting_class: type | None = None) -> None:
    """Reject a ``setting`` that is not a PPQ ``QuantizationSetting``.

    Args:
        setting: The ``setting`` argument (None passes).
        setting_class: PPQ's ``QuantizationSetting`` once PPQ is imported; before, the check is by attribute.

    Raises:
        InvalidTypeError: ``setting`` is something else.
    """
    if setting is None:
        return
    valid = isinstance(setting, setting_class) if setting_class is not None else hasattr(
        setting, "quantize_activation_setting")
    if not valid:
        raise InvalidTypeError(_SETTING_TYPE.format(type(setting).__name__))


@dataclass(frozen=True)
class QuantizeOptions:
    """The checked arguments of one ``quantize`` run, and the choices it applied.

    Build it with :meth:`check`. Until :meth:`applied`, ``observer`` and ``unsigned_nonnegative`` hold what
    was asked (None: the recipe's choice) and ``threads`` may be None; afterwards, what runs.

    Attributes:
        device: ``'cpu'``, ``'cuda'`` or ``'cuda:N'``.
        mapname: The map's name.
        target: ``<mapsave>/<mapname>``, whose parent is writable.
        calib_steps: Calibration batches asked for.
        bit_width: Default bit width.
        weight_bits: Weight bit width.
        activation_bits: Activation bit width.
        symmetrical: Symmetric activations.
        per_channel: Per-output-channel weight scales.
        seed: Seed of the random data and generators.
        analysis_steps: Batches the error is measured on.
        layerwise_analysis: Whether the layer-wise error is measured.
        threads: torch CPU threads (None: the engine's default, until :meth:`applied`).
        layer_bits: Node name -> ``(weight_bits, activation_bits)``.
        first_last_bits: Bits of the first and last MAC operator, or None.
        recipe: The recipe name; ``'custom'`` for a ``setting`` without a recipe.
        observer: The activation observer (asked, then applied).
        unsigned_nonnegative: Unsigned ranges for never-negative activations (asked, then applied).
        weight_observer: How weight scales are chosen (the recipe's).
        power_of_two: Every scale a power of two.
        cim: The compute-in-memory crossbar the map is made for (see ``quantize``'s ``cim``), or None.
        rounding: How weights are rounded (one of :data:`ROUNDINGS`; None until :meth:`applied`: the recipe's).
        time_budget: Seconds learned rounding may take, or None.
        setting: The expert's PPQ ``QuantizationSetting``, or None for the recipe's.
    """

    device: str
    mapname: str
    target: Path
    calib_steps: int
    bit_width: int
    weight_bits: int
    activation_bits: int
    symmetrical: bool
    per_channel: bool
    seed: int
    analysis_steps: int | None
    layerwise_analysis: bool
    threads: int | None
    layer_bits: dict[str, tuple[int, int]] = field(default_factory=dict)
    first_last_bits: int | None = None
    recipe: str = "default"
    observer: str | None = None
    unsigned_nonnegative: bool | None = None
    weight_observer: str = "ppq"
    power_of_two: bool = False
    cim: CIMSpec | None = None
    rounding: str | None = None
    time_budget: float | None = None
    setting: Any = field(default=None, repr=False, compare=False)

    @classmethod
    def check(cls, *, device: object, mapname: object, calib_steps: object, bit_width: object,
              weight_bits: object, activation_bits: object, symmetrical: object, per_channel: object, seed: object,
              analysis_steps: object, layerwise_analysis: object, threads: object, layer_bits: object,
              first_last_bits: object, observer: object, recipe: object, unsigned_nonnegative: object,
              setting: Any, mapsave_dir: str | os.PathLike | None, power_of_two: object = False,
              cim: object = None, rounding: object = None, time_budget: object = None) -> QuantizeOptions:
        """Check every argument of ``quantize`` but the model and the data, in the order of its signature.

        Raises:
            maptools.MaptoolsError: a subclass naming the first bad argument.
        """
        device = check_device(device)
        mapname = check_mapname(mapname)
        calib_steps = check_batches(calib_steps, "calib_steps")
        bit_width = check_bits(bit_width, "bit_width")
        w_bits = check_bits(weight_bits, "weight_bits") if weight_bits is not None else bit_width
        a_bits = check_bits(activation_bits, "activation_bits") if activation_bits is not None else bit_width
        symmetrical = check_bool(symmetrical, "symmetrical")
        per_channel = check_bool(per_channel, "per_channel")
        seed = check_seed(seed)
        analysis_steps = None if analysis_steps is None else check_batches(analysis_steps, "analysis_steps")
        layerwise_analysis = check_bool(layerwise_analysis, "layerwise_analysis")
        threads = check_threads(threads) if threads is not None else None
        overrides = check_layer_bits(layer_bits)
        if first_last_bits is not None:
            first_last_bits = check_bits(first_last_bits, "first_last_bits")
        if observer is not None and observer not in OBSERVERS:
            raise InvalidArgumentError(f"observer: expected one of {list(OBSERVERS)} or None, got {observer!r}")
        if recipe is not None and recipe not in RECIPES:
            raise InvalidArgumentError(f"recipe: expected one of {list(RECIPES)} or None, got {recipe!r}")
        recipe_name = recipe if recipe is not None else "custom" if setting is not None else "default"
        check_setting_type(setting)  # by attribute: PPQ is not imported yet
        if unsigned_nonnegative is not None:
            unsigned_nonnegative = check_bool(unsigned_nonnegative, "unsigned_nonnegative")
        if unsigned_nonnegative and not symmetrical:
            raise InvalidArgumentError(
                "unsigned_nonnegative: True needs symmetric activations, but symmetrical=False was given (asymmetric "
                "activations already use the unsigned range 0..2^b-1, with a zero point); drop one of the two")
        if unsigned_nonnegative and observer == "kl":
            raise InvalidArgumentError(_KL_UNSIGNED.format(source="observer='kl'"))
        power_of_two = check_bool(power_of_two, "power_of_two")
        all_weight_bits = [w_bits, *(w for w, _ in overrides.values())]
        cim_spec = check_cim(cim, all_weight_bits + ([first_last_bits] if first_last_bits is not None else []))
        if rounding is not None and rounding not in ROUNDINGS:
            raise InvalidArgumentError(f"rounding: expected one of {list(ROUNDINGS)} or None, got {rounding!r}")
        time_budget = check_time_budget(time_budget)
        target = map_directory(mapname, mapsave_dir)
        check_writable_dir(target.parent, "mapsave_dir")
        return cls(device=device, mapname=mapname, target=target, calib_steps=calib_steps, bit_width=bit_width,
                   weight_bits=w_bits, activation_bits=a_bits, symmetrical=symmetrical, per_channel=per_channel,
                   seed=seed, analysis_steps=analysis_steps, layerwise_analysis=layerwise_analysis, threads=threads,
                   layer_bits=overrides, first_last_bits=first_last_bits, recipe=recipe_name,
                   observer=observer, unsigned_nonnegative=unsigned_nonnegative,
                   weight_observer=RECIPE_WEIGHT_OBSERVERS.get(recipe_name, "ppq"), power_of_two=power_of_two,
                   cim=cim_spec, rounding=rounding, time_budget=time_budget, setting=setting)

    def with_layer_bits(self, node_names: Sequence[str], first_and_last: Sequence[str]) -> QuantizeOptions:
        """The options for a model: ``layer_bits`` checked against its nodes, ``first_last_bits`` added.

        Args:
            node_names: The names of the prepared model's nodes.
            first_and_last: Its first and last MAC operators (given ``first_last_bits`` to those without a
                ``layer_bits`` entry).

        Raises:
            InvalidArgumentError: a ``layer_bits`` node is not in the model.
        """
        unknown = sorted(set(self.layer_bits) - set(node_names))
        if unknown:
            raise InvalidArgumentError(f"layer_bits: nodes {unknown} are not in the model")
        overrides = dict(self.layer_bits)
        if self.first_last_bits is not None:
            for name in first_and_last:
                overrides.setdefault(name, (self.first_last_bits, self.first_last_bits))
        return dataclasses.replace(self, layer_bits=overrides)

    def applied(self, setting: Any, default_threads: int) -> QuantizeOptions:
        """The options as they run with the PPQ ``setting``: observer, unsigned ranges and threads decided.

        PPQ calibrates every activation with the setting's ``calib_algorithm`` when it has one, else with each
        config's observer (the explicit ``observer``, else the recipe's, else ``percentile``). The recipe's
        unsigned ranges are turned off, with an INFO line, where they cannot apply; an explicit
        ``unsigned_nonnegative=True`` that cannot apply is an error.

        Args:
            setting: The PPQ setting that will run.
            default_threads: The threads when none were given.

        Raises:
            InvalidArgumentError: ``observer`` contradicts the setting's calibration algorithm, or
                ``unsigned_nonnegative=True`` meets the setting's ``kl`` calibration.
        """
        observer, unsigned, recipe = self.observer, self.unsigned_nonnegative, self.recipe
        forced = setting.quantize_activation_setting.calib_algorithm
        if forced is not None:
            forced = str(forced).lower()
            if observer is not None and observer != forced:
                raise InvalidArgumentError(
                    f"observer: {observer!r} given, but setting.quantize_activation_setting.calib_algorithm is "
                    f"{forced!r}, which PPQ applies to every activation; give only one of them (or the same)")
        applied = forced or observer or RECIPE_OBSERVERS.get(recipe) or "percentile"
        if unsigned and applied == "kl":
            raise InvalidArgumentError(_KL_UNSIGNED.format(
                source="setting.quantize_activation_setting.calib_algorithm='kl'"))
        if unsigned is None and RECIPE_UNSIGNED.get(recipe, False):
            reasons = ((["symmetrical=False (asymmetric activations use 0..2^b-1 with a zero point)"]
                        if not self.symmetrical else [])
                       + (["the kl observer (PPQ calibrates it on signed ranges only)"] if applied == "kl" else []))
            if reasons:
                logger.info("unsigned_nonnegative: the %r recipe's unsigned ranges for non-negative activations are "
                            "off with %s", recipe, " and ".join(reasons))
            unsigned = not reasons
        return dataclasses.replace(self, observer=applied, unsigned_nonnegative=bool(unsigned),
                                   threads=self.threads or default_threads, rounding=self.applied_rounding())

    def applied_rounding(self) -> str:
        """The rounding that runs: the one asked, else ``'learned'`` for ``best`` when a weight bit width is in
        :data:`LEARNED_ROUNDING_BITS`, else ``'nearest'``."""
        if self.rounding is not None:
            return self.rounding
        low, high = LEARNED_ROUNDING_BITS
        bits = [self.weight_bits, *(w for w, _ in self.layer_bits.values())]
        return "learned" if self.recipe == "best" and any(low <= b <= high for b in bits) else "nearest"

    def settings(self, input_shapes: Mapping[str, Sequence[int]], calibration: str,
                 calib_batches: int) -> dict[str, Any]:
        """The manifest's (and ``report.json``'s) ``settings`` of the applied options.

        Args:
            input_shapes: The checked input shapes.
            calibration: ``'random'`` or ``'user'``.
            calib_batches: The number of calibration batches used.
        """
        return {
            "input_shapes": {k: list(v) for k, v in input_shapes.items()}, "device": self.device,
            "weight_bits": self.weight_bits, "activation_bits": self.activation_bits, "bit_width": self.bit_width,
            "symmetrical": self.symmetrical, "per_channel": self.per_channel, "observer": self.observer,
            "weight_observer": self.weight_observer, "power_of_two": self.power_of_two,
            "unsigned_nonnegative": self.unsigned_nonnegative,
            "recipe": self.recipe, "ppq_setting": "custom" if self.setting is not None else "recipe",
            "layer_bits": {k: list(v) for k, v in self.layer_bits.items()},
            "calibration": calibration, "calib_steps": self.calib_steps, "calib_batches": calib_batches,
            "seed": self.seed, "layerwise_analysis": self.layerwise_analysis, "analysis_steps": self.analysis_steps,
            "threads": self.threads, "rounding": self.rounding, "time_budget": self.time_budget,
        }
