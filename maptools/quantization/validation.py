"""Checks of the scalar arguments of :func:`~maptools.quantization.quantize` and the helpers.

Each check raises a :class:`~maptools.MaptoolsError` subclass whose message names the argument, what was
given and what is expected. All of them run before anything is computed or written.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from pathlib import Path

import numpy as np

from maptools.errors import DeviceError, InvalidArgumentError, InvalidTypeError

__all__ = [
    "MAX_BITS",
    "MIN_BITS",
    "check_bits",
    "check_bool",
    "check_device",
    "check_layer_bits",
    "check_positive_int",
    "check_writable_dir",
]

#: Smallest supported bit width.
MIN_BITS = 2
#: Largest supported bit width: quant_model.onnx keeps activations in 8-bit QDQ containers (ONNX < 1.16
#: has no wider QuantizeLinear output that onnxruntime runs at opset 13).
MAX_BITS = 8


def check_positive_int(value: object, argument: str, minimum: int = 1) -> int:
    """Return ``value`` as int if it is an integer >= ``minimum``."""
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)):
        raise InvalidTypeError(f"{argument}: expected an int >= {minimum}, got {value!r} ({type(value).__name__})")
    if value < minimum:
        raise InvalidArgumentError(f"{argument}: expected an int >= {minimum}, got {value!r}")
    return int(value)


def check_bits(value: object, argument: str) -> int:
    """Return a bit width in ``[MIN_BITS, MAX_BITS]``."""
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)):
        raise InvalidTypeError(
            f"{argument}: expected an int bit width from {MIN_BITS} to {MAX_BITS}, "
            f"got {value!r} ({type(value).__name__})"
        )
    if not MIN_BITS <= value <= MAX_BITS:
        raise InvalidArgumentError(f"{argument}: expected a bit width from {MIN_BITS} to {MAX_BITS}, got {value}")
    return int(value)


def check_bool(value: object, argument: str) -> bool:
    """Return ``value`` if it is a bool."""
    if not isinstance(value, (bool, np.bool_)):
        raise InvalidTypeError(f"{argument}: expected True or False, got {value!r}")
    return bool(value)


def check_layer_bits(value: object) -> dict[str, tuple[int, int]]:
    """Normalise ``layer_bits``: node name -> int or ``(weight_bits, activation_bits)``."""
    if value is None:
        return {}
    if not isinstance(value, Mapping):
        raise InvalidTypeError(
            "layer_bits: expected a dict of node name -> bits or (weight_bits, activation_bits), "
            f"got {type(value).__name__}"
        )
    result: dict[str, tuple[int, int]] = {}
    for name, bits in value.items():
        if not isinstance(name, str):
            raise InvalidTypeError(f"layer_bits: keys must be node names (str), got {name!r}")
        if isinstance(bits, (tuple, list)):
            if len(bits) != 2:
                raise InvalidArgumentError(
                    f"layer_bits[{name!r}]: expected (weight_bits, activation_bits), got {bits!r}"
                )
            result[name] = (
                check_bits(bits[0], f"layer_bits[{name!r}][0]"),
                check_bits(bits[1], f"layer_bits[{name!r}][1]"),
            )
        else:
            b = check_bits(bits, f"layer_bits[{name!r}]")
            result[name] = (b, b)
    return result


def check_device(device: object) -> str:
    """Return ``'cpu'`` or ``'cuda'``; ``'cuda'`` must have a GPU (never a silent fallback to CPU)."""
    if not isinstance(device, str) or device.split(":")[0] not in ("cpu", "cuda"):
        raise DeviceError(f"device: expected 'cpu' or 'cuda', got {device!r}")
    if device.startswith("cuda"):
        import torch

        if not torch.cuda.is_available():
            raise DeviceError(
                f"device: {device!r} was requested but no CUDA GPU is available on this machine; use device='cpu'"
            )
    return device


def check_writable_dir(path: Path, argument: str) -> Path:
    """Check that ``path`` is (or can be created as) a writable directory."""
    probe = path
    while not probe.exists():
        if probe.parent == probe:
            break
        probe = probe.parent
    if probe.exists() and not probe.is_dir():
        raise InvalidArgumentError(f"{argument}: {str(probe)!r} exists and is not a directory; expected a directory")
    if not os.access(probe, os.W_OK | os.X_OK):
        raise InvalidArgumentError(f"{argument}: {str(probe)!r} is not writable; expected a writable directory")
    return path
