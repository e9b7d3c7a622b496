"""Calibration data: random batches, user data checked against the graph, ImageFolder and ``.npy`` folders.

Everything here returns a list of batches, each a ``dict[input name -> torch.Tensor]`` of float32 (or
the graph's integer type), the form the engine consumes.
"""

from __future__ import annotations

import itertools
import logging
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path

import numpy as np
import torch

from maptools.errors import CalibrationError, InvalidArgumentError
from maptools.quantization.model import LoadedModel

__all__ = [
    "MIN_CALIB_BATCHES",
    "imagefolder_calibset",
    "npy_calibset",
    "prepare_calibset",
    "random_calibset",
]

logger = logging.getLogger(__name__)

#: PPQ refuses to calibrate on fewer batches than this.
MIN_CALIB_BATCHES = 8

Batch = dict[str, torch.Tensor]


def random_calibset(input_shapes: Mapping[str, Sequence[int]], steps: int, seed: int = 0) -> list[Batch]:
    """Draw ``steps`` batches of standard-normal data with the given shapes.

    The generator is seeded with ``seed``, so the same seed gives the same batches (and the same
    artifacts).

    Args:
        input_shapes: Input name -> shape (including the batch dimension).
        steps: Number of batches.
        seed: Seed of the random generator.

    Returns:
        The batches.
    """
    generator = torch.Generator().manual_seed(int(seed))
    return [
        {
            name: torch.randn(tuple(shape), generator=generator, dtype=torch.float32)
            for name, shape in input_shapes.items()
        }
        for _ in range(steps)
    ]


def _to_tensor(value: object, where: str) -> torch.Tensor:
    if isinstance(value, torch.Tensor):
        return value.detach().cpu()
    if isinstance(value, np.ndarray):
        if value.dtype == object or value.dtype.kind not in "biuf":
            raise CalibrationError(f"calibset{where}: numpy array of dtype {value.dtype} is not numeric")
        return torch.from_numpy(np.asarray(value, order="C"))  # ascontiguousarray makes 0-d 1-d
    raise CalibrationError(f"calibset{where}: expected a torch.Tensor or numpy array, got {type(value).__name__}")


def _check_tensor(
    tensor: torch.Tensor, name: str, shape: tuple[int, ...], dtype: np.dtype, dynamic_batch: bool, where: str
) -> torch.Tensor:
    expected_kind = np.dtype(dtype).kind
    if tensor.dtype == torch.bool or tensor.is_complex():
        raise CalibrationError(f"calibset{where}: dtype {tensor.dtype} given for input {name!r}, expected {dtype}")
    if expected_kind == "f" and not tensor.is_floating_point():
        raise CalibrationError(
            f"calibset{where}: input {name!r} has dtype {tensor.dtype}, expected a floating tensor ({dtype})"
        )
    if expected_kind in "iu" and tensor.is_floating_point():
        raise CalibrationError(f"calibset{where}: input {name!r} has dtype {tensor.dtype}, expected {dtype}")
    given = tuple(tensor.shape)
    ok = len(given) == len(shape) and all(
        g == s or (axis == 0 and dynamic_batch) for axis, (g, s) in enumerate(zip(given, shape, strict=False))
    )
    if not ok:
        raise CalibrationError(
            f"calibset{where}: input {name!r} has shape {list(given)}, expected {list(shape)} "
            "(the shape given in input_shapes)"
        )
    tensor = tensor.to(torch.from_numpy(np.zeros(0, dtype=dtype)).dtype)
    if tensor.is_floating_point() and not bool(torch.isfinite(tensor).all()):
        raise CalibrationError(f"calibset{where}: input {name!r} contains NaN or Inf values")
    return tensor


