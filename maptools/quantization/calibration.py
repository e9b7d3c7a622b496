"""Calibration data: random batches, user data checked against the graph, ImageFolder and ``.npy`` folders.

Everything here returns a sequence of batches, each a ``dict[input name -> torch.Tensor]`` of float32 (or
the graph's integer type), the form the engine consumes: a list, random batches made when iterated
(:class:`RandomBatches`), or for folders a
:class:`~maptools.quantization.calibfolders.FolderBatches` that decodes a batch's files only when it is read
(the folders are read by :mod:`maptools.quantization.calibfolders`, re-exported here).
"""

from __future__ import annotations

import itertools
import logging
from collections.abc import Iterable, Iterator, Mapping, Sequence

import numpy as np
import torch

from maptools.errors import CalibrationError
from maptools.quantization.model import LoadedModel
from maptools.quantization.records import ANALYSIS_SAMPLES

__all__ = [
    "MIN_ANALYSIS_BATCHES",
    "MIN_CALIB_BATCHES",
    "batch_samples",
    "default_analysis_steps",
    "RandomBatches",
    "prepare_calibset",
    "random_calibset",
]

logger = logging.getLogger(__name__)

#: PPQ refuses to calibrate on fewer batches than this.
MIN_CALIB_BATCHES = 8
#: The fewest analysis batches by default, whatever the batch size.
MIN_ANALYSIS_BATCHES = 4

Batch = dict[str, torch.Tensor]


class RandomBatches(Sequence[Batch]):
    """Standard-normal batches made one at a time, each time the sequence is iterated (nothing is kept).

    What :func:`random_calibset` returns: memory holds one batch whatever ``steps`` is. Every iteration restarts
    the generator from ``seed``, so each pass (PPQ calibrates in several) sees the same batches. Indexing makes the
    batches before the one asked for again (cheap for the first ones, which is all quantize indexes).
    """

    def __init__(self, input_shapes: Mapping[str, Sequence[int]], steps: int, seed: int) -> None:
        self._shapes = {name: tuple(int(d) for d in shape) for name, shape in input_shapes.items()}
        self._steps = int(steps)
        self._seed = int(seed)

    def __len__(self) -> int:
        return self._steps

    def __iter__(self) -> Iterator[Batch]:
        generator = torch.Generator().manual_seed(self._seed)
        for _ in range(self._steps):
            yield {name: torch.randn(shape, generator=generator, dtype=torch.float32)
                   for name, shape in self._shapes.items()}

    def __getitem__(self, index: int | slice) -> Batch | list[Batch]:  # type: ignore[override]
        if isinstance(index, slice):
            wanted = range(*index.indices(self._steps))
            if not wanted:
                return []
            chosen = set(wanted)
            made = {i: b for i, b in enumerate(itertools.islice(iter(self), max(wanted) + 1)) if i in chosen}
            return [made[i] for i in wanted]
        position = index + self._steps if index < 0 else index
        if not 0 <= position < self._steps:
            raise IndexError(f"batch {index} of {self._steps}")
        return next(itertools.islice(iter(self), position, None))

    def __repr__(self) -> str:
        return f"RandomBatches({self._steps} batches of {self._shapes}, seed {self._seed})"


def random_calibset(input_shapes: Mapping[str, Sequence[int]], steps: int, seed: int = 0) -> RandomBatches:
    """``steps`` batches of standard-normal data with the given shapes, made when iterated.

    The generator is seeded with ``seed``, so the same seed gives the same batches (and the same
    artifacts); the batches are made one at a time (:class:`RandomBatches`), so memory holds one whatever
    ``steps`` is.

    Args:
        input_shapes: Input name -> shape (including the batch dimension).
        steps: Number of batches.
        seed: Seed of the random generator.

    Returns:
        The batches, a sequence made on demand.
    """
    return RandomBatches(input_shapes, steps, seed)


def _to_tensor(value: object, where: str) -> torch.Tensor:
    if isinstance(value, torch.Tensor):
        return value.detach().cpu()
    if isinstance(value, np.ndarray):
        if value.dtype == object or value.dtype.kind not in "biuf":
            raise CalibrationError(f"{where}: numpy array of dtype {value.dtype} is not numeric")
        return torch.from_numpy(np.asarray(value, order="C"))  # ascontiguousarray makes 0-d 1-d
    raise CalibrationError(f"{where}: expected a torch.Tensor or numpy array, got {type(value).__name__}")


