"""Reading a map safely, and the artifact format's names (re-exported from :mod:`.format`).

The files of ``mapsave/<mapname>`` and their keys are defined in :mod:`maptools.quantization.format`;
writing, locking and finding a map directory in :mod:`maptools.quantization.mapdir`. Both are re-exported
here, the module user code imports.

:func:`read_map` reads every artifact of a map from one snapshot (:mod:`.snapshot`), all of one map even
while another process replaces it; the single-file readers read through the same snapshot.

Loading never runs code from a map: the two pickles go through a restricted unpickler that only rebuilds
maptools records, numpy arrays and builtins, the JSON files through :mod:`json`, and every file is checked
against the manifest's SHA-256 (which proves the files are those ``quantize`` wrote together, not who
wrote them: the manifest sits in the same folder).
"""

from __future__ import annotations

import io
import json
import math
import os
import pickle
import re
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from maptools.errors import ArtifactError, InvalidTypeError, UnsafeArtifactError
from maptools.quantization.boundedio import MAX_MANIFEST_BYTES, read_regular
from maptools.quantization.format import (
    CHANNEL_FORMAT_VERSION,
    CIM_FILE,
    CIM_FORMAT_VERSION,
    FORMAT_VERSION,
    MANIFEST,
    MAPSAVE_ENV,
    PICKLE_PROTOCOL,
    PPQGRAPH,
    PPQSTATE,
    QUANTINFO,
    QUANTMODEL,
    QUANTPARAMS,
    READABLE_MAJORS,
    REPORT_JSON,
    REPORT_PNG,
    bias_key,
    weight_key,
)
from maptools.quantization.mapdir import (
    LOCK_TIMEOUT,
    READ_WAIT,
    check_mapname,
    check_replaceable,
    map_directory,
    map_lock,
    mapsave_root,
    recover_interrupted,
    resolve_map,
    sha256_of,
    write_map,
)
from maptools.quantization.schemas import (
    MAX_DEPTH,
    check_cim_file,
    check_depth,
    check_manifest,
    check_ppq_state,
    check_quantinfo,
    check_quantparams,
)
from maptools.quantization.snapshot import read_files

__all__ = [
    "CIM_FILE",
    "CHANNEL_FORMAT_VERSION",
    "CIM_FORMAT_VERSION",
    "FORMAT_VERSION",
    "LOCK_TIMEOUT",
    "MANIFEST",
    "MapContents",
    "MAPSAVE_ENV",
    "PPQGRAPH",
    "PPQSTATE",
    "QUANTINFO",
    "QUANTMODEL",
    "QUANTPARAMS",
    "REPORT_JSON",
    "REPORT_PNG",
    "bias_key",
    "check_mapname",
    "check_replaceable",
    "dump_json",
    "dump_pickle",
    "float_operators",
    "load_quant_model",
    "load_quantinfo",
    "load_quantparams",
    "map_directory",
    "map_lock",
    "map_contents",
    "mapsave_root",
    "operators_left_in_float",
    "read_artifact_bytes",
    "read_json",
    "parse_manifest",
    "read_manifest",
    "read_map",
    "read_map_files",
    "read_pickle",
    "read_ppq_state",
    "read_quantinfo",
    "read_quantparams",
    "recover_interrupted",
    "resolve_map",
    "sha256_of",
    "weight_key",
    "write_map",
]


def dump_pickle(obj: Any) -> bytes:
    """Serialise an artifact object (deterministic for equal inputs)."""
    return pickle.dumps(obj, protocol=PICKLE_PROTOCOL)


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
    except ArtifactError as exc:  # a record's field checked as it is rebuilt (OperatorQuantConfig.cim)
        raise ArtifactError(f"{what}: {exc}") from None
    except Exception as exc:
        raise ArtifactError(f"{what}: not a readable maptools pickle ({type(exc).__name__}: {exc})") from None


def dump_json(obj: Any) -> bytes:
    """Serialise a JSON artifact (deterministic: sorted keys)."""
    return (json.dumps(obj, sort_keys=True, separators=(",", ":"), allow_nan=False) + "\n").encode()


def _no_constant(name: str) -> Any:
    raise ValueError(f"{name} is not a number JSON allows")


def _finite_float(text: str) -> float:
    value = float(text)
    if not math.isfinite(value):
        raise ValueError(f"number {text[:20]}... does not fit a float64")
    return value


