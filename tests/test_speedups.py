"""maptools' calibration speed-ups give PPQ's results to the bit, and leave PPQ untouched outside maptools."""

from __future__ import annotations

import contextlib

import pytest
import torch

from maptools.quantization import quantize
from maptools.quantization.engine import session as session_module
from maptools.quantization.engine.speedups import TopkPercentileObserver, fast_observers

FILES = ("quantinfo.pkl", "quantparams.pkl", "quant_model.onnx")


@pytest.mark.parametrize("kwargs", [
    {"recipe": "fast", "bit_width": 4},
    {"recipe": "fast", "bit_width": 8, "symmetrical": False, "observer": "minmax"},
    {"recipe": "default", "bit_width": 4},
    {"recipe": "default", "bit_width": 4, "symmetrical": False},
])
@pytest.mark.slow
def test_speedups_change_no_artifact_byte(tiny_onnx, tmp_path, monkeypatch, kwargs):
    def run(name):
        result = quantize({"input": [2, 3, 8, 8]}, "cpu", tiny_onnx, mapname=name, calib_steps=8,
                          mapsave_dir=tmp_path, analysis_steps=1, **kwargs)
        return {f: (result.directory / f).read_bytes() for f in FILES}

    fast = run("fast")
    monkeypatch.setattr(session_module, "accelerated_pipeline", lambda build: build)
    monkeypatch.setattr(session_module, "fast_observers", contextlib.nullcontext)
    plain = run("plain")
    for name in FILES:
        assert fast[name] == plain[name], name


def test_topk_percentile_observer_equals_ppqs():
    from ppq.core import (
        QuantizationPolicy,
        QuantizationProperty,
        QuantizationStates,
        TensorQuantizationConfig,
    )
    from ppq.IR import Variable
    from ppq.quantization.observer.range import TorchPercentileObserver

    generator = torch.Generator().manual_seed(0)
    tensors = [torch.randn(1, 64, 56, 56, generator=generator), torch.relu(torch.randn(3, 7, generator=generator)),
               torch.zeros(5), torch.tensor([2.0]), torch.randint(-3, 3, (1000,), generator=generator).float()]

    def observed(cls):
        results = []
        for tensor in tensors:
            config = TensorQuantizationConfig(
                policy=QuantizationPolicy(QuantizationProperty.SYMMETRICAL + QuantizationProperty.LINEAR
                                          + QuantizationProperty.PER_TENSOR),
                rounding=None, num_of_bits=8, quant_min=-128, quant_max=127, exponent_bits=0, scale=None,
                offset=None, observer_algorithm="percentile", state=QuantizationStates.INITIAL)
            observer = cls(Variable(name="x"), config)
            observer.observe(tensor)
            results.append(observer._percentile_collector[0])
        return results

    for ours, ppqs in zip(observed(TopkPercentileObserver), observed(TorchPercentileObserver), strict=True):
        assert torch.equal(ours, ppqs)


def test_fast_observers_are_scoped():
    from ppq.quantization.observer import OBSERVER_TABLE
    from ppq.quantization.observer.range import TorchPercentileObserver

    assert OBSERVER_TABLE["percentile"] is TorchPercentileObserver
    with fast_observers():
        assert OBSERVER_TABLE["percentile"] is TopkPercentileObserver
    assert OBSERVER_TABLE["percentile"] is TorchPercentileObserver


def test_vectorized_mse_loss_equals_ppqs_to_the_bit():
    import numpy as np
    from ppq.quantization.observer.range import TorchMSEObserver

    from maptools.quantization.engine.speedups import vectorized_mse_loss

    assert TorchMSEObserver.compute_mse_loss is not vectorized_mse_loss  # installed only while maptools runs
    observer = TorchMSEObserver.__new__(TorchMSEObserver)
    generator = np.random.default_rng(0)
    checked = 0
    for lam, used in ((0.5, 2048), (40.0, 300), (5000.0, 17)):
        histogram = [int(v) for v in generator.poisson(lam, 2048) * (np.arange(2048) < used)]
        for levels in (8, 16, 256):
            for start in (0, 8, 600):
                for step in range(1, 2048 // levels + 1, 13):
                    end = start + levels * step
                    assert vectorized_mse_loss(observer, histogram, start, step, end) == \
                        TorchMSEObserver.compute_mse_loss(observer, histogram, start, step, end)
                    checked += 1
    assert checked > 200
