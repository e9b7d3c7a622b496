"""The inputs a map takes: its recorded input shapes, and batches of them read from a folder."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from maptools.errors import InvalidArgumentError
from maptools.quantization import artifacts

__all__ = ["map_folder_inputs", "map_input_shapes"]


def map_input_shapes(mapname: str, mapsave_dir: str | os.PathLike | None = None) -> dict[str, list[int]]:
    """The input shapes a map was quantized with (``settings.input_shapes`` of its manifest).

    Raises:
        MapNotFoundError: no such map.
        ArtifactError: the manifest is missing, unreadable or of another format version.
    """
    manifest = artifacts.read_manifest(artifacts.resolve_map(mapname, mapsave_dir), complete=True)
    return {name: list(shape) for name, shape in manifest["settings"]["input_shapes"].items()}


def map_folder_inputs(mapname: str, folder: str | os.PathLike, option: str, mean: Any, std: Any, *,
                      mapsave_dir: str | os.PathLike | None = None, python_call: str = "verify",
                      shapes: dict[str, list[int]] | None = None) -> Any:
    """The batches of a folder of ``.npy`` files or images, shaped as the map's (single) input.

    What the command line's ``--inputs DIR`` (and ``cim-sweep --calib DIR``) read: ``.npy`` files with
    :func:`~maptools.quantization.npy_calibset` if the folder holds any, else images with
    :func:`~maptools.quantization.imagefolder_calibset` normalised by ``mean`` and ``std``.

    Args:
        mapname: The map whose input shape the batches take.
        folder: The folder.
        option: The option named in errors (``'--inputs'``).
        mean, std: Image normalisation.
        mapsave_dir: The mapsave directory.
        python_call: The function to name for multi-input maps (``verify`` or ``cim_sweep``).
        shapes: The map's input shapes if its manifest was already read (one snapshot), else None to read them.

    Raises:
        InvalidArgumentError: not a folder, a map with several inputs, or less than one batch in the folder.
    """
    from maptools.quantization.calibfolders import imagefolder_calibset, npy_calibset

    if shapes is None:
        shapes = map_input_shapes(mapname, mapsave_dir)
    path = Path(folder)
    if not path.is_dir():
        raise InvalidArgumentError(f"{option}: {str(folder)!r} is not a directory; expected a folder of .npy files "
                                   "or images")
    if len(shapes) != 1:
        raise InvalidArgumentError(f"{option}: map {mapname!r} has {len(shapes)} inputs {list(shapes)}; a folder "
                                   "of inputs serves single-input maps only (from Python, pass "
                                   f"{python_call}(inputs=...))")
    if any(path.glob("*.npy")):
        batches = npy_calibset(path, shapes)
    else:
        batches = imagefolder_calibset(path, shapes, mean=mean, std=std)
    if len(batches) == 0:
        raise InvalidArgumentError(f"{option}: {str(folder)!r} holds less than one batch of the map's input shape "
                                   f"{next(iter(shapes.values()))}")
    return batches
