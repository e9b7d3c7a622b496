"""PPQ's simulation rebuilt from ``ppq_state.json`` equals the quantizing session's to the bit; no map is unpickled.

Each case quantizes a model through :func:`~maptools.quantization.quantize` (keeping the PPQ session that
wrote the map), rebuilds the session from the map with :func:`~maptools.quantization.replay.ppq_session` and
compares the two forwards with ``np.array_equal`` on held-out batches.
"""

from __future__ import annotations

import json
import os
import pickle
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from maptools import ArtifactError, UnsafeArtifactError
from maptools.examples import digits, mobile
from maptools.quantization import quantize, read_quantinfo, read_quantparams, simulate, verify
from maptools.quantization.artifacts import MANIFEST, PPQGRAPH, PPQSTATE, QUANTINFO, QUANTPARAMS, sha256_of
from maptools.quantization.engine import PPQSession
from maptools.quantization.replay import ppq_session

SHAPE = list(digits.INPUT_SHAPE)
MIXED = {"/stem/stem.0/Conv": (8, 8), "/block1/Add": (4, 8)}
#: name -> (model, quantize keyword arguments)
CASES = {
    "digits_w8a8_fast": (digits.MODEL_PATH, {"bit_width": 8, "recipe": "fast"}),
    "digits_w4a4_default_unsigned": (digits.MODEL_PATH, {"bit_width": 4}),
    "digits_w4a4_asymmetric": (digits.MODEL_PATH, {"bit_width": 4, "symmetrical": False}),
    "mobile_w4a4_best": (mobile.MODEL_PATH, {"bit_width": 4, "recipe": "best"}),
    "digits_w8a8_kl": (digits.MODEL_PATH, {"bit_width": 8, "recipe": "fast", "observer": "kl"}),
    "mobile_w4a4_fast_unsigned": (mobile.MODEL_PATH, {"bit_width": 4, "recipe": "fast",
                                                      "unsigned_nonnegative": True}),
    "mobile_w4a4_mixed": (mobile.MODEL_PATH, {"bit_width": 4, "layer_bits": MIXED}),
    "mobile_w8a8_per_tensor": (mobile.MODEL_PATH, {"bit_width": 8, "per_channel": False}),
}


@pytest.fixture
def sessions(monkeypatch) -> list[PPQSession]:
    """The PPQ sessions that write maps during the test (captured when their state is saved)."""
    captured: list[PPQSession] = []
    original = PPQSession.to_state

    def to_state(self, quantparams):
        captured.append(self)
        return original(self, quantparams)

    monkeypatch.setattr(PPQSession, "to_state", to_state)
    return captured


@pytest.fixture(scope="module")
def digits_batches() -> tuple[list[dict[str, np.ndarray]], list[dict[str, torch.Tensor]]]:
    """(16 calibration batches of training digits, 3 held-out batches of test digits as tensors)."""
    train, _ = digits.load_split("train")
    test, _ = digits.load_split("test")
    calib = [{"input": train[i:i + 16]} for i in range(0, 16 * 16, 16)]
    held_out = [{"input": torch.from_numpy(np.ascontiguousarray(test[i:i + 16]))} for i in range(0, 48, 16)]
    return calib, held_out


def assert_same_simulation(original: PPQSession, rebuilt: PPQSession, batches: list[dict[str, torch.Tensor]]) -> None:
    """The rebuilt session computes the original's outputs bit for bit, and they are quantized ones."""
    differs_from_fp32 = False
    for batch in batches:
        want, got = original.forward(batch), rebuilt.forward(batch)
        assert list(got) == list(want)
        for name in want:
            assert got[name].dtype == want[name].dtype and np.array_equal(got[name], want[name]), (
                f"output {name!r}: max difference {np.abs(got[name] - want[name]).max()}")
        fp32 = rebuilt.forward(batch, quantized=False)
        differs_from_fp32 |= any(not np.array_equal(fp32[name], got[name]) for name in got)
    assert differs_from_fp32, "the rebuilt session does not quantize"


