"""The artifact format of ``mapsave/<mapname>``, defined once: names, writing, manifest and safe loading.

A map directory holds:

* ``quantinfo.pkl`` -- ``dict[node name, OperatorQuantConfig]``
* ``quantparams.pkl`` -- ``dict[str, numpy int array | None]`` (integer weights and biases)
* ``quant_model.onnx`` -- the QDQ model
* ``ppq_state.json`` -- PPQ's quantization as data, for :func:`~maptools.quantization.verify` to rebuild PPQ's
  simulation from the float model (see :mod:`maptools.quantization.engine.state`)
* ``report.json``, ``report.png`` -- the quantization report
* ``manifest.json`` -- versions, settings, the input model's path and SHA-256, and every file's SHA-256

Maps of format 1.0 (maptools 0.1 until this change) also hold ``ppq_graph.pkl``, PPQ's graph as a plain pickle: nothing
reads it any more, since unpickling it could run any code its author chose.

Writing is atomic: every file goes into a temporary directory beside the target, which replaces the old
map directory only once complete (two renames), so an interrupted run -- even by SIGKILL -- leaves the
earlier map untouched and loadable. Loading never runs code from a map: the two pickles go through a
restricted unpickler that only rebuilds maptools records, numpy arrays and builtins, the JSON files through
:mod:`json`, and every file is checked against the manifest's SHA-256 (which proves the files are those
``quantize`` wrote together, not who wrote them: the manifest sits in the same folder).
"""

from __future__ import annotations

import contextlib
import hashlib
import io
import json
import logging
import os
import pickle
import re
import shutil
import tempfile
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

from maptools.errors import ArtifactError, InvalidArgumentError, InvalidTypeError, MapNotFoundError, UnsafeArtifactError

__all__ = [
    "FORMAT_VERSION",
    "MANIFEST",
    "PPQGRAPH",
    "PPQSTATE",
    "QUANTINFO",
    "QUANTMODEL",
    "QUANTPARAMS",
    "check_mapname",
    "float_operators",
    "map_directory",
    "mapsave_root",
    "read_json",
    "read_manifest",
    "read_pickle",
    "read_quantinfo",
    "read_quantparams",
    "write_map",
]

logger = logging.getLogger(__name__)

#: Version of the artifact format; loaders refuse other major versions. 1.1: ``ppq_state.json`` replaces
#: ``ppq_graph.pkl``.
FORMAT_VERSION = "1.1"
#: Per-operator quantization configs.
QUANTINFO = "quantinfo.pkl"
#: Integer weights and biases.
QUANTPARAMS = "quantparams.pkl"
#: The QDQ ONNX model.
QUANTMODEL = "quant_model.onnx"
#: Versions, settings and SHA-256 of every file.
MANIFEST = "manifest.json"
#: PPQ's quantization as data (JSON), so ``verify`` can rebuild and replay PPQ's simulation.
PPQSTATE = "ppq_state.json"
#: PPQ's graph as a plain pickle, in maps of format 1.0 only; never read (unpickling it could run code).
PPQGRAPH = "ppq_graph.pkl"
#: Environment variable naming the default mapsave directory.
MAPSAVE_ENV = "MAPTOOLS_MAPSAVE"
PICKLE_PROTOCOL = 4

_MAPNAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._+-]{0,127}$")


def mapsave_root(mapsave_dir: str | os.PathLike | None = None) -> Path:
    """The mapsave directory: ``mapsave_dir``, else ``$MAPTOOLS_MAPSAVE``, else ``./mapsave``."""
    if mapsave_dir is not None and not isinstance(mapsave_dir, (str, os.PathLike)):
        raise InvalidTypeError(f"mapsave_dir: expected a directory path or None, got {type(mapsave_dir).__name__}")
    chosen = mapsave_dir if mapsave_dir is not None else os.environ.get(MAPSAVE_ENV) or "mapsave"
    return Path(chosen).expanduser()


