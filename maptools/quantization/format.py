"""The artifact format of ``mapsave/<mapname>``, defined once: version, file names and parameter keys.

A map directory holds:

* :data:`QUANTINFO` (``quantinfo.pkl``) -- ``dict[node name, OperatorQuantConfig]``
* :data:`QUANTPARAMS` (``quantparams.pkl``) -- ``dict[str, numpy int array | None]``: integer weights and
  biases under the keys of :func:`weight_key` and :func:`bias_key`
* :data:`QUANTMODEL` (``quant_model.onnx``) -- the QDQ model
* :data:`PPQSTATE` (``ppq_state.json``) -- PPQ's quantization as data, for
  :func:`~maptools.quantization.verify` to rebuild PPQ's simulation from the float model (see
  :mod:`maptools.quantization.engine.state`)
* :data:`REPORT_JSON`, :data:`REPORT_PNG` (``report.json``, ``report.png``) -- the quantization report
* :data:`CIM_FILE` (``cim.json``, optional) -- the compute-in-memory crossbar and ADC calibration of the map's
  crossbars, written by ``quantize(..., cim=)`` or later by
  :func:`~maptools.quantization.cimmap.mapcal.write_map_calibration`
* :data:`MANIFEST` (``manifest.json``) -- the format version (:data:`FORMAT_VERSION`, or
  :data:`CIM_FORMAT_VERSION` for a map holding ``cim.json``, :data:`CHANNEL_FORMAT_VERSION` for one with
  per-channel activation scales: :func:`format_version`), the rounding rule
  (:data:`~maptools.quantization.intmath.ROUNDING`),
  versions, settings, the input model's path and SHA-256, and every file's SHA-256

A map quantized with ``cim=`` (format :data:`CIM_FORMAT_VERSION`, 2.1) also holds, besides ``cim.json``, the
``cim`` field of every crossbar MAC's record and, in ``quantparams.pkl``, the weight slices
(:func:`weight_slices_key`) and, unless the spec's ``requant`` is ``'float'``, the int32 requantization
multipliers and shifts (:func:`requant_multiplier_key`, :func:`requant_shift_key`). Everything else is laid out
as in 2.0. Loaders read every map of a major version in :data:`READABLE_MAJORS`: 2.x, and the 1.x maps of
earlier maptools (whose records also copy their first input as ``input_*`` fields and the CIM spec).

Maps of format 1.0 also hold :data:`PPQGRAPH` (``ppq_graph.pkl``), PPQ's graph as a plain pickle, which
nothing reads any more. Writing, locking and safe loading are in :mod:`maptools.quantization.artifacts`;
the integer arithmetic the files follow is in :mod:`maptools.quantization.intmath`.

This module imports nothing but the standard library.
"""

from __future__ import annotations

from collections.abc import Iterable

__all__ = [
    "BIAS_TYPES",
    "CONV_TYPES",
    "FORMAT_VERSION",
    "MAC_OPS",
    "MAC_TYPES",
    "MANIFEST",
    "MAPSAVE_ENV",
    "PICKLE_PROTOCOL",
    "PPQGRAPH",
    "PPQSTATE",
    "QUANTINFO",
    "QUANTMODEL",
    "QUANTPARAMS",
    "REPORT_JSON",
    "REPORT_PNG",
    "CIM_FILE",
    "CHANNEL_FORMAT_VERSION",
    "CIM_FORMAT_VERSION",
    "READABLE_MAJORS",
    "bias_key",
    "format_version",
    "param_family",
    "requant_multiplier_key",
    "requant_shift_key",
    "weight_key",
    "weight_slices_key",
]

