"""Bundled mobile-style digits example: depthwise-separable CNN with ReLU6, HardSwish and squeeze-excite.

The model file :data:`MODEL_PATH` is produced by ``examples/train_mobile.py`` from the same data as the
residual CNN of :mod:`maptools.examples.digits`, whose data helpers (:func:`load_split`,
:func:`write_imagefolder`, :func:`onnx_top1`) and constants apply unchanged: same input ``'input'``
``(N, 1, 8, 8)`` normalised with :data:`MEAN`/:data:`STD`, same output ``'logits'`` ``(N, 10)``.

At opset 13, ReLU6 is a ``Clip(0, 6)`` node and HardSwish is ``x * HardSigmoid(x)`` (``HardSigmoid`` +
``Mul``); the squeeze-excite block is ``GlobalAveragePool`` -> ``Conv`` -> ``Relu`` -> ``Conv`` ->
``Sigmoid`` -> ``Mul``.
"""

from __future__ import annotations

from pathlib import Path

from maptools.examples.digits import (
    IMAGE_SIZE,
    INPUT_NAME,
    INPUT_SHAPE,
    MEAN,
    OUTPUT_NAME,
    STD,
    load_split,
    onnx_top1,
    write_imagefolder,
)

__all__ = [
    "IMAGE_SIZE",
    "INPUT_NAME",
    "INPUT_SHAPE",
    "MEAN",
    "MODEL_PATH",
    "OUTPUT_NAME",
    "STD",
    "load_split",
    "onnx_top1",
    "write_imagefolder",
]

MODEL_PATH: Path = Path(__file__).parent / "data" / "digits_mobile.onnx"
"""Path of the bundled FP32 ONNX model."""
