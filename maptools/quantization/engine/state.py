"""PPQ's quantized graph as data: what its executor uses, saved without pickle and restored on a rebuilt graph.

A map keeps PPQ's quantization in ``ppq_state.json`` (see :mod:`maptools.quantization.artifacts`), so that
``verify`` can replay PPQ's own simulation without unpickling anything. The graph itself is not saved: it
is rebuilt from the float model, which PPQ loads and dispatches the same way every time
(:meth:`PPQSession.from_onnx <maptools.quantization.engine.session.PPQSession.from_onnx>`). The state
records, for the rebuilt graph:

* every operator's name, type, inputs, outputs and platform (the structure is checked against the
  rebuilt graph, and the platforms decide which operators become quantized);
* every tensor quantization config of a quantized operator, keyed by ``[operator, "in"|"out", index]``:
  state, policy, bits, integer range, rounding, channel axis, scale and offset, and the config it is
  ``dominated_by`` (its key; configs that share one quantization point at the same root);
* every parameter whose value PPQ changed (baked weights and biases, a Clip's bounds, anything a pass
  such as equalization or LSQ modified): weights and biases as a reference to their integers in
  ``quantparams.pkl``, used only when ``(integer - offset) * scale`` gives PPQ's value bit for bit in
  float32, anything else as its own array.

Arrays are stored as ``{"dtype", "shape", "data"}`` with the raw little-endian bytes in base64; only
boolean, integer and float dtypes are accepted. Reading the state runs no code: it is JSON and
``numpy.frombuffer``.
"""

from __future__ import annotations

import base64
import hashlib
import logging
from collections.abc import Mapping
from dataclasses import asdict
from typing import Any

import numpy as np
import torch

from maptools.errors import ArtifactError, EngineError
from maptools.quantization.engine.facade import (
    BaseGraph,
    QuantableOperation,
    QuantizationPolicy,
    QuantizationProperty,
    QuantizationStates,
    QuantizationVisibility,
    RoundingPolicy,
    TargetPlatform,
    TensorQuantizationConfig,
)
from maptools.quantization.engine.quantizer import LowBitSpec
from maptools.quantization.format import bias_key, weight_key
from maptools.quantization.schemas import check_record

__all__ = [
    "STATE_VERSION",
    "capture_state",
    "decode_array",
    "encode_array",
    "parameter_fingerprints",
    "restore_state",
    "spec_from_state",
    "structure_of",
]

logger = logging.getLogger(__name__)

#: Version of the state's own layout (inside ``ppq_state.json``).
STATE_VERSION = 1
_ARRAY_KINDS = "biuf"


# -- arrays -------------------------------------------------------------------------------------------------
def encode_array(value: Any) -> dict[str, Any]:
    """A numpy array or torch tensor as ``{"dtype", "shape", "data"}`` (raw little-endian bytes, base64)."""
    if isinstance(value, torch.Tensor):
        value = value.detach().cpu().numpy()
    array = np.asarray(value)
    if array.dtype.kind not in _ARRAY_KINDS:
        raise EngineError(f"cannot store an array of dtype {array.dtype} in ppq_state.json")
    array = np.ascontiguousarray(array, dtype=array.dtype.newbyteorder("<"))
    return {"dtype": array.dtype.str, "shape": list(array.shape), "data": base64.b64encode(array.tobytes()).decode()}


def decode_array(entry: Any, what: str) -> np.ndarray:
    """Inverse of :func:`encode_array`; refuses anything but a well-formed numeric array.

    Raises:
        ArtifactError: malformed entry, non-numeric dtype or a size that does not match the shape.
    """
    try:
        dtype = np.dtype(str(entry["dtype"]))
        shape = tuple(int(d) for d in entry["shape"])
        raw = base64.b64decode(entry["data"], validate=True)
    except (KeyError, TypeError, ValueError) as exc:
        raise ArtifactError(f"{what}: not an array entry ({type(exc).__name__}: {exc})") from None
    if dtype.kind not in _ARRAY_KINDS or any(d < 0 for d in shape):
        raise ArtifactError(f"{what}: dtype {dtype} / shape {list(shape)} is not a numeric array")
    if len(raw) != dtype.itemsize * int(np.prod(shape, dtype=np.int64)):
        raise ArtifactError(f"{what}: {len(raw)} bytes do not hold a {dtype} array of shape {list(shape)}")
    return np.frombuffer(raw, dtype=dtype).reshape(shape).copy()


def _fingerprint(value: Any) -> str:
    if isinstance(value, torch.Tensor):
        value = value.detach().cpu().numpy()
    array = np.ascontiguousarray(np.asarray(value))
    digest = hashlib.sha256(array.tobytes()).hexdigest()
    return f"{array.dtype.str}{list(array.shape)}{digest}"