def check_mapname(mapname: object) -> str:
    """Return ``mapname`` if it is a safe directory name, else raise :class:`InvalidArgumentError`."""
    if not isinstance(mapname, str):
        raise InvalidTypeError(f"mapname: expected a string such as 'resnet18', got {type(mapname).__name__}")
    if not mapname:
        raise InvalidArgumentError("mapname: is empty; expected a name such as 'resnet18'")
    if "/" in mapname or "\\" in mapname or os.sep in mapname or mapname.startswith(".") or ".." in mapname:
        raise InvalidArgumentError(
            f"mapname: {mapname!r} contains a path separator, '..' or a leading dot; expected a plain name "
            "such as 'resnet18' (letters, digits, '.', '_', '+', '-')"
        )
    if not _MAPNAME.match(mapname):
        raise InvalidArgumentError(
            f"mapname: {mapname!r} has characters unsafe in file names; expected letters, digits, '.', '_', '+', '-' "
            "(at most 128, starting with a letter or digit)"
        )
    return mapname


def map_directory(mapname: str, mapsave_dir: str | os.PathLike | None = None) -> Path:
    """``<mapsave>/<mapname>`` for a checked map name."""
    return mapsave_root(mapsave_dir) / check_mapname(mapname)


def sha256_of(data: bytes) -> str:
    """Hex SHA-256 of bytes."""
    return hashlib.sha256(data).hexdigest()


def dump_pickle(obj: Any) -> bytes:
    """Serialise an artifact object (deterministic for equal inputs)."""
    return pickle.dumps(obj, protocol=PICKLE_PROTOCOL)


