"""Sliding windows over the spatial axes of ``(N, C, *spatial)`` tensors: pads, window slices, pooling."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import Any

import numpy as np

from maptools.quantization.reference.registry import string_attr

__all__ = ["pool", "spatial_pads", "window_slices"]


def spatial_pads(node_attrs: dict[str, Any], in_sizes: list[int], kernel: list[int], strides: list[int],
                 dilations: list[int]) -> list[int]:
    """Explicit ``[begin..., end...]`` pads from the ``pads`` / ``auto_pad`` attributes of a Conv or pool."""
    dims = len(in_sizes)
    auto_pad = string_attr(node_attrs, "auto_pad", "NOTSET")
    if auto_pad in ("NOTSET", ""):
        pads = list(node_attrs.get("pads", [0] * (2 * dims)))
        return pads if pads else [0] * (2 * dims)
    if auto_pad == "VALID":
        return [0] * (2 * dims)
    begin, end = [], []
    for size, k, s, d in zip(in_sizes, kernel, strides, dilations, strict=True):
        out = -(-size // s)
        total = max(0, (out - 1) * s + (k - 1) * d + 1 - size)
        small, large = total // 2, total - total // 2
        begin.append(small if auto_pad == "SAME_UPPER" else large)
        end.append(large if auto_pad == "SAME_UPPER" else small)
    return begin + end


def window_slices(kernel: list[int], strides: list[int], dilations: list[int],
                  out_sizes: list[int]) -> Iterator[tuple[tuple[int, ...], tuple[slice, ...]]]:
    """Yield ``(kernel offset, tuple of spatial slices)`` for every kernel position."""
    for offset in np.ndindex(*kernel):
        slices = tuple(
            slice(o * d, o * d + s * (n - 1) + 1, s)
            for o, s, d, n in zip(offset, strides, dilations, out_sizes, strict=True)
        )
        yield offset, slices


def pool(x: np.ndarray, kernel: list[int], strides: list[int], pads: list[int], dilations: list[int],
         ceil_mode: bool, reduce: Callable[[np.ndarray, np.ndarray], np.ndarray], pad_value: float,
         extra_value: float | None = None) -> np.ndarray:
    """Sliding-window reduction over the spatial axes of ``x``, ``(N, C, *spatial)``.

    ``pad_value`` fills the explicit pads, ``extra_value`` (default ``pad_value``) the extra end padding
    ``ceil_mode`` may need.
    """
    dims = len(kernel)
    sizes = list(x.shape[2:])
    begin, end = pads[:dims], pads[dims:]
    out_sizes, extra = [], []
    for size, k, s, d, b, e in zip(sizes, kernel, strides, dilations, begin, end, strict=True):
        span = (k - 1) * d + 1
        total = size + b + e - span
        out = (-(-total // s) if ceil_mode else total // s) + 1
        if ceil_mode and (out - 1) * s >= size + b:
            out -= 1
        out_sizes.append(out)
        extra.append(max(0, (out - 1) * s + span - (size + b + e)))
    widths = [(0, 0), (0, 0)] + [(b, e) for b, e in zip(begin, end, strict=True)]
    xp = np.pad(x, widths, constant_values=pad_value)
    if any(extra):
        fill = pad_value if extra_value is None else extra_value
        xp = np.pad(xp, [(0, 0), (0, 0)] + [(0, n) for n in extra], constant_values=fill)
    result = None
    for _, slices in window_slices(kernel, strides, dilations, out_sizes):
        window = xp[(slice(None), slice(None)) + slices]
        result = window.copy() if result is None else reduce(result, window)
    return result
