"""Calibration (and verification) batches read from a folder: images (ImageFolder or flat) or ``.npy`` arrays.

:func:`imagefolder_calibset` and :func:`npy_calibset` return a :class:`FolderBatches`, which decodes a batch's
files only when it is read. Both are re-exported by :mod:`maptools.quantization.calibration` and
:mod:`maptools.quantization`.
"""

from __future__ import annotations

import contextlib
import io
import logging
import math
import os
from collections.abc import Callable, Iterator, Mapping, Sequence
from pathlib import Path
from typing import BinaryIO, overload

import numpy as np
import torch

from maptools.errors import CalibrationError, InvalidArgumentError, MaptoolsError
from maptools.quantization.boundedio import open_regular, read_regular
from maptools.quantization.config import IMAGENET_MEAN, IMAGENET_STD
from maptools.quantization.validation import check_seed

__all__ = ["MAX_FOLDER_DEPTH", "MAX_FOLDER_ENTRIES", "MAX_INPUT_FILE_BYTES", "FolderBatches", "imagefolder_calibset",
           "npy_calibset"]

logger = logging.getLogger(__name__)

Batch = dict[str, torch.Tensor]

#: Deepest folder level below a calibration folder's root that is read.
MAX_FOLDER_DEPTH = 32
#: Most entries (files and folders) listed under a calibration folder: ImageNet's training set (1.28 million images in
#: 1000 folders) fits; a walk from ``/`` stops.
MAX_FOLDER_ENTRIES = 2_000_000
#: Largest file of a calibration or inputs folder (an image or a ``.npy`` array) that is opened: each file is
#: opened only if it is a regular file of at most this size (no FIFO or device, even one swapped in after the
#: folder was listed), and a ``.npy`` file must hold exactly the bytes its header declares.
MAX_INPUT_FILE_BYTES = 2 << 30


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


class FolderBatches(Sequence[Batch]):
    """Calibration batches read from files on demand: a batch's files are decoded when it is indexed.

    What :func:`imagefolder_calibset` and :func:`npy_calibset` return. Listing the folder reads no image (and
    of a ``.npy`` file only its header); ``len()`` is known at once, and indexing or iterating decodes only the
    files of the batches asked for, one batch at a time, so memory is bounded by the batch size and
    :func:`~maptools.quantization.quantize` (which reads at most ``calib_steps`` batches) decodes no more than
    those. Nothing is cached: each access decodes again. A slice returns a list of decoded batches.

    Attributes:
        groups: The files of each batch, in batch order.
        source: What the batches are read from (for messages).
    """

    def __init__(self, name: str, groups: list[list[Path]], decode: Callable[[list[Path]], torch.Tensor],
                 source: str) -> None:
        self._name = name
        self.groups = groups
        self._decode = decode
        self.source = source

    def __len__(self) -> int:
        return len(self.groups)

    @overload
    def __getitem__(self, index: int) -> Batch: ...

    @overload
    def __getitem__(self, index: slice) -> list[Batch]: ...

    def __getitem__(self, index: int | slice) -> Batch | list[Batch]:
        if isinstance(index, slice):
            return [self[i] for i in range(*index.indices(len(self)))]
        return {self._name: self._decode(self.groups[index])}

    def __iter__(self) -> Iterator[Batch]:
        for index in range(len(self)):
            yield self[index]

    def __repr__(self) -> str:
        size = len(self.groups[0]) if self.groups else 0
        return f"FolderBatches({self.source}: {len(self)} batches of {size} file(s))"


