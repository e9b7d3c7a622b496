"""Named PPQ setting recipes: ``fast``, ``default`` and ``best``.

* ``fast``: calibration only, with the observer given to ``quantize`` (PPQ's TensorRT setting: operator
  fusion, per-tensor activation calibration, parameter baking).
* ``default``: calibration with PPQ's MSE observer (a histogram search of the clipping range that
  minimises the quantization error) instead of the given observer. Still calibration only: it costs a
  second calibration pass and the search, not a training.
* ``best``: ``default`` plus PPQ's LSQ fine-tuning of weights, biases and scales on the calibration data,
  block by block (8 operators), against the FP32 outputs of each block. On the CPU it trains there.

Why these (measured with ``bench/accuracy.py``, see the benchmarks page of the documentation):

* The MSE observer gives a higher output SNR than PPQ's default percentile observer at every bit pair
  measured (W8A8 to W2A4) on both bundled models, e.g. +1 dB at W8A8 and +1.4 dB at W4A4 on the digits
  CNN, and lifts the mobile CNN at W4A4 from 41% to 70% top-1.
* Bias correction, the previous ``default``, is not in any recipe: it is computed before maptools
  quantizes the fan-out tensors PPQ leaves in float, so its corrections fit another graph; it cost 0.4
  point of top-1 at W4A4 on the digits CNN and 45 points at W2A4 with the percentile observer.
* Layer-wise equalization changed top-1 by -6 to +1 points and SNR by -0.5 to +1.3 dB depending on the
  bit pair: no consistent gain.
* LSQ has a per-block safety net (a block whose loss grows is rolled back). Its learning rate applies to
  weights and scales alike (Adam): 1e-3 suits 2 to 4-bit grids but is too coarse for 8-bit ones, PPQ's
  1e-5 the reverse; 1e-4 for 300 steps beats PPQ's own LSQ (1e-5, 500 steps, blocks of 4) in output SNR
  at every bit pair on both models. Blocks of 8 operators halve the data collection of blocks of 4.

The observer of ``default`` and ``best`` overrides the ``observer`` argument of ``quantize`` (PPQ's
runtime calibration applies the setting's algorithm to every activation): use ``fast`` to calibrate with
another observer, or pass an explicit ``setting``.
"""

from __future__ import annotations

from maptools.errors import InvalidArgumentError
from maptools.quantization.engine.quiet import import_ppq

import_ppq()

from ppq.api.setting import QuantizationSetting, QuantizationSettingFactory  # noqa: E402

__all__ = ["LSQ_BLOCK_SIZE", "LSQ_LR", "LSQ_STEPS", "RECIPES", "RECIPE_OBSERVERS", "build_setting"]

#: Recipe names accepted by ``quantize(recipe=...)``.
RECIPES = ("fast", "default", "best")

#: Activation observer each recipe calibrates with; None means the ``observer`` given to ``quantize``.
RECIPE_OBSERVERS: dict[str, str | None] = {"fast": None, "default": "mse", "best": "mse"}

#: LSQ fine-tuning of ``best``: training steps per block, Adam learning rate, operators per block.
LSQ_STEPS = 300
LSQ_LR = 1e-4
LSQ_BLOCK_SIZE = 8


def _collecting_device(device: str) -> str:
    """Where PPQ's training passes cache their data: the CPU unless running on CUDA."""
    return "cuda" if device.startswith("cuda") else "cpu"


def build_setting(recipe: str, device: str, calib_batches: int) -> QuantizationSetting:
    """Build the PPQ ``QuantizationSetting`` of a recipe.

    Args:
        recipe: One of :data:`RECIPES`.
        device: Execution device (``'cpu'`` or ``'cuda'``); LSQ caches its training data there.
        calib_batches: Number of calibration batches; LSQ trains on all of them, cycling when it takes
            more steps than there are batches.

    Returns:
        A fresh setting (the caller may modify it).

    Raises:
        InvalidArgumentError: ``recipe`` is not one of :data:`RECIPES` or ``calib_batches`` < 1.
    """
    if recipe not in RECIPES:
        raise InvalidArgumentError(f"recipe: expected one of {list(RECIPES)}, got {recipe!r}")
    if isinstance(calib_batches, bool) or not isinstance(calib_batches, int) or calib_batches < 1:
        raise InvalidArgumentError(f"calib_batches: expected a positive int, got {calib_batches!r}")
    setting = QuantizationSettingFactory.trt_setting()
    observer = RECIPE_OBSERVERS[recipe]
    if observer is not None:
        setting.quantize_activation_setting.calib_algorithm = observer
    if recipe == "best":
        setting.lsq_optimization = True
        lsq = setting.lsq_optimization_setting
        lsq.collecting_device = _collecting_device(device)
        lsq.steps = LSQ_STEPS
        lsq.lr = LSQ_LR
        lsq.block_size = LSQ_BLOCK_SIZE
        lsq.is_scale_trainable = True
        lsq.gamma = 0.0
    return setting
