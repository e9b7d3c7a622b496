"""Artifacts: safe loading, manifest checks, atomic writes that survive SIGKILL."""

from __future__ import annotations

import json
import os
import pickle
import re
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

from maptools import ArtifactError, MapNotFoundError, UnsafeArtifactError
from maptools.quantization import quantize, read_quantinfo, read_quantparams
from maptools.quantization.artifacts import MANIFEST, resolve_map, sha256_of

pytestmark = pytest.mark.stack  # also run on the oldest supported stack (make test)

SHAPES = {"input": [2, 3, 8, 8]}


@pytest.fixture
def saved(tmp_path, tiny_onnx) -> Path:
    root = tmp_path / "mapsave"
    quantize(SHAPES, "cpu", tiny_onnx, mapname="m", calib_steps=8, bit_width=4, mapsave_dir=root, recipe="fast")
    return root


def rewrite_manifest(directory: Path, filename: str) -> None:
    manifest = json.loads((directory / MANIFEST).read_text())
    data = (directory / filename).read_bytes()
    manifest["files"][filename] = {"sha256": sha256_of(data), "bytes": len(data)}  # the size is checked too
    (directory / MANIFEST).write_text(json.dumps(manifest))


class Exploit:
    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


@pytest.mark.parametrize("filename,reader", [("quantinfo.pkl", read_quantinfo), ("quantparams.pkl", read_quantparams)])
def test_crafted_pickle_runs_nothing(saved, tmp_path, filename, reader):
    marker = tmp_path / "pwned"
    (saved / "m" / filename).write_bytes(pickle.dumps({"x": Exploit(marker)}))
    rewrite_manifest(saved / "m", filename)  # even with a matching checksum the unpickler refuses
    with pytest.raises(UnsafeArtifactError, match="posix.system|os.system"):
        reader("m", saved)
    assert not marker.exists()


def test_modified_file_is_detected(saved):
    path = saved / "m" / "quantparams.pkl"
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0xFF
    path.write_bytes(bytes(data))
    with pytest.raises(ArtifactError, match="quantparams.pkl was modified"):
        read_quantparams("m", saved)
    assert read_quantinfo("m", saved)  # the untouched file still loads


def test_missing_file_and_manifest(saved):
    (saved / "m" / "quantinfo.pkl").unlink()
    with pytest.raises(ArtifactError, match="quantinfo.pkl is missing"):
        read_quantinfo("m", saved)
    (saved / "m" / MANIFEST).unlink()
    with pytest.raises(ArtifactError, match="manifest.json is missing"):
        read_quantparams("m", saved)


@pytest.mark.parametrize("version", ["3.0", "0.9", "2", ""])
def test_incompatible_format_version(saved, version):
    manifest = json.loads((saved / "m" / MANIFEST).read_text())
    manifest["format_version"] = version
    (saved / "m" / MANIFEST).write_text(json.dumps(manifest))
    shown = re.escape(version or "unknown")
    with pytest.raises(ArtifactError, match=rf"manifest\.json: artifact format version '{shown}'"):
        read_quantinfo("m", saved)


def test_maps_of_the_new_major_version_and_1x_maps_are_read(saved):
    """Format 2 stores each record's first input once: a 1.x reader must refuse it, this one reads both."""
    manifest = json.loads((saved / "m" / MANIFEST).read_text())
    assert manifest["format_version"].split(".")[0] == "2"
    manifest["format_version"] = "1.1"
    (saved / "m" / MANIFEST).write_text(json.dumps(manifest))
    assert read_quantinfo("m", saved)


def test_missing_map_names_path_and_fix(tmp_path):
    with pytest.raises(MapNotFoundError) as caught:
        read_quantinfo("nothing", tmp_path)
    assert str(tmp_path / "nothing") in str(caught.value) and "quantize" in str(caught.value)