def _group(files: list[Path], batch_size: int) -> list[list[Path]]:
    usable = (len(files) // batch_size) * batch_size
    if usable < len(files):
        logger.info("dropping the last %d sample(s) that do not fill a batch of %d", len(files) - usable, batch_size)
    return [files[i : i + batch_size] for i in range(0, usable, batch_size)]


def _has_image_extension(name: str) -> bool:
    from torchvision.datasets.folder import IMG_EXTENSIONS

    return name.lower().endswith(IMG_EXTENSIONS)


class _FolderWalk:
    """Lists folders below a root, following links but reading each real folder once, within the limits.

    A folder is known by its device and inode (``os.stat``, links followed), so a link back up the tree or two links
    to one folder are read once (at the first path in sorted depth-first order; a link to a class folder is not
    followed, the class reads it): the walk reads each folder once, where ``os.walk(followlinks=True)`` branches
    exponentially through link loops. Only regular files (links followed) are listed: no FIFO, device or socket is
    ever opened.
    """

    def __init__(self, root: Path, argument: str) -> None:
        self.root = root
        self.argument = argument
        self.visited: set[tuple[int, int]] = set()
        self.reserved: set[tuple[int, int]] = set()
        self.entries = 0

    def reserve(self, folders: list[Path]) -> None:
        """Read ``folders`` only as the tops of :meth:`tree` (the class folders), never through a link."""
        for folder in folders:
            with contextlib.suppress(OSError):
                info = os.stat(folder)
                self.reserved.add((info.st_dev, info.st_ino))

    def scan(self, directory: Path, depth: int = 0, top: bool = True) -> tuple[list[str], list[str]] | None:
        """The sub-folder and regular file names of ``directory``; None when it was read already or is unreadable.

        Raises:
            InvalidArgumentError: ``directory`` is deeper than :data:`MAX_FOLDER_DEPTH` below the root, or the walk
                has listed more than :data:`MAX_FOLDER_ENTRIES` entries.
        """
        try:
            info = os.stat(directory)
        except OSError:
            return None
        key = (info.st_dev, info.st_ino)
        if key in self.visited or (key in self.reserved and not top):
            return None
        self.visited.add(key)
        if depth > MAX_FOLDER_DEPTH:
            raise InvalidArgumentError(
                f"{self.argument}: {str(directory)!r} is {depth} folders deep below {str(self.root)!r}, deeper than "
                f"{MAX_FOLDER_DEPTH}; expected class sub-folders of images (ImageFolder) or a flat folder")
        try:
            with os.scandir(directory) as listing:
                entries = list(listing)
        except OSError:  # unreadable: skipped, as os.walk does
            return None
        self.entries += len(entries)
        if self.entries > MAX_FOLDER_ENTRIES:
            raise InvalidArgumentError(
                f"{self.argument}: more than {MAX_FOLDER_ENTRIES} files and folders under {str(self.root)!r}; "
                "expected a calibration folder (a few thousand images are plenty), not a whole disk")
        folders: list[str] = []
        files: list[str] = []
        for entry in entries:
            if entry.is_dir():
                folders.append(entry.name)
            elif entry.is_file():
                files.append(entry.name)
        return folders, files

    def tree(self, top: Path, depth: int = 1) -> list[tuple[str, list[str]]]:
        """``(folder, regular file names)`` of ``top`` and every folder below it, sorted by path like ``os.walk``'s."""
        found: list[tuple[str, list[str]]] = []
        stack = [(top, depth)]
        while stack:
            directory, level = stack.pop()
            listed = self.scan(directory, level, top=directory == top)
            if listed is None:
                continue
            folders, files = listed
            found.append((str(directory), files))
            stack.extend((directory / name, level + 1) for name in sorted(folders, reverse=True))
        return sorted(found)


def _list_images(root: Path) -> tuple[list[Path], str]:
    """The images of an ImageFolder root (class sub-folders, torchvision's order) or of a flat folder."""
    walk = _FolderWalk(root, "root")
    folders, files = walk.scan(root) or ([], [])
    classes = sorted(folders)
    walk.reserve([root / cls for cls in classes])
    in_classes: list[Path] = []
    for cls in classes:  # the order of torchvision.datasets.ImageFolder: class by class, sorted walk
        for dirpath, names in walk.tree(root / cls):
            in_classes += [Path(dirpath) / n for n in sorted(names) if _has_image_extension(n)]
    flat = sorted(root / name for name in files if _has_image_extension(name))
    if in_classes:
        if flat:
            logger.warning("%s: %d image(s) beside the class sub-folders are not used (ImageFolder layout: one "
                           "sub-folder per class)", root, len(flat))
        return in_classes, f"ImageFolder {root} ({len(classes)} class folders)"
    return flat, f"image folder {root}"


def imagefolder_calibset(
    root: str | Path,
    input_shapes: Mapping[str, Sequence[int]],
    mean: Sequence[float] = IMAGENET_MEAN,
    std: Sequence[float] = IMAGENET_STD,
    limit: int | None = None,
    seed: int = 0,
) -> FolderBatches:
    """Build a calibration set from a folder of images: an ImageFolder root, or a flat folder of images.

    With class sub-folders (``torchvision.datasets.ImageFolder`` layout) their images are used, in
    ImageFolder's order; a folder without sub-folders holding images is used as it is (flat). Images
    (``.jpg``, ``.jpeg``, ``.png``, ``.ppm``, ``.bmp``, ``.pgm``, ``.tif``, ``.tiff``, ``.webp``) are
    resized to the input's height and width, converted to its channel count (1-channel models get
    grayscale), turned into tensors in ``[0, 1]`` (``ToTensor``), normalised with ``mean``/``std`` and
    stacked into batches of the batch size in ``input_shapes``. Samples are shuffled with ``seed`` so that a
    few calibration steps still see every class.

    The batches are decoded on demand (:class:`FolderBatches`): listing the folder reads no image, and
    ``quantize(calibset=..., calib_steps=n)`` decodes only the ``n`` batches it uses.

    Args:
        root: ImageFolder root (one sub-folder per class) or a folder of images.
        input_shapes: ``{input name: [batch, channels, height, width]}`` for a single-input model.
        mean: Per-channel mean in ``[0, 1]`` pixel scale (after ``ToTensor``): one value, or one per channel
            (the RGB default is averaged for 1 channel).
        std: Per-channel standard deviation, as ``mean``; every entry ``> 0``.
        limit: Use at most this many images.
        seed: Seed of the shuffle.

    Returns:
        A sequence of ``{input name: tensor [batch, C, H, W]}`` batches, decoded when indexed.

    Raises:
        InvalidArgumentError: ``root`` is not a directory or has no images, or ``input_shapes``/``mean``/``std``/
            ``limit`` do not fit.
        CalibrationError: (when a batch is read) an image cannot be decoded.
    """
    from PIL import Image
    from torchvision import transforms

    name, (batch_size, channels, height, width) = _single_input(input_shapes)
    if channels not in (1, 3):
        raise InvalidArgumentError(f"input_shapes[{name!r}]: images have 1 or 3 channels, got {channels}")
    if limit is not None and (isinstance(limit, bool) or not isinstance(limit, int) or limit <= 0):
        raise InvalidArgumentError(f"limit: expected a positive int or None, got {limit!r}")
    seed = check_seed(seed)
    if not isinstance(root, (str, Path)) or not Path(root).is_dir():
        raise InvalidArgumentError(f"root: {root!r} is not a directory; expected an ImageFolder root or a folder "
                                   "of images")
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
    transform = transforms.Compose(steps)
    root = Path(root)
    images, source = _list_images(root)
    if not images:
        raise InvalidArgumentError(
            f"root: no images under {str(root)!r}; expected class sub-folders of images (ImageFolder) or image "
            "files (.jpg, .jpeg, .png, .ppm, .bmp, .pgm, .tif, .tiff, .webp) in the folder itself")
    order = torch.randperm(len(images), generator=torch.Generator().manual_seed(int(seed))).tolist()
    if limit is not None:
        order = order[:limit]

    def decode(files: list[Path]) -> torch.Tensor:
        samples = []
        for file in files:
            data = read_regular(file, "calibset: image", MAX_INPUT_FILE_BYTES, error=CalibrationError)
            try:
                with Image.open(io.BytesIO(data)) as image:  # what torchvision's default loader does, from bytes
                    samples.append(transform(image.convert("RGB")))
            except Exception as exc:
                raise CalibrationError(f"calibset: cannot read image {file} ({type(exc).__name__}: {exc})") from None
        return torch.stack(samples)

    batches = FolderBatches(name, _group([images[i] for i in order], batch_size), decode, source)
    logger.info("%s: %d images -> %d batches of %d", source, len(order), len(batches), batch_size)
    return batches


def _npy_header(handle: BinaryIO) -> tuple[tuple[int, ...], np.dtype]:
    """Shape and dtype of an open ``.npy`` file from its header (the data is not read)."""
    version = np.lib.format.read_magic(handle)
    if version == (1, 0):
        shape, _, dtype = np.lib.format.read_array_header_1_0(handle)
    elif version == (2, 0):
        shape, _, dtype = np.lib.format.read_array_header_2_0(handle)
    else:  # format 3.0 (a UTF-8 header) has no public reader
        shape, _, dtype = np.lib.format._read_array_header(handle, version)
    return tuple(shape), np.dtype(dtype)


@contextlib.contextmanager
def _open_npy(file: Path, error: type[MaptoolsError]) -> Iterator[tuple[BinaryIO, tuple[int, ...], np.dtype]]:
    """Open a ``.npy`` file of a folder (a regular file within the limit), read its header, check its size."""
    with open_regular(file, f"calib_npy: {file.name}", MAX_INPUT_FILE_BYTES, error=error) as (handle, size):
        try:
            shape, dtype = _npy_header(handle)
        except Exception as exc:
            raise error(f"calib_npy: {file.name} is not a readable .npy file ({exc})") from None
        declared = handle.tell() + math.prod(shape) * dtype.itemsize
        if size != declared:
            raise error(f"calib_npy: {file.name} holds {size} bytes, its header declares {declared} (shape "
                        f"{list(shape)}, {dtype}); expected a .npy file as numpy.save writes it")
        yield handle, shape, dtype


def _load_npy(file: Path, shape: tuple[int, ...]) -> np.ndarray:
    """The array of a listed ``.npy`` file (a batch of ``shape`` or one sample), opened and checked again."""
    with _open_npy(file, CalibrationError) as (handle, given, dtype):
        if given not in (shape, shape[1:]) or dtype.kind not in "biuf":  # replaced since it was listed
            raise CalibrationError(f"calib_npy: {file.name} now holds {dtype} of shape {list(given)}, expected "
                                   f"numbers of shape {list(shape)} or {list(shape[1:])}")
        return np.fromfile(handle, dtype=dtype, count=math.prod(given)).reshape(given)


def npy_calibset(directory: str | Path, input_shapes: Mapping[str, Sequence[int]]) -> FolderBatches:
    """Build a calibration set from a folder of ``.npy`` arrays (the layout of PPQ's tutorial).

    Each file holds either a whole batch with the shape in ``input_shapes`` or a single sample (that
    shape without the batch dimension); single samples are stacked into batches. Files are read in
    sorted name order: the whole batches first, then the stacked samples. Only the headers are read here
    (every file's shape is checked at once); the arrays are loaded when a batch is indexed
    (:class:`FolderBatches`).

    Args:
        directory: Folder holding ``*.npy`` files.
        input_shapes: ``{input name: shape}`` for a single-input model.

    Returns:
        A sequence of ``{input name: tensor}`` batches, loaded when indexed.

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
    _, names = _FolderWalk(Path(directory), "calib_npy").scan(Path(directory)) or ([], [])
    files = sorted(Path(directory) / name for name in names if name.endswith(".npy") and not name.startswith("."))
    if not files:
        raise InvalidArgumentError(f"calib_npy: no .npy files in {str(directory)!r}")
    whole: list[list[Path]] = []
    singles: list[Path] = []
    for file in files:
        with _open_npy(file, InvalidArgumentError) as (_, given, dtype):
            pass
        if dtype.kind not in "biuf":
            raise InvalidArgumentError(f"calib_npy: {file.name} holds dtype {dtype}, expected numbers")
        if given == shape:
            whole.append([file])
        elif given == shape[1:]:
            singles.append(file)
        else:
            raise InvalidArgumentError(
                f"calib_npy: {file.name} has shape {list(given)}, expected {list(shape)} or {list(shape[1:])}"
            )

    def decode(group: list[Path]) -> torch.Tensor:
        arrays = [_load_npy(file, shape) for file in group]
        if len(group) == 1 and tuple(arrays[0].shape) == shape:
            return torch.from_numpy(np.asarray(arrays[0], order="C"))
        return torch.stack([torch.from_numpy(np.asarray(a, order="C")) for a in arrays])

    groups = whole + (_group(singles, shape[0]) if shape else [])
    batches = FolderBatches(name, groups, decode, f".npy folder {directory}")
    logger.info("%s: %d files -> %d batches", batches.source, len(files), len(batches))
    return batches
