"""The PPQ engine: the only part of maptools that imports PPQ.

Importing this package imports PPQ (quietly). Everything it returns is a maptools record, a numpy
array or an ONNX proto.
"""

from maptools.quantization.engine.quantizer import LowBitSpec, int_range
from maptools.quantization.engine.session import PPQSession, bias_key, default_setting, weight_key

__all__ = ["LowBitSpec", "PPQSession", "bias_key", "default_setting", "int_range", "weight_key"]
