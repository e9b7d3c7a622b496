"""Reading and preparing the float ONNX model (no PPQ here).

The model is checked and loaded once; :func:`prepare_model` then fixes the input shapes the user gave
(resolving dynamic dimensions), gives every node a unique name so the artifacts can be keyed by node
name, and folds the shape arithmetic that the model's own fixed dimensions make constant
(:func:`~maptools.quantization.folding.fold_shape_computations`).
"""

from __future__ import annotations

import hashlib
import logging
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import onnx
from onnx import TensorProto

from maptools.errors import (
    InvalidArgumentError,
    InvalidTypeError,
    MaptoolsError,
    ModelError,
    ModelNotFoundError,
    UnsupportedOperatorError,
)
from maptools.quantization.affine import fold_affine_chains
from maptools.quantization.boundedio import MAX_EXTERNAL_DATA_BYTES, MAX_MODEL_BYTES, hash_regular, read_regular
from maptools.quantization.folding import fold_shape_computations
from maptools.quantization.format import MAC_TYPES
from maptools.quantization.opset import downgrade_to_opset13
from maptools.quantization.opset_rules import DEFAULT_DOMAINS
from maptools.quantization.validation import check_batch_memory

__all__ = ["GraphInput", "LoadedModel", "check_domains", "check_input_shapes", "first_and_last_macs",
           "load_model", "output_operators", "prepare_model"]

logger = logging.getLogger(__name__)

Dim = int | str | None


@dataclass(frozen=True)
class GraphInput:
    """One real (non-initializer) input of the ONNX graph.

    Attributes:
        name: Input name.
        dims: Declared dimensions: an int for a fixed dim, a string or None for a dynamic one; ``()`` for a
            rank-0 (scalar) input.
        dtype: numpy dtype of the input.
    """

    name: str
    dims: tuple[Dim, ...]
    dtype: np.dtype

    def is_fixed(self, axis: int) -> bool:
        """Whether dimension ``axis`` has a fixed positive size in the model (False past its rank)."""
        if not -len(self.dims) <= axis < len(self.dims):
            return False
        dim = self.dims[axis]
        return isinstance(dim, int) and dim > 0


@dataclass
class LoadedModel:
    """A checked ONNX model and what maptools needs to know of it.

    Attributes:
        path: Resolved path of the ONNX file.
        proto: The parsed model.
        sha256: SHA-256 of the file's bytes and of its external data files (:func:`model_sha256`).
        inputs: Real graph inputs, in graph order.
        outputs: Graph output names, in graph order.
    """

    path: Path
    proto: onnx.ModelProto
    sha256: str
    inputs: list[GraphInput]
    outputs: list[str]

    @property
    def input_names(self) -> list[str]:
        """Names of the real graph inputs."""
        return [i.name for i in self.inputs]


def _dims_of(value_info: onnx.ValueInfoProto) -> tuple[Dim, ...]:
    dims: list[Dim] = []
    for d in value_info.type.tensor_type.shape.dim:
        if d.HasField("dim_value") and d.dim_value > 0:
            dims.append(int(d.dim_value))
        elif d.HasField("dim_param"):
            dims.append(d.dim_param)
        else:
            dims.append(None)
    return tuple(dims)


def _numpy_dtype(elem_type: int) -> np.dtype:
    try:
        return np.dtype(onnx.helper.tensor_dtype_to_np_dtype(elem_type))
    except Exception:  # undefined element type: treat as float32, the common case
        return np.dtype(np.float32)


def _external_locations(proto: onnx.ModelProto) -> list[str]:
    """Relative paths of the external data files a model's initializers refer to, sorted."""
    locations = set()
    for tensor in onnx.external_data_helper._get_all_tensors(proto):
        if tensor.data_location == TensorProto.EXTERNAL:
            entries = {entry.key: entry.value for entry in tensor.external_data}
            locations.add(entries.get("location", ""))
    return sorted(locations)


