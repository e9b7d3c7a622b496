"""Every numeric argument has a documented range checked before anything starts (issue 22, items 4, 5 and 9)."""

from __future__ import annotations

import os
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
import onnx
import pytest
import torch
from conftest import deadline, write_images

from maptools import CalibrationError, InvalidArgumentError, InvalidTypeError, UnsupportedOperatorError
from maptools.cli import main
from maptools.quantization import calibfolders, pipeline, quantize, random_calibset
from maptools.quantization.cim import CIMSpec
from maptools.quantization.cim.spec import MAX_ARRAY_SIZE
from maptools.quantization.validation import MAX_BATCHES, MAX_SEED, MAX_THREADS

SHAPES = {"input": [2, 3, 8, 8]}


class StartedError(Exception):
    """Raised by a patched stage: the run went past the argument checks."""


@pytest.fixture
def no_start(monkeypatch):
    """The model stage raises :class:`StartedError`: an argument check that lets the run start fails the test fast."""

    def started(*args, **kwargs):
        raise StartedError("the run started")

    monkeypatch.setattr(pipeline, "load", started)


# (keyword, value, error, argument named)
API_LIMITS = [
    ("threads", 100_000, InvalidArgumentError, "threads"),
    ("threads", MAX_THREADS + 1, InvalidArgumentError, "threads"),
    ("calib_steps", 1_000_000_000, InvalidArgumentError, "calib_steps"),
    ("calib_steps", MAX_BATCHES + 1, InvalidArgumentError, "calib_steps"),
    ("analysis_steps", MAX_BATCHES + 1, InvalidArgumentError, "analysis_steps"),
    ("seed", 99999999999999999999999, InvalidArgumentError, "seed"),
    ("seed", MAX_SEED + 1, InvalidArgumentError, "seed"),
    ("seed", 1.5, InvalidTypeError, "seed"),
]


@pytest.mark.parametrize(("keyword", "value", "error", "argument"), API_LIMITS,
                         ids=[f"{k}={v}" for k, v, *_ in API_LIMITS])
def test_api_limit_refused_before_the_run_starts(keyword, value, error, argument, tiny_onnx, tmp_path, no_start):
    mapsave = tmp_path / "mapsave"
    with pytest.raises(error) as caught:
        quantize(SHAPES, "cpu", tiny_onnx, mapname="m", mapsave_dir=mapsave, **{keyword: value})
    assert str(caught.value).startswith(f"{argument}: ")
    assert str(value) in str(caught.value)
    assert not mapsave.exists()


@pytest.mark.parametrize(("keyword", "value"), [("threads", MAX_THREADS), ("calib_steps", MAX_BATCHES),
                                                ("analysis_steps", MAX_BATCHES), ("seed", MAX_SEED), ("seed", 0)])
def test_api_limit_itself_is_accepted(keyword, value, tiny_onnx, tmp_path, no_start):
    with pytest.raises(StartedError):
        quantize(SHAPES, "cpu", tiny_onnx, mapname="m", mapsave_dir=tmp_path, **{keyword: value})


# (options, the option named, what the message says)
CLI_LIMITS = [
    (["--threads", "100000"], "--threads", f"expected an int from 1 to {MAX_THREADS}"),
    (["--threads", "10000"], "--threads", f"expected an int from 1 to {MAX_THREADS}"),
    (["--calib-steps", "1000000000"], "--calib-steps", f"expected an int from 1 to {MAX_BATCHES}"),
    (["--analysis-steps", str(MAX_BATCHES + 1)], "--analysis-steps", f"expected an int from 1 to {MAX_BATCHES}"),
    (["--seed", "99999999999999999999999"], "--seed", f"expected an int from 0 to {MAX_SEED}"),
    (["--cim", "rows=99999999999999999999"], "--cim", f"CIMSpec.rows: got 99999999999999999999, expected an "
                                                      f"integer in 1..{MAX_ARRAY_SIZE}"),
    (["--cim", f"cols={MAX_ARRAY_SIZE + 1}"], "--cim", "CIMSpec.cols"),
]


