"""The structure of each file of a map, checked right after parsing: a wrong shape is an ``ArtifactError``.

One checker per file of :mod:`maptools.quantization.format` (``check_manifest``, ``check_quantinfo``,
``check_quantparams``, ``check_ppq_state``, ``check_cim_file``), each naming the file and the field at fault
(``"manifest.json: field 'settings' is missing"``). The records of ``quantinfo.pkl`` are checked against
the type hints of their own dataclasses (:mod:`maptools.quantization.records`), so a field's type is defined
once. Parsed JSON and unpickled data are also limited in depth (:data:`MAX_DEPTH`, checked without
recursion), so nothing that walks them later can recurse without bound.

This module imports the standard library, numpy and the records only (no torch, no PPQ).
"""

from __future__ import annotations

import dataclasses
import math
import types
import typing
from collections.abc import Mapping
from functools import cache
from typing import Any

import numpy as np

from maptools.errors import ArtifactError
from maptools.quantization.format import CIM_FILE, MANIFEST, PPQSTATE, QUANTINFO, QUANTPARAMS
from maptools.quantization.records import OperatorQuantConfig

__all__ = ["MAP_SECTIONS", "MAX_DEPTH", "MAX_INPUT_ELEMENTS", "check_cim_file", "check_depth", "check_manifest",
           "check_quantinfo", "check_quantparams", "check_ppq_state", "check_record"]

#: Deepest nesting of lists and dicts accepted in a JSON artifact or a pickle (maptools writes at most 8).
MAX_DEPTH = 64
#: Most elements of one input shape a manifest may record (a batch of that many float32 is 1 GiB).
MAX_INPUT_ELEMENTS = 1 << 28
#: Largest absolute integer accepted in a record (int32: bits, zero points, integer ranges, axes).
_INT_LIMIT = 1 << 31
_BITS_FIELDS = frozenset({"bits", "input_bits", "output_bits", "io_bits", "weight_bits", "bias_bits",
                          "activation_bits"})
_MAX_BITS = 32
#: Scales: finite numbers; the array ones (per output channel) one-dimensional and not empty. Not required
#: positive: LSQ (recipe ``best``) trains weight scales, and the mobile example at W4A4 ``best`` holds one <= 0.
_SCALE_FIELDS = frozenset({"scale", "input_scale", "output_scale", "weight_scale", "bias_scale"})
_MAX_NDIM = 8


def _fail(what: str, field: str, problem: str) -> ArtifactError:
    return ArtifactError(f"{what}: field {field!r} {problem}" if field else f"{what}: {problem}")


def _type_name(value: object) -> str:
    return "null" if value is None else type(value).__name__


def check_depth(value: Any, what: str, limit: int = MAX_DEPTH) -> None:
    """Refuse lists, tuples and dicts nested deeper than ``limit`` (iteratively, each container once).

    Raises:
        ArtifactError: nested deeper than ``limit``.
    """
    stack: list[tuple[Any, int]] = [(value, 1)]
    deepest: dict[int, int] = {}
    while stack:
        item, depth = stack.pop()
        if isinstance(item, Mapping):
            children: Any = item.values()
        elif isinstance(item, (list, tuple, set, frozenset)):
            children = item
        else:
            continue
        if deepest.get(id(item), 0) >= depth:  # a pickle may share a container (or hold a cycle): walk it again
            continue                            # only when reached deeper (at most `limit` times)
        deepest[id(item)] = depth
        if depth > limit:
            raise ArtifactError(f"{what}: nested deeper than {limit} levels; a maptools artifact is not")
        stack.extend((child, depth + 1) for child in children)


def _mapping(value: Any, what: str, field: str, expected: str = "an object") -> Mapping[str, Any]:
    if not isinstance(value, Mapping):
        if not field:
            raise ArtifactError(f"{what}: expected {expected}, got {_type_name(value)}")
        raise _fail(what, field, f"is {_type_name(value)}, expected {expected}")
    return value