def _external_path(path: Path, location: str, what: str, error: type[MaptoolsError]) -> Path:
    """The file of an external-data location, refused if it leaves the model's folder (as onnx's loader does)."""
    relative = Path(location)
    if not location or relative.is_absolute() or ".." in relative.parts:
        raise error(f"{what}: {str(path)!r} refers to external data at {location!r}; expected a path inside the "
                    "model's folder")
    return path.parent / relative


def model_sha256(path: str | Path, what: str = "onnx_path", error: type[MaptoolsError] = ModelError,
                 missing: type[MaptoolsError] | None = None) -> str:
    """SHA-256 of a model file and of the external data files it refers to (in sorted order), hex.

    The same model gives the same digest wherever its folder is; a change to any of its files changes it.
    Every file is checked before it is read (a regular file, at most :data:`~.boundedio.MAX_MODEL_BYTES`, its
    external data at most :data:`~.boundedio.MAX_EXTERNAL_DATA_BYTES` each, inside the model's folder).

    Raises:
        error: a file is missing (``missing`` if given), not a regular file, too large, or external data outside
            the model's folder.
    """
    path = Path(path)
    data = read_regular(path, what, MAX_MODEL_BYTES, error=error, missing=missing)
    digest = hashlib.sha256(data)
    try:
        locations = _external_locations(onnx.load_from_string(data))
    except Exception:  # not a readable model: the file's bytes alone
        locations = []
    for location in locations:
        digest.update(b"\0" + location.encode() + b"\0")
        hash_regular(digest, _external_path(path, location, what, error), f"{what} (external data {location!r})",
                     MAX_EXTERNAL_DATA_BYTES, error=error, missing=missing)
    return digest.hexdigest()


def load_model(onnx_path: str | Path) -> LoadedModel:
    """Check and load the float ONNX model.

    Args:
        onnx_path: Path of the ``.onnx`` file.

    Returns:
        The loaded model with its inputs, outputs and SHA-256.

    Raises:
        InvalidTypeError: ``onnx_path`` is not a string or path.
        ModelNotFoundError: the file does not exist or is a directory.
        ModelError: the file is empty, not an ONNX model, or has no inputs or outputs.
    """
    if not isinstance(onnx_path, (str, Path)):
        raise InvalidTypeError(
            f"onnx_path: expected a path to an .onnx file (str or pathlib.Path), got {type(onnx_path).__name__}"
        )
    path = Path(onnx_path).expanduser()
    if not path.exists():
        raise ModelNotFoundError(f"onnx_path: file {str(path)!r} does not exist; expected an .onnx model file")
    if path.is_dir():
        raise ModelNotFoundError(f"onnx_path: {str(path)!r} is a directory; expected an .onnx model file")
    data = read_regular(path, "onnx_path", MAX_MODEL_BYTES, error=ModelError)
    if not data:
        raise ModelError(f"onnx_path: file {str(path)!r} is empty; expected an ONNX model")
    sha256 = model_sha256(path)  # checks the external data files (regular, inside the folder) before onnx reads them
    try:
        proto = onnx.load_from_string(data)
        if _external_locations(proto):  # weights in files beside the model (torch's default exporter does this)
            onnx.external_data_helper.load_external_data_for_model(proto, str(path.parent))
    except Exception as exc:
        raise ModelError(
            f"onnx_path: {str(path)!r} is not a readable ONNX model ({type(exc).__name__}: {exc}); "
            "expected a model saved with onnx.save or torch.onnx.export"
        ) from None
    if not proto.graph.node:
        raise ModelError(f"onnx_path: {str(path)!r} holds no ONNX graph nodes; expected an ONNX model")
    try:
        onnx.checker.check_model(proto)
    except Exception as exc:
        raise ModelError(f"onnx_path: {str(path)!r} fails onnx.checker: {exc}") from None
    initializers = {init.name for init in proto.graph.initializer}
    inputs = [
        GraphInput(vi.name, _dims_of(vi), _numpy_dtype(vi.type.tensor_type.elem_type))
        for vi in proto.graph.input
        if vi.name not in initializers
    ]
    outputs = [vi.name for vi in proto.graph.output]
    if not inputs or not outputs:
        raise ModelError(f"onnx_path: {str(path)!r} has no graph inputs or outputs")
    return LoadedModel(
        path=path.resolve(),
        proto=proto,
        sha256=sha256,
        inputs=inputs,
        outputs=outputs,
    )