@pytest.mark.parametrize(("options", "option", "expected"), CLI_LIMITS, ids=[" ".join(o) for o, *_ in CLI_LIMITS])
def test_cli_limit_exits_2_naming_the_option(options, option, expected, tiny_onnx, tmp_path, capsys, monkeypatch):
    import maptools.quantization as package

    def started(*args, **kwargs):
        raise StartedError("quantize was called")

    monkeypatch.setattr(package, "quantize", started)
    mapsave = tmp_path / "mapsave"
    code = main(["quantize", str(tiny_onnx), "--input", "input:2,3,8,8", "--mapname", "x", "--mapsave-dir",
                 str(mapsave), *options])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1
    assert err[0].startswith(f"maptools quantize: argument {option}: ") and expected in err[0]
    assert not mapsave.exists()


@pytest.mark.parametrize(("command", "option", "value"), [("verify", "--batches", MAX_BATCHES + 1),
                                                          ("cim-sweep", "--batches", MAX_BATCHES + 1),
                                                          ("cim-sweep", "--seed", MAX_SEED + 1),
                                                          ("cim-sweep", "--jobs", MAX_THREADS + 1)])
def test_map_commands_limit_their_batches_and_seed(command, option, value, tmp_path, capsys):
    assert main([command, "nomap", option, str(value), "--mapsave-dir", str(tmp_path)]) == 2
    assert capsys.readouterr().err.startswith(f"maptools {command}: argument {option}: expected an int from ")


def test_python_verify_and_sweep_limit_batches_and_seed(tmp_path):
    from maptools.quantization import verify
    from maptools.quantization.cimmap.sweep import cim_sweep

    with pytest.raises(InvalidArgumentError, match=rf"^batches: expected an int from 1 to {MAX_BATCHES}"):
        verify("nomap", mapsave_dir=tmp_path, batches=MAX_BATCHES + 1)
    with pytest.raises(InvalidArgumentError, match=rf"^batches: expected an int from 1 to {MAX_BATCHES}"):
        cim_sweep("nomap", mapsave_dir=tmp_path, batches=MAX_BATCHES + 1)
    with pytest.raises(InvalidArgumentError, match=rf"^seed: expected an int from 0 to {MAX_SEED}"):
        cim_sweep("nomap", mapsave_dir=tmp_path, seed=MAX_SEED + 1)
    with pytest.raises(InvalidArgumentError, match=rf"^jobs: expected an int from 1 to {MAX_THREADS}"):
        cim_sweep("nomap", mapsave_dir=tmp_path, jobs=100_000)
    # a range is checked before it is expanded (1-10^11 made a list of 10^11 ints)
    started = time.perf_counter()
    with pytest.raises(InvalidArgumentError, match=rf"^rows: expected integers in 1\.\.{MAX_ARRAY_SIZE}"):
        cim_sweep("nomap", mapsave_dir=tmp_path, rows="1-100000000000")
    assert time.perf_counter() - started < 1


def test_input_shape_larger_than_memory_is_refused_with_the_figures(tiny_onnx, tmp_path, monkeypatch, capsys):
    def started(*args, **kwargs):
        raise StartedError("calibration data was made")

    monkeypatch.setattr(pipeline, "calibration_data", started)
    mapsave = tmp_path / "mapsave"
    needed = 10**12 * 3 * 8 * 8 * 4  # float32
    with pytest.raises(InvalidArgumentError) as caught:
        quantize({"input": [10**12, 3, 8, 8]}, "cpu", tiny_onnx, mapname="m", mapsave_dir=mapsave)
    message = str(caught.value)
    assert message.startswith("input_shapes: ") and f"({needed} bytes)" in message
    assert "bytes) of memory available" in message
    with pytest.raises(InvalidArgumentError, match=r"^input_shapes: one batch of input:99999999999999999999,3,8,8"):
        quantize({"input": [10**20 - 1, 3, 8, 8]}, "cpu", tiny_onnx, mapname="m", mapsave_dir=mapsave)
    for dims in ("1000000000000,3,8,8", "99999999999999999999,3,8,8"):
        assert main(["quantize", str(tiny_onnx), "--input", f"input:{dims}", "--mapname", "x", "--mapsave-dir",
                     str(mapsave)]) == 2
        err = capsys.readouterr().err
        assert err.startswith(f"maptools quantize: argument --input: one batch of input:{dims} takes ")
    assert not mapsave.exists()


