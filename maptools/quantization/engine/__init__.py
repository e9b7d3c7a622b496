"""The PPQ engine: the only part of maptools that imports PPQ.

Its modules import PPQ (quietly, see :mod:`~maptools.quantization.engine.quiet`, which itself does not);
the names re-exported here are imported on first use (PEP 562), so importing the package alone does not.
Everything it returns is a maptools record, a numpy array or an ONNX proto.
"""

from __future__ import annotations

import importlib
from typing import Any

__all__ = ["LowBitSpec", "PPQSession", "bias_key", "default_setting", "int_range", "weight_key"]

_LAZY = {
    "LowBitSpec": "maptools.quantization.engine.quantizer",
    "int_range": "maptools.quantization.engine.quantizer",
    "PPQSession": "maptools.quantization.engine.session",
    "bias_key": "maptools.quantization.engine.session",
    "default_setting": "maptools.quantization.engine.session",
    "weight_key": "maptools.quantization.engine.session",
}


def __getattr__(name: str) -> Any:
    module = _LAZY.get(name)
    if module is None:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    value = getattr(importlib.import_module(module), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_LAZY))