def prepare_calibset(
    calibset: object, model: LoadedModel, input_shapes: Mapping[str, tuple[int, ...]], calib_steps: int
) -> list[Batch]:
    """Check a user calibration set against the graph and return the batches to calibrate on.

    Args:
        calibset: An iterable of batches. A batch is a ``dict`` input name -> ``torch.Tensor`` or numpy
            array; for a single-input model a bare tensor or array is accepted too.
        model: The loaded model (for input names, dtypes and which dims are dynamic).
        input_shapes: The checked input shapes; tensors must match them (the batch dimension may differ
            when the model's batch dimension is dynamic).
        calib_steps: At most this many batches are used.

    Returns:
        Up to ``calib_steps`` batches as ``dict[name, torch.Tensor]``.

    Raises:
        CalibrationError: not iterable, empty, fewer than :data:`MIN_CALIB_BATCHES` batches, or a batch
            of the wrong type, names, shape or dtype, or with NaN/Inf values.
    """
    if isinstance(calibset, (str, bytes, Mapping, torch.Tensor, np.ndarray)) or not isinstance(calibset, Iterable):
        raise CalibrationError(
            f"calibset: expected an iterable of batches (e.g. a list of {{'input': tensor}}), got "
            f"{type(calibset).__name__}"
        )
    items = list(itertools.islice(iter(calibset), calib_steps))
    if not items:
        raise CalibrationError("calibset: is empty; expected at least 8 batches (or calibset=None for random data)")
    if len(items) < MIN_CALIB_BATCHES:
        raise CalibrationError(
            f"calibset: holds {len(items)} batches (calib_steps={calib_steps}), but PPQ needs at least "
            f"{MIN_CALIB_BATCHES} calibration batches; give more batches"
        )
    graph_inputs = {i.name: i for i in model.inputs}
    names = list(input_shapes)
    batches: list[Batch] = []
    for index, item in enumerate(items):
        where = f"[{index}]"
        if isinstance(item, Mapping):
            given = list(item.keys())
            if set(given) != set(names):
                raise CalibrationError(
                    f"calibset{where}: has inputs {given!r}, expected exactly the model inputs {names!r}"
                )
            raw = {name: item[name] for name in names}
        elif isinstance(item, (torch.Tensor, np.ndarray)):
            if len(names) != 1:
                raise CalibrationError(
                    f"calibset{where}: a bare tensor was given but the model has {len(names)} inputs "
                    f"{names!r}; give a dict of input name -> tensor"
                )
            raw = {names[0]: item}
        else:
            raise CalibrationError(
                f"calibset{where}: expected a dict of input name -> tensor (or a tensor), got {type(item).__name__}"
            )
        batch: Batch = {}
        for name in names:
            graph_input = graph_inputs[name]
            tensor = _to_tensor(raw[name], f"{where}[{name!r}]")
            batch[name] = _check_tensor(
                tensor, name, input_shapes[name], graph_input.dtype, not graph_input.is_fixed(0), where
            )
        batches.append(batch)
    return batches


def _single_input(input_shapes: object) -> tuple[str, tuple[int, ...]]:
    if not isinstance(input_shapes, Mapping) or len(input_shapes) != 1:
        raise InvalidArgumentError(
            f"input_shapes: expected a dict with exactly one input such as {{'input': [1, 3, 224, 224]}}, "
            f"got {input_shapes!r}"
        )
    ((name, shape),) = input_shapes.items()
    if (
        isinstance(shape, (str, bytes))
        or not isinstance(shape, Sequence)
        or len(shape) != 4
        or not all(isinstance(d, int) and not isinstance(d, bool) and d > 0 for d in shape)
    ):
        raise InvalidArgumentError(
            f"input_shapes[{name!r}]: expected [batch, channels, height, width] positive ints, got {shape!r}"
        )
    return str(name), tuple(int(d) for d in shape)


def _per_channel(values: Sequence[float], channels: int, what: str) -> list[float]:
    values = [float(v) for v in values]
    if len(values) == channels:
        return values
    if len(values) == 1:
        return values * channels
    if channels == 1 and len(values) == 3:
        return [sum(values) / 3.0]
    raise InvalidArgumentError(
        f"{what}: {len(values)} values given for a {channels}-channel input; expected 1 or {channels}"
    )