def _fsync_dir(path: Path) -> None:
    with contextlib.suppress(OSError):
        fd = os.open(path, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


def write_map(target: Path, files: Mapping[str, bytes], manifest: dict[str, Any],
              before_swap: Callable[[Path], None] | None = None) -> None:
    """Write a complete map directory atomically.

    Args:
        target: ``<mapsave>/<mapname>``.
        files: File name -> bytes (the manifest is added with every file's SHA-256).
        manifest: Manifest fields; ``files`` and ``format_version`` are filled in here.
        before_swap: Test hook called with the staging directory once everything is written.
    """
    parent = target.parent
    parent.mkdir(parents=True, exist_ok=True)
    recover_interrupted(target)
    for stale in parent.glob(f".{target.name}.tmp-*"):  # left by a killed earlier run
        shutil.rmtree(stale, ignore_errors=True)
    manifest = dict(manifest)
    manifest["format_version"] = FORMAT_VERSION
    manifest["files"] = {name: {"sha256": sha256_of(data), "bytes": len(data)} for name, data in files.items()}
    payload = dict(files)
    payload[MANIFEST] = (json.dumps(manifest, indent=2, sort_keys=True) + "\n").encode()
    staging = Path(tempfile.mkdtemp(prefix=f".{target.name}.tmp-", dir=parent))
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(staging, 0o777 & ~umask)
    try:
        for name, data in payload.items():
            with open(staging / name, "wb") as handle:
                handle.write(data)
                handle.flush()
                os.fsync(handle.fileno())
        _fsync_dir(staging)
        if before_swap is not None:
            before_swap(staging)
        old = None
        if target.exists():
            old = Path(tempfile.mkdtemp(prefix=f".{target.name}.old-", dir=parent))
            os.rmdir(old)
            os.replace(target, old)
        os.replace(staging, target)
        _fsync_dir(parent)
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise


def recover_interrupted(target: Path) -> None:
    """Restore a map left between the two renames of :func:`write_map` by a killed process."""
    if target.exists():
        return
    leftovers = sorted(target.parent.glob(f".{target.name}.old-*"))
    if leftovers:
        os.replace(leftovers[-1], target)
        logger.warning("restored %s from an interrupted write", target)


class _RestrictedUnpickler(pickle.Unpickler):
    """Rebuilds only maptools records, numpy arrays/dtypes/scalars and builtin containers and scalars."""

    _ALLOWED = {
        ("maptools.quantization.records", "OperatorQuantConfig"),
        ("maptools.quantization.records", "TensorQuant"),
        ("numpy", "ndarray"),
        ("numpy", "dtype"),
        ("numpy.core.multiarray", "_reconstruct"),
        ("numpy._core.multiarray", "_reconstruct"),
        ("numpy.core.multiarray", "scalar"),
        ("numpy._core.multiarray", "scalar"),
        ("builtins", "dict"),
        ("builtins", "list"),
        ("builtins", "tuple"),
        ("builtins", "set"),
        ("builtins", "frozenset"),
        ("builtins", "complex"),
        ("collections", "OrderedDict"),
    }

    def find_class(self, module: str, name: str) -> Any:
        if (module, name) in self._ALLOWED or (module == "numpy.dtypes" and name.endswith("DType")):
            return super().find_class(module, name)
        raise UnsafeArtifactError(
            f"refusing to load {module}.{name}: only maptools records, numpy arrays and builtins may appear "
            "in a maptools artifact"
        )


def read_pickle(data: bytes, what: str) -> Any:
    """Unpickle artifact bytes with the restricted unpickler."""
    try:
        return _RestrictedUnpickler(io.BytesIO(data)).load()
    except UnsafeArtifactError as exc:
        raise UnsafeArtifactError(f"{what}: {exc}") from None
    except Exception as exc:
        raise ArtifactError(f"{what}: not a readable maptools pickle ({type(exc).__name__}: {exc})") from None


def dump_json(obj: Any) -> bytes:
    """Serialise a JSON artifact (deterministic: sorted keys)."""
    return (json.dumps(obj, sort_keys=True, separators=(",", ":"), allow_nan=False) + "\n").encode()


def read_json(data: bytes, what: str) -> Any:
    """Parse a JSON artifact (plain data: nothing in it is executed)."""
    try:
        return json.loads(data)
    except ValueError as exc:
        raise ArtifactError(f"{what}: not valid JSON ({exc})") from None


def read_manifest(directory: Path) -> dict[str, Any]:
    """Load and check ``manifest.json`` of a map directory."""
    path = directory / MANIFEST
    if not path.is_file():
        raise ArtifactError(f"{path} is missing; the map is incomplete or was written by another tool. "
                            "Re-run maptools.quantization.quantize to produce it")
    try:
        manifest = json.loads(path.read_text())
    except (OSError, ValueError) as exc:
        raise ArtifactError(f"{path}: not valid JSON ({exc})") from None
    version = str(manifest.get("format_version", ""))
    if version.split(".")[0] != FORMAT_VERSION.split(".")[0]:
        raise ArtifactError(
            f"{path}: artifact format version {version or 'unknown'!r} is not compatible with this maptools "
            f"(format {FORMAT_VERSION}); re-run quantize with this version"
        )
    return manifest


def resolve_map(mapname: str, mapsave_dir: str | os.PathLike | None) -> Path:
    directory = map_directory(mapname, mapsave_dir)
    recover_interrupted(directory)
    if not directory.is_dir():
        raise MapNotFoundError(
            f"mapname: no map {mapname!r} at {directory}; produce it with "
            f"maptools.quantization.quantize(..., mapname={mapname!r}) (or `maptools quantize`)"
        )
    return directory


def read_artifact_bytes(mapname: str, filename: str, mapsave_dir: str | os.PathLike | None = None) -> bytes:
    """Read one artifact file, checked against the manifest's SHA-256."""
    directory = resolve_map(mapname, mapsave_dir)
    manifest = read_manifest(directory)
    path = directory / filename
    if not path.is_file():
        raise ArtifactError(f"{path} is missing; re-run quantize for map {mapname!r}")
    data = path.read_bytes()
    expected = manifest.get("files", {}).get(filename, {}).get("sha256")
    if expected is None:
        raise ArtifactError(f"{path}: not listed in {directory / MANIFEST}")
    if sha256_of(data) != expected:
        raise ArtifactError(
            f"{path} was modified after quantize wrote it (SHA-256 differs from {MANIFEST}); "
            f"re-run quantize for map {mapname!r}"
        )
    return data


#: Name of the nodes the QDQ exporter inserts (QuantizeLinear, DequantizeLinear and their Clip).
_EXPORTER_NODE = re.compile(r"^PPQ_Operation_\d+$")
_EXPORTER_TYPES = {"QuantizeLinear", "DequantizeLinear", "Clip"}


def float_operators(mapname: str, mapsave_dir: str | os.PathLike | None = None) -> list[dict[str, str]]:
    """The operators of ``quant_model.onnx`` left in float: those without a ``quantinfo.pkl`` record.

    The QuantizeLinear, DequantizeLinear and Clip nodes the exporter inserted (named ``PPQ_Operation_<n>``) are
    not counted; what remains without a record runs in float on the chip's host side (shape arithmetic,
    operators PPQ does not quantize...).

    Args:
        mapname: The map name given to ``quantize``.
        mapsave_dir: The mapsave directory (default ``$MAPTOOLS_MAPSAVE`` or ``./mapsave``).

    Returns:
        ``[{"node": name, "op_type": type}, ...]`` in graph order.

    Raises:
        MapNotFoundError: no such map.
        ArtifactError: a file is missing, modified or unreadable.
    """
    import onnx

    quantinfo = read_quantinfo(mapname, mapsave_dir)
    data = read_artifact_bytes(mapname, QUANTMODEL, mapsave_dir)
    try:
        model = onnx.load_from_string(data)
    except Exception as exc:
        raise ArtifactError(f"{QUANTMODEL} of map {mapname!r}: not a readable ONNX model ({exc})") from None
    return [{"node": node.name, "op_type": node.op_type} for node in model.graph.node
            if node.name not in quantinfo
            and not (node.op_type in _EXPORTER_TYPES and _EXPORTER_NODE.match(node.name))]


def read_quantinfo(mapname: str, mapsave_dir: str | os.PathLike | None = None) -> dict:
    """Load ``quantinfo.pkl`` of a map: ``dict[node name, OperatorQuantConfig]``.

    Args:
        mapname: The map name given to ``quantize``.
        mapsave_dir: The mapsave directory (default ``$MAPTOOLS_MAPSAVE`` or ``./mapsave``).

    Raises:
        MapNotFoundError: no such map.
        ArtifactError: a file is missing, modified, corrupt or of an incompatible format version.
        UnsafeArtifactError: the pickle holds anything but maptools records, numpy arrays and builtins.
    """
    data = read_artifact_bytes(mapname, QUANTINFO, mapsave_dir)
    return read_pickle(data, QUANTINFO)


def read_quantparams(mapname: str, mapsave_dir: str | os.PathLike | None = None) -> dict:
    """Load ``quantparams.pkl`` of a map: ``dict[str, numpy integer array | None]``.

    Keys are ``<node>_conv_weight``, ``<node>_conv_bias`` (Conv, ConvTranspose) and ``<node>_gemm_weight``,
    ``<node>_gemm_bias`` (Gemm, MatMul with a constant weight). Weights are integers in
    ``[-2^(b-1), 2^(b-1)-1]`` with the ONNX weight's shape; biases are int32 at scale
    ``input_scale * weight_scale`` (None for an operator without bias).

    Raises:
        MapNotFoundError: no such map.
        ArtifactError: a file is missing, modified, corrupt or of an incompatible format version.
        UnsafeArtifactError: the pickle holds anything but numpy arrays and builtins.
    """
    data = read_artifact_bytes(mapname, QUANTPARAMS, mapsave_dir)
    return read_pickle(data, QUANTPARAMS)