def parameter_fingerprints(graph: BaseGraph) -> dict[str, str]:
    """Variable name -> dtype, shape and SHA-256 of every parameter's value (to find those PPQ changes)."""
    return {var.name: _fingerprint(var.value) for var in graph.variables.values()
            if var.is_parameter and var.value is not None}


def structure_of(graph: BaseGraph) -> dict[str, dict[str, Any]]:
    """Operator name -> type, input and output variable names, in the graph's order."""
    return {op.name: {"type": op.type, "inputs": [v.name for v in op.inputs], "outputs": [v.name for v in op.outputs]}
            for op in graph.operations.values()}


# -- capture ------------------------------------------------------------------------------------------------
def _config_keys(graph: BaseGraph) -> dict[int, list[Any]]:
    keys: dict[int, list[Any]] = {}
    for op in graph.operations.values():
        if isinstance(op, QuantableOperation):
            for kind, configs in (("in", op.config.input_quantization_config),
                                  ("out", op.config.output_quantization_config)):
                for index, config in enumerate(configs):
                    keys[id(config)] = [op.name, kind, index]
    return keys


def _number_or_array(value: Any) -> Any:
    if value is None:
        return None
    if isinstance(value, (torch.Tensor, np.ndarray)):
        return encode_array(value)
    if isinstance(value, (bool, int, float)):
        return {"number": value}
    raise EngineError(f"cannot store a quantization scale or offset of type {type(value).__name__}")


def _capture_config(config: TensorQuantizationConfig, keys: dict[int, list[Any]],
                    detached: list[dict[str, Any]]) -> dict[str, Any]:
    root = config.dominated_by
    entry: dict[str, Any] = {
        "state": config.state.name,
        "policy": int(config.policy._policy),
        "num_of_bits": int(config.num_of_bits),
        "quant_min": config.quant_min,
        "quant_max": config.quant_max,
        "exponent_bits": int(config.exponent_bits),
        "rounding": config.rounding.name,
        "channel_axis": config.channel_axis,
        "observer_algorithm": config.observer_algorithm,
        "visibility": config.visibility.name,
        "scale": _number_or_array(config._scale),
        "offset": _number_or_array(config._offset),
        "dominated_by": None,
    }
    if root is not config:
        if id(root) not in keys:  # a root attached to no operator (created by a pass): kept on its own
            keys[id(root)] = ["", "detached", len(detached)]
            detached.append(_capture_config(root, keys, detached))
        entry["dominated_by"] = keys[id(root)]
    return entry


def _dequantized(q: np.ndarray, like: torch.Tensor, config: TensorQuantizationConfig) -> torch.Tensor | None:
    """``(q - offset) * scale`` in float32, as PPQ's linear quantization computes it; None if not applicable."""
    scale, offset = config.scale, config.offset
    if not isinstance(scale, torch.Tensor) or not isinstance(offset, torch.Tensor) or like.dtype != torch.float32:
        return None
    integers = torch.from_numpy(np.asarray(q)).to(torch.float32).reshape(like.shape)
    scale, offset = scale.detach().cpu(), offset.detach().cpu()
    if config.policy.has_property(QuantizationProperty.PER_CHANNEL):
        shape = [1 if axis != config.channel_axis else -1 for axis in range(integers.ndim)]
        scale, offset = scale.view(shape), offset.view(shape)
    return (integers - offset) * scale


def _integer_sources(graph: BaseGraph, quantparams: Mapping[str, Any]) -> dict[str, tuple[str, Any]]:
    """Parameter variable name -> (quantparams key, its config) for weights and biases with integers saved."""
    sources: dict[str, tuple[str, Any]] = {}
    for op in graph.operations.values():
        if not isinstance(op, QuantableOperation):
            continue
        for index, key in ((1, weight_key(op.name, op.type)), (2, bias_key(op.name, op.type))):
            if index < len(op.inputs) and op.inputs[index].is_parameter and quantparams.get(key) is not None:
                sources[op.inputs[index].name] = (key, op.config.input_quantization_config[index])
    return sources


