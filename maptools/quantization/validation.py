"""Checks of the scalar arguments of :func:`~maptools.quantization.quantize` and the helpers.

Each check raises a :class:`~maptools.MaptoolsError` subclass whose message names the argument, what was
given and what is expected. All of them run before anything is computed or written.
"""

from __future__ import annotations

import math
import os
from collections.abc import Mapping, Sequence
from pathlib import Path

import numpy as np

from maptools.errors import DeviceError, InvalidArgumentError, InvalidTypeError

__all__ = [
    "MAX_BATCHES",
    "MAX_BITS",
    "MAX_SEED",
    "MAX_THREADS",
    "MIN_BITS",
    "available_memory",
    "check_batch_memory",
    "check_batches",
    "check_bits",
    "check_bool",
    "check_device",
    "check_jobs",
    "check_layer_bits",
    "check_positive_int",
    "check_seed",
    "check_threads",
    "check_writable_dir",
    "format_bytes",
]

#: Smallest supported bit width.
MIN_BITS = 2
#: Largest supported bit width: quant_model.onnx keeps activations in 8-bit QDQ containers (ONNX < 1.16
#: has no wider QuantizeLinear output that onnxruntime runs at opset 13).
MAX_BITS = 8
#: Most torch / BLAS threads (and ``cim-sweep`` worker processes): more than the cores only slows PPQ down (see
#: ``engine.threads``), and thousands of OpenMP threads hang or crash the process (10,000 hung, 100,000 segfaulted).
MAX_THREADS = 256
#: Most batches one argument asks for (``calib_steps``, ``analysis_steps``, ``verify``'s and ``cim-sweep``'s
#: ``batches``): random batches are made one at a time, but each is at least one forward of the model.
MAX_BATCHES = 100_000
#: Largest seed: numpy's legacy ``np.random.seed`` takes 0..2**32-1 (torch takes up to 2**64-1).
MAX_SEED = 2**32 - 1


def check_positive_int(value: object, argument: str, minimum: int = 1, maximum: int | None = None,
                       why: str = "") -> int:
    """Return ``value`` as int if it is an integer >= ``minimum`` (and <= ``maximum``, which ``why`` explains)."""
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)):
        raise InvalidTypeError(f"{argument}: expected an int >= {minimum}, got {value!r} ({type(value).__name__})")
    if value < minimum:
        raise InvalidArgumentError(f"{argument}: expected an int >= {minimum}, got {value!r}")
    if maximum is not None and value > maximum:
        raise InvalidArgumentError(f"{argument}: expected an int from {minimum} to {maximum}"
                                   + (f" ({why})" if why else "") + f", got {value!r}")
    return int(value)


def check_threads(value: object, argument: str = "threads") -> int:
    """Return a thread count in ``1..MAX_THREADS``."""
    return check_positive_int(value, argument, maximum=MAX_THREADS, why="more threads than cores only slow PPQ down")


def check_jobs(value: object, argument: str = "jobs") -> int:
    """Return a number of worker processes in ``1..MAX_THREADS``."""
    return check_positive_int(value, argument, maximum=MAX_THREADS, why="more processes than cores only slow it down")


def check_batches(value: object, argument: str) -> int:
    """Return a number of batches in ``1..MAX_BATCHES``."""
    return check_positive_int(value, argument, maximum=MAX_BATCHES, why="each batch is a forward of the model")


def check_seed(value: object, argument: str = "seed") -> int:
    """Return a seed in ``0..MAX_SEED``."""
    return check_positive_int(value, argument, minimum=0, maximum=MAX_SEED, why="the seeds numpy and torch accept")


def available_memory() -> int | None:
    """Bytes of memory available to a new allocation (Linux ``MemAvailable``), or None when unknown."""
    try:
        with open("/proc/meminfo", encoding="ascii") as handle:
            for line in handle:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    try:
        return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    except (OSError, ValueError, AttributeError):
        return None


def format_bytes(count: int) -> str:
    """``count`` bytes as a short figure with a binary unit (``'256.0 TiB'``; ``'2^80 B'`` past EiB)."""
    units = ("B", "KiB", "MiB", "GiB", "TiB", "PiB", "EiB")
    if count >= 1024 ** len(units):
        return f"2^{count.bit_length() - 1} B"
    power = 0
    while count >= 1024 ** (power + 1):
        power += 1
    return f"{count} B" if power == 0 else f"{count / 1024**power:.1f} {units[power]}"


def check_batch_memory(shapes: Mapping[str, Sequence[int]], itemsizes: Mapping[str, int], argument: str,
                       batches: int = 1) -> int:
    """Check that ``batches`` batches of ``shapes`` fit in the available memory; return their bytes.

    One batch is the least a run holds (activations take several times more), so this refuses the absurd before
    anything is allocated, with the figures: bytes needed and bytes available.

    Raises:
        InvalidArgumentError: the batches take more than the available memory.
    """
    needed = batches * sum(math.prod(int(d) for d in shape) * int(itemsizes[name]) for name, shape in shapes.items())
    available = available_memory()
    if available is not None and needed > available:
        listed = ", ".join(f"{name}:{','.join(str(int(d)) for d in shape)}" for name, shape in shapes.items())
        count = "one batch" if batches == 1 else f"{batches} batches"
        raise InvalidArgumentError(
            f"{argument}: {count} of {listed} take{'s' if batches == 1 else ''} {format_bytes(needed)} ({needed} "
            f"bytes), more than the {format_bytes(available)} ({available} bytes) of memory available; expected "
            f"{'smaller shapes' if batches == 1 else 'fewer or smaller batches'}")
    return needed


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
