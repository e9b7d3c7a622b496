"""maptools: the quantization stage of a hardware-mapping toolchain for compute-in-memory chips.

The public entry points live in :mod:`maptools.quantization`; every error derives from
:class:`maptools.MaptoolsError`.
"""

from __future__ import annotations

import logging

from maptools.errors import (
    ArtifactError,
    CalibrationError,
    DeviceError,
    EngineError,
    InvalidArgumentError,
    InvalidTypeError,
    MapNotFoundError,
    MaptoolsError,
    ModelError,
    ModelNotFoundError,
    UnsafeArtifactError,
    UnsupportedOperatorError,
)

__version__ = "0.1.0"

logging.getLogger(__name__).addHandler(logging.NullHandler())

__all__ = [
    "ArtifactError",
    "CalibrationError",
    "DeviceError",
    "EngineError",
    "InvalidArgumentError",
    "InvalidTypeError",
    "MapNotFoundError",
    "MaptoolsError",
    "ModelError",
    "ModelNotFoundError",
    "UnsafeArtifactError",
    "UnsupportedOperatorError",
    "__version__",
]
