"""What :func:`~maptools.quantization.quantize` was asked for and what it applied: :class:`QuantizeOptions`.

The options are a :class:`~maptools.quantization.config.QuantizeConfig` (checked when built); the model then
resolves the per-layer bits (:meth:`QuantizeOptions.with_layer_bits`), and the PPQ setting that will run decides
the activation observer and the unsigned ranges applied (:meth:`QuantizeOptions.applied`). The manifest's
``settings`` are :meth:`QuantizeOptions.settings` of the applied options.

The recipes' choices made in maptools (:data:`RECIPE_OBSERVERS`, :data:`RECIPE_UNSIGNED`,
:data:`RECIPE_WEIGHT_OBSERVERS`, :data:`RECIPE_FIRST_WEIGHT_BITS`, :data:`RECIPE_OUTPUT_ACTIVATION_BITS`) live here,
as plain data, so that checking arguments imports neither torch nor PPQ; :mod:`maptools.quantization.engine.recipes`
builds the PPQ settings and explains the choices.
"""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from maptools.errors import InvalidArgumentError, InvalidTypeError
from maptools.quantization.config import KL_UNSIGNED, QuantizeConfig
from maptools.quantization.mapdir import map_directory
from maptools.quantization.validation import check_writable_dir

__all__ = [
    "LEARNED_ROUNDING_BITS",
    "RECIPE_FIRST_WEIGHT_BITS",
    "RECIPE_OBSERVERS",
    "RECIPE_OUTPUT_ACTIVATION_BITS",
    "RECIPE_UNSIGNED",
    "RECIPE_WEIGHT_OBSERVERS",
    "QuantizeOptions",
]

logger = logging.getLogger(__name__)

#: Activation observer each recipe calibrates with; None means the ``observer`` given to ``quantize``.
RECIPE_OBSERVERS: dict[str, str | None] = {"fast": None, "default": "mse", "best": "mse"}
#: Whether each recipe quantizes non-negative activations over the unsigned range (see ``quantize``).
RECIPE_UNSIGNED: dict[str, bool] = {"fast": False, "default": True, "best": True}
#: How each recipe chooses weight scales (see :func:`~maptools.quantization.engine.quantizer.weight_scales`).
RECIPE_WEIGHT_OBSERVERS: dict[str, str] = {"fast": "ppq", "default": "minmax", "best": "mse"}
#: Weight bit widths at which ``recipe='best'`` learns the rounding (wider weights keep nearest rounding).
LEARNED_ROUNDING_BITS = (2, 6)
#: Below this weight width, the recipe keeps the first MAC operator's weights at it (its activations at the map's
#: width), as the published low-bit methods do: it reads the image through few weights per output (benchmarks, *The
#: first layer at 8-bit weights, and flat views for the first learned layer*).
RECIPE_FIRST_WEIGHT_BITS: dict[str, int] = {"best": 8}
#: Below this activation width, the recipe keeps the operators that write the model's outputs
#: (:func:`~maptools.quantization.model.output_operators`) at it (their weights at the map's width), as the
#: published low-bit methods leave the network's output unquantized: 4-bit logits tie or clip the top classes
#: (benchmarks, *The outputs at 8 bits below 8-bit activations*).
RECIPE_OUTPUT_ACTIVATION_BITS: dict[str, int] = {"default": 8, "best": 8}

