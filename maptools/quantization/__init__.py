"""Quantization of float ONNX models for compute-in-memory chips.

.. code-block:: python

    from maptools.quantization import quantize, read_quantinfo, read_quantparams
    quantize({'input': [1, 3, 224, 224]}, 'cpu', 'resnet18.onnx', mapname='resnet18',
             calibset=None, calib_steps=128, bit_width=4)
    info = read_quantinfo('resnet18')
    params = read_quantparams('resnet18')

Importing this package, reading a map (:func:`read_quantinfo`, :func:`read_quantparams`) and running it
(:func:`simulate`) import neither torch nor PPQ: :func:`quantize` imports them once its arguments are
checked, and the calibration-set helpers (:func:`random_calibset`, :func:`npy_calibset`,
:func:`imagefolder_calibset`), which return torch tensors, are imported on first use.
"""

from __future__ import annotations

from maptools._lazy import lazy_attributes
from maptools.quantization.api import quantize
from maptools.quantization.artifacts import MapContents, read_map, read_quantinfo, read_quantparams
from maptools.quantization.cim.spec import CIMSpec
from maptools.quantization.config import (
    OBSERVERS,
    RECIPES,
    BitsConfig,
    CalibrationConfig,
    OutputConfig,
    QuantizeConfig,
    RecipeConfig,
    RunConfig,
)
from maptools.quantization.records import OperatorQuantConfig, QuantizationResult, TensorQuant
from maptools.quantization.reference import simulate
from maptools.quantization.verify import VerifyReport, verify

__all__ = [
    "OBSERVERS",
    "RECIPES",
    "BitsConfig",
    "CIMSpec",
    "CalibrationConfig",
    "OutputConfig",
    "QuantizeConfig",
    "RecipeConfig",
    "RunConfig",
    "MapContents",
    "OperatorQuantConfig",
    "QuantizationResult",
    "TensorQuant",
    "imagefolder_calibset",
    "npy_calibset",
    "quantize",
    "random_calibset",
    "read_map",
    "read_quantinfo",
    "read_quantparams",
    "simulate",
    "verify",
    "VerifyReport",
]

#: Names imported on first use (PEP 562), with their module: these import torch.
_LAZY = {
    "imagefolder_calibset": "maptools.quantization.calibfolders",
    "npy_calibset": "maptools.quantization.calibfolders",
    "random_calibset": "maptools.quantization.calibration",
}

__getattr__, __dir__ = lazy_attributes(__name__, globals(), _LAZY)
