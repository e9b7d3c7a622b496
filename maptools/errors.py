"""The exceptions maptools raises.

Every error maptools raises derives from :class:`MaptoolsError`, so a caller can catch them all in one
``except`` clause. Each one also derives from the builtin exception that fits (``ValueError``,
``TypeError``, ``FileNotFoundError``...), so code written against the builtins keeps working.

Messages name the argument, what was given and what was expected.
"""

from __future__ import annotations

__all__ = [
    "ArtifactError",
    "CalibrationError",
    "DeviceError",
    "EngineError",
    "FloatModelMissingError",
    "InvalidArgumentError",
    "InvalidTypeError",
    "MapBusyError",
    "MapNotFoundError",
    "MapWriteError",
    "MaptoolsError",
    "ModelError",
    "ModelNotFoundError",
    "NotAMapError",
    "UnsafeArtifactError",
    "UnsupportedOperatorError",
]


class MaptoolsError(Exception):
    """Base class of every error raised by maptools."""


class InvalidArgumentError(MaptoolsError, ValueError):
    """An argument has the right type but a value outside what is accepted."""


class InvalidTypeError(MaptoolsError, TypeError):
    """An argument has the wrong type."""


class ModelNotFoundError(MaptoolsError, FileNotFoundError):
    """The ONNX model file does not exist (or is a directory)."""


class ModelError(MaptoolsError, ValueError):
    """The ONNX model file exists but cannot be used (empty, not ONNX, corrupt, unsupported graph)."""


class CalibrationError(MaptoolsError, ValueError):
    """The calibration set is unusable: wrong type, too few batches, wrong names, shapes or values."""


class DeviceError(MaptoolsError, ValueError):
    """The requested execution device is unknown or not available on this machine."""


class MapNotFoundError(MaptoolsError, FileNotFoundError):
    """No quantization results exist for the requested map name."""


class MapBusyError(MaptoolsError, TimeoutError):
    """Another process is writing the same map and did not finish its swap in time."""


class NotAMapError(MaptoolsError, FileExistsError):
    """Where maptools would write a map (its folder or its lock file) lies something maptools did not write.

    Replacing it would destroy someone's data, so nothing there is moved, deleted or written through.
    """


class MapWriteError(MaptoolsError, OSError):
    """The operating system refused a write of a map (disk full, permissions...); the earlier map is unchanged."""


class ArtifactError(MaptoolsError, ValueError):
    """A file in ``mapsave/<mapname>`` is missing, modified, corrupt or from an incompatible version."""


class UnsafeArtifactError(ArtifactError):
    """A pickle tried to load something other than maptools records, numpy arrays and builtins."""


class FloatModelMissingError(ArtifactError):
    """The float model a map records was moved away or changed since quantize: only the runs needing it are skipped.

    A recorded model that is there but unsafe to read (a FIFO, a device, too large, external data outside its
    folder) is a plain :class:`ArtifactError` instead, raised before anything runs.
    """


class EngineError(MaptoolsError, RuntimeError):
    """The quantization engine (PPQ) failed; the message names the operator when it is known."""


class UnsupportedOperatorError(MaptoolsError, NotImplementedError):
    """An operator cannot be handled (by PPQ or by the integer reference executor)."""
