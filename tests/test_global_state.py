"""quantize leaves the caller's global random generators as it found them (issue 24 item 6)."""

from __future__ import annotations

import random

import numpy as np
import torch

from maptools.quantization import quantize


def _draws() -> tuple[float, float, float]:
    return random.random(), float(np.random.random()), float(torch.rand(1))


def test_quantize_leaves_the_global_generators_as_it_found_them(tiny_onnx, tmp_path):
    """PPQ draws from Python's, numpy's and torch's global generators, which quantize seeds with ``seed``; the
    caller's streams continue afterwards as if quantize had not run, and the map is the same either way."""
    shapes = {"input": [1, 3, 8, 8]}
    random.seed(7), np.random.seed(7), torch.manual_seed(7)
    expected = _draws()
    random.seed(7), np.random.seed(7), torch.manual_seed(7)
    first = quantize(shapes, "cpu", tiny_onnx, mapname="a", calib_steps=8, mapsave_dir=tmp_path, recipe="fast")
    assert _draws() == expected
    random.seed(1), np.random.seed(1), torch.manual_seed(1)  # another caller state: the same map
    second = quantize(shapes, "cpu", tiny_onnx, mapname="b", calib_steps=8, mapsave_dir=tmp_path, recipe="fast")
    assert first.quantparams_path.read_bytes() == second.quantparams_path.read_bytes()
    assert first.quantinfo_path.read_bytes() == second.quantinfo_path.read_bytes()
