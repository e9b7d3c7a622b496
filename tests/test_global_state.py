"""quantize leaves the caller's global random generators as it found them (issue 24 item 6)."""

from __future__ import annotations

import random
import sys
from pathlib import Path

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


def _ppq_globals() -> dict:
    """PPQ's process-wide tables and the methods maptools builds on, by identity."""
    from ppq.executor.base import OPERATION_FORWARD_TABLE
    from ppq.quantization.observer import OBSERVER_TABLE
    from ppq.quantization.observer.range import TorchMSEObserver, TorchPercentileObserver
    from ppq.quantization.optim import training

    return {"observers": dict(OBSERVER_TABLE), "forwards": {p: dict(t) for p, t in OPERATION_FORWARD_TABLE.items()},
            "methods": (TorchMSEObserver.compute_mse_loss, TorchPercentileObserver.observe),
            "lsq_delegator": training.LSQDelegator}


def _plain_ppq_scales(model: Path) -> dict[str, list[float]]:
    """Quantize ``model`` with PPQ alone (its TensorRT quantizer and setting, percentile): every config's scale."""
    from ppq.api import QuantizationSettingFactory, quantize_onnx_model
    from ppq.core import TargetPlatform

    from maptools.quantization.engine.quiet import ppq_silenced

    setting = QuantizationSettingFactory.trt_setting()
    generator = torch.Generator().manual_seed(0)
    batches = [torch.randn(2, 3, 8, 8, generator=generator) for _ in range(8)]
    with ppq_silenced():
        graph = quantize_onnx_model(str(model), batches, calib_steps=8, input_shape=[2, 3, 8, 8],
                                    platform=TargetPlatform.TRT_INT8, setting=setting, device="cpu")
    return {f"{op.name}:{var.name}": config.scale.flatten().tolist()
            for op in graph.operations.values() if hasattr(op, "config")
            for config, var in op.config_with_variable if config.scale is not None}


def test_quantize_changes_nothing_in_ppq(tiny_onnx, tmp_path):
    """maptools passes its own passes and observers to PPQ: after quantize (``default``: the faster calibration,
    MSE observers, the PRelu fix) PPQ's tables and methods are the same objects, and PPQ alone quantizes as before."""
    from maptools.quantization.engine import facade  # PPQ itself, as maptools imports it

    assert facade.import_ppq() is sys.modules["ppq"]
    before = _ppq_globals()
    plain = _plain_ppq_scales(tiny_onnx)
    quantize({"input": [2, 3, 8, 8]}, "cpu", tiny_onnx, mapname="m", calib_steps=8, mapsave_dir=tmp_path,
             recipe="default", bit_width=4, analysis_steps=1)
    assert _ppq_globals() == before
    assert _plain_ppq_scales(tiny_onnx) == plain
    assert len(plain) >= 6