@pytest.mark.slow
@pytest.mark.parametrize("case", list(CASES))
def test_rebuilt_ppq_session_equals_the_original(case, tmp_path, sessions, digits_batches):
    model, kwargs = CASES[case]
    calib, held_out = digits_batches
    result = quantize({"input": SHAPE}, "cpu", model, mapname=case, calibset=calib, calib_steps=8,
                      analysis_steps=1, mapsave_dir=tmp_path, **kwargs)
    (original,) = sessions
    assert_same_simulation(original, ppq_session(case, tmp_path), held_out)
    names = {path.name for path in result.directory.iterdir()}
    assert PPQSTATE in names and PPQGRAPH not in names
    manifest = json.loads((result.directory / MANIFEST).read_text())
    assert manifest["format_version"] == "2.0" and set(manifest["files"]) == names - {MANIFEST}
    state = json.loads((result.directory / PPQSTATE).read_text())
    weights = [name for name, record in read_quantinfo(case, tmp_path).items() if record.weight_bits is not None]
    from_integers = [entry["quantparams"] for entry in state["parameters"].values() if "quantparams" in entry]
    # every weight comes back from its integers in quantparams.pkl (not stored twice)
    assert {key.rsplit("_", 2)[0] for key in from_integers if key.endswith("_weight")} == set(weights)


def test_final_concat_and_prelu_models(tmp_path, sessions):
    from test_rewrites import _calib, _conv, _detector_head, _model, _save

    inits: dict[str, np.ndarray] = {"slope": np.random.default_rng(1).uniform(0.1, 0.3, (6, 1, 1)).astype(np.float32)}
    nodes = [_conv("conv1", "input", "c1", 3, 6, inits),
             __import__("onnx").helper.make_node("PRelu", ["c1", "slope"], ["p"], name="prelu"),
             _conv("conv2", "p", "out", 6, 2, inits)]
    models = {"head": (_save(_detector_head(final=True), tmp_path / "head.onnx"), [1, 3, 8, 8]),
              "pnet": (_save(_model(nodes, {"input": [1, 3, 12, 12]}, ["out"], inits), tmp_path / "pnet.onnx"),
                       [1, 3, 12, 12])}
    for index, (name, (path, shape)) in enumerate(models.items()):
        quantize({"input": shape}, "cpu", path, mapname=name, calibset=_calib(shape, 10), calib_steps=8,
                 analysis_steps=1, mapsave_dir=tmp_path)
        batches = [{k: torch.from_numpy(v) for k, v in b.items()} for b in _calib(shape, 3, seed=7)]
        assert_same_simulation(sessions[index], ppq_session(name, tmp_path), batches)
    assert "head_concat" in sessions[0].final_concats[0].float_nodes


def test_ppq_state_is_small(tmp_path):
    result = quantize({"input": SHAPE}, "cpu", digits.MODEL_PATH, mapname="d", calib_steps=8, analysis_steps=1,
                      mapsave_dir=tmp_path, recipe="fast")
    size = (result.directory / PPQSTATE).stat().st_size
    assert size < 2 * (result.directory / QUANTINFO).stat().st_size + 32_000, size  # the 1.0 pickle: 344 kB


# -- nothing is unpickled with code-executing pickle, by any command -----------------------------------------
class Exploit:
    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def _as_format_1_0(directory: Path, graph_pickle: bytes) -> None:
    """Turn a map into one of format 1.0: ppq_graph.pkl instead of ppq_state.json, hashes rewritten to match."""
    (directory / PPQSTATE).unlink()
    (directory / PPQGRAPH).write_bytes(graph_pickle)
    manifest = json.loads((directory / MANIFEST).read_text())
    manifest["format_version"] = "1.0"
    manifest["versions"]["maptools"] = "0.1.0"
    del manifest["files"][PPQSTATE]
    manifest["files"][PPQGRAPH] = {"sha256": sha256_of(graph_pickle), "bytes": len(graph_pickle)}
    (directory / MANIFEST).write_text(json.dumps(manifest))