def read_json(data: bytes, what: str) -> Any:
    """Parse a JSON artifact (plain data: nothing in it is executed), nested at most :data:`.schemas.MAX_DEPTH`.

    ``NaN``, ``Infinity`` and numbers beyond float64 are refused (maptools never writes them).
    """
    try:
        parsed = json.loads(data, parse_constant=_no_constant, parse_float=_finite_float)
    except RecursionError:
        raise ArtifactError(f"{what}: nested deeper than {MAX_DEPTH} levels; a maptools artifact is not") from None
    except ValueError as exc:  # JSONDecodeError, UnicodeDecodeError, an integer of more than 4300 digits
        raise ArtifactError(f"{what}: not valid JSON ({' '.join(str(exc).split())[:200]})") from None
    check_depth(parsed, what)
    return parsed


def read_manifest(directory: Path, complete: bool = False) -> dict[str, Any]:
    """Load and check ``manifest.json`` of a map directory (a writer's swap in progress is waited for).

    Args:
        directory: The map directory.
        complete: Also require the ``model``, ``settings`` and ``versions`` sections ``quantize`` writes
            (:func:`~.schemas.check_manifest`), for the readers that use them.
    """
    path = directory / MANIFEST
    if not os.path.lexists(path):
        with map_lock(directory, READ_WAIT, shared=True):  # between a swap's two renames: wait for the writer
            pass
    if not os.path.lexists(path):
        raise ArtifactError(f"{path} is missing; the map is incomplete or was written by another tool. "
                            "Re-run maptools.quantization.quantize to produce it")
    return parse_manifest(read_regular(path, MANIFEST, MAX_MANIFEST_BYTES, follow_links=False), path, complete)


def parse_manifest(data: bytes, path: Path, complete: bool = False) -> dict[str, Any]:
    """Check the bytes of ``manifest.json`` (read from ``path``): its schema, of a compatible format version."""
    manifest = read_json(data, f"{path}")
    if not isinstance(manifest, dict):
        check_manifest(manifest, f"{path}")  # raises: names what the top level is
    version = manifest.get("format_version", "")
    major = re.fullmatch(r"(\d+)\.\d+", version) if isinstance(version, str) else None
    if major is None or major.group(1) not in READABLE_MAJORS:
        raise ArtifactError(
            f"{path}: artifact format version {str(version)[:20] or 'unknown'!r} is not compatible with this "
            f"maptools (format {FORMAT_VERSION}, reads {'.x, '.join(READABLE_MAJORS)}.x); re-run quantize with "
            "this version"
        )
    return check_manifest(manifest, f"{path}", complete)


def _manifest_parser(complete: bool) -> Callable[[bytes, Path], dict[str, Any]]:
    return lambda data, path: parse_manifest(data, path, complete)


def read_map_files(mapname: str, filenames: Iterable[str], mapsave_dir: str | os.PathLike | None = None
                   ) -> dict[str, bytes]:
    """Read some artifact files of a map, all of one map (one snapshot), each checked against the manifest."""
    return read_files(mapname, filenames, mapsave_dir, parse_manifest).files


def read_artifact_bytes(mapname: str, filename: str, mapsave_dir: str | os.PathLike | None = None) -> bytes:
    """Read one artifact file, checked against the manifest read with it (never mixed up by a concurrent swap).

    The file is opened only if it is a regular file (not a link) of the size the manifest records, at most
    :data:`~.boundedio.MAX_ARTIFACT_BYTES` (:mod:`.snapshot`).
    """
    return read_map_files(mapname, [filename], mapsave_dir)[filename]


#: Name of the nodes the QDQ exporter inserts (QuantizeLinear, DequantizeLinear and their Clip).
_EXPORTER_NODE = re.compile(r"^PPQ_Operation_\d+\Z")
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
    files = read_map_files(mapname, [QUANTINFO, QUANTMODEL], mapsave_dir)
    return operators_left_in_float(mapname, load_quantinfo(files[QUANTINFO]), files[QUANTMODEL])


def load_quant_model(mapname: str, data: bytes) -> Any:
    """``quant_model.onnx`` of map ``mapname`` from its checked bytes, as an ``onnx.ModelProto``."""
    import onnx

    try:
        return onnx.load_from_string(data)
    except Exception as exc:
        raise ArtifactError(f"{QUANTMODEL} of map {mapname!r}: not a readable ONNX model ({exc})") from None


def operators_left_in_float(mapname: str, quantinfo: Mapping[str, Any], quant_model: bytes) -> list[dict[str, str]]:
    """:func:`float_operators` of a map's records and ``quant_model.onnx`` already read (one snapshot)."""
    model = load_quant_model(mapname, quant_model)
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
    return load_quantinfo(read_artifact_bytes(mapname, QUANTINFO, mapsave_dir))


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
    return load_quantparams(read_artifact_bytes(mapname, QUANTPARAMS, mapsave_dir))


