"""Calibration from folders: batches decoded on demand, flat image folders, fewer batches than asked."""

from __future__ import annotations

import io
import logging
import shutil
from pathlib import Path

import numpy as np
import PIL.Image
import pytest
import torch
from conftest import write_images

from maptools import CalibrationError, InvalidArgumentError
from maptools.quantization import calibfolders, imagefolder_calibset, npy_calibset, quantize
from maptools.quantization.calibfolders import FolderBatches


def png_bytes(seed: int) -> bytes:
    buffer = io.BytesIO()
    rng = np.random.default_rng(seed)
    PIL.Image.fromarray(rng.integers(0, 256, (8, 8, 3), dtype=np.uint8), "RGB").save(buffer, format="PNG")
    return buffer.getvalue()


@pytest.fixture(scope="module")
def big_imagefolder(tmp_path_factory) -> Path:
    """3,000 8x8 PNGs in 3 class folders (16 distinct images, their bytes copied: fast to write)."""
    root = tmp_path_factory.mktemp("imagenet_like")
    images = [png_bytes(seed) for seed in range(16)]
    for c in range(3):
        folder = root / f"class{c}"
        folder.mkdir()
        for i in range(1000):
            (folder / f"{i:04d}.png").write_bytes(images[(i + c) % 16])
    return root


@pytest.fixture
def opened(monkeypatch) -> list[str]:
    """The image files read to be decoded (each through boundedio, then PIL from its bytes)."""
    calls: list[str] = []
    original = calibfolders.read_regular

    def counting_read(path, *args, **kwargs):
        calls.append(str(path))
        return original(path, *args, **kwargs)

    monkeypatch.setattr(calibfolders, "read_regular", counting_read)
    return calls


def test_only_the_batches_used_are_decoded(big_imagefolder, opened, tiny_onnx, tmp_path):
    calib = imagefolder_calibset(big_imagefolder, {"input": [4, 3, 8, 8]}, seed=3)
    assert isinstance(calib, FolderBatches) and len(calib) == 750 and opened == []  # listing decodes nothing
    result = quantize({"input": [4, 3, 8, 8]}, "cpu", tiny_onnx, mapname="lazy", calibset=calib, calib_steps=8,
                      analysis_steps=2, mapsave_dir=tmp_path, recipe="fast")
    assert result.output_snr_db["out"] > 5 and result.analysis_data == "held-out"
    # 8 batches of 4 to calibrate and the 2 after them to measure the error, each image decoded once
    assert len(opened) == 40 and len(set(opened)) == 40
    classes = {Path(p).parent.name for p in opened}
    assert classes == {"class0", "class1", "class2"}  # the seeded shuffle mixes the classes
    # a batch is decoded again on each access, nothing is cached; a slice gives a list of decoded batches
    first = calib[0]["input"]
    assert first.shape == (4, 3, 8, 8) and first.dtype == torch.float32 and len(opened) == 44
    assert [b["input"].shape[0] for b in calib[1:3]] == [4, 4] and len(opened) == 52
    assert torch.equal(calib[0]["input"], first)
    # the order torchvision's ImageFolder and the seeded shuffle give (as when every image was decoded up front)
    import torchvision

    samples = torchvision.datasets.ImageFolder(str(big_imagefolder)).samples
    order = torch.randperm(len(samples), generator=torch.Generator().manual_seed(3)).tolist()
    assert [str(p) for g in calib.groups[:2] for p in g] == [samples[i][0] for i in order[:8]]


def test_flat_folder_of_images(tmp_path, opened, tiny_onnx, capsys):
    from maptools.cli import main

    flat = tmp_path / "flat"
    flat.mkdir()
    for i in range(18):
        (flat / f"img{i:02d}.png").write_bytes(png_bytes(i))
    (flat / "notes.txt").write_text("not an image")
    calib = imagefolder_calibset(flat, {"input": [2, 3, 8, 8]})
    assert len(calib) == 9 and sorted(p.name for g in calib.groups for p in g) == [f"img{i:02d}.png" for i in range(18)]
    assert calib[0]["input"].shape == (2, 3, 8, 8) and len(opened) == 2
    assert main(["quantize", str(tiny_onnx), "--input", "input:2,3,8,8", "--mapname", "flat", "--calib-dir",
                 str(flat), "--calib-steps", "8", "--recipe", "fast", "--mapsave-dir", str(tmp_path / "m")]) == 0
    assert "flat" in capsys.readouterr().out


