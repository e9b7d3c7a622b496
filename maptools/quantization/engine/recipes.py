"""Named PPQ setting recipes: ``fast``, ``default`` and ``best``.

* ``fast``: calibration only (PPQ's TensorRT setting, operator fusion, parameter baking).
* ``default``: ``fast`` plus PPQ's bias correction, cheap and helpful below 8 bits.
* ``best``: ``default`` plus layer-wise equalization and LSQ fine-tuning of scales and weights on the
  calibration data (run on the CPU when ``device='cpu'``).

Measured figures are in the benchmarks page of the documentation.
"""

from __future__ import annotations

from maptools.errors import InvalidArgumentError
from maptools.quantization.engine.quiet import import_ppq

import_ppq()

from ppq.api.setting import QuantizationSetting, QuantizationSettingFactory  # noqa: E402

__all__ = ["RECIPES", "build_setting"]

#: Recipe names accepted by ``quantize(recipe=...)``.
RECIPES = ("fast", "default", "best")


def build_setting(recipe: str, device: str, calib_batches: int) -> QuantizationSetting:
    """Build the PPQ ``QuantizationSetting`` of a recipe.

    Args:
        recipe: One of :data:`RECIPES`.
        device: Execution device; LSQ and bias correction collect their data there.
        calib_batches: Number of calibration batches (bounds the optimisation passes' steps).
    """
    if recipe not in RECIPES:
        raise InvalidArgumentError(f"recipe: expected one of {list(RECIPES)}, got {recipe!r}")
    setting = QuantizationSettingFactory.trt_setting()
    if recipe == "fast":
        return setting
    collect = "cpu" if device.startswith("cpu") else "cuda"
    setting.bias_correct = True
    setting.bias_correct_setting.collecting_device = collect
    setting.bias_correct_setting.steps = min(32, calib_batches)
    if recipe == "best":
        setting.equalization = True
        setting.equalization_setting.iterations = 10
        setting.lsq_optimization = True
        lsq = setting.lsq_optimization_setting
        lsq.collecting_device = collect
        lsq.steps = 300
        lsq.lr = 1e-4
        lsq.block_size = 4
        lsq.is_scale_trainable = True
    return setting