def _poison(directory: Path, filename: str, payload: bytes) -> None:
    (directory / filename).write_bytes(payload)
    manifest = json.loads((directory / MANIFEST).read_text())
    manifest["files"][filename] = {"sha256": sha256_of(payload), "bytes": len(payload)}
    (directory / MANIFEST).write_text(json.dumps(manifest))


def _cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "maptools", *args], capture_output=True, text=True, timeout=300,
                          check=False)


def test_format_1_0_map_loads_and_verify_never_unpickles_its_graph(tmp_path):
    quantize({"input": [1, *SHAPE[1:]]}, "cpu", digits.MODEL_PATH, mapname="old", calib_steps=8, analysis_steps=1,
             mapsave_dir=tmp_path, recipe="fast")
    marker = tmp_path / "pwned"
    directory = tmp_path / "old"
    _as_format_1_0(directory, pickle.dumps({"graph": Exploit(marker)}))
    # the loaders of format 1.0 maps still work
    info, params = read_quantinfo("old", tmp_path), read_quantparams("old", tmp_path)
    assert info["/stem/stem.0/Conv"].weight_bits == 8 and params["/stem/stem.0/Conv_conv_weight"].dtype == np.int8
    images, _ = digits.load_split("test")
    assert simulate("old", {"input": images[:1]}, mapsave_dir=tmp_path)["logits"].shape == (1, 10)
    report = verify("old", mapsave_dir=tmp_path)
    reason = ("LegacyGraphError: this map keeps PPQ's graph as a pickle (ppq_graph.pkl, format 1.0, written by "
              "maptools 0.1.0); verify no longer unpickles it: re-quantize to compare with PPQ")
    assert report.failures == {"ppq": reason}
    assert report.get("fp32", "ppq").not_run == f"ppq: {reason}" and len(report.ran_pairs) == 3
    assert report.get("onnxruntime", "integer").within_one_step >= 0.99
    done = _cli("verify", "old", "--mapsave-dir", str(tmp_path))
    assert done.returncode == 0 and "ppq could not run: LegacyGraphError: this map keeps PPQ's graph as a pickle" \
        in done.stdout, done.stderr
    done = _cli("inspect", "old", "--mapsave-dir", str(tmp_path))
    assert done.returncode == 0 and "/stem/stem.0/Conv" in done.stdout
    assert not marker.exists()
    # every pickle poisoned too: every reader refuses, nothing runs
    for filename in (QUANTINFO, QUANTPARAMS):
        _poison(directory, filename, pickle.dumps({"x": Exploit(marker)}))
    for reader in (read_quantinfo, read_quantparams):
        with pytest.raises(UnsafeArtifactError, match="refusing to load (posix|os).system"):
            reader("old", tmp_path)
    with pytest.raises(UnsafeArtifactError):
        simulate("old", {"input": images[:1]}, mapsave_dir=tmp_path)
    with pytest.raises(UnsafeArtifactError):
        verify("old", mapsave_dir=tmp_path)
    for command in ("verify", "inspect"):
        done = _cli(command, "old", "--mapsave-dir", str(tmp_path))
        assert done.returncode == 2 and "refusing to load" in done.stderr, (command, done.stderr)
    assert not marker.exists()


def test_malformed_state_is_an_artifact_error(tmp_path):
    quantize({"input": SHAPE}, "cpu", digits.MODEL_PATH, mapname="m", calib_steps=8, analysis_steps=1,
             mapsave_dir=tmp_path, recipe="fast")
    state = json.loads((tmp_path / "m" / PPQSTATE).read_text())
    name, entry = next((n, e) for n, e in state["operations"].items() if "quantization" in e)
    entry["quantization"]["outputs"][0]["scale"]["dtype"] = "|O"
    _poison(tmp_path / "m", PPQSTATE, json.dumps(state).encode())
    with pytest.raises(ArtifactError, match=f"{name} output 0 scale: dtype object"):
        ppq_session("m", tmp_path)
    report = verify("m", mapsave_dir=tmp_path)
    assert report.failures["ppq"].startswith("ArtifactError: ") and len(report.ran_pairs) == 3