def test_manifest_records_versions_settings_and_hashes(saved, tiny_onnx):
    manifest = json.loads((saved / "m" / MANIFEST).read_text())
    assert set(manifest["versions"]) >= {"maptools", "ppq", "torch", "onnx", "onnxruntime", "protobuf", "numpy"}
    assert manifest["model"]["path"] == str(tiny_onnx.resolve())
    assert manifest["model"]["sha256"] == sha256_of(tiny_onnx.read_bytes())
    settings = manifest["settings"]
    assert (settings["weight_bits"], settings["activation_bits"], settings["seed"]) == (4, 4, 0)
    assert settings["calibration"] == "random" and settings["recipe"] == "fast"
    for name in ("quantinfo.pkl", "quantparams.pkl", "quant_model.onnx"):
        assert manifest["files"][name]["sha256"] == sha256_of((saved / "m" / name).read_bytes())


# -- SIGKILL at several moments ------------------------------------------------------------------------
CHILD = textwrap.dedent("""
    import os, sys, time
    from pathlib import Path
    moment, marker, model, root = sys.argv[1], Path(sys.argv[2]), sys.argv[3], sys.argv[4]
    from maptools.quantization import artifacts, quantize
    from maptools.quantization.engine import session

    def pause():
        marker.write_text("now")
        time.sleep(60)

    if moment == "calibration":
        original = session.PPQSession.quantize
        def slow(self, *args, **kwargs):
            pause()
            return original(self, *args, **kwargs)
        session.PPQSession.quantize = slow
    elif moment == "writing":
        calls = []
        real_fsync = os.fsync
        def fsync(fd):
            real_fsync(fd)
            calls.append(fd)
            if len(calls) == 2:  # one file complete, the next not yet
                pause()
        artifacts.os.fsync = fsync
    elif moment == "swapping":
        real_replace = os.replace
        calls = []
        def replace(a, b):
            real_replace(a, b)
            calls.append(a)
            if len(calls) == 1:  # old map moved aside, new one not yet in place
                pause()
        artifacts.os.replace = replace
    quantize({"input": [2, 3, 8, 8]}, "cpu", model, mapname="m", calib_steps=8, bit_width=8,
             mapsave_dir=root, recipe="fast")
""")


@pytest.mark.parametrize("moment", ["calibration", "writing", "swapping"])
def test_sigkill_leaves_earlier_map_intact(saved, tmp_path, tiny_onnx, moment):
    before = {p.name: p.read_bytes() for p in (saved / "m").iterdir()}
    info_before = read_quantinfo("m", saved)
    marker = tmp_path / f"{moment}.marker"
    script = tmp_path / "child.py"
    script.write_text(CHILD)
    child = subprocess.Popen([sys.executable, str(script), moment, str(marker), str(tiny_onnx), str(saved)],
                             stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    deadline = time.monotonic() + 120
    while not marker.exists():
        assert child.poll() is None, child.stderr.read().decode()
        assert time.monotonic() < deadline, "the child never reached the moment"
        time.sleep(0.05)
    child.send_signal(signal.SIGKILL)
    child.wait(timeout=30)
    assert child.returncode == -signal.SIGKILL
    info_after = read_quantinfo("m", saved)  # reads a map left between the two renames where it lies
    directory = resolve_map("m", saved)
    if moment == "swapping":  # the reader renamed nothing: it read the earlier map where the swap moved it
        assert directory.name.startswith(".m.old-") and not (saved / "m").exists()
    else:
        assert directory == saved / "m"
    assert {p.name: p.read_bytes() for p in directory.iterdir()} == before
    assert repr(info_after) == repr(info_before)
    assert read_quantparams("m", saved).keys() == {"conv_conv_weight", "conv_conv_bias", "fc_gemm_weight",
                                                   "fc_gemm_bias"}
    # and a later run replaces it cleanly, leaving no staging directories behind
    quantize(SHAPES, "cpu", tiny_onnx, mapname="m", calib_steps=8, bit_width=8, mapsave_dir=saved, recipe="fast")
    assert read_quantinfo("m", saved)["conv"].weight_bits == 8
    assert sorted(p.name for p in saved.iterdir()) == [".m.lock", "m"]
