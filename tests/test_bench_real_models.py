"""The corpus bench's recipe names (which layers a ``+...8`` suffix keeps at 8 bits) and calibration sources."""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import onnx
import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "bench"))

import real_models  # noqa: E402

from maptools.quantization.model import first_and_last_macs, output_operators  # noqa: E402

_MODEL = Path(real_models.__file__).resolve().parents[1] / "maptools" / "examples" / "data" / "digits_mobile.onnx"


@pytest.mark.parametrize(("suffix", "end", "both"), [("+first8", 0, None), ("+last8", -1, None),
                                                    ("+firstlast8", None, 8), ("", None, None)])
def test_a_suffix_keeps_the_first_or_last_mac_at_8_bits(suffix, end, both):
    proto = onnx.load(_MODEL)
    ends = first_and_last_macs(proto)
    assert len(ends) == 2 and ends[0] != ends[1]
    recipe, layer_bits, first_last_bits = real_models.kept_at_8(f"best:learned:seed=1{suffix}", proto)
    assert recipe == "best:learned:seed=1"
    assert layer_bits == (None if end is None else {ends[end]: 8})
    assert first_last_bits == both


def test_first4_rounds_the_first_mac_to_4_bit_weights_at_the_maps_activation_bits():
    """``+first4`` undoes ``best``'s 8-bit first layer for a comparison: 4-bit weights, the map's activations."""
    proto = onnx.load(_MODEL)
    first = first_and_last_macs(proto)[0]
    assert real_models.kept_at_8("best+first4", proto, 6) == ("best", {first: (4, 6)}, None)


def test_out8_and_outmap_set_the_output_operators_activation_bits():
    """``+out8`` gives the operators writing the outputs what ``default`` and ``best`` give them below 8-bit
    activations; ``+outmap`` puts them back at the map's activation bits."""
    proto = onnx.load(_MODEL)
    outputs = output_operators(proto)
    assert outputs and first_and_last_macs(proto)[-1] in outputs
    assert real_models.kept_at_8("default+out8", proto, 4, 4) == ("default", dict.fromkeys(outputs, (4, 8)), None)
    assert real_models.kept_at_8("best+outmap", proto, 4, 6) == ("best", dict.fromkeys(outputs, (6, 4)), None)


def test_a_recipes_seed_reaches_quantize():
    """``RoundingSettings.seed`` is replaced by quantize's seed: a recipe's ``seed=`` must reach quantize."""
    assert real_models.recipe_parts("best:learned:seed=2:iterations=50") == ("best", "learned", {"iterations": 50}, 2)
    assert real_models.recipe_parts("default") == ("default", None, {}, 0)


def test_calibration_from_the_evaluation_sources_never_reuses_an_evaluated_feed():
    """``--calib-from eval`` draws other crops of the evaluation photographs: none is a calibration-split crop or
    one of the evaluated crops; the default is the protocol's calibration split."""
    model = real_models.registry.get("efficientnet_lite1")
    protocol = real_models.calibration_feeds(model, 8)
    others = real_models.calibration_feeds(model, 8, "eval")
    evaluated = real_models.registry.inputs_for(model, "eval", count=64, seed=1)
    assert all(np.array_equal(a["input"], b["input"])
               for a, b in zip(protocol, real_models.registry.inputs_for(model, "calib", 8, seed=0), strict=True))
    assert all(np.array_equal(a["input"], b["input"])
               for a, b in zip(others, real_models.registry.inputs_for(model, "eval", 8, seed=8), strict=True))
    assert not any(np.array_equal(a["input"], b["input"]) for a in others for b in evaluated + protocol)
    with pytest.raises(ValueError, match="calibration source"):
        real_models.calibration_feeds(model, 8, "train")


def test_the_threads_option_reaches_quantize(monkeypatch, tmp_path):
    """``--threads N`` goes to every maptools ``quantize`` the bench runs (the peers keep one thread); without it
    quantize gets None, its own default."""
    seen: dict[str, object] = {}

    def run_model(*args, **kwargs):
        seen["run_model"] = kwargs["threads"]
        return []

    monkeypatch.setattr(real_models, "run_model", run_model)
    threads = torch.get_num_threads()
    try:  # the bench's main sets torch's threads for its process
        assert real_models.main(["--models", "efficientnet_lite1", "--threads", "2", "--out", "-"]) == 0
        assert seen.pop("run_model") == 2
        assert real_models.main(["--models", "efficientnet_lite1", "--out", "-"]) == 0
        assert seen.pop("run_model") is None
    finally:
        torch.set_num_threads(threads)

    class StopError(Exception):
        pass

    def quantize(*args, **kwargs):
        seen["quantize"] = kwargs["threads"]
        raise StopError

    monkeypatch.setattr(real_models, "quantize", quantize)
    model = real_models.registry.get("efficientnet_lite1")
    with pytest.raises(StopError):
        real_models._run_maptools(model, [], [], 4, 8, "default", tmp_path, threads=2)
    assert seen["quantize"] == 2


def test_each_row_names_its_feeds_by_digest_and_the_stack_by_version(monkeypatch, tmp_path):
    """A row carries the SHA-256 digests of its calibration and evaluation feeds (same data, same digest; one
    element one ulp away, another), and the stack's versions are those installed: the same code and seed gave
    other learned integers in another environment (benchmarks), so a row must say which data and stack it had."""
    from importlib.metadata import version

    model = real_models.registry.get("efficientnet_lite1")
    monkeypatch.setattr(real_models, "measure", lambda *args: {"cell": "-", "score": 0.0, "seconds": 0.0})
    rows = real_models.run_model(model, [(8, 8)], ["default"], [], 8, 2, tmp_path)
    calib = real_models.calibration_feeds(model, 8)
    assert rows[0]["calib_sha256"] == real_models.feeds_digest(calib) != rows[0]["eval_sha256"]
    assert len(rows[0]["calib_sha256"]) == 16
    nudged = [{"input": feed["input"].copy()} for feed in calib]
    nudged[3]["input"].flat[7] = np.nextafter(nudged[3]["input"].flat[7], np.float32(np.inf))
    assert real_models.feeds_digest(nudged) != real_models.feeds_digest(calib)
    assert real_models.feeds_digest([{"input": f["input"].astype(np.float64)} for f in calib]) != \
        real_models.feeds_digest(calib)
    stack = real_models.stack_versions()
    assert {"ppq", "torch", "numpy", "onnx", "onnxruntime"} <= set(stack)
    assert stack["numpy"] == version("numpy") == np.__version__ and stack["ppq"] == "0.6.6"
    assert real_models.cpu_model().strip()
