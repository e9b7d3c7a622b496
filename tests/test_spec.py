"""The engine's LowBitSpec is built from a resolved quantize configuration in one place."""

from __future__ import annotations

import dataclasses

from maptools.quantization.config import BitsConfig, CalibrationConfig, QuantizeConfig, RecipeConfig
from maptools.quantization.engine.quantizer import LowBitSpec


def _config(symmetrical: bool) -> QuantizeConfig:
    return QuantizeConfig(
        bits=BitsConfig(bit_width=4, weight_bits=3, activation_bits=6, layer_bits={"conv": (5, 7)},
                        symmetrical=symmetrical, per_channel=False, unsigned_nonnegative=symmetrical,
                        power_of_two=True),
        calibration=CalibrationConfig(observer="minmax"), recipe=RecipeConfig(weight_observer="mse"))


def test_spec_takes_every_field_from_the_config() -> None:
    """Each field comes from the bits, calibration or recipe group: none is left at LowBitSpec's default."""
    specs = [LowBitSpec.from_config(_config(symmetrical)) for symmetrical in (False, True)]
    assert specs[0] == LowBitSpec(weight_bits=3, activation_bits=6, symmetrical=False, per_channel=False,
                                  layer_bits={"conv": (5, 7)}, observer="minmax", unsigned_nonnegative=False,
                                  weight_observer="mse", power_of_two=True)
    assert specs[1] == dataclasses.replace(specs[0], symmetrical=True, unsigned_nonnegative=True)
    defaults = LowBitSpec()
    assert [f.name for f in dataclasses.fields(LowBitSpec)
            if all(getattr(spec, f.name) == getattr(defaults, f.name) for spec in specs)] == []
    assert specs[0].bits_of("conv") == (5, 7) and specs[0].bits_of("other") == (3, 6)
