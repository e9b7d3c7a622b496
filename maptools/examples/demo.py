"""The demo: quantize the bundled digits CNN with ImageFolder calibration and compare top-1.

``make demo`` (or ``maptools demo``) runs :func:`run_demo`: it writes the training digits as an
ImageFolder of PNGs, calibrates on it, quantizes the bundled model at 4 bits and evaluates FP32 and
quantized top-1 on the held-out digits through onnxruntime (on ``quant_model.onnx``).
"""

from __future__ import annotations

import logging
import tempfile
from dataclasses import dataclass
from pathlib import Path

from maptools.examples import digits

__all__ = ["DemoResult", "run_demo"]

logger = logging.getLogger(__name__)


@dataclass
class DemoResult:
    """Outcome of :func:`run_demo`.

    Attributes:
        fp32_top1: Top-1 (%) of the float model on the held-out digits.
        quant_top1: Top-1 (%) of ``quant_model.onnx`` on the same digits.
        bits: Bit width used.
        files: Every file written in the map directory (:attr:`QuantizationResult.files
            <maptools.quantization.QuantizationResult.files>`).
        result: The full :class:`~maptools.quantization.QuantizationResult`.
    """

    fp32_top1: float
    quant_top1: float
    bits: int
    files: list[Path]
    result: object

    def lines(self) -> list[str]:
        """The demo's report, one line each."""
        return [
            f"FP32 top-1 on {'held-out digits'}: {self.fp32_top1:.2f}%",
            f"W{self.bits}A{self.bits} top-1 (onnxruntime on quant_model.onnx): {self.quant_top1:.2f}%",
            *[f"wrote {path}" for path in self.files],
        ]


def run_demo(bits: int = 4, mapname: str | None = None, mapsave_dir: str | Path | None = None,
             recipe: str = "default", calib_steps: int = 64) -> DemoResult:
    """Quantize the bundled digits model with ImageFolder calibration and evaluate it.

    Args:
        bits: Bit width of weights and activations.
        mapname: Map name (default ``digits_w<bits>a<bits>``).
        mapsave_dir: Where to save the map (default ``$MAPTOOLS_MAPSAVE`` or ``./mapsave``).
        recipe: Quantization recipe.
        calib_steps: Calibration batches of 16 images.

    Returns:
        FP32 and quantized top-1 and the artifact paths.
    """
    from maptools.quantization import imagefolder_calibset, quantize

    mapname = mapname or f"digits_w{bits}a{bits}"
    shapes = {digits.INPUT_NAME: list(digits.INPUT_SHAPE)}
    with tempfile.TemporaryDirectory(prefix="maptools-digits-") as tmp:
        root = digits.write_imagefolder(Path(tmp) / "calib", split="train")
        calibset = imagefolder_calibset(root, shapes, mean=digits.MEAN, std=digits.STD)  # read by quantize
        result = quantize(shapes, "cpu", digits.MODEL_PATH, mapname=mapname, calibset=calibset,
                          calib_steps=calib_steps, bit_width=bits, mapsave_dir=mapsave_dir, recipe=recipe)
    images, labels = digits.load_split("test")
    fp32 = digits.onnx_top1(digits.MODEL_PATH, images, labels)
    quant = digits.onnx_top1(result.model_path, images, labels)
    return DemoResult(fp32_top1=fp32, quant_top1=quant, bits=bits,
                      files=result.files, result=result)
