"""Bundled digits example: a small residual CNN trained on scikit-learn's 8x8 digits.

The model file :data:`MODEL_PATH` is produced by ``examples/train_digits.py``. The train/test split of the
digits ships with the package as 8-bit pixels in :data:`DATA_PATH` (48 kB, written by
``examples/make_digits_data.py`` from scikit-learn's copy of the UCI "Optical Recognition of Handwritten
Digits" data, CC BY 4.0), so nothing here needs scikit-learn. This module only needs numpy at import time;
Pillow and onnxruntime are imported lazily inside the functions that use them, so importing it never pulls
in torch.

The preprocessing in :func:`load_split` reproduces exactly what a torchvision ``ImageFolder`` pipeline
(``Grayscale(1)``, ``ToTensor()``, ``Normalize(MEAN, STD)``) sees when it reads the PNG files written by
:func:`write_imagefolder`.
"""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np

__all__ = [
    "IMAGE_SIZE",
    "INPUT_NAME",
    "INPUT_SHAPE",
    "DATA_PATH",
    "MEAN",
    "MODEL_PATH",
    "OUTPUT_NAME",
    "STD",
    "load_split",
    "onnx_top1",
    "write_imagefolder",
]

logger = logging.getLogger(__name__)

MODEL_PATH: Path = Path(__file__).parent / "data" / "digits_resnet.onnx"
"""Path of the bundled FP32 ONNX model."""

DATA_PATH: Path = Path(__file__).parent / "data" / "digits.npz"
"""The bundled split: ``train_images`` (1257, 8, 8), ``train_labels``, ``test_images`` (540, 8, 8) and
``test_labels``, uint8 pixels ``round(v * 255 / 16)`` of the raw ``0..16`` values, and labels ``0..9``."""

INPUT_NAME: str = "input"
"""Name of the model's input tensor."""

OUTPUT_NAME: str = "logits"
"""Name of the model's output tensor (unnormalised class scores, shape ``(N, 10)``)."""

IMAGE_SIZE: int = 8
"""Height and width of the input images in pixels."""

MEAN: tuple[float, ...] = (0.5,)
"""Per-channel mean used for normalisation (single grayscale channel)."""

STD: tuple[float, ...] = (0.5,)
"""Per-channel standard deviation used for normalisation (single grayscale channel)."""

INPUT_SHAPE: tuple[int, int, int, int] = (16, 1, IMAGE_SIZE, IMAGE_SIZE)
"""Input shape (batch of 16, used for calibration in the demo); the batch axis of the model is dynamic."""

_SPLITS = ("train", "test")


def _normalize(pixels: np.ndarray) -> np.ndarray:
    """Apply ``ToTensor()`` + ``Normalize(MEAN, STD)`` to uint8 pixels, in float32 like torchvision."""
    x = pixels.astype(np.float32) / np.float32(255.0)
    mean = np.asarray(MEAN, dtype=np.float32).reshape(1, -1, 1, 1)
    std = np.asarray(STD, dtype=np.float32).reshape(1, -1, 1, 1)
    return ((x - mean) / std).astype(np.float32)


def _split_uint8(split: str) -> tuple[np.ndarray, np.ndarray]:
    """Return the requested split as uint8 images ``(N, 8, 8)`` and int64 labels ``(N,)``."""
    if split not in _SPLITS:
        raise ValueError(f"split must be one of {_SPLITS!r}, got {split!r}")
    with np.load(DATA_PATH, allow_pickle=False) as data:
        return data[f"{split}_images"], data[f"{split}_labels"].astype(np.int64)


