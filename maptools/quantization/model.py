"""Reading and preparing the float ONNX model (no PPQ here).

The model is checked and loaded once; :func:`prepare_model` then fixes the input shapes the user gave
(resolving dynamic dimensions) and gives every node a unique name so the artifacts can be keyed by node
name.
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

from maptools.errors import InvalidArgumentError, InvalidTypeError, ModelError, ModelNotFoundError

__all__ = ["GraphInput", "LoadedModel", "check_input_shapes", "load_model", "prepare_model"]

logger = logging.getLogger(__name__)

Dim = int | str | None


@dataclass(frozen=True)
class GraphInput:
    """One real (non-initializer) input of the ONNX graph.

    Attributes:
        name: Input name.
        dims: Declared dimensions: an int for a fixed dim, a string or None for a dynamic one.
        dtype: numpy dtype of the input.
    """

    name: str
    dims: tuple[Dim, ...]
    dtype: np.dtype

    def is_fixed(self, axis: int) -> bool:
        """Whether dimension ``axis`` has a fixed positive size in the model."""
        dim = self.dims[axis]
        return isinstance(dim, int) and dim > 0


@dataclass
class LoadedModel:
    """A checked ONNX model and what maptools needs to know of it.

    Attributes:
        path: Resolved path of the ONNX file.
        proto: The parsed model.
        sha256: SHA-256 of the file's bytes.
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
    data = path.read_bytes()
    if not data:
        raise ModelError(f"onnx_path: file {str(path)!r} is empty; expected an ONNX model")
    try:
        proto = onnx.load_from_string(data)
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
        sha256=hashlib.sha256(data).hexdigest(),
        inputs=inputs,
        outputs=outputs,
    )


def check_input_shapes(input_shapes: object, model: LoadedModel) -> dict[str, tuple[int, ...]]:
    """Check ``input_shapes`` against the model's inputs and return it normalised.

    Args:
        input_shapes: Mapping of input name -> shape (a sequence of positive ints).
        model: The loaded model.

    Returns:
        ``{input name: shape tuple}`` in the graph's input order.

    Raises:
        InvalidTypeError: not a mapping, or a shape that is not a sequence of ints.
        InvalidArgumentError: a missing or unknown input, a non-positive dim, a rank or a fixed dim that
            contradicts the model.
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
            raise InvalidArgumentError(
                f"input_shapes[{name!r}]: rank {len(dims)} given ({dims}), but the model's input has rank "
                f"{len(graph_input.dims)} ({list(graph_input.dims)})"
            )
        for axis, (given, declared) in enumerate(zip(dims, graph_input.dims, strict=True)):
            if isinstance(declared, int) and declared > 0 and declared != given:
                raise InvalidArgumentError(
                    f"input_shapes[{name!r}]: dim {axis} is {given}, but the model fixes it to {declared} "
                    f"(model input shape {list(graph_input.dims)})"
                )
        result[name] = tuple(dims)
    return result


def prepare_model(model: LoadedModel, input_shapes: Mapping[str, Sequence[int]]) -> onnx.ModelProto:
    """Return a copy of the model ready for the engine.

    The copy has the given input shapes written into its inputs (dynamic dims resolved), every node
    named (unnamed nodes get ``<OpType>_<index>``, duplicates a ``_<n>`` suffix), and no stale
    intermediate shape information.

    Args:
        model: The loaded model.
        input_shapes: Checked input shapes (see :func:`check_input_shapes`).

    Returns:
        The prepared model proto.
    """
    proto = onnx.ModelProto()
    proto.CopyFrom(model.proto)
    for vi in proto.graph.input:
        if vi.name in input_shapes:
            shape = vi.type.tensor_type.shape
            del shape.dim[:]
            for d in input_shapes[vi.name]:
                shape.dim.add().dim_value = int(d)
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
    return proto


def elem_type_name(dtype: np.dtype) -> str:
    """ONNX element type name for a numpy dtype (for messages)."""
    return TensorProto.DataType.Name(onnx.helper.np_dtype_to_tensor_dtype(dtype))