def test_folder_batches_to_decode_must_fit_in_memory(tiny_onnx, tmp_path, monkeypatch):
    """The checked batches of a folder are kept: their decoded bytes are checked before any image is decoded."""
    from maptools.quantization import imagefolder_calibset, validation

    calibset = imagefolder_calibset(write_images(tmp_path / "images", "RGB", (8, 8), per_class=8), SHAPES)
    decoded = []
    monkeypatch.setattr(calibset, "_decode", lambda files: decoded.append(files))
    monkeypatch.setattr(validation, "available_memory", lambda: 10_000)
    mapsave = tmp_path / "mapsave"
    with pytest.raises(InvalidArgumentError) as caught:  # 8 batches (12 asked, 8 in the folder) of 1536 bytes
        quantize(SHAPES, "cpu", tiny_onnx, mapname="m", calibset=calibset, calib_steps=8, mapsave_dir=mapsave)
    assert str(caught.value).startswith("calib_steps: 8 batches of input:2,3,8,8 take 12.0 KiB (12288 bytes), more "
                                        "than the 9.8 KiB (10000 bytes) of memory available")
    assert decoded == [] and not mapsave.exists()


def test_cli_reproducers_exit_2_in_under_10_s(tiny_onnx, tmp_path):
    """The issue's command lines, as a user runs them: a one-line error, exit 2, nothing written."""
    mapsave = tmp_path / "mapsave"
    for options in (["--threads", "100000"], ["--cim", "rows=99999999999999999999"]):
        started = time.perf_counter()
        proc = subprocess.run([sys.executable, "-m", "maptools", "quantize", str(tiny_onnx), "--input", "input:2,3,8,8",
                               "--mapname", "x", "--mapsave-dir", str(mapsave), *options],
                              capture_output=True, text=True, timeout=60)
        assert proc.returncode == 2 and len(proc.stderr.splitlines()) == 1 and options[0] in proc.stderr
        assert time.perf_counter() - started < 10
    assert not mapsave.exists()


def test_cim_spec_bounds():
    assert CIMSpec(rows=MAX_ARRAY_SIZE, cols=MAX_ARRAY_SIZE, cell_bits=8, dac_bits=8).full_scale < 2**32
    for field in ("rows", "cols"):
        with pytest.raises(InvalidArgumentError, match=rf"^CIMSpec\.{field}: got {MAX_ARRAY_SIZE + 1}, expected"):
            CIMSpec(**{field: MAX_ARRAY_SIZE + 1})
        with pytest.raises(InvalidArgumentError, match=rf"^CIMSpec\.{field}: got 0, expected"):
            CIMSpec(**{field: 0})
    with pytest.raises(InvalidArgumentError, match=r"^CIMSpec\.rows: got 99999999999999999999"):
        CIMSpec.from_dict({"rows": 99999999999999999999})


def test_largest_crossbar_is_exact(tiny_onnx, tmp_path):
    """The largest array accepted runs, and with an ideal ADC equals the exact integer executor bit for bit."""
    from maptools.quantization.reference import simulate

    spec = CIMSpec(rows=MAX_ARRAY_SIZE, cols=MAX_ARRAY_SIZE, cell_bits=8, dac_bits=8)
    quantize(SHAPES, "cpu", tiny_onnx, mapname="big", calib_steps=8, mapsave_dir=tmp_path, recipe="fast", cim=spec)
    x = np.random.default_rng(0).standard_normal(SHAPES["input"]).astype(np.float32)
    crossbar = simulate("big", x, cim=True, mapsave_dir=tmp_path)["out"]
    np.testing.assert_array_equal(crossbar, simulate("big", x, mapsave_dir=tmp_path)["out"])