def load_split(split: str = "test") -> tuple[np.ndarray, np.ndarray]:
    """Load a deterministic train/test split of scikit-learn's digits, preprocessed for the model.

    The split is ``train_test_split(test_size=0.3, random_state=0, stratify=labels)``, read from the bundled
    :data:`DATA_PATH` (scikit-learn is not needed). Pixels are quantised to 8 bits as ``round(v * 255 / 16)``
    (exactly the values stored by :func:`write_imagefolder`) and normalised as ``(p / 255 - 0.5) / 0.5``.

    Args:
        split: Either ``"train"`` or ``"test"``.

    Returns:
        A tuple ``(images, labels)`` where ``images`` is a float32 array of shape ``(N, 1, 8, 8)`` with
        values in ``[-1, 1]`` and ``labels`` is an int64 array of shape ``(N,)``.

    Raises:
        ValueError: If ``split`` is not ``"train"`` or ``"test"``.
    """
    pixels, labels = _split_uint8(split)
    return _normalize(pixels[:, None, :, :]), labels


def write_imagefolder(root: str | Path, split: str = "train", limit_per_class: int | None = None) -> Path:
    """Write a split of the digits as 8x8 grayscale PNGs in torchvision ``ImageFolder`` layout.

    Files are written to ``root/<digit>/<index:04d>.png`` (class folders ``"0"`` .. ``"9"``), where
    ``index`` is the sample's position in the split. Reading them back with ``Grayscale(1)``,
    ``ToTensor()`` and ``Normalize(MEAN, STD)`` gives exactly the arrays returned by :func:`load_split`.

    Args:
        root: Output directory; created if missing.
        split: Either ``"train"`` or ``"test"``.
        limit_per_class: If given, write at most this many images per class (the first ones of the split).

    Returns:
        ``root`` as a :class:`~pathlib.Path`.

    Raises:
        ValueError: If ``split`` is invalid or ``limit_per_class`` is negative.
    """
    from PIL import Image

    if limit_per_class is not None and limit_per_class < 0:
        raise ValueError(f"limit_per_class must be >= 0 or None, got {limit_per_class!r}")
    pixels, labels = _split_uint8(split)
    root = Path(root)
    for digit in range(10):
        (root / str(digit)).mkdir(parents=True, exist_ok=True)
    counts = [0] * 10
    for index, (image, label) in enumerate(zip(pixels, labels, strict=True)):
        label = int(label)
        if limit_per_class is not None and counts[label] >= limit_per_class:
            continue
        # A 2-D uint8 array becomes an 8-bit grayscale ("L") image.
        Image.fromarray(image).save(root / str(label) / f"{index:04d}.png")
        counts[label] += 1
    logger.info("wrote %d %s images to %s", sum(counts), split, root)
    return root


def onnx_top1(model_path: str | Path, images: np.ndarray, labels: np.ndarray, batch_size: int = 64) -> float:
    """Compute the top-1 accuracy of an ONNX classifier with onnxruntime on the CPU.

    Args:
        model_path: Path of the ONNX model; its first input is fed with ``images``.
        images: Float32 array of shape ``(N, 1, 8, 8)``, e.g. from :func:`load_split`.
        labels: Integer array of shape ``(N,)``.
        batch_size: Number of images per inference call.

    Returns:
        Top-1 accuracy in percent.

    Raises:
        ValueError: If ``images`` and ``labels`` have different lengths, are empty, or ``batch_size`` < 1.
    """
    import onnxruntime as ort

    if len(images) != len(labels):
        raise ValueError(f"images and labels differ in length: {len(images)} != {len(labels)}")
    if len(images) == 0:
        raise ValueError("images must not be empty")
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size!r}")
    session = ort.InferenceSession(str(model_path), providers=["CPUExecutionProvider"])
    input_name = session.get_inputs()[0].name
    images = np.ascontiguousarray(images, dtype=np.float32)
    correct = 0
    for start in range(0, len(images), batch_size):
        logits = session.run(None, {input_name: images[start : start + batch_size]})[0]
        correct += int((np.argmax(logits, axis=1) == labels[start : start + batch_size]).sum())
    accuracy = 100.0 * correct / len(images)
    logger.debug("top-1 of %s on %d images: %.2f%%", model_path, len(images), accuracy)
    return accuracy
