"""Named PPQ setting recipes: ``fast``, ``default`` and ``best``.

* ``fast``: calibration only, with the observer given to ``quantize`` (``percentile`` by default) and
  signed activations (PPQ's TensorRT setting: operator fusion, per-tensor activation calibration,
  parameter baking).
* ``default``: calibration with PPQ's MSE observer (a histogram search of the clipping range that
  minimises the quantization error), and never-negative activations on the unsigned range
  (:data:`~maptools.quantization.options.RECIPE_UNSIGNED`, see :mod:`maptools.quantization.engine.unsigned`).
  Still calibration only.
* ``best``: ``default`` plus, at 8-bit activations (:data:`LSQ_MIN_ACTIVATION_BITS`), PPQ's LSQ
  fine-tuning of weights, biases and scales on the calibration data, block by block (4 operators), against
  the FP32 outputs of each block (:data:`LSQ_LR`); zero points are not trained
  (:class:`~maptools.quantization.engine.quantizer.IntegerZeroPointLSQPass`). On the CPU it trains there.
  At 2- to 6-bit weights ``best`` first learns the weights' rounding
  (:mod:`~maptools.quantization.engine.learned_rounding`, chosen by
  :meth:`~maptools.quantization.options.QuantizeOptions.applied_rounding`); at 8-bit activations LSQ then
  trains the activation scales and biases around the learned integers (better than either alone on
  EfficientNet-Lite1, level on Lite2: :ref:`bench-learned-rounding`). Below 8-bit activations LSQ fitted to
  64 calibration images lowered both trained Lite networks, so ``best`` is learned rounding alone there.

The measurements behind these choices are on the benchmarks page (:ref:`bench-recipes`).

An explicit ``observer`` (``quantize(observer=...)``, passed here as ``build_setting(..., observer=...)``)
replaces the recipe's for every activation. PPQ's MSE search runs in numpy here
(:func:`~maptools.quantization.engine.speedups.vectorized_mse_loss`, the same float64 result to the bit),
because PPQ's Python loop over the histogram is slow below 8 bits (:ref:`bench-recipes`).
"""

from __future__ import annotations

from maptools.errors import InvalidArgumentError
from maptools.quantization.config import OBSERVERS, RECIPES
from maptools.quantization.engine.facade import (
    QuantizationSetting,
    QuantizationSettingFactory,
)
from maptools.quantization.options import RECIPE_OBSERVERS
from maptools.quantization.validation import check_bits

__all__ = [
    "LSQ_BLOCK_SIZE",
    "LSQ_LR",
    "LSQ_MIN_ACTIVATION_BITS",
    "LSQ_STEPS",
    "build_setting",
    "default_setting",
]

#: LSQ fine-tuning of ``best``: training steps per block, Adam learning rate (1e-3, once used at 4-bit activations
#: on the bundled digits models' evidence, lost most of two trained ImageNet networks' confident predictions;
#: benchmarks, *Why the recipes are what they are*), operators per block.
LSQ_STEPS = 300
LSQ_LR = 1e-4
LSQ_BLOCK_SIZE = 4
#: ``best`` runs LSQ only at this many activation bits and more: below, it cost both trained Lite networks
#: agreement at W4A4 and Lite2 at W8A4 (benchmarks, *LSQ below 8-bit activations*).
LSQ_MIN_ACTIVATION_BITS = 8


def default_setting() -> QuantizationSetting:
    """PPQ's TensorRT setting, the baseline every recipe starts from."""
    return QuantizationSettingFactory.trt_setting()


def _collecting_device(device: str) -> str:
    """Where PPQ's training passes cache their data: the CPU unless running on CUDA."""
    return "cuda" if device.startswith("cuda") else "cpu"


def build_setting(recipe: str, device: str, calib_batches: int, *, observer: str | None = None,
                  activation_bits: int = 8) -> QuantizationSetting:
    """Build the PPQ ``QuantizationSetting`` of a recipe.

    Args:
        recipe: One of :data:`~maptools.quantization.config.RECIPES`.
        device: Execution device (``'cpu'`` or ``'cuda'``); LSQ caches its training data there.
        calib_batches: Number of calibration batches; LSQ trains on all of them, cycling when it takes
            more steps than there are batches.
        observer: Activation observer every recipe calibrates with (one of ``quantize``'s
            ``OBSERVERS``); None for the recipe's own (:data:`~maptools.quantization.options.RECIPE_OBSERVERS`).
        activation_bits: The map's activation bit width: ``best`` runs LSQ only at
            :data:`LSQ_MIN_ACTIVATION_BITS` and more.

    Returns:
        A fresh setting (the caller may modify it).

    Raises:
        InvalidArgumentError: ``recipe`` is not one of :data:`~maptools.quantization.config.RECIPES`,
            ``calib_batches`` < 1, ``observer`` is unknown or ``activation_bits`` is not a supported bit width.
        InvalidTypeError: ``activation_bits`` is not an int.
    """
    if recipe not in RECIPES:
        raise InvalidArgumentError(f"recipe: expected one of {list(RECIPES)}, got {recipe!r}")
    if isinstance(calib_batches, bool) or not isinstance(calib_batches, int) or calib_batches < 1:
        raise InvalidArgumentError(f"calib_batches: expected a positive int, got {calib_batches!r}")
    if observer is not None and observer not in OBSERVERS:
        raise InvalidArgumentError(f"observer: expected one of {list(OBSERVERS)} or None, got {observer!r}")
    check_bits(activation_bits, "activation_bits")
    setting = default_setting()
    observer = observer if observer is not None else RECIPE_OBSERVERS[recipe]
    if observer is not None:
        setting.quantize_activation_setting.calib_algorithm = observer
    if recipe == "best" and activation_bits >= LSQ_MIN_ACTIVATION_BITS:
        setting.lsq_optimization = True
        lsq = setting.lsq_optimization_setting
        lsq.collecting_device = _collecting_device(device)
        lsq.steps = LSQ_STEPS
        lsq.lr = LSQ_LR
        lsq.block_size = LSQ_BLOCK_SIZE
        lsq.is_scale_trainable = True
        lsq.gamma = 0.0
    return setting