#: Version of the artifact format. 1.1: ``ppq_state.json`` replaces ``ppq_graph.pkl``. 2.0: records keep their
#: first input once (in ``inputs``) and refer to ``cim.json`` for the CIM spec, so a 1.x reader must refuse them
#: rather than read the missing ``input_*`` fields as None.
FORMAT_VERSION = "2.0"
#: Version of a map quantized with ``cim=``: 2.0 plus the CIM content (``cim.json``, the records' ``cim`` field,
#: the weight slices and requantization multipliers in ``quantparams.pkl``). A map without CIM content is
#: written as :data:`FORMAT_VERSION`.
CIM_FORMAT_VERSION = "2.1"
#: Version of a map whose ``quantinfo.pkl`` records per-channel activation scales (a
#: :class:`~maptools.quantization.records.TensorQuant` with ``axis``: a tensor only depthwise Convs read, see
#: :mod:`maptools.quantization.engine.channelwise`) and whose QDQ model quantizes it along that axis: 2.1 plus
#: that optional field (a minor bump). A map without such a record is written as before.
CHANNEL_FORMAT_VERSION = "2.2"
#: Major format versions this maptools reads: its own and the 1.x maps of earlier versions.
READABLE_MAJORS = ("1", "2")
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
#: Settings, timings and per-operator error.
REPORT_JSON = "report.json"
#: Per-operator SNR figure.
REPORT_PNG = "report.png"
#: The map's compute-in-memory ADC calibration (JSON), present once one is stored.
CIM_FILE = "cim.json"
#: Environment variable naming the default mapsave directory.
MAPSAVE_ENV = "MAPTOOLS_MAPSAVE"
#: Pickle protocol of ``quantinfo.pkl`` and ``quantparams.pkl``.
PICKLE_PROTOCOL = 4

#: Operators that multiply an input by a constant weight: the layers a crossbar holds, whose integer weights
#: ``quantparams.pkl`` keeps (:func:`weight_key`).
MAC_OPS: tuple[str, ...] = ("Conv", "ConvTranspose", "Gemm", "MatMul")
#: The same, as a set.
MAC_TYPES = frozenset(MAC_OPS)
#: The MAC operators with a bias input, kept as int32 (:func:`bias_key`).
BIAS_TYPES = frozenset({"Conv", "ConvTranspose", "Gemm"})
#: Operator types whose parameters are keyed ``_conv_``; every other MAC (Gemm, MatMul) is ``_gemm_``.
CONV_TYPES = frozenset({"Conv", "ConvTranspose"})


def param_family(op_type: str) -> str:
    """``'conv'`` for Conv and ConvTranspose, ``'gemm'`` for Gemm and MatMul: the middle of a parameter key."""
    return "conv" if op_type in CONV_TYPES else "gemm"


def weight_key(op_name: str, op_type: str) -> str:
    """``quantparams.pkl`` key of an operator's integer weight: ``<node>_conv_weight`` or ``<node>_gemm_weight``."""
    return f"{op_name}_{param_family(op_type)}_weight"


def bias_key(op_name: str, op_type: str) -> str:
    """``quantparams.pkl`` key of an operator's integer bias: ``<node>_conv_bias`` or ``<node>_gemm_bias``."""
    return f"{op_name}_{param_family(op_type)}_bias"


def weight_slices_key(op_name: str, op_type: str) -> str:
    """``quantparams.pkl`` key of a crossbar MAC's weight slices (cell digits): ``<weight key>_slices``."""
    return f"{weight_key(op_name, op_type)}_slices"


def requant_multiplier_key(op_name: str, op_type: str) -> str:
    """``quantparams.pkl`` key of a MAC's int32 requantization multipliers: ``<node>_conv_requant_multiplier``."""
    return f"{op_name}_{param_family(op_type)}_requant_multiplier"


def requant_shift_key(op_name: str, op_type: str) -> str:
    """``quantparams.pkl`` key of a MAC's int32 requantization shifts: ``<node>_conv_requant_shift``."""
    return f"{op_name}_{param_family(op_type)}_requant_shift"


def _version_key(version: str) -> tuple[int, ...]:
    return tuple(int(part) for part in version.split("."))


def format_version(file_names: Iterable[str], at_least: str | None = None) -> str:
    """The format version of a map made of these files: :data:`CIM_FORMAT_VERSION` with ``cim.json``, or
    ``at_least`` when that is later (:data:`CHANNEL_FORMAT_VERSION` for per-channel activation records)."""
    version = CIM_FORMAT_VERSION if CIM_FILE in set(file_names) else FORMAT_VERSION
    if at_least is not None and _version_key(at_least) > _version_key(version):
        return at_least
    return version