def test_random_calibration_is_streamed(monkeypatch):
    """No batch is made before it is read, each pass makes the same ones, and they are today's values."""
    made = []
    randn = torch.randn

    def counting(*args, **kwargs):
        made.append(args[0])
        return randn(*args, **kwargs)

    monkeypatch.setattr(torch, "randn", counting)
    shapes = {"a": (2, 3), "b": (4,)}
    batches = random_calibset(shapes, MAX_BATCHES, seed=7)
    assert len(batches) == MAX_BATCHES and made == []
    first = [batch for _, batch in zip(range(3), batches, strict=False)]
    assert len(made) == 3 * 2  # three batches of two inputs
    generator = torch.Generator().manual_seed(7)
    for batch in first:  # the values of the list random_calibset returned before it streamed
        for name, shape in shapes.items():
            torch.testing.assert_close(batch[name], randn(shape, generator=generator, dtype=torch.float32),
                                       rtol=0, atol=0)
    again = next(iter(batches))
    torch.testing.assert_close(again, first[0], rtol=0, atol=0)
    small = random_calibset(shapes, 5, seed=7)
    assert len(list(small)) == 5
    torch.testing.assert_close(small[2], list(small)[2], rtol=0, atol=0)
    torch.testing.assert_close(small[-1], list(small)[4], rtol=0, atol=0)
    torch.testing.assert_close(small[1:4:2], [list(small)[1], list(small)[3]], rtol=0, atol=0)
    with pytest.raises(IndexError):
        small[5]


def _foreign_conv(tiny_onnx: Path, path: Path) -> Path:
    model = onnx.load(str(tiny_onnx))
    conv = next(node for node in model.graph.node if node.op_type == "Conv")
    conv.domain = "com.example"
    model.opset_import.append(onnx.helper.make_opsetid("com.example", 1))
    onnx.save(model, str(path))
    return path


def test_foreign_domain_operator_is_refused(tiny_onnx, tmp_path, capsys):
    path = _foreign_conv(tiny_onnx, tmp_path / "foreign.onnx")
    mapsave = tmp_path / "mapsave"
    with pytest.raises(UnsupportedOperatorError) as caught:
        quantize(SHAPES, "cpu", path, mapname="m", calib_steps=8, mapsave_dir=mapsave)
    assert str(caught.value).startswith("node 'conv': operator 'Conv' of domain 'com.example'")
    assert main(["quantize", str(path), "--input", "input:2,3,8,8", "--mapname", "x", "--mapsave-dir",
                 str(mapsave)]) == 2
    assert "of domain 'com.example'" in capsys.readouterr().err
    assert not mapsave.exists()


def _listed_within(root: Path, timeout: float) -> list[str]:
    """The first file of each batch imagefolder_calibset makes of ``root``; fails if listing takes over ``timeout``."""
    from maptools.quantization import imagefolder_calibset

    result: list = []
    worker = threading.Thread(target=lambda: result.append(imagefolder_calibset(root, {"input": [1, 3, 8, 8]})),
                              daemon=True)  # a hung walk is left behind, the test fails
    worker.start()
    worker.join(timeout)
    assert result, f"listing {root} took more than {timeout} s"
    return sorted(str(group[0]) for group in result[0].groups)


def test_symlink_loops_are_walked_once(tmp_path):
    root = write_images(tmp_path / "images", "RGB", (8, 8), per_class=2)
    classes = sorted(p for p in root.iterdir() if p.is_dir())
    expected = sorted(str(p) for c in classes for p in c.iterdir())
    for index in range(3):  # three links to the root in each class: os.walk branched 3^depth times
        for folder in classes:
            (folder / f"up{index}").symlink_to("..")
    (classes[0] / "again").symlink_to(classes[1])  # another class once more: read once
    (classes[0] / "self").symlink_to(".")
    os.mkfifo(classes[0] / "pipe.png")  # opening a FIFO blocks: only regular files are listed
    assert _listed_within(root, timeout=10) == expected