def check_input_shapes(input_shapes: object, model: LoadedModel) -> dict[str, tuple[int, ...]]:
    """Check ``input_shapes`` against the model's inputs and return it normalised.

    Args:
        input_shapes: Mapping of input name -> shape (a sequence of positive ints; ``[]`` for a rank-0 input).
        model: The loaded model.

    Returns:
        ``{input name: shape tuple}`` in the graph's input order.

    Raises:
        InvalidTypeError: not a mapping, or a shape that is not a sequence of ints.
        InvalidArgumentError: a missing or unknown input, a non-positive dim, a rank or a fixed dim that
            contradicts the model, or one batch larger than the available memory.
    """
    if not isinstance(input_shapes, Mapping):
        raise InvalidTypeError(
            f"input_shapes: expected a dict of input name -> shape such as {{'input': [1, 3, 224, 224]}}, "
            f"got {type(input_shapes).__name__}"
        )
    expected = {i.name: i for i in model.inputs}
    unknown = [k for k in input_shapes if k not in expected]
    if unknown:
        raise InvalidArgumentError(
            f"input_shapes: names {unknown!r} are not inputs of the model; its inputs are {list(expected)}"
        )
    missing = [k for k in expected if k not in input_shapes]
    if missing:
        raise InvalidArgumentError(
            f"input_shapes: no shape given for model input(s) {missing!r}; the model's inputs are {list(expected)}"
        )
    result: dict[str, tuple[int, ...]] = {}
    for name, graph_input in expected.items():
        shape = input_shapes[name]
        if isinstance(shape, (str, bytes)) or not isinstance(shape, Sequence):
            raise InvalidTypeError(
                f"input_shapes[{name!r}]: expected a list of ints such as [1, 3, 224, 224], got {shape!r}"
            )
        dims: list[int] = []
        for d in shape:
            if isinstance(d, bool) or not isinstance(d, (int, np.integer)):
                raise InvalidTypeError(f"input_shapes[{name!r}]: dims must be ints, got {list(shape)!r}")
            if d <= 0:
                raise InvalidArgumentError(f"input_shapes[{name!r}]: dims must be positive, got {list(shape)!r}")
            dims.append(int(d))
        if len(dims) != len(graph_input.dims):
            hint = "; give [] for this scalar input" if not graph_input.dims else ""
            raise InvalidArgumentError(
                f"input_shapes[{name!r}]: rank {len(dims)} given ({dims}), but the model's input has rank "
                f"{len(graph_input.dims)} ({list(graph_input.dims)}){hint}"
            )
        for axis, (given, declared) in enumerate(zip(dims, graph_input.dims, strict=True)):
            if isinstance(declared, int) and declared > 0 and declared != given:
                raise InvalidArgumentError(
                    f"input_shapes[{name!r}]: dim {axis} is {given}, but the model fixes it to {declared} "
                    f"(model input shape {list(graph_input.dims)})"
                )
        result[name] = tuple(dims)
    check_batch_memory(result, {i.name: i.dtype.itemsize for i in model.inputs}, "input_shapes")
    return result


def check_domains(proto: onnx.ModelProto) -> None:
    """Refuse a node of another domain than ONNX's own: PPQ would run it as the standard operator of its name.

    Raises:
        UnsupportedOperatorError: naming the first such node, its operator type and its domain.
    """
    for node in proto.graph.node:
        if node.domain not in DEFAULT_DOMAINS:
            raise UnsupportedOperatorError(
                f"node {node.name!r}: operator {node.op_type!r} of domain {node.domain!r}; PPQ 0.6.6 executes only "
                f"the default ONNX domain ({' or '.join(map(repr, DEFAULT_DOMAINS))}) and would run it as the "
                f"standard {node.op_type!r}; replace it with a standard operator before quantizing")


