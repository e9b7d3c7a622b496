"""A crafted map cannot hang or exhaust a reader, and wrong-shaped artifacts give clear errors (issue 22, 2 and 3)."""

from __future__ import annotations

import contextlib
import io
import json
import os
import shutil
import time
from pathlib import Path
from typing import Any

import onnx
import pytest
from conftest import deadline

from maptools.cli import main
from maptools.errors import ArtifactError, ModelError
from maptools.examples import digits
from maptools.quantization import read_quantinfo, read_quantparams, verify
from maptools.quantization.artifacts import (
    CIM_FILE,
    MANIFEST,
    QUANTINFO,
    QUANTPARAMS,
    dump_pickle,
    read_manifest,
    read_ppq_state,
    sha256_of,
)
from maptools.quantization.boundedio import read_regular
from maptools.quantization.model import load_model, model_sha256

#: A reader still running after this many seconds hangs.
LIMIT = 20
SWEEP = ["--adc-bits", "4", "--rows", "64", "--cell-bits", "2", "--jobs", "1", "--batches", "1"]

pytestmark = pytest.mark.stack  # also run on the oldest supported stack (make test)


@pytest.fixture
def root(digits_cim_map: Path, tmp_path: Path) -> Path:
    """A copy of the digits map ``m`` (with cim.json) to damage."""
    return Path(shutil.copytree(digits_cim_map, tmp_path / "mapsave"))


def _manifest(root: Path) -> dict[str, Any]:
    return json.loads((root / "m" / MANIFEST).read_text())


def _write_manifest(root: Path, manifest: Any) -> None:
    (root / "m" / MANIFEST).write_text(json.dumps(manifest))


def _replace(root: Path, filename: str, data: bytes) -> None:
    """Replace a file of the map and record its hash and size in the manifest (only the schema can refuse it)."""
    (root / "m" / filename).write_bytes(data)
    manifest = _manifest(root)
    manifest["files"][filename] = {"sha256": sha256_of(data), "bytes": len(data)}
    _write_manifest(root, manifest)


def _cli(*args: str, capsys: pytest.CaptureFixture) -> tuple[int, str]:
    with contextlib.redirect_stdout(io.StringIO()), deadline(LIMIT):
        code = main(list(args))
    return code, " ".join(capsys.readouterr().err.split())


def _external_model(folder: Path) -> Path:
    """The digits model saved with its weights in ``weights.bin`` beside it."""
    folder.mkdir()
    model = onnx.load(str(digits.MODEL_PATH))
    path = folder / "model.onnx"
    onnx.save_model(model, str(path), save_as_external_data=True, all_tensors_to_one_file=True, location="weights.bin",
                    size_threshold=0)
    return path


# -- 2: bounded readers -------------------------------------------------------------------------------------------
@pytest.fixture
def no_execution(monkeypatch) -> list[str]:
    """Records every onnxruntime session and integer executor built: a crafted map must be refused before."""
    import onnxruntime

    from maptools.quantization.reference import ReferenceExecutor

    built: list[str] = []
    session, from_files = onnxruntime.InferenceSession, ReferenceExecutor.from_files.__func__
    monkeypatch.setattr(onnxruntime, "InferenceSession",
                        lambda *a, **k: built.append("onnxruntime") or session(*a, **k))
    monkeypatch.setattr(ReferenceExecutor, "from_files",
                        classmethod(lambda cls, *a, **k: built.append("integer") or from_files(cls, *a, **k)))
    return built


def _record_model(root: Path, path: Path) -> None:
    manifest = _manifest(root)
    manifest["model"]["path"] = str(path)
    _write_manifest(root, manifest)


def _refused_by_every_command(root: Path, expected: str, capsys, built: list[str]) -> None:
    """verify and cim-sweep refuse the map (ArtifactError, exit 2) before any execution, in seconds."""
    started = time.monotonic()
    with deadline(LIMIT), pytest.raises(ArtifactError, match=expected):
        verify("m", mapsave_dir=root, batches=1)
    for command in (["verify", "m", "--batches", "1"], ["cim-sweep", "m", *SWEEP]):
        code, err = _cli(*command, "--mapsave-dir", str(root), capsys=capsys)
        assert code == 2 and "error: the float model of map 'm'" in err and "internal error" not in err, (command, err)
    assert built == [] and time.monotonic() - started < LIMIT  # nothing ran


def test_external_data_fifo_of_the_recorded_model_is_refused_with_exit_2(root, tmp_path, capsys, no_execution):
    model = _external_model(tmp_path / "model")
    os.unlink(model.parent / "weights.bin")
    os.mkfifo(model.parent / "weights.bin")  # nobody ever writes to it: reading it blocks forever
    _record_model(root, model)
    _refused_by_every_command(root, "weights.bin is a FIFO; expected a regular file", capsys, no_execution)