def _get(container: Mapping[str, Any], key: str, what: str, prefix: str = "") -> Any:
    field = f"{prefix}{key}"
    if key not in container:
        raise _fail(what, field, "is missing")
    return container[key]


def _int(value: Any, what: str, field: str, low: int, high: int) -> int:
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)):
        raise _fail(what, field, f"is {_type_name(value)}, expected an integer in {low}..{high}")
    if not low <= value <= high:
        raise _fail(what, field, f"is {value}, expected an integer in {low}..{high}")
    return int(value)


def _str(value: Any, what: str, field: str) -> str:
    if not isinstance(value, str):
        raise _fail(what, field, f"is {_type_name(value)}, expected a string")
    return value


# -- manifest.json --------------------------------------------------------------------------------------------
def _check_shape(value: Any, what: str, field: str) -> None:
    if not isinstance(value, list) or len(value) > _MAX_NDIM:
        raise _fail(what, field, f"is {_type_name(value)} {str(value)[:40]}, expected a list of at most {_MAX_NDIM} "
                    "positive integers")
    elements = 1
    for index, dim in enumerate(value):
        elements *= _int(dim, what, f"{field}[{index}]", 1, MAX_INPUT_ELEMENTS)
    if elements > MAX_INPUT_ELEMENTS:
        raise _fail(what, field, f"is {value}: {elements} elements, more than the {MAX_INPUT_ELEMENTS} accepted")


#: The sections of a manifest that ``quantize`` always writes, beyond the ``format_version`` and ``files`` every
#: reader needs: required by the readers that use them (``check_manifest(..., complete=True)``).
MAP_SECTIONS = ("model", "settings", "versions")


def check_manifest(manifest: Any, what: str = MANIFEST, complete: bool = False) -> dict[str, Any]:
    """Check the fields of ``manifest.json`` that readers use; returns it.

    Always required: ``format_version`` (str) and ``files`` (name -> ``{"sha256": str, "bytes": int}``).
    ``model`` (``path``, ``sha256``: str), ``settings`` (``input_shapes``: input name -> shape, ``seed``: int)
    and ``versions`` (name -> str) are checked when present, and required with ``complete`` (the readers of
    the float model, the input shapes or the versions: ``verify``, ``cim-sweep``, ``inspect``).

    Raises:
        ArtifactError: naming the field that is missing or of the wrong type.
    """
    manifest = dict(_mapping(manifest, what, "", "a JSON object (the top level of a manifest)"))
    _str(_get(manifest, "format_version", what), what, "format_version")
    files = _mapping(_get(manifest, "files", what), what, "files")
    for name, entry in files.items():
        entry = _mapping(entry, what, f"files.{name}")
        _str(_get(entry, "sha256", what, f"files.{name}."), what, f"files.{name}.sha256")
        if "bytes" in entry:
            _int(entry["bytes"], what, f"files.{name}.bytes", 0, 1 << 62)
    for section in MAP_SECTIONS:
        if complete:
            _get(manifest, section, what)
    if "model" in manifest:
        model = _mapping(manifest["model"], what, "model")
        for key in ("path", "sha256"):
            if not _str(_get(model, key, what, "model."), what, f"model.{key}"):
                raise _fail(what, f"model.{key}", "is empty")
    if "settings" in manifest:
        settings = _mapping(manifest["settings"], what, "settings")
        shapes = _mapping(_get(settings, "input_shapes", what, "settings."), what, "settings.input_shapes")
        if not shapes:
            raise _fail(what, "settings.input_shapes", "is empty, expected input name -> shape")
        for name, shape in shapes.items():
            _check_shape(shape, what, f"settings.input_shapes.{name}")
        # torch.manual_seed accepts -2^63 .. 2^64-1; verify seeds its random batches with seed + 1
        _int(_get(settings, "seed", what, "settings."), what, "settings.seed", -(1 << 63), (1 << 64) - 2)
    if "versions" in manifest:
        for key, value in _mapping(manifest["versions"], what, "versions").items():
            _str(value, what, f"versions.{key}")
    check_depth(manifest, what)
    return manifest