def test_folder_without_images(tmp_path):
    (tmp_path / "empty" / "sub").mkdir(parents=True)
    (tmp_path / "empty" / "readme.txt").write_text("x")
    with pytest.raises(InvalidArgumentError, match=r"root: no images under .*empty'; expected class sub-folders of "
                                                   r"images \(ImageFolder\) or image files"):
        imagefolder_calibset(tmp_path / "empty", {"input": [2, 3, 8, 8]})


def test_unreadable_image_named_when_its_batch_is_read(tmp_path):
    root = write_images(tmp_path / "images", "RGB", (8, 8), per_class=2, classes=2)
    (root / "class1" / "broken.png").write_bytes(b"not a png")
    calib = imagefolder_calibset(root, {"input": [5, 3, 8, 8]})
    assert len(calib) == 1
    with pytest.raises(CalibrationError, match=r"calibset: cannot read image .*class1/broken.png \(Unidentified"):
        calib[0]


def test_npy_files_loaded_on_demand(tmp_path, monkeypatch):
    folder = tmp_path / "npy"
    folder.mkdir()
    rng = np.random.default_rng(0)
    samples = [rng.normal(size=(3, 8, 8)).astype(np.float32) for _ in range(10)]
    for i, sample in enumerate(samples):
        np.save(folder / f"s{i:02d}.npy", sample)
    np.save(folder / "batch.npy", np.stack(samples[:4]) + 1)  # a whole batch: comes first
    loads: list[str] = []
    original = calibfolders._load_npy
    monkeypatch.setattr(calibfolders, "_load_npy", lambda file, shape: loads.append(file.name) or original(file, shape))
    calib = npy_calibset(folder, {"input": [4, 3, 8, 8]})
    assert len(calib) == 3 and loads == []  # 1 whole batch + 10 samples -> 2 batches of 4 (2 dropped)
    np.testing.assert_array_equal(calib[0]["input"].numpy(), np.stack(samples[:4]) + 1)
    np.testing.assert_array_equal(calib[2]["input"].numpy(), np.stack(samples[4:8]))
    assert loads == ["batch.npy", "s04.npy", "s05.npy", "s06.npy", "s07.npy"]
    np.save(folder / "odd.npy", np.zeros((5, 8, 8), np.float32))
    with pytest.raises(InvalidArgumentError, match=r"calib_npy: odd.npy has shape \[5, 8, 8\], expected \[4, 3, 8, 8\] "
                                                   r"or \[3, 8, 8\]"):
        npy_calibset(folder, {"input": [4, 3, 8, 8]})


def test_fewer_batches_than_calib_steps_warns(tiny_onnx, tmp_path, caplog):
    batches = [{"input": torch.randn(2, 3, 8, 8)} for _ in range(16)]
    with caplog.at_level(logging.WARNING, logger="maptools"):
        quantize({"input": [2, 3, 8, 8]}, "cpu", tiny_onnx, mapname="few", calibset=batches, calib_steps=32,
                 mapsave_dir=tmp_path, recipe="fast")
    assert "calibset: holds 16 batches, fewer than calib_steps=32; calibrating on those 16 batches" in caplog.text
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="maptools"):
        quantize({"input": [2, 3, 8, 8]}, "cpu", tiny_onnx, mapname="enough", calibset=iter(batches),
                 calib_steps=12, mapsave_dir=tmp_path, recipe="fast")
    assert "fewer than calib_steps" not in caplog.text


def test_imagefolder_keeps_top_level_images_out_with_class_folders(tmp_path, caplog):
    root = write_images(tmp_path / "images", "RGB", (8, 8), per_class=4, classes=2)
    shutil.copy(root / "class0" / "0.png", root / "stray.png")
    with caplog.at_level(logging.WARNING, logger="maptools"):
        calib = imagefolder_calibset(root, {"input": [2, 3, 8, 8]})
    assert len(calib) == 4 and "1 image(s) beside the class sub-folders are not used" in caplog.text
