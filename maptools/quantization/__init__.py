"""Quantization of float ONNX models for compute-in-memory chips.

.. code-block:: python

    from maptools.quantization import quantize, read_quantinfo, read_quantparams
    quantize({'input': [1, 3, 224, 224]}, 'cpu', 'resnet18.onnx', mapname='resnet18',
             calibset=None, calib_steps=128, bit_width=4)
    info = read_quantinfo('resnet18')
    params = read_quantparams('resnet18')
"""

from maptools.quantization.api import OBSERVERS, RECIPES, quantize
from maptools.quantization.artifacts import read_quantinfo, read_quantparams
from maptools.quantization.calibration import imagefolder_calibset, npy_calibset, random_calibset
from maptools.quantization.records import OperatorQuantConfig, QuantizationResult, TensorQuant
from maptools.quantization.reference import simulate
from maptools.quantization.verify import VerifyReport, verify

__all__ = [
    "OBSERVERS",
    "RECIPES",
    "OperatorQuantConfig",
    "QuantizationResult",
    "TensorQuant",
    "imagefolder_calibset",
    "npy_calibset",
    "quantize",
    "random_calibset",
    "read_quantinfo",
    "read_quantparams",
    "simulate",
    "verify",
    "VerifyReport",
]