# -- quantinfo.pkl ----------------------------------------------------------------------------------------------
@cache
def _hints(cls: type) -> dict[str, Any]:
    return typing.get_type_hints(cls)


def _matches(value: Any, hint: Any, name: str) -> bool:
    """Whether ``value`` has the type ``hint`` (the subset of type hints the records use)."""
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if hint is Any:
        return True
    if origin in (typing.Union, types.UnionType):
        return any(_matches(value, arg, name) for arg in args)
    if hint is type(None):
        return value is None
    if origin is list:
        return isinstance(value, list) and all(_matches(item, args[0], name) for item in value)
    if origin is tuple:
        return (isinstance(value, tuple) and len(value) == len(args)
                and all(_matches(item, arg, name) for item, arg in zip(value, args, strict=True)))
    if origin is dict:
        return isinstance(value, dict) and all(_matches(k, args[0], name) and _matches(v, args[1], name)
                                               for k, v in value.items())
    if hint is bool:
        return isinstance(value, (bool, np.bool_))
    if hint is int:
        if isinstance(value, bool) or not isinstance(value, (int, np.integer)):
            return False
        return (1 <= value <= _MAX_BITS) if name in _BITS_FIELDS else abs(int(value)) < _INT_LIMIT
    if hint is float:
        return (isinstance(value, (int, float, np.integer, np.floating)) and not isinstance(value, bool)
                and math.isfinite(float(value)))
    if hint is str:
        return isinstance(value, str)
    if hint is np.ndarray:
        return (isinstance(value, np.ndarray) and value.dtype.kind in "biuf" and value.ndim <= _MAX_NDIM
                and (value.dtype.kind != "f" or bool(np.isfinite(value).all())))
    if dataclasses.is_dataclass(hint):
        return isinstance(value, hint)
    return False


def _describe(hint: Any) -> str:
    if isinstance(hint, type):
        return hint.__name__
    text = str(hint).replace("typing.", "").replace("numpy.", "np.")
    return text.replace("maptools.quantization.records.", "").replace("maptools.quantization.placement.", "")


def _shown(value: Any) -> str:
    if isinstance(value, np.ndarray):
        return f"an array of dtype {value.dtype}, shape {list(value.shape)}"
    return f"{_type_name(value)} {str(value)[:40]}"


def _scale_shaped(value: Any) -> bool:
    array = np.asarray(value)
    return array.ndim == 0 or (array.ndim == 1 and array.size > 0)


def check_record(record: Any, cls: type, what: str, where: str) -> None:
    """Check every field of a record (an :class:`OperatorQuantConfig`, a :class:`TensorQuant`, a dataclass) by type.

    Integers are within int32 (bit widths within 1..32), floats and float arrays finite, arrays numeric.

    Raises:
        ArtifactError: naming the record and the field.
    """
    if type(record) is not cls:
        raise ArtifactError(f"{what}: {where} is {_type_name(record)}, expected {cls.__name__}")
    state = vars(record)
    for field in dataclasses.fields(cls):
        hint = _hints(cls)[field.name]
        if field.name not in state:
            if field.default is dataclasses.MISSING:  # a field with a default reads the class's (cim: None)
                raise ArtifactError(f"{what}: {where}: field {field.name!r} is missing")
            continue
        value = state[field.name]
        if not _matches(value, hint, field.name):
            raise ArtifactError(f"{what}: {where}: field {field.name!r} is {_shown(value)}, expected {_describe(hint)}"
                                + (f" within 1..{_MAX_BITS}" if field.name in _BITS_FIELDS else ""))
        if field.name in _SCALE_FIELDS and value is not None and not _scale_shaped(value):
            raise ArtifactError(f"{what}: {where}: field {field.name!r} is {_shown(value)}, expected a scale (a "
                                "number, or a one-dimensional array of one or more entries)")
        if isinstance(value, list):
            for index, item in enumerate(value):
                if item is not None and dataclasses.is_dataclass(item):
                    check_record(item, type(item), what, f"{where}.{field.name}[{index}]")
    extra = sorted(set(state) - {f.name for f in dataclasses.fields(cls)})
    if extra:
        raise ArtifactError(f"{what}: {where}: unknown field(s) {extra[:5]}")