def capture_state(graph: BaseGraph, spec: LowBitSpec, quantparams: Mapping[str, Any],
                  initial_parameters: Mapping[str, str]) -> dict[str, Any]:
    """What PPQ's executor needs of a quantized graph, as JSON-ready data.

    Args:
        graph: The quantized PPQ graph.
        spec: The bit widths and policies it was quantized with.
        quantparams: The map's integer weights and biases (``PPQSession.quantparams``).
        initial_parameters: :func:`parameter_fingerprints` of the graph before quantization.

    Returns:
        The content of ``ppq_state.json``.
    """
    keys = _config_keys(graph)
    detached: list[dict[str, Any]] = []
    operations: dict[str, dict[str, Any]] = {}
    for name, entry in structure_of(graph).items():
        op = graph.operations[name]
        entry["platform"] = op.platform.name
        if isinstance(op, QuantableOperation):
            entry["quantization"] = {
                "inputs": [_capture_config(c, keys, detached) for c in op.config.input_quantization_config],
                "outputs": [_capture_config(c, keys, detached) for c in op.config.output_quantization_config],
            }
        operations[name] = entry
    sources = _integer_sources(graph, quantparams)
    parameters: dict[str, dict[str, Any]] = {}
    for var in graph.variables.values():
        if not var.is_parameter or var.value is None:
            continue
        if initial_parameters.get(var.name) == _fingerprint(var.value):
            continue  # the float model's own value
        value = var.value if isinstance(var.value, torch.Tensor) else torch.as_tensor(var.value)
        source = sources.get(var.name)
        if source is not None:
            rebuilt = _dequantized(quantparams[source[0]], value, source[1])
            if rebuilt is not None and rebuilt.dtype == value.dtype and torch.equal(rebuilt, value.detach().cpu()):
                parameters[var.name] = {"quantparams": source[0]}
                continue
        parameters[var.name] = {"array": encode_array(value)}
    spec_fields = asdict(spec)
    spec_fields["layer_bits"] = {k: list(v) for k, v in spec.layer_bits.items()}
    return {"state_version": STATE_VERSION, "spec": spec_fields, "operations": operations,
            "detached_configs": detached, "parameters": parameters}


# -- restore ------------------------------------------------------------------------------------------------
def spec_from_state(state: Mapping[str, Any]) -> LowBitSpec:
    """The :class:`LowBitSpec` recorded in a state.

    Raises:
        ArtifactError: missing or malformed fields.
    """
    try:
        fields = dict(state["spec"])
        fields["layer_bits"] = {str(k): (int(v[0]), int(v[1])) for k, v in fields.get("layer_bits", {}).items()}
        spec = LowBitSpec(**fields)
    except (KeyError, TypeError, ValueError, IndexError, AttributeError) as exc:
        raise ArtifactError(f"ppq_state.json: malformed spec ({type(exc).__name__}: {exc})") from None
    check_record(spec, LowBitSpec, "ppq_state.json", "spec")  # every field of the type LowBitSpec declares
    return spec


def _scale_value(entry: Any, what: str) -> Any:
    if entry is None:
        return None
    if isinstance(entry, Mapping) and "number" in entry:
        return entry["number"]
    return torch.from_numpy(decode_array(entry, what))


def _apply_config(config: TensorQuantizationConfig, entry: Mapping[str, Any], what: str) -> None:
    try:
        config.state = QuantizationStates[entry["state"]]
        config._policy = QuantizationPolicy(int(entry["policy"]))
        config._num_of_bits = int(entry["num_of_bits"])
        config._quant_min, config._quant_max = entry["quant_min"], entry["quant_max"]
        config._exponent_bits = int(entry["exponent_bits"])
        config._rounding = RoundingPolicy[entry["rounding"]]
        config._channel_axis = None if entry["channel_axis"] is None else int(entry["channel_axis"])
        config.observer_algorithm = entry["observer_algorithm"]
        config._visibility = QuantizationVisibility[entry["visibility"]]
    except (KeyError, TypeError, ValueError) as exc:
        raise ArtifactError(f"ppq_state.json: {what}: malformed quantization config "
                            f"({type(exc).__name__}: {exc})") from None
    config._scale = _scale_value(entry.get("scale"), f"{what} scale")
    config._offset = _scale_value(entry.get("offset"), f"{what} offset")
    config._dominator = config


def _check_structure(graph: BaseGraph, operations: Mapping[str, Any]) -> None:
    rebuilt = structure_of(graph)
    if set(rebuilt) != set(operations):
        missing = sorted(set(operations) - set(rebuilt))
        extra = sorted(set(rebuilt) - set(operations))
        raise EngineError(
            "the graph rebuilt from the float model differs from the quantized one "
            f"(operators only in the map: {missing[:5]}, only in the rebuilt graph: {extra[:5]}); PPQ's passes "
            "changed the graph's structure (weight or channel split, for example), which cannot be replayed")
    for name, entry in operations.items():
        expected = {key: entry.get(key) for key in ("type", "inputs", "outputs")}
        if rebuilt[name] != expected:
            raise EngineError(f"the graph rebuilt from the float model differs from the quantized one at operator "
                              f"{name!r}: {rebuilt[name]} instead of {expected}")


