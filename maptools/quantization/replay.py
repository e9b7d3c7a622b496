"""PPQ's simulation of a map, rebuilt from data: the float model, ``ppq_state.json`` and ``quantparams.pkl``.

Nothing of the map is unpickled with code-executing pickle: ``ppq_state.json`` is JSON, ``quantparams.pkl``
goes through the restricted unpickler of :mod:`maptools.quantization.artifacts`, and the graph itself is
loaded by PPQ from the float model recorded in the manifest (checked against its SHA-256), then quantized as
the state says (:meth:`~maptools.quantization.engine.session.PPQSession.from_state`).
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any

from maptools.errors import ArtifactError, FloatModelMissingError
from maptools.quantization import artifacts

if TYPE_CHECKING:
    from maptools.quantization.engine.session import PPQSession

__all__ = ["LegacyGraphError", "float_model_path", "legacy_graph_reason", "ppq_session", "replay_state", "session_of"]


class LegacyGraphError(ArtifactError):
    """A format-1.0 map keeps PPQ's graph as a pickle, which is never unpickled: a limitation, not damage."""


def float_model_path(mapname: str, manifest: Mapping[str, Any], directory: Path) -> Path:
    """The float model a map was quantized from, checked against the manifest's SHA-256.

    The model and its external data are hashed only after their own checks
    (:func:`~maptools.quantization.model.model_sha256`: regular files of a bounded size).

    Raises:
        FloatModelMissingError: the model (or one of its external-data files) is gone, or changed since the map
            was made: what needs it cannot run, the rest of the map still can.
        ArtifactError: the model is there but not a regular file (a FIFO, a device...), too large, or refers
            to external data outside its folder: a crafted map, refused before anything runs.
    """
    from maptools.quantization.model import model_sha256

    model_path = Path(manifest["model"]["path"])
    if not os.path.lexists(model_path):
        raise FloatModelMissingError(f"the float model {model_path} recorded in {directory / artifacts.MANIFEST} is "
                                     "gone; it is needed to run FP32 and to rebuild PPQ's simulation")
    # bounded: a regular file (and external data inside its folder) of a sane size, or an ArtifactError
    what = f"the float model of map {mapname!r} (model.path in {artifacts.MANIFEST})"
    if model_sha256(model_path, what, ArtifactError, FloatModelMissingError) != manifest["model"]["sha256"]:
        raise FloatModelMissingError(f"the float model {model_path} changed since map {mapname!r} was made; re-run "
                                     "quantize")
    return model_path


def legacy_graph_reason(manifest: Mapping[str, Any]) -> str:
    """Why PPQ's simulation of a format-1.0 map (``ppq_graph.pkl``) is not replayed."""
    version = manifest.get("versions", {}).get("maptools", "unknown")
    return (f"this map keeps PPQ's graph as a pickle ({artifacts.PPQGRAPH}, format "
            f"{manifest.get('format_version', '1.0')}, written by maptools {version}); verify no longer unpickles "
            "it: re-quantize to compare with PPQ")


def ppq_session(mapname: str, mapsave_dir: str | os.PathLike | None = None, device: str = "cpu") -> PPQSession:
    """Rebuild PPQ's quantized session of a map, whose forward is PPQ's simulation to the bit.

    Args:
        mapname: The map.
        mapsave_dir: The mapsave directory.
        device: ``'cpu'`` or ``'cuda'``.

    Raises:
        MapNotFoundError: no such map.
        ArtifactError: the map has no ``ppq_state.json`` (format 1.0 maps keep a pickle instead, which is not
            read), a file is modified or malformed, or the float model is unsafe to read.
        FloatModelMissingError: the float model is gone or changed.
        EngineError: PPQ could not rebuild the graph.
    """
    contents = artifacts.read_map(mapname, mapsave_dir, complete=True)
    return session_of(contents, float_model_path(mapname, contents.manifest, contents.directory), device)


def replay_state(contents: artifacts.MapContents) -> dict[str, Any]:
    """The ``ppq_state.json`` PPQ's simulation is rebuilt from.

    Raises:
        ArtifactError: the map has none (a format-1.0 map keeps a pickle instead, which is not read).
    """
    if contents.ppq_state is None:
        if artifacts.PPQGRAPH in contents.files:
            raise LegacyGraphError(legacy_graph_reason(contents.manifest))
        raise ArtifactError(f"map {contents.mapname!r} has no {artifacts.PPQSTATE}; re-quantize to compare with PPQ")
    return contents.ppq_state


def session_of(contents: artifacts.MapContents, model_path: Path, device: str = "cpu") -> PPQSession:
    """:func:`ppq_session` of a map read as one snapshot, its float model at ``model_path`` (checked).

    Raises:
        ArtifactError: the map has no ``ppq_state.json``.
        EngineError: PPQ could not rebuild the graph.
    """
    from maptools.quantization.model import check_input_shapes, load_model, prepare_model

    manifest = contents.manifest
    state = replay_state(contents)
    model = load_model(model_path)
    shapes = check_input_shapes({name: list(shape) for name, shape in manifest["settings"]["input_shapes"].items()},
                                model)
    prepared = prepare_model(model, shapes)

    from maptools.quantization.engine.session import PPQSession

    return PPQSession.from_state(prepared, state, contents.quantparams, device)