def _check_tensor(
    tensor: torch.Tensor, name: str, shape: tuple[int, ...], dtype: np.dtype, dynamic_batch: bool, where: str
) -> torch.Tensor:
    expected_kind = np.dtype(dtype).kind
    if tensor.dtype == torch.bool or tensor.is_complex():
        raise CalibrationError(f"{where}: dtype {tensor.dtype} given for input {name!r}, expected {dtype}")
    if expected_kind == "f" and not tensor.is_floating_point():
        raise CalibrationError(
            f"{where}: input {name!r} has dtype {tensor.dtype}, expected a floating tensor ({dtype})"
        )
    if expected_kind in "iu" and tensor.is_floating_point():
        raise CalibrationError(f"{where}: input {name!r} has dtype {tensor.dtype}, expected {dtype}")
    given = tuple(tensor.shape)
    ok = len(given) == len(shape) and all(
        g == s or (axis == 0 and dynamic_batch) for axis, (g, s) in enumerate(zip(given, shape, strict=False))
    )
    if not ok:
        raise CalibrationError(
            f"{where}: input {name!r} has shape {list(given)}, expected {list(shape)} "
            "(the shape given in input_shapes)"
        )
    tensor = tensor.to(torch.from_numpy(np.zeros(0, dtype=dtype)).dtype)
    if tensor.is_floating_point() and not bool(torch.isfinite(tensor).all()):
        raise CalibrationError(f"{where}: input {name!r} contains NaN or Inf values")
    return tensor


def default_analysis_steps(input_shapes: Mapping[str, Sequence[int]]) -> int:
    """Analysis batches by default: :data:`~maptools.quantization.records.ANALYSIS_SAMPLES` samples, at least
    :data:`MIN_ANALYSIS_BATCHES` batches."""
    batch = next((int(shape[0]) for shape in input_shapes.values() if len(shape) and int(shape[0]) > 0), 1)
    return max(MIN_ANALYSIS_BATCHES, -(-ANALYSIS_SAMPLES // batch))


def batch_samples(batches: Iterable[Mapping[str, object]]) -> int:
    """Samples in ``batches``: the first dimension of each batch's first input with one (1 for scalars)."""
    total = 0
    for batch in batches:
        shape = next((tuple(getattr(v, "shape", ())) for v in batch.values() if len(getattr(v, "shape", ()))), ())
        total += int(shape[0]) if shape else 1
    return total


def prepare_calibset(
    calibset: object, model: LoadedModel, input_shapes: Mapping[str, tuple[int, ...]], calib_steps: int,
    *, argument: str = "calibset", minimum: int = MIN_CALIB_BATCHES,
) -> list[Batch]:
    """Check a user calibration set against the graph and return the batches to calibrate on.

    Args:
        calibset: An iterable of batches. A batch is a ``dict`` input name -> ``torch.Tensor`` or numpy
            array; for a single-input model a bare tensor or array is accepted too.
        model: The loaded model (for input names, dtypes and which dims are dynamic).
        input_shapes: The checked input shapes; tensors must match them (the batch dimension may differ
            when the model's batch dimension is dynamic).
        calib_steps: At most this many batches are used (read lazily: only these are taken from the iterable).
        argument: The argument's name in error messages (``'evalset'`` for evaluation data).
        minimum: The fewest batches accepted (PPQ's minimum for calibration, 1 for evaluation data).

    Returns:
        Up to ``calib_steps`` batches as ``dict[name, torch.Tensor]``.

    Raises:
        CalibrationError: not iterable, empty, fewer than :data:`MIN_CALIB_BATCHES` batches, or a batch
            of the wrong type, names, shape or dtype, or with NaN/Inf values.
    """
    if isinstance(calibset, (str, bytes, Mapping, torch.Tensor, np.ndarray)) or not isinstance(calibset, Iterable):
        raise CalibrationError(
            f"{argument}: expected an iterable of batches (e.g. a list of {{'input': tensor}}), got "
            f"{type(calibset).__name__}"
        )
    items = list(itertools.islice(iter(calibset), calib_steps))
    if not items:
        raise CalibrationError(f"{argument}: is empty; expected at least {minimum} batches"
                               + (" (or calibset=None for random data)" if argument == "calibset" else ""))
    if len(items) < minimum:
        raise CalibrationError(
            f"{argument}: holds {len(items)} batches (calib_steps={calib_steps}), but PPQ needs at least "
            f"{minimum} calibration batches; give more batches"
        )
    graph_inputs = {i.name: i for i in model.inputs}
    names = list(input_shapes)
    batches: list[Batch] = []
    for index, item in enumerate(items):
        where = f"{argument}[{index}]"
        if isinstance(item, Mapping):
            given = list(item.keys())
            if set(given) != set(names):
                raise CalibrationError(
                    f"{where}: has inputs {given!r}, expected exactly the model inputs {names!r}"
                )
            raw = {name: item[name] for name in names}
        elif isinstance(item, (torch.Tensor, np.ndarray)):
            if len(names) != 1:
                raise CalibrationError(
                    f"{where}: a bare tensor was given but the model has {len(names)} inputs "
                    f"{names!r}; give a dict of input name -> tensor"
                )
            raw = {names[0]: item}
        else:
            raise CalibrationError(
                f"{where}: expected a dict of input name -> tensor (or a tensor), got {type(item).__name__}"
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
