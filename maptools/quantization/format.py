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
* :data:`CIM_FILE` (``cim.json``, optional) -- the compute-in-memory ADC calibration of the map's crossbars,
  written by :func:`~maptools.quantization.cim.mapcal.write_map_calibration`
* :data:`MANIFEST` (``manifest.json``) -- :data:`FORMAT_VERSION`, the rounding rule (:data:`ROUNDING`),
  versions, settings, the input model's path and SHA-256, and every file's SHA-256

Maps of format 1.0 also hold :data:`PPQGRAPH` (``ppq_graph.pkl``), PPQ's graph as a plain pickle, which
nothing reads any more. Writing, locking and safe loading are in :mod:`maptools.quantization.artifacts`;
the integer arithmetic the files follow is in :mod:`maptools.quantization.intmath`.

This module imports nothing but :mod:`~maptools.quantization.intmath` (numpy).
"""

from __future__ import annotations

from maptools.quantization.intmath import ROUNDING

__all__ = [
    "BIAS_TYPES",
    "CONV_TYPES",
    "FORMAT_VERSION",
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
    "ROUNDING",
    "bias_key",
    "param_family",
    "weight_key",
]

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
MAC_TYPES = frozenset({"Conv", "ConvTranspose", "Gemm", "MatMul"})
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
