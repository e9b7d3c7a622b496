"""Named PPQ setting recipes: ``fast``, ``default`` and ``best``.

* ``fast``: calibration only, with the observer given to ``quantize`` (``percentile`` by default) and
  signed activations (PPQ's TensorRT setting: operator fusion, per-tensor activation calibration,
  parameter baking).
* ``default``: calibration with PPQ's MSE observer (a histogram search of the clipping range that
  minimises the quantization error), and never-negative activations on the unsigned range
  (:data:`RECIPE_UNSIGNED`, see :mod:`maptools.quantization.engine.unsigned`). Still calibration only.
* ``best``: ``default`` plus PPQ's LSQ fine-tuning of weights, biases and scales on the calibration data,
  block by block (8 operators), against the FP32 outputs of each block; zero points are not trained
  (:class:`~maptools.quantization.engine.quantizer.IntegerZeroPointLSQPass`). On the CPU it trains there.

Why these (measured with ``bench/accuracy.py`` on the two bundled digits models at W8A8, W4A8, W4A4,
W3A3 and W2A4; the table is on the benchmarks page of the documentation):

* The MSE observer gives a higher output SNR than PPQ's percentile observer at 9 of the 10 model and bit
  pairs (+1.1 dB at W8A8 and +1.4 dB at W4A4 on the digits CNN; -0.3 dB at W4A8).
* Unsigned ranges for never-negative activations add the bit a signed range wastes on them: on the mobile
  CNN at W4A4, 86% top-1 instead of 73% with the MSE observer alone.
* Bias correction is in no recipe: before the fused-activation and fan-out fixes of the engine it cost
  0.4 point of top-1 at W4A4 and up to 45 points at W2A4 on the digits CNN; now it adds +1.3 dB on the
  mobile CNN at W8A8 and +1.9 points at W4A4 for 2x the time (8.8x on a resnet18), which LSQ beats.
* Layer-wise equalization changed top-1 by -6.3 to +1.9 points and SNR by -0.5 to +1.3 dB depending on
  the bit pair: no consistent gain.
* LSQ rolls back any block whose loss grows. Its Adam learning rate applies to weights and scales alike:
  1e-3 suits 2 to 4-bit grids but is too coarse for 8-bit ones, PPQ's default 1e-5 is too timid below 8
  bits; 1e-4 for 300 steps beats PPQ's own LSQ (1e-5, 500 steps, blocks of 4) in output SNR at 9 of the
  10 model and bit pairs (digits W4A8: 0.5 dB under). Blocks of 8 operators halve the data collection of
  blocks of 4. On the bundled models with 32 calibration batches, ``best`` takes 13 to 41 s on two CPU
  cores.

An explicit ``observer`` (``quantize(observer=...)``, passed here as ``build_setting(..., observer=...)``)
replaces the recipe's for every activation. PPQ's MSE search scores thousands of candidate ranges per
tensor below 8 bits (more with ``symmetrical=False``) in a Python loop over the histogram; maptools runs
the same scoring in numpy (:func:`~maptools.quantization.engine.speedups.vectorized_mse_loss`, the same
float64 result to the bit): the digits CNN at W4A4 with ``symmetrical=False`` takes 16 s instead of 93 s,
the mobile CNN's ``default`` W4A4 5 s instead of 13 s.
"""

from __future__ import annotations

from maptools.errors import InvalidArgumentError
from maptools.quantization.engine.quiet import import_ppq

import_ppq()

from ppq.api.setting import QuantizationSetting, QuantizationSettingFactory  # noqa: E402

__all__ = ["LSQ_BLOCK_SIZE", "LSQ_LR", "LSQ_STEPS", "RECIPES", "RECIPE_OBSERVERS", "RECIPE_UNSIGNED", "build_setting"]

#: Recipe names accepted by ``quantize(recipe=...)``.
RECIPES = ("fast", "default", "best")

#: Activation observer each recipe calibrates with; None means the ``observer`` given to ``quantize``.
RECIPE_OBSERVERS: dict[str, str | None] = {"fast": None, "default": "mse", "best": "mse"}

#: Whether each recipe quantizes non-negative activations over the unsigned range (see ``quantize``).
RECIPE_UNSIGNED: dict[str, bool] = {"fast": False, "default": True, "best": True}

#: LSQ fine-tuning of ``best``: training steps per block, Adam learning rate, operators per block.
LSQ_STEPS = 300
LSQ_LR = 1e-4
LSQ_BLOCK_SIZE = 8


def _collecting_device(device: str) -> str:
    """Where PPQ's training passes cache their data: the CPU unless running on CUDA."""
    return "cuda" if device.startswith("cuda") else "cpu"


def build_setting(recipe: str, device: str, calib_batches: int, *, observer: str | None = None) -> QuantizationSetting:
    """Build the PPQ ``QuantizationSetting`` of a recipe.

    Args:
        recipe: One of :data:`RECIPES`.
        device: Execution device (``'cpu'`` or ``'cuda'``); LSQ caches its training data there.
        calib_batches: Number of calibration batches; LSQ trains on all of them, cycling when it takes
            more steps than there are batches.
        observer: Activation observer every recipe calibrates with (one of ``quantize``'s
            ``OBSERVERS``); None for the recipe's own (:data:`RECIPE_OBSERVERS`).

    Returns:
        A fresh setting (the caller may modify it).

    Raises:
        InvalidArgumentError: ``recipe`` is not one of :data:`RECIPES`, ``calib_batches`` < 1 or
            ``observer`` is unknown.
    """
    from maptools.quantization.api import OBSERVERS

    if recipe not in RECIPES:
        raise InvalidArgumentError(f"recipe: expected one of {list(RECIPES)}, got {recipe!r}")
    if isinstance(calib_batches, bool) or not isinstance(calib_batches, int) or calib_batches < 1:
        raise InvalidArgumentError(f"calib_batches: expected a positive int, got {calib_batches!r}")
    if observer is not None and observer not in OBSERVERS:
        raise InvalidArgumentError(f"observer: expected one of {list(OBSERVERS)} or None, got {observer!r}")
    setting = QuantizationSettingFactory.trt_setting()
    observer = observer if observer is not None else RECIPE_OBSERVERS[recipe]
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
