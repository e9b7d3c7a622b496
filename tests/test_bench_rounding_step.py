"""The step benchmark's shapes: read from the corpus model, not written by hand."""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "bench"))

import rounding_step  # noqa: E402


def test_lite1s_depthwise_layers_are_read_from_the_model():
    """EfficientNet-Lite1 at 240 x 240: 21 depthwise Convs in 12 shapes, from the 32-channel 3 x 3 of block 0 on a
    120 x 120 map to the 1,152-channel 5 x 5 ones on 8 x 8 (the list the benchmark's JSON was measured on)."""
    shapes = rounding_step.depthwise_shapes("efficientnet_lite1")
    assert len(shapes) == 12 and sum(count for *_, count in shapes) == 21
    assert shapes[0] == (32, 9, 120 * 120, 1)
    assert (1152, 25, 64, 4) in shapes and (672, 25, 225, 3) in shapes
    assert {taps for _, taps, _, _ in shapes} == {9, 25}