def _stack(samples: list[torch.Tensor], name: str, batch_size: int) -> list[Batch]:
    usable = (len(samples) // batch_size) * batch_size
    if usable < len(samples):
        logger.info("dropping the last %d sample(s) that do not fill a batch of %d", len(samples) - usable, batch_size)
    return [{name: torch.stack(samples[i : i + batch_size])} for i in range(0, usable, batch_size)]


def imagefolder_calibset(
    root: str | Path,
    input_shapes: Mapping[str, Sequence[int]],
    mean: Sequence[float] = (0.485, 0.456, 0.406),
    std: Sequence[float] = (0.229, 0.224, 0.225),
    limit: int | None = None,
    seed: int = 0,
) -> list[Batch]:
    """Build a calibration set from a ``torchvision.datasets.ImageFolder`` directory.

    Images are resized to the input's height and width, converted to its channel count (1-channel
    models get grayscale), turned into tensors in ``[0, 1]``, normalised with ``mean``/``std`` and
    stacked into batches of the batch size in ``input_shapes``. Samples are shuffled with ``seed`` so
    that a few calibration steps still see every class.

    Args:
        root: ImageFolder root (one sub-folder per class).
        input_shapes: ``{input name: [batch, channels, height, width]}`` for a single-input model.
        mean: Per-channel mean (one value, or one per channel; the RGB default is averaged for 1 channel).
        std: Per-channel standard deviation, as ``mean``.
        limit: Use at most this many images.
        seed: Seed of the shuffle.

    Returns:
        A list of ``{input name: tensor [batch, C, H, W]}`` batches.

    Raises:
        InvalidArgumentError: ``root`` is not a directory, has no images, or ``input_shapes``/``mean``/``std``
            do not fit.
    """
    import torchvision
    from torchvision import transforms

    name, (batch_size, channels, height, width) = _single_input(input_shapes)
    if channels not in (1, 3):
        raise InvalidArgumentError(f"input_shapes[{name!r}]: images have 1 or 3 channels, got {channels}")
    if limit is not None and (isinstance(limit, bool) or not isinstance(limit, int) or limit <= 0):
        raise InvalidArgumentError(f"limit: expected a positive int or None, got {limit!r}")
    if not isinstance(root, (str, Path)) or not Path(root).is_dir():
        raise InvalidArgumentError(f"root: {root!r} is not a directory; expected an ImageFolder root")
    mean_c = _per_channel(mean, channels, "mean")
    std_c = _per_channel(std, channels, "std")
    if not all(np.isfinite(mean_c)):
        raise InvalidArgumentError(f"mean: expected finite numbers, got {list(mean)!r}")
    if not all(np.isfinite(std_c)) or any(v <= 0 for v in std_c):
        raise InvalidArgumentError(
            f"std: expected standard deviations > 0 (the normalisation divides by them), got {list(std)!r}")
    steps: list = [transforms.Resize([height, width])]
    if channels == 1:
        steps.append(transforms.Grayscale(num_output_channels=1))
    steps += [transforms.ToTensor(), transforms.Normalize(mean=mean_c, std=std_c)]
    try:
        dataset = torchvision.datasets.ImageFolder(root=str(root), transform=transforms.Compose(steps))
    except (FileNotFoundError, RuntimeError) as exc:
        raise InvalidArgumentError(f"root: no usable images under {str(root)!r} ({exc})") from None
    order = torch.randperm(len(dataset), generator=torch.Generator().manual_seed(int(seed))).tolist()
    if limit is not None:
        order = order[:limit]
    samples = [dataset[i][0] for i in order]
    batches = _stack(samples, name, batch_size)
    logger.info("ImageFolder %s: %d images -> %d batches of %d", root, len(samples), len(batches), batch_size)
    return batches


def npy_calibset(directory: str | Path, input_shapes: Mapping[str, Sequence[int]]) -> list[Batch]:
    """Build a calibration set from a folder of ``.npy`` arrays (the layout of PPQ's tutorial).

    Each file holds either a whole batch with the shape in ``input_shapes`` or a single sample (that
    shape without the batch dimension); single samples are stacked into batches. Files are read in
    sorted name order.

    Args:
        directory: Folder holding ``*.npy`` files.
        input_shapes: ``{input name: shape}`` for a single-input model.

    Returns:
        A list of ``{input name: tensor}`` batches.

    Raises:
        InvalidArgumentError: the folder is missing, has no ``.npy`` files, or a file's shape fits neither form.
    """
    if not isinstance(input_shapes, Mapping) or len(input_shapes) != 1:
        raise InvalidArgumentError(
            f"input_shapes: expected exactly one input for .npy calibration, got {input_shapes!r}"
        )
    ((name, shape),) = input_shapes.items()
    shape = tuple(int(d) for d in shape)
    if not isinstance(directory, (str, Path)) or not Path(directory).is_dir():
        raise InvalidArgumentError(f"calib_npy: {directory!r} is not a directory; expected a folder of .npy files")
    files = sorted(Path(directory).glob("*.npy"))
    if not files:
        raise InvalidArgumentError(f"calib_npy: no .npy files in {str(directory)!r}")
    batches: list[Batch] = []
    singles: list[torch.Tensor] = []
    for file in files:
        array = np.load(file, allow_pickle=False)
        if tuple(array.shape) == shape:
            batches.append({name: torch.from_numpy(np.asarray(array, order="C"))})
        elif tuple(array.shape) == shape[1:]:
            singles.append(torch.from_numpy(np.asarray(array, order="C")))
        else:
            raise InvalidArgumentError(
                f"calib_npy: {file.name} has shape {list(array.shape)}, expected {list(shape)} or {list(shape[1:])}"
            )
    batches += _stack(singles, name, shape[0])
    return batches
