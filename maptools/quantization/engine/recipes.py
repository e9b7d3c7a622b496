"""Named PPQ setting recipes: ``fast``, ``default`` and ``best``.

* ``fast``: calibration only, with the observer given to ``quantize`` (``percentile`` by default) and
  signed activations (PPQ's TensorRT setting: operator fusion, per-tensor activation calibration,
  parameter baking).
* ``default``: calibration with PPQ's MSE observer (a histogram search of the clipping range that
  minimises the quantization error), and never-negative activations on the unsigned range
  (:data:`~maptools.quantization.options.RECIPE_UNSIGNED`, see :mod:`maptools.quantization.engine.unsigned`).
  Still calibration only.
* ``best``: ``default`` plus PPQ's LSQ fine-tuning of weights, biases and scales on the calibration data,
  block by block (4 operators), against the FP32 outputs of each block, with a learning rate that depends
  on the activation bits (:func:`lsq_learning_rate`); zero points are not trained
  (:class:`~maptools.quantization.engine.quantizer.IntegerZeroPointLSQPass`). On the CPU it trains there.
  At 2- to 6-bit weights ``best`` first learns the weights' rounding
  (:mod:`~maptools.quantization.engine.learned_rounding`, chosen by
  :meth:`~maptools.quantization.options.QuantizeOptions.applied_rounding`); LSQ then trains the activation
  scales and biases around the learned integers (EfficientNet-Lite1 W4A8: better than either alone, see the
  benchmarks).

Why these (measured with ``bench/accuracy.py`` on the two bundled digits models at W8A8, W4A8, W4A4,
W3A3 and W2A4; the table is on the benchmarks page of the documentation):

* The MSE observer gives a higher output SNR than PPQ's percentile observer at 9 of the 10 model and bit
  pairs (+1.1 dB at W8A8 and +1.4 dB at W4A4 on the digits CNN; -0.3 dB at W4A8).
* Unsigned ranges for never-negative activations add the bit a signed range wastes on them: on the mobile
  CNN at W4A4, 90.4% top-1 / 7.6 dB instead of 85.4% / 6.9 dB with the MSE observer alone (digits CNN
  W3A3: 92.4% / 5.6 dB instead of 89.6% / 4.8 dB).
* Bias correction is in no recipe: before the fused-activation and fan-out fixes of the engine it cost
  0.4 point of top-1 at W4A4 and up to 45 points at W2A4 on the digits CNN; now, on the mobile CNN, it
  adds 3.2 points at W4A4 (93.5%) and +0.7 dB at W8A8 for 3x the time of ``default`` (8.8x on a resnet18),
  and LSQ beats it.
* Layer-wise equalization changed top-1 by -6.3 to +1.9 points and SNR by -0.5 to +1.3 dB depending on
  the bit pair: no consistent gain.
* LSQ rolls back any block whose loss grows. Its Adam learning rate applies to weights and scales alike,
  and Adam moves every parameter by about the learning rate per step whatever its gradient: 1e-3 suits the
  coarse grids of 4-bit and narrower activations, but moves 8-bit scales by too much; PPQ's default 1e-5
  is too timid below 8 bits. Measured on the two bundled models (300 steps, blocks of 4; top-1 / output
  SNR): with 8-bit activations 1e-4 beats 1e-3 in SNR at all four model and bit pairs (digits W4A8 27.5 dB
  against 26.7, W8A8 37.4 against 36.6); with 4-bit and narrower activations 1e-3 beats 1e-4 in SNR at all
  six (mobile W2A4 83 % / 6.7 dB against 60 % / 4.0 dB, W3A3 72 % / 5.5 dB against 71 % / 4.3 dB; digits
  W4A4 15.48 against 15.47 dB, W2A4 12.2 against 10.6 dB, W3A3 10.1 against 9.4 dB; mobile W4A4 11.6
  against 10.6 dB). Blocks of 4 operators instead of 8 gave +1.3 dB on the digits CNN at W4A8 (27.5
  against 26.2 dB) and -0.6 to +1.2 dB elsewhere. On the bundled models with 32 calibration batches,
  ``best`` takes 13 to 40 s on two CPU cores.

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
from maptools.quantization.options import (
    OBSERVERS,
    RECIPE_OBSERVERS,
    RECIPE_UNSIGNED,
    RECIPE_WEIGHT_OBSERVERS,
    RECIPES,
)

import_ppq()

from ppq.api.setting import QuantizationSetting, QuantizationSettingFactory  # noqa: E402

__all__ = [
    "LSQ_BLOCK_SIZE",
    "LSQ_LR",
    "LSQ_LR_LOW_BIT",
    "LSQ_STEPS",
    "RECIPES",
    "RECIPE_OBSERVERS",
    "RECIPE_UNSIGNED",
    "RECIPE_WEIGHT_OBSERVERS",
    "build_setting",
    "default_setting",
    "lsq_learning_rate",
]

#: LSQ fine-tuning of ``best``: training steps per block, Adam learning rate (activations wider than 4
#: bits, and 4 bits or fewer), operators per block.
LSQ_STEPS = 300
LSQ_LR = 1e-4
LSQ_LR_LOW_BIT = 1e-3
LSQ_BLOCK_SIZE = 4


def default_setting() -> QuantizationSetting:
    """PPQ's TensorRT setting, the baseline every recipe starts from."""
    return QuantizationSettingFactory.trt_setting()