def check_quantinfo(quantinfo: Any, what: str = QUANTINFO) -> dict[str, OperatorQuantConfig]:
    """Check ``quantinfo.pkl``: a dict of operator name -> :class:`OperatorQuantConfig`, each field typed.

    Raises:
        ArtifactError: naming the record and the field.
    """
    if not isinstance(quantinfo, dict):
        raise ArtifactError(f"{what}: expected a dict of operator name -> OperatorQuantConfig, got "
                            f"{_type_name(quantinfo)}")
    check_depth(quantinfo, what)
    for name, record in quantinfo.items():
        if not isinstance(name, str):
            raise ArtifactError(f"{what}: key {name!r} is {_type_name(name)}, expected an operator name (str)")
        check_record(record, OperatorQuantConfig, what, f"record {name!r}")
        if record.name != name:
            raise ArtifactError(f"{what}: record {name!r}: field 'name' is {record.name!r}, expected its key")
    return quantinfo


def check_quantparams(quantparams: Any, what: str = QUANTPARAMS) -> dict[str, np.ndarray | None]:
    """Check ``quantparams.pkl``: a dict of key -> integer numpy array (or None).

    Raises:
        ArtifactError: naming the key.
    """
    if not isinstance(quantparams, dict):
        raise ArtifactError(f"{what}: expected a dict of parameter key -> integer numpy array, got "
                            f"{_type_name(quantparams)}")
    for key, value in quantparams.items():
        if not isinstance(key, str):
            raise ArtifactError(f"{what}: key {key!r} is {_type_name(key)}, expected a parameter key (str)")
        if value is None:
            continue
        if not isinstance(value, np.ndarray) or value.dtype.kind not in "iu" or value.ndim > _MAX_NDIM:
            shown = f"an array of dtype {value.dtype}, shape {list(value.shape)}" if isinstance(value, np.ndarray) \
                else _type_name(value)
            raise ArtifactError(f"{what}: field {key!r} is {shown}, expected an integer numpy array of at most "
                                f"{_MAX_NDIM} dimensions (or None)")
    return quantparams


# -- ppq_state.json -----------------------------------------------------------------------------------------------
_CONFIG_KEYS = ("state", "policy", "num_of_bits", "quant_min", "quant_max", "exponent_bits", "rounding",
                "channel_axis", "observer_algorithm", "visibility")


def _check_config(entry: Any, what: str, field: str) -> None:
    entry = _mapping(entry, what, field)
    for key in _CONFIG_KEYS:
        _get(entry, key, what, f"{field}.")
    for key in ("state", "rounding", "visibility"):
        _str(entry[key], what, f"{field}.{key}")
    _int(entry["policy"], what, f"{field}.policy", 0, _INT_LIMIT)
    _int(entry["num_of_bits"], what, f"{field}.num_of_bits", 1, _MAX_BITS)
    _int(entry["exponent_bits"], what, f"{field}.exponent_bits", 0, _MAX_BITS)
    for key in ("quant_min", "quant_max"):
        _int(entry[key], what, f"{field}.{key}", -_INT_LIMIT, _INT_LIMIT)
    if entry["channel_axis"] is not None:
        _int(entry["channel_axis"], what, f"{field}.channel_axis", -_MAX_NDIM, _MAX_NDIM)
    for key in ("scale", "offset"):
        value = entry.get(key)
        if value is not None:
            _mapping(value, what, f"{field}.{key}", "an object (a number or an array entry) or null")
            if "number" in value and not _matches(value["number"], float, key):
                raise _fail(what, f"{field}.{key}.number",
                            f"is {_type_name(value['number'])}, expected a finite number")
    dominated_by = entry.get("dominated_by")
    if dominated_by is not None and (not isinstance(dominated_by, list) or len(dominated_by) != 3):
        raise _fail(what, f"{field}.dominated_by", f"is {_type_name(dominated_by)}, expected [operator, kind, index]")