def test_external_data_outside_the_folder_or_too_large_is_refused_with_exit_2(root, tmp_path, capsys, no_execution,
                                                                               monkeypatch):
    model = _external_model(tmp_path / "model")
    _record_model(root, model)
    monkeypatch.setattr("maptools.quantization.model.MAX_EXTERNAL_DATA_BYTES", 1000)  # the weights hold 10 KiB
    size = (model.parent / "weights.bin").stat().st_size
    _refused_by_every_command(root, f"weights.bin holds {size} bytes, more than the 1000 bytes accepted", capsys,
                              no_execution)
    monkeypatch.undo()
    proto = onnx.load(str(model), load_external_data=False)
    next(iter(proto.graph.initializer)).external_data[0].value = "../elsewhere.bin"
    model.write_bytes(proto.SerializeToString())
    _refused_by_every_command(root, "refers to external data at '../elsewhere.bin'", capsys, [])


def test_a_float_model_moved_away_only_skips_fp32_and_ppq(root, tmp_path, capsys):
    model = _external_model(tmp_path / "model")
    _record_model(root, model)
    os.unlink(model.parent / "weights.bin")  # the user moved the weights away: not crafted, the map still verifies
    with deadline(LIMIT):
        report = verify("m", mapsave_dir=root, batches=1)
    assert report.failures["fp32"].startswith("FloatModelMissingError: the float model of map 'm'")
    assert "weights.bin is missing" in report.failures["fp32"] and set(report.failures) == {"fp32", "ppq"}
    assert [(p.reference, p.candidate) for p in report.ran_pairs] == [("onnxruntime", "integer")]
    code, err = _cli("cim-sweep", "m", *SWEEP, "--mapsave-dir", str(root), capsys=capsys)
    assert code == 0 and "FP32 could not run: FloatModelMissingError" in err
    _record_model(root, tmp_path / "nowhere.onnx")
    code, err = _cli("verify", "m", "--batches", "1", "--mapsave-dir", str(root), capsys=capsys)
    assert code == 3 and "fp32 could not run: FloatModelMissingError" in err  # not fully verified, not refused


@pytest.mark.parametrize("link", ["/dev/zero", "absolute"])
def test_external_data_device_or_outside_the_folder_is_refused_before_reading(root, tmp_path, link):
    model = _external_model(tmp_path / "model")
    if link == "/dev/zero":  # reading it whole never ends (memory runs out)
        os.unlink(model.parent / "weights.bin")
        os.symlink("/dev/zero", model.parent / "weights.bin")
        expected = "is a character device; expected a regular file"
    else:  # the model points its weights at a device by an absolute location
        proto = onnx.load(str(model), load_external_data=False)
        for tensor in proto.graph.initializer:
            for entry in tensor.external_data:
                if entry.key == "location":
                    entry.value = "/dev/zero"
        model.write_bytes(proto.SerializeToString())
        expected = "refers to external data at '/dev/zero'; expected a path inside the model's folder"
    with deadline(LIMIT), pytest.raises(ArtifactError, match=expected):
        model_sha256(model, "model.path", ArtifactError)
    with deadline(LIMIT), pytest.raises(ModelError, match=expected):  # quantize's loader checks before onnx reads
        load_model(model)


def test_model_path_that_is_a_device_or_fifo_is_refused_with_exit_2(root, tmp_path, capsys, no_execution):
    os.mkfifo(tmp_path / "fifo.onnx")
    for path, kind in ((tmp_path / "fifo.onnx", "a FIFO"), (Path("/dev/zero"), "a character device")):
        _record_model(root, path)
        _refused_by_every_command(root, f"{path} is {kind}; expected a regular file", capsys, no_execution)
    with deadline(LIMIT), pytest.raises(ModelError, match="onnx_path: .*fifo.onnx is a FIFO"):
        load_model(tmp_path / "fifo.onnx")


@pytest.mark.parametrize("kind", ["fifo", "symlink", "grown"])
def test_map_file_that_is_not_the_regular_file_the_manifest_records_is_refused(root, kind):
    path = root / "m" / QUANTPARAMS
    size = path.stat().st_size
    if kind == "fifo":
        path.unlink()
        os.mkfifo(path)
        expected = f"{QUANTPARAMS} is a FIFO; expected a regular file"
    elif kind == "symlink":
        path.unlink()
        os.symlink("/dev/zero", path)
        expected = f"{QUANTPARAMS} is a symbolic link; expected a regular file"
    else:  # a larger file than recorded is refused from its size, before it is read or hashed
        with path.open("ab") as handle:
            handle.write(b"\0" * 4096)
        expected = f"holds {size + 4096} bytes, the manifest records {size}"
    with deadline(LIMIT), pytest.raises(ArtifactError, match=expected):
        read_quantparams("m", root)


