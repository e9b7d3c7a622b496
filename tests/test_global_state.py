"""quantize leaves the caller's global random generators and PPQ as it found them (issue 24 item 6)."""

from __future__ import annotations

import random
import sys
from pathlib import Path

import numpy as np
import onnx
import torch
from onnx import TensorProto, helper, numpy_helper

from maptools.quantization import quantize
from maptools.quantization.engine.operators import FIXED_OPERATORS, prelu_forward
from maptools.quantization.engine.quantizer import IntegerZeroPointLSQPass
from maptools.quantization.pipeline import seeded_cuda_devices, seeded_globals


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



class _FakeCuda:
    """Two CUDA devices' generator states, as ``torch.cuda`` hands them to ``fork_rng`` and ``manual_seed``."""

    def __init__(self) -> None:
        self.states = {0: torch.tensor([10], dtype=torch.uint8), 1: torch.tensor([11], dtype=torch.uint8)}
        self.seeded: list[int] = []

    def get_rng_state(self, device: int = 0) -> torch.Tensor:
        return self.states[int(device)].clone()

    def set_rng_state(self, state: torch.Tensor, device: int = 0) -> None:
        self.states[int(device)] = state.clone()

    def manual_seed_all(self, seed: int) -> None:
        self.seeded.append(seed)
        for device in self.states:
            self.states[device] = torch.tensor([seed % 256], dtype=torch.uint8)


def test_seeding_gives_every_cuda_generator_back(monkeypatch):
    """``torch.manual_seed`` reseeds every CUDA device too: with CUDA present (faked: no GPU in the suite), the
    seeded block runs on the seed on both devices, and each device's state is given back afterwards."""
    fake = _FakeCuda()
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    for name in ("get_rng_state", "set_rng_state", "manual_seed_all"):
        monkeypatch.setattr(torch.cuda, name, getattr(fake, name))
    assert seeded_cuda_devices() == [0, 1]
    cpu_before = torch.random.get_rng_state()
    with seeded_globals(1234):
        assert fake.seeded == [1234] and [int(fake.states[d]) for d in (0, 1)] == [1234 % 256] * 2
    assert [int(fake.states[d]) for d in (0, 1)] == [10, 11]
    assert torch.equal(torch.random.get_rng_state(), cpu_before)


def test_without_cuda_no_device_generator_is_touched(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert seeded_cuda_devices() == []
    random.seed(3), np.random.seed(3), torch.manual_seed(3)
    expected = _draws()
    random.seed(3), np.random.seed(3), torch.manual_seed(3)
    with seeded_globals(5):
        inside = _draws()
    assert _draws() == expected and inside != expected

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


def _prelu_onnx(path: Path) -> Path:
    """Conv -> PRelu (slope [C, 1, 1], as torch's exporter writes it) -> Conv, input 'input' [1, 3, 8, 8]."""
    rng = np.random.default_rng(0)
    inits = {"w1": rng.normal(0, 0.3, (4, 3, 3, 3)), "b1": rng.normal(0, 0.1, (4,)),
             "slope": rng.uniform(0.1, 0.3, (4, 1, 1)), "w2": rng.normal(0, 0.3, (2, 4, 3, 3)),
             "b2": rng.normal(0, 0.1, (2,))}
    nodes = [helper.make_node("Conv", ["input", "w1", "b1"], ["c"], name="conv1", pads=[1, 1, 1, 1]),
             helper.make_node("PRelu", ["c", "slope"], ["p"], name="prelu"),
             helper.make_node("Conv", ["p", "w2", "b2"], ["out"], name="conv2", pads=[1, 1, 1, 1])]
    graph = helper.make_graph(nodes, "prelu", [helper.make_tensor_value_info("input", TensorProto.FLOAT, [1, 3, 8, 8])],
                              [helper.make_tensor_value_info("out", TensorProto.FLOAT, [1, 2, 8, 8])],
                              [numpy_helper.from_array(v.astype(np.float32), k) for k, v in inits.items()])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)])
    model.ir_version = 8
    onnx.save(model, str(path))
    return path


def test_ppq_is_unchanged_during_quantize_too(tmp_path, monkeypatch):
    """Inside maptools' call as well (in its PRelu, which PPQ 0.6.6 cannot execute itself, and in its LSQ pass)
    PPQ's tables and methods are PPQ's own objects; LSQ leaves the zero points as calibrated."""
    before = _ppq_globals()
    seen: list[tuple[str, bool]] = []
    offsets: list[tuple[torch.Tensor, torch.Tensor]] = []

    def prelu_spy(*args, **kwargs):
        seen.append(("prelu", _ppq_globals() == before))
        return prelu_forward(*args, **kwargs)

    enable = IntegerZeroPointLSQPass.enable_block_gradient

    def lsq_spy(self, block):
        seen.append(("lsq", _ppq_globals() == before))
        offsets.extend((config.offset, config.offset.detach().clone()) for op in block.rps
                       if hasattr(op, "config_with_variable") for config, _ in op.config_with_variable
                       if isinstance(config.offset, torch.Tensor))
        enable(self, block)

    monkeypatch.setitem(FIXED_OPERATORS, "PRelu", prelu_spy)
    monkeypatch.setattr(IntegerZeroPointLSQPass, "enable_block_gradient", lsq_spy)
    generator = np.random.default_rng(0)
    calib = [{"input": generator.standard_normal((1, 3, 8, 8)).astype(np.float32)} for _ in range(8)]
    result = quantize({"input": [1, 3, 8, 8]}, "cpu", _prelu_onnx(tmp_path / "prelu.onnx"), mapname="p",
                      calibset=calib, calib_steps=8, mapsave_dir=tmp_path, recipe="best", symmetrical=False)
    assert {kind for kind, _ in seen} == {"prelu", "lsq"}
    assert all(same for _, same in seen)
    assert result.output_snr_db["out"] > 30.0
    moved = [(now, then) for now, then in offsets if not torch.equal(now, then)]
    assert len(offsets) >= 4 and any(then.abs().max() > 0 for _, then in offsets) and not moved