def prepare_model(model: LoadedModel, input_shapes: Mapping[str, Sequence[int]]) -> onnx.ModelProto:
    """Return a copy of the model ready for the engine.

    The copy is expressed at opset 13 at most (:func:`~maptools.quantization.opset.downgrade_to_opset13`),
    has every node named (unnamed nodes get ``<OpType>_<index>``, duplicates a ``_<n>`` suffix), no stale
    intermediate shape information, the shape arithmetic that the model's own fixed input dims make constant
    folded into initializers (:func:`~.folding.fold_shape_computations`; done before the dynamic dims are resolved,
    so ``quant_model.onnx`` still runs at any size the float model takes), constant affine chains after Convs
    folded into them and decomposed hard-swish written as ``x * HardSigmoid(x)`` (:func:`~.affine.fold_affine_chains`),
    and the given input shapes
    written into its inputs (dynamic dims resolved).

    Args:
        model: The loaded model.
        input_shapes: Checked input shapes (see :func:`check_input_shapes`).

    Returns:
        The prepared model proto.

    Raises:
        UnsupportedOperatorError: a node cannot be expressed at opset 13, or is outside the default domain.
    """
    proto, _ = downgrade_to_opset13(model.proto)
    check_domains(proto)
    if proto is model.proto:
        proto = onnx.ModelProto()
        proto.CopyFrom(model.proto)
    del proto.graph.value_info[:]
    seen: set[str] = set()
    renamed = 0
    for index, node in enumerate(proto.graph.node):
        name = node.name or f"{node.op_type}_{index}"
        base, n = name, 1
        while name in seen:
            name = f"{base}_{n}"
            n += 1
        if name != node.name:
            renamed += 1
            node.name = name
        seen.add(name)
    if renamed:
        logger.info("named %d unnamed or duplicate ONNX nodes (as <OpType>_<index>)", renamed)
    folded = fold_shape_computations(proto)
    if folded:
        logger.info("folded %d shape-computation nodes into constants", folded)
    fold_affine_chains(proto)
    for vi in proto.graph.input:
        if vi.name in input_shapes:
            shape = vi.type.tensor_type.shape
            del shape.dim[:]
            for d in input_shapes[vi.name]:
                shape.dim.add().dim_value = int(d)
    return proto


def first_and_last_macs(proto: onnx.ModelProto) -> list[str]:
    """Names of the first and the last MAC operator with a constant weight (input 1 an initializer or a Constant
    node's output), in graph order.

    One name when the graph has a single such operator, none when it has none.
    """
    constants = _constant_names(proto)
    macs = [node.name for node in proto.graph.node if _is_mac(node, constants)]
    return list(dict.fromkeys(macs[:1] + macs[-1:]))


def output_operators(proto: onnx.ModelProto) -> list[str]:
    """Names of the operators that write the model's outputs: walking back from each graph output, every
    operator up to and including the first MAC operator with a constant weight on each path, in graph order.

    These are the values that leave the chip (logits, boxes, per-step class scores); the rest of the graph
    only feeds them.
    """
    constants = _constant_names(proto)
    producer = {out: node for node in proto.graph.node for out in node.output}
    found: set[str] = set()
    pending = [producer[out.name] for out in proto.graph.output if out.name in producer]
    while pending:
        node = pending.pop()
        if node.name in found or node.op_type == "Constant":
            continue
        found.add(node.name)
        if not _is_mac(node, constants):
            pending.extend(producer[name] for name in node.input if name in producer)
    return [node.name for node in proto.graph.node if node.name in found]


def _constant_names(proto: onnx.ModelProto) -> set[str]:
    """The initializers' and Constant nodes' outputs (Paddle2ONNX writes weights as Constant nodes, other
    exporters as initializers)."""
    return {init.name for init in proto.graph.initializer} | {
        out for node in proto.graph.node if node.op_type == "Constant" for out in node.output}


def _is_mac(node: onnx.NodeProto, constants: set[str]) -> bool:
    """A Conv / Gemm / MatMul whose weight is a constant."""
    return node.op_type in MAC_TYPES and len(node.input) > 1 and node.input[1] in constants


def elem_type_name(dtype: np.dtype) -> str:
    """ONNX element type name for a numpy dtype (for messages)."""
    return TensorProto.DataType.Name(onnx.helper.np_dtype_to_tensor_dtype(dtype))