def load_quantinfo(data: bytes) -> dict:
    """``quantinfo.pkl`` from its checked bytes, its schema checked (what every reader of it shares)."""
    return check_quantinfo(read_pickle(data, QUANTINFO))


def load_quantparams(data: bytes) -> dict:
    """``quantparams.pkl`` from its checked bytes, its schema checked (what every reader of it shares)."""
    return check_quantparams(read_pickle(data, QUANTPARAMS))


def read_ppq_state(mapname: str, mapsave_dir: str | os.PathLike | None = None) -> dict[str, Any]:
    """Load ``ppq_state.json`` of a map, its structure checked (:func:`~.schemas.check_ppq_state`).

    Raises:
        MapNotFoundError: no such map.
        ArtifactError: the file is missing, modified, not JSON or of the wrong structure.
    """
    return check_ppq_state(read_json(read_artifact_bytes(mapname, PPQSTATE, mapsave_dir), PPQSTATE))


@dataclass(frozen=True)
class MapContents:
    """Every artifact of one map, read by :func:`read_map` from one snapshot (the files: :mod:`.format`).

    ``files`` holds the checked bytes of every file the manifest lists (``quant_model.onnx``, ``report.png``...);
    the pickles and JSON files are also given parsed (None for an optional file the map does not have).
    """

    mapname: str
    directory: Path
    manifest: dict[str, Any]
    quantinfo: dict
    quantparams: dict
    ppq_state: dict | None
    report: dict | None
    cim: dict | None
    files: Mapping[str, bytes] = field(repr=False)

    @property
    def quant_model(self) -> bytes:
        """``quant_model.onnx`` as bytes (``onnx.load_from_string`` reads it)."""
        return self.files[QUANTMODEL]


def read_map(mapname: str, mapsave_dir: str | os.PathLike | None = None, *, complete: bool = False) -> MapContents:
    """Read every artifact of a map at once, all of the same map even while another process replaces it.

    Unlike a sequence of :func:`~maptools.quantization.read_quantinfo`, :func:`~maptools.quantization.read_quantparams`
    ... calls, between which a writer may swap the map, everything here comes from one snapshot, every file
    checked against the manifest read with it. Loading runs no code from the map (the restricted unpickler).

    Args:
        mapname: The map name given to ``quantize``.
        mapsave_dir: The mapsave directory (default ``$MAPTOOLS_MAPSAVE`` or ``./mapsave``).
        complete: Also require the manifest's ``model``, ``settings`` and ``versions`` sections (what
            ``verify``, ``inspect``, ``cim-sweep`` and the replay of PPQ's simulation read).

    Raises:
        MapNotFoundError: no such map.
        MapBusyError: a writer held the map's lock for :data:`~maptools.quantization.mapdir.READ_WAIT` seconds.
        ArtifactError: a file is missing, modified, corrupt or of an incompatible format version.
        UnsafeArtifactError: a pickle holds anything but maptools records, numpy arrays and builtins.
    """
    snapshot = read_files(mapname, None, mapsave_dir, _manifest_parser(complete))
    for name in (QUANTINFO, QUANTPARAMS, QUANTMODEL):
        if name not in snapshot.files:
            raise ArtifactError(f"{snapshot.directory / name}: not listed in {snapshot.directory / MANIFEST}; "
                                f"re-run quantize for map {mapname!r}")

    def parsed_json(name: str, check: Callable[[Any, str], Any] = lambda value, _what: value) -> Any:
        return check(read_json(snapshot.files[name], name), name) if name in snapshot.files else None

    return MapContents(
        mapname=mapname, directory=snapshot.directory, manifest=snapshot.manifest,
        quantinfo=load_quantinfo(snapshot.files[QUANTINFO]), quantparams=load_quantparams(snapshot.files[QUANTPARAMS]),
        ppq_state=parsed_json(PPQSTATE, check_ppq_state), report=parsed_json(REPORT_JSON),
        cim=parsed_json(CIM_FILE, check_cim_file),
        files=snapshot.files)


def map_contents(mapname: str | MapContents, mapsave_dir: str | os.PathLike | None = None) -> MapContents:
    """A command's one snapshot of a map: :func:`read_map` (``complete``) of a name, or a read map re-checked.

    Raises:
        InvalidTypeError: ``mapname`` is neither a name nor a :class:`MapContents`.
        MapNotFoundError, ArtifactError: as :func:`read_map`.
    """
    if isinstance(mapname, MapContents):
        check_manifest(mapname.manifest, f"{mapname.directory / MANIFEST}", True)
        return mapname
    if not isinstance(mapname, str):
        raise InvalidTypeError(f"mapname: got {type(mapname).__name__}, expected a map name or read_map()'s result")
    return read_map(mapname, mapsave_dir, complete=True)