def test_folder_walk_limits(tmp_path, monkeypatch):
    from maptools.quantization import imagefolder_calibset, npy_calibset

    root = write_images(tmp_path / "images", "RGB", (8, 8), per_class=4)
    deep = root / "deep"
    for level in range(5):
        deep = deep / f"l{level}"
    deep.mkdir(parents=True)
    monkeypatch.setattr(calibfolders, "MAX_FOLDER_DEPTH", 4)
    with pytest.raises(InvalidArgumentError, match=r"^root: .* is 5 folders deep below .*, deeper than 4"):
        imagefolder_calibset(root, {"input": [1, 3, 8, 8]})
    monkeypatch.setattr(calibfolders, "MAX_FOLDER_DEPTH", 32)
    assert len(imagefolder_calibset(root, {"input": [1, 3, 8, 8]})) == 8
    monkeypatch.setattr(calibfolders, "MAX_FOLDER_ENTRIES", 5)
    with pytest.raises(InvalidArgumentError, match=r"^root: more than 5 files and folders under "):
        imagefolder_calibset(root, {"input": [1, 3, 8, 8]})
    npy = tmp_path / "npy"
    npy.mkdir()
    for index in range(6):
        np.save(npy / f"{index}.npy", np.zeros((3, 8, 8), np.float32))
    with pytest.raises(InvalidArgumentError, match=r"^calib_npy: more than 5 files and folders under "):
        npy_calibset(npy, {"input": [1, 3, 8, 8]})
    monkeypatch.setattr(calibfolders, "MAX_FOLDER_ENTRIES", 2_000_000)
    os.mkfifo(npy / "pipe.npy")  # never opened (reading its header blocked)
    assert len(npy_calibset(npy, {"input": [2, 3, 8, 8]})) == 3


def test_folder_files_swapped_for_a_fifo_or_device_after_listing_are_refused(tmp_path):
    """The walk lists regular files only; each file is opened again without blocking and checked (boundedio)."""
    from maptools.quantization import imagefolder_calibset, npy_calibset

    root = write_images(tmp_path / "images", "RGB", (8, 8), per_class=2)
    images = imagefolder_calibset(root, {"input": [4, 3, 8, 8]})
    first = sorted(root.glob("*/*.png"))
    for path in first:
        path.unlink()
        os.mkfifo(path)  # listed as images, now FIFOs nobody writes to: an open blocked forever
    with deadline(10), pytest.raises(CalibrationError, match=r"calibset: image: .*\.png is a FIFO; expected a regular"):
        images[0]
    npy = tmp_path / "npy"
    npy.mkdir()
    np.save(npy / "0.npy", np.zeros((2, 3, 8, 8), np.float32))
    batches = npy_calibset(npy, {"input": [2, 3, 8, 8]})
    (npy / "0.npy").unlink()
    (npy / "0.npy").symlink_to("/dev/zero")  # np.load read it until memory ran out
    with deadline(10), pytest.raises(CalibrationError, match=r"calib_npy: 0\.npy: .* is a character device"):
        batches[0]
    with pytest.raises(InvalidArgumentError, match=r"calib_npy: no \.npy files in "):  # the walk lists regular files
        npy_calibset(npy, {"input": [2, 3, 8, 8]})


def test_npy_files_larger_than_declared_or_than_the_limit_are_refused_before_loading(tmp_path, monkeypatch):
    from maptools.quantization import npy_calibset

    npy = tmp_path / "npy"
    npy.mkdir()
    np.save(npy / "0.npy", np.zeros((3, 8, 8), np.float32))  # 768 bytes of data after a 128-byte header
    with (npy / "0.npy").open("ab") as handle:
        handle.write(b"\0" * 4096)  # a small header in front of a huge file: np.load read only the header's count
    with pytest.raises(InvalidArgumentError, match=r"calib_npy: 0\.npy holds 4992 bytes, its header declares 896 "):
        npy_calibset(npy, {"input": [1, 3, 8, 8]})
    np.save(npy / "0.npy", np.zeros((3, 8, 8), np.float32))
    assert len(npy_calibset(npy, {"input": [1, 3, 8, 8]})) == 1
    monkeypatch.setattr(calibfolders, "MAX_INPUT_FILE_BYTES", 800)
    with pytest.raises(InvalidArgumentError, match=r"calib_npy: 0\.npy: .* holds 896 bytes, more than the 800 bytes"):
        npy_calibset(npy, {"input": [1, 3, 8, 8]})
