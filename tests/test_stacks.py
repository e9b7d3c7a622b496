"""The oldest supported stack (.ci/oldest-stack.txt) writes the same artifacts as the newest, byte for byte.

``make test`` builds a second virtualenv with the oldest onnx, protobuf, onnxruntime and numpy maptools
supports and points ``MAPTOOLS_OLDEST_PYTHON`` at its interpreter. This test quantizes the bundled models
with that interpreter and with this one (same settings, same seed) and compares the artifacts (the three
for the mapper and ``ppq_state.json``).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from maptools.examples import digits, mobile
from maptools.quantization.artifacts import PPQSTATE, QUANTINFO, QUANTMODEL, QUANTPARAMS

pytestmark = pytest.mark.slow  # quantizes in a second interpreter on the oldest stack

OLDEST_PYTHON = os.environ.get("MAPTOOLS_OLDEST_PYTHON")
ARTIFACTS = (QUANTINFO, QUANTPARAMS, QUANTMODEL, PPQSTATE)
#: (model, input shape, extra CLI arguments): the default recipe at 4 bits on both bundled models, one of
#: them with asymmetric activations, and 8 bits with the fast recipe.
CASES = {
    "digits_w4a4": (digits.MODEL_PATH, digits.INPUT_SHAPE, ["--bits", "4"]),
    "digits_w8a8_asym_fast": (digits.MODEL_PATH, digits.INPUT_SHAPE, ["--bits", "8", "--asymmetric",
                                                                      "--recipe", "fast"]),
    "mobile_w4a8": (mobile.MODEL_PATH, mobile.INPUT_SHAPE, ["--weight-bits", "4", "--act-bits", "8"]),
}


def _versions(python: str) -> dict[str, str]:
    code = ("import json, importlib.metadata as m; print(json.dumps({p: m.version(p) for p in "
            "('onnx', 'protobuf', 'onnxruntime', 'numpy', 'ppq', 'torch')}))")
    return json.loads(subprocess.run([python, "-c", code], capture_output=True, text=True, check=True).stdout)


def _quantize(python: str, mapsave: Path, name: str) -> dict[str, bytes]:
    model, shape, extra = CASES[name]
    command = [python, "-m", "maptools", "quantize", str(model), "--input", f"input:{','.join(map(str, shape))}",
               "--mapname", name, "--calib-steps", "8", "--mapsave-dir", str(mapsave), *extra]
    done = subprocess.run(command, capture_output=True, text=True, timeout=600, check=False)
    assert done.returncode == 0, f"{python}: {done.stderr[-2000:]}"
    return {artifact: (mapsave / name / artifact).read_bytes() for artifact in ARTIFACTS}


@pytest.mark.skipif(not OLDEST_PYTHON, reason="MAPTOOLS_OLDEST_PYTHON is not set: `make test` builds the "
                                              "oldest-stack virtualenv and sets it")
def test_oldest_and_newest_stack_write_identical_artifacts(tmp_path: Path) -> None:
    oldest, newest = _versions(OLDEST_PYTHON), _versions(sys.executable)
    assert oldest["onnx"] != newest["onnx"] and oldest["protobuf"] != newest["protobuf"], (oldest, newest)
    assert oldest["ppq"] == newest["ppq"] == "0.6.6"
    for name in CASES:
        old = _quantize(OLDEST_PYTHON, tmp_path / "oldest", name)
        new = _quantize(sys.executable, tmp_path / "newest", name)
        for artifact in ARTIFACTS:
            assert old[artifact] == new[artifact], (
                f"{name}: {artifact} differs between onnx {oldest['onnx']} / protobuf {oldest['protobuf']} and "
                f"onnx {newest['onnx']} / protobuf {newest['protobuf']}")