def lsq_learning_rate(activation_bits: int) -> float:
    """LSQ's Adam learning rate in ``best``: :data:`LSQ_LR_LOW_BIT` at 4-bit activations and below.

    Wider activations get :data:`LSQ_LR`.
    """
    return LSQ_LR_LOW_BIT if activation_bits <= 4 else LSQ_LR


def _collecting_device(device: str) -> str:
    """Where PPQ's training passes cache their data: the CPU unless running on CUDA."""
    return "cuda" if device.startswith("cuda") else "cpu"


def build_setting(recipe: str, device: str, calib_batches: int, *, observer: str | None = None,
                  activation_bits: int = 8) -> QuantizationSetting:
    """Build the PPQ ``QuantizationSetting`` of a recipe.

    Args:
        recipe: One of :data:`~maptools.quantization.options.RECIPES`.
        device: Execution device (``'cpu'`` or ``'cuda'``); LSQ caches its training data there.
        calib_batches: Number of calibration batches; LSQ trains on all of them, cycling when it takes
            more steps than there are batches.
        observer: Activation observer every recipe calibrates with (one of ``quantize``'s
            ``OBSERVERS``); None for the recipe's own (:data:`~maptools.quantization.options.RECIPE_OBSERVERS`).
        activation_bits: The map's (default) activation bit width; sets ``best``'s LSQ learning rate.

    Returns:
        A fresh setting (the caller may modify it).

    Raises:
        InvalidArgumentError: ``recipe`` is not one of :data:`~maptools.quantization.options.RECIPES`,
            ``calib_batches`` < 1 or ``observer`` is unknown.
    """
    if recipe not in RECIPES:
        raise InvalidArgumentError(f"recipe: expected one of {list(RECIPES)}, got {recipe!r}")
    if isinstance(calib_batches, bool) or not isinstance(calib_batches, int) or calib_batches < 1:
        raise InvalidArgumentError(f"calib_batches: expected a positive int, got {calib_batches!r}")
    if observer is not None and observer not in OBSERVERS:
        raise InvalidArgumentError(f"observer: expected one of {list(OBSERVERS)} or None, got {observer!r}")
    setting = default_setting()
    observer = observer if observer is not None else RECIPE_OBSERVERS[recipe]
    if observer is not None:
        setting.quantize_activation_setting.calib_algorithm = observer
    if recipe == "best":
        setting.lsq_optimization = True
        lsq = setting.lsq_optimization_setting
        lsq.collecting_device = _collecting_device(device)
        lsq.steps = LSQ_STEPS
        lsq.lr = lsq_learning_rate(activation_bits)
        lsq.block_size = LSQ_BLOCK_SIZE
        lsq.is_scale_trainable = True
        lsq.gamma = 0.0
    return setting