_SETTING_TYPE = ("setting: expected a PPQ QuantizationSetting (e.g. from maptools.quantization.engine.recipes."
                 "build_setting) or None, got {}")


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
    """The checked configuration of one ``quantize`` run, and the choices it applied.

    Build it with :meth:`check`: ``weight_bits``, ``activation_bits`` and ``recipe`` are then resolved. Until
    :meth:`applied`, ``observer``, ``unsigned_nonnegative``, ``weight_observer``, ``rounding`` and ``threads``
    hold what was asked (None: the recipe's or the engine's choice); afterwards, what runs.

    Attributes:
        config: The options (see :class:`~maptools.quantization.config.QuantizeConfig`).
        target: ``<mapsave>/<mapname>``, whose parent is writable.
        setting: The expert's PPQ ``QuantizationSetting``, or None for the recipe's.
    """

    config: QuantizeConfig
    target: Path
    setting: Any = field(default=None, repr=False, compare=False)

    @classmethod
    def check(cls, config: QuantizeConfig, setting: Any = None) -> QuantizeOptions:
        """Resolve the bits and the recipe of a checked ``config``, check ``setting`` and the map's folder.

        Raises:
            maptools.MaptoolsError: a subclass naming the bad argument.
        """
        if not isinstance(config, QuantizeConfig):
            raise InvalidTypeError(f"config: expected a maptools.quantization.QuantizeConfig or None, got "
                                   f"{type(config).__name__}")
        bits, recipe = config.bits, config.recipe.recipe
        config = config.replace(weight_bits=bits.weight_bits or bits.bit_width,
                                activation_bits=bits.activation_bits or bits.bit_width,
                                recipe=recipe if recipe is not None or setting is not None else "default")
        check_setting_type(setting)  # by attribute: PPQ is not imported yet
        target = map_directory(config.output.mapname, config.output.mapsave_dir)
        check_writable_dir(target.parent, "mapsave_dir")
        return cls(config=config, target=target, setting=setting)

    @property
    def recipe(self) -> str:
        """The recipe name; ``'custom'`` for a ``setting`` without a recipe."""
        return self.config.recipe.recipe or "custom"

    def with_layer_bits(self, node_names: Sequence[str], first_and_last: Sequence[str],
                        outputs: Sequence[str] = ()) -> QuantizeOptions:
        """The options for a model: ``layer_bits`` checked against its nodes, ``first_last_bits`` added, then the
        recipe's first-layer weights (:data:`RECIPE_FIRST_WEIGHT_BITS`) where neither names the first MAC, and the
        recipe's output activations (:data:`RECIPE_OUTPUT_ACTIVATION_BITS`) where neither names an output operator.

        Args:
            node_names: The names of the prepared model's nodes.
            first_and_last: Its first and last MAC operators (given ``first_last_bits`` to those without a
                ``layer_bits`` entry; the first one the recipe's first-layer weights when neither applies).
            outputs: The operators that write its outputs (:func:`~maptools.quantization.model.output_operators`).

        Raises:
            InvalidArgumentError: a ``layer_bits`` node is not in the model.
        """
        bits = self.config.bits
        unknown = sorted(set(bits.layer_bits) - set(node_names))
        if unknown:
            raise InvalidArgumentError(f"layer_bits: nodes {unknown} are not in the model")
        overrides = dict(bits.layer_bits)
        if bits.first_last_bits is not None:
            for name in first_and_last:
                overrides.setdefault(name, (bits.first_last_bits, bits.first_last_bits))
        first_bits = RECIPE_FIRST_WEIGHT_BITS.get(self.recipe)
        weight_bits = bits.weight_bits or bits.bit_width
        if first_and_last and first_bits is not None and weight_bits < first_bits \
                and first_and_last[0] not in overrides:
            overrides[first_and_last[0]] = (first_bits, bits.activation_bits or bits.bit_width)
            logger.info("recipe %r: the first MAC operator %s keeps %d-bit weights (layer_bits={%r: (%d, %d)} rounds "
                        "it to %d bits too)", self.recipe, first_and_last[0], first_bits, first_and_last[0],
                        weight_bits, overrides[first_and_last[0]][1], weight_bits)
        output_bits = RECIPE_OUTPUT_ACTIVATION_BITS.get(self.recipe)
        activation_bits = bits.activation_bits or bits.bit_width
        named = set(bits.layer_bits) | (set(first_and_last) if bits.first_last_bits is not None else set())
        kept = [name for name in outputs if name not in named]
        if output_bits is not None and activation_bits < output_bits and kept:
            for name in kept:
                overrides[name] = (overrides.get(name, (weight_bits, activation_bits))[0], output_bits)
            listed = ", ".join(kept[:6]) + (f" and {len(kept) - 6} more" if len(kept) > 6 else "")
            logger.info("recipe %r: the operators writing the model's outputs (%s) keep %d-bit activations "
                        "(layer_bits naming them sets their bits)", self.recipe, listed, output_bits)
        return self.replace(layer_bits=overrides)

    def replace(self, **options: Any) -> QuantizeOptions:
        """These options with some (by their names, as ``quantize``'s keyword arguments) replaced."""
        return dataclasses.replace(self, config=self.config.replace(**options))

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
        config, recipe = self.config, self.recipe
        observer, unsigned = config.calibration.observer, config.bits.unsigned_nonnegative
        forced = setting.quantize_activation_setting.calib_algorithm
        if forced is not None:
            forced = str(forced).lower()
            if observer is not None and observer != forced:
                raise InvalidArgumentError(
                    f"observer: {observer!r} given, but setting.quantize_activation_setting.calib_algorithm is "
                    f"{forced!r}, which PPQ applies to every activation; give only one of them (or the same)")
        applied = forced or observer or RECIPE_OBSERVERS.get(recipe) or "percentile"
        if unsigned and applied == "kl":
            raise InvalidArgumentError(KL_UNSIGNED.format(
                source="setting.quantize_activation_setting.calib_algorithm='kl'"))
        if unsigned is None and RECIPE_UNSIGNED.get(recipe, False):
            reasons = ((["symmetrical=False (asymmetric activations use 0..2^b-1 with a zero point)"]
                        if not config.bits.symmetrical else [])
                       + (["the kl observer (PPQ calibrates it on signed ranges only)"] if applied == "kl" else []))
            if reasons:
                logger.info("unsigned_nonnegative: the %r recipe's unsigned ranges for non-negative activations are "
                            "off with %s", recipe, " and ".join(reasons))
            unsigned = not reasons
        return self.replace(observer=applied, unsigned_nonnegative=bool(unsigned),
                            threads=config.run.threads or default_threads, rounding=self.applied_rounding(),
                            weight_observer=config.recipe.weight_observer or RECIPE_WEIGHT_OBSERVERS.get(recipe, "ppq"))

    def applied_rounding(self) -> str:
        """The rounding that runs: the one asked, else ``'learned'`` for ``best`` when a weight bit width is in
        :data:`LEARNED_ROUNDING_BITS`, else ``'nearest'``."""
        if self.config.recipe.rounding is not None:
            return self.config.recipe.rounding
        low, high = LEARNED_ROUNDING_BITS
        bits = [self.config.bits.weight_bits, *(w for w, _ in self.config.bits.layer_bits.values())]
        return "learned" if self.recipe == "best" and any(low <= b <= high for b in bits) else "nearest"

    def settings(self, input_shapes: Mapping[str, Sequence[int]], calibration: str,
                 calib_batches: int) -> dict[str, Any]:
        """The manifest's (and ``report.json``'s) ``settings``: the applied options and the run's own facts.

        Args:
            input_shapes: The checked input shapes.
            calibration: ``'random'`` or ``'user'``.
            calib_batches: The number of calibration batches used.
        """
        return {**self.config.settings(), "recipe": self.recipe,
                "input_shapes": {k: list(v) for k, v in input_shapes.items()},
                "ppq_setting": "custom" if self.setting is not None else "recipe",
                "calibration": calibration, "calib_batches": calib_batches}