def restore_state(graph: BaseGraph, spec: LowBitSpec, state: Mapping[str, Any],
                  quantparams: Mapping[str, Any]) -> None:
    """Quantize a freshly loaded and dispatched graph as ``state`` says, in place.

    Args:
        graph: The float model loaded into PPQ (``PPQSession.from_onnx``), not yet quantized.
        spec: :func:`spec_from_state` of ``state``.
        state: The content of ``ppq_state.json``.
        quantparams: The map's ``quantparams.pkl``.

    Raises:
        ArtifactError: the state is malformed or refers to integers ``quantparams.pkl`` does not have.
        EngineError: the rebuilt graph's structure differs from the quantized one.
    """
    from maptools.quantization.engine.quantizer import LowBitQuantizer

    if state.get("state_version") != STATE_VERSION:
        raise ArtifactError(f"ppq_state.json: state version {state.get('state_version')!r} is not "
                            f"{STATE_VERSION}; re-run quantize with this maptools")
    operations = state.get("operations")
    if not isinstance(operations, Mapping):
        raise ArtifactError("ppq_state.json: no 'operations' table")
    _check_structure(graph, operations)
    quantizer = LowBitQuantizer(graph=graph, spec=spec)
    for name, entry in operations.items():
        try:
            graph.operations[name].platform = TargetPlatform[entry["platform"]]
        except KeyError:
            raise ArtifactError(f"ppq_state.json: operator {name!r}: unknown platform "
                                f"{entry.get('platform')!r}") from None
    configs: dict[tuple[str, str, int], TensorQuantizationConfig] = {}
    links: list[tuple[TensorQuantizationConfig, Any]] = []
    for name in list(graph.operations):  # the graph's order, as PPQ's quantizer goes through it
        entry = operations[name]
        recorded = entry.get("quantization")
        if recorded is None:
            continue
        op = quantizer.quantize_operation(name)
        if not isinstance(op, QuantableOperation):
            raise ArtifactError(f"ppq_state.json: operator {name!r} is recorded as quantized, but PPQ does not "
                                f"quantize it on platform {entry['platform']}")
        for kind, live, saved in (("in", op.config.input_quantization_config, recorded.get("inputs", [])),
                                  ("out", op.config.output_quantization_config, recorded.get("outputs", []))):
            if len(live) != len(saved):
                raise ArtifactError(f"ppq_state.json: operator {name!r} has {len(saved)} {kind}put configs, the "
                                    f"rebuilt one {len(live)}")
            for index, (config, config_entry) in enumerate(zip(live, saved, strict=True)):
                _apply_config(config, config_entry, f"{name} {kind}put {index}")
                configs[(name, kind, index)] = config
                links.append((config, config_entry.get("dominated_by")))
    for index, entry in enumerate(state.get("detached_configs", [])):
        config = TensorQuantizationConfig(policy=QuantizationPolicy(int(entry["policy"])))
        _apply_config(config, entry, f"detached config {index}")
        configs[("", "detached", index)] = config
        links.append((config, entry.get("dominated_by")))
    for config, key in links:
        if key is None:
            continue
        try:
            root = configs[(str(key[0]), str(key[1]), int(key[2]))]
        except (KeyError, TypeError, ValueError, IndexError):
            raise ArtifactError(f"ppq_state.json: a config is dominated by {key!r}, which is not recorded") from None
        config._dominator = root
    _restore_parameters(graph, state.get("parameters", {}), quantparams)


def _restore_parameters(graph: BaseGraph, parameters: Mapping[str, Any], quantparams: Mapping[str, Any]) -> None:
    sources = _integer_sources(graph, quantparams)
    for name, entry in parameters.items():
        var = graph.variables.get(name)
        if var is None or not var.is_parameter:
            raise ArtifactError(f"ppq_state.json: parameter {name!r} is not a parameter of the rebuilt graph")
        current = var.value if isinstance(var.value, torch.Tensor) else torch.as_tensor(var.value)
        if "quantparams" in entry:
            key = entry["quantparams"]
            source = sources.get(name)
            if source is None or source[0] != key:
                raise ArtifactError(f"ppq_state.json: parameter {name!r} refers to {key!r}, which quantparams.pkl "
                                    "does not hold for it")
            value = _dequantized(quantparams[key], current, source[1])
            if value is None:
                raise ArtifactError(f"ppq_state.json: parameter {name!r} cannot be rebuilt from {key!r}")
        else:
            value = torch.from_numpy(decode_array(entry.get("array"), f"parameter {name!r}"))
        var.value = value.to(current.device)