def check_ppq_state(state: Any, what: str = PPQSTATE) -> dict[str, Any]:
    """Check the structure of ``ppq_state.json`` (:mod:`maptools.quantization.engine.state` reads the values).

    Raises:
        ArtifactError: naming the field.
    """
    state = dict(_mapping(state, what, "", "a JSON object (the top level of a PPQ state)"))
    _int(_get(state, "state_version", what), what, "state_version", 0, _INT_LIMIT)
    _mapping(_get(state, "spec", what), what, "spec")
    operations = _mapping(_get(state, "operations", what), what, "operations")
    for name, entry in operations.items():
        field = f"operations.{name}"
        entry = _mapping(entry, what, field)
        for key in ("type", "platform"):
            _str(_get(entry, key, what, f"{field}."), what, f"{field}.{key}")
        for key in ("inputs", "outputs"):
            names = _get(entry, key, what, f"{field}.")
            if not isinstance(names, list) or not all(isinstance(n, str) for n in names):
                raise _fail(what, f"{field}.{key}", f"is {_type_name(names)}, expected a list of variable names")
        quantization = entry.get("quantization")
        if quantization is not None:
            quantization = _mapping(quantization, what, f"{field}.quantization")
            for key in ("inputs", "outputs"):
                configs = quantization.get(key, [])
                if not isinstance(configs, list):
                    raise _fail(what, f"{field}.quantization.{key}", f"is {_type_name(configs)}, expected a list")
                for index, config in enumerate(configs):
                    _check_config(config, what, f"{field}.quantization.{key}[{index}]")
    detached = state.get("detached_configs", [])
    if not isinstance(detached, list):
        raise _fail(what, "detached_configs", f"is {_type_name(detached)}, expected a list")
    for index, config in enumerate(detached):
        _check_config(config, what, f"detached_configs[{index}]")
    for name, entry in _mapping(state.get("parameters", {}), what, "parameters").items():
        entry = _mapping(entry, what, f"parameters.{name}")
        if "quantparams" in entry:
            _str(entry["quantparams"], what, f"parameters.{name}.quantparams")
        else:
            _mapping(_get(entry, "array", what, f"parameters.{name}."), what, f"parameters.{name}.array")
    check_depth(state, what)
    return state


# -- cim.json ----------------------------------------------------------------------------------------------------
def check_cim_file(data: Any, what: str = CIM_FILE) -> dict[str, Any]:
    """Check the top level of ``cim.json`` (:class:`~maptools.quantization.cim.mapcalibration.MapCalibration` reads
    the rest).

    Raises:
        ArtifactError: naming the field.
    """
    data = dict(_mapping(data, what, "", "a JSON object (the top level of a CIM calibration)"))
    _int(_get(data, "format", what), what, "format", 0, _INT_LIMIT)
    _mapping(_get(data, "spec", what), what, "spec")
    for name, entry in _mapping(_get(data, "adc", what), what, "adc").items():
        _mapping(entry, what, f"adc.{name}")
    for key in ("method", "fingerprint"):
        if key in data:
            _str(data[key], what, key)
    if "batches" in data:
        _int(data["batches"], what, "batches", 0, 1 << 62)
    check_depth(data, what)
    return data
