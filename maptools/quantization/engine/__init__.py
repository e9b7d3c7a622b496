"""The PPQ engine: the only part of maptools that imports PPQ.

Importing this package imports PPQ (quietly). Everything it returns is a maptools record, a numpy
array or an ONNX proto.
"""

from maptools.quantization.engine.quantizer import LowBitSpec
from maptools.quantization.engine.recipes import default_setting
from maptools.quantization.engine.session import PPQSession
from maptools.quantization.format import bias_key, weight_key
from maptools.quantization.intmath import int_range

__all__ = ["LowBitSpec", "PPQSession", "bias_key", "default_setting", "int_range", "weight_key"]
