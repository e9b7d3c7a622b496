"""maptools' calibration speed-ups give PPQ's results to the bit, and change nothing in PPQ."""

from __future__ import annotations

import pytest
import torch

from maptools.quantization import quantize
from maptools.quantization.engine.facade import RuntimeCalibrationPass, TorchMSEObserver, TorchPercentileObserver
from maptools.quantization.engine.quantizer import LowBitQuantizer
from maptools.quantization.engine.speedups import FastCalibrationPass, TopkPercentileObserver, vectorized_mse_loss

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
    monkeypatch.setattr(LowBitQuantizer, "calibration_pass", RuntimeCalibrationPass)  # PPQ's own pass
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


@pytest.mark.parametrize(("recipe", "observer_type"), [("fast", TopkPercentileObserver), ("default", TorchMSEObserver)])
def test_fast_observers_are_maptools_instances_not_a_patch(tiny_onnx, tmp_path, monkeypatch, recipe, observer_type):
    """While maptools calibrates, PPQ's observer table and observer methods are PPQ's own; the pass's observers
    are maptools' (a TopkPercentileObserver, an MSE observer with vectorized_mse_loss bound to the instance)."""
    from ppq.quantization.observer import OBSERVER_TABLE

    table = dict(OBSERVER_TABLE)
    ppq_methods = (TorchMSEObserver.compute_mse_loss, TorchPercentileObserver.observe)
    seen = []
    calibrate = FastCalibrationPass.calibrate

    def spy(self, *args, **kwargs):
        calibrate(self, *args, **kwargs)
        observers = [o for op in self._observers.values() for o in op._hook._observer_table.values()]
        seen.append((dict(OBSERVER_TABLE), (TorchMSEObserver.compute_mse_loss, TorchPercentileObserver.observe),
                     observers))

    monkeypatch.setattr(FastCalibrationPass, "calibrate", spy)
    quantize({"input": [2, 3, 8, 8]}, "cpu", tiny_onnx, mapname="m", calib_steps=8, mapsave_dir=tmp_path,
             analysis_steps=1, recipe=recipe, bit_width=4)
    assert seen
    for during_table, during_methods, observers in seen:
        assert during_table == table and during_methods == ppq_methods
        ours = [o for o in observers if type(o) is observer_type]
        assert ours
        if observer_type is TorchMSEObserver:
            assert all(o.compute_mse_loss.__func__ is vectorized_mse_loss for o in ours)


def test_vectorized_mse_loss_equals_ppqs_to_the_bit():
    import numpy as np

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