def test_bounded_read_refuses_more_than_the_limit(tmp_path):
    path = tmp_path / "f"
    path.write_bytes(b"x" * 100)
    assert read_regular(path, "f", 100) == b"x" * 100
    with pytest.raises(ArtifactError, match="holds 100 bytes, more than the 99 bytes accepted"):
        read_regular(path, "f", 99)


# -- 3: a schema per file -----------------------------------------------------------------------------------------
@pytest.mark.parametrize("content,expected", [
    (b"[]", r"manifest.json: expected a JSON object \(the top level of a manifest\), got list"),
    (b"[" * 200_000 + b"]" * 200_000, "nested deeper than 64 levels"),
    (None, "manifest.json: field 'settings' is missing"),
    (b'{"format_version": "1.2", "settings": NaN}', "NaN is not a number JSON allows"),
])
def test_wrong_shaped_manifest_gives_exit_2_naming_the_field(root, capsys, content, expected):
    if content is None:
        manifest = _manifest(root)
        del manifest["settings"]
        content = json.dumps(manifest).encode()
    (root / "m" / MANIFEST).write_bytes(content)
    with pytest.raises(ArtifactError, match=expected):
        read_manifest(root / "m", complete=True)  # the sections quantize writes, as verify and inspect read them
    for command in (["inspect", "m"], ["verify", "m", "--batches", "1"], ["cim-sweep", "m", *SWEEP]):
        code, err = _cli(*command, "--mapsave-dir", str(root), capsys=capsys)
        assert code == 2 and "internal error" not in err, (command, err)
        assert "error: " in err and MANIFEST in err


def test_quantinfo_holding_a_list_is_refused(root, capsys):
    _replace(root, QUANTINFO, dump_pickle([1, 2, 3]))
    with pytest.raises(ArtifactError, match="quantinfo.pkl: expected a dict of operator name -> OperatorQuantConfig, "
                                            "got list"):
        read_quantinfo("m", root)
    code, err = _cli("inspect", "m", "--mapsave-dir", str(root), capsys=capsys)
    assert code == 2 and "got list" in err


def test_quantinfo_record_with_a_wrong_field_names_record_and_field(root):
    info = read_quantinfo("m", root)
    info["/stem/stem.0/Conv"].weight_bits = "4"
    _replace(root, QUANTINFO, dump_pickle(info))
    with pytest.raises(ArtifactError, match=r"quantinfo.pkl: record '/stem/stem.0/Conv': field 'weight_bits' is str "
                                            r"4, expected int \| None within 1..32"):
        read_quantinfo("m", root)


def test_quantparams_float_array_is_refused(root):
    params = read_quantparams("m", root)
    params["/stem/stem.0/Conv_conv_weight"] = params["/stem/stem.0/Conv_conv_weight"].astype("float32")
    _replace(root, QUANTPARAMS, dump_pickle(params))
    with pytest.raises(ArtifactError, match="quantparams.pkl: field '/stem/stem.0/Conv_conv_weight' is an array of "
                                            "dtype float32"):
        read_quantparams("m", root)


def test_deep_pickle_is_refused(root):
    _replace(root, QUANTPARAMS, b"\x80\x04" + b"]" * 200_000 + b"a" * 199_999 + b".")  # lists in lists, 200,000 deep
    with pytest.raises(ArtifactError, match="quantparams.pkl: expected a dict of parameter key -> integer numpy array, "
                                            "got list"):
        read_quantparams("m", root)
    info = read_quantinfo("m", root)
    deep: Any = []
    for _ in range(1000):
        deep = [deep]
    _replace(root, QUANTINFO, dump_pickle({**info, "deep": deep}))
    with pytest.raises(ArtifactError, match="quantinfo.pkl: nested deeper than 64 levels"):
        read_quantinfo("m", root)
    info["/stem/stem.0/Conv"].cim = {"layout": deep}  # a placement's nesting is its type's: refused by type
    _replace(root, QUANTINFO, dump_pickle(info))
    with pytest.raises(ArtifactError, match=r"^quantinfo.pkl: record '/stem/stem.0/Conv': field 'cim'"):
        read_quantinfo("m", root)


def test_list_shaped_cim_json_gives_exit_2(root, capsys):
    _replace(root, CIM_FILE, b"[]")
    code, err = _cli("inspect", "m", "--mapsave-dir", str(root), capsys=capsys)
    assert code == 2 and "cim.json: expected a JSON object (the top level of a CIM calibration), got list" in err


def test_ppq_state_without_operations_names_the_field(root):
    state = read_ppq_state("m", root)
    del state["operations"]
    _replace(root, "ppq_state.json", json.dumps(state).encode())
    with pytest.raises(ArtifactError, match="ppq_state.json: field 'operations' is missing"):
        read_ppq_state("m", root)
