"""Reading and preparing the float ONNX model (no PPQ here).

The model is checked and loaded once; :func:`prepare_model` then fixes the input shapes the user gave
(resolving dynamic dimensions), gives every node a unique name so the artifacts can be keyed by node
name, and folds the shape arithmetic that the model's own fixed dimensions make constant
(:func:`fold_shape_computations`).
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
from maptools.quantization.opset import downgrade_to_opset13

__all__ = ["MAC_TYPES", "GraphInput", "LoadedModel", "check_input_shapes", "first_and_last_macs",
           "fold_shape_computations", "load_model", "prepare_model"]

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


def model_sha256(path: str | Path) -> str:
    """SHA-256 of a model file and of the external data files it refers to (in sorted order), hex.

    The same model gives the same digest wherever its folder is; a change to any of its files changes it.
    """
    path = Path(path)
    data = path.read_bytes()
    digest = hashlib.sha256(data)
    try:
        locations = _external_locations(onnx.load_from_string(data))
    except Exception:  # not a readable model: the file's bytes alone
        locations = []
    for location in locations:
        digest.update(b"\0" + location.encode() + b"\0")
        digest.update((path.parent / location).read_bytes())
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
    data = path.read_bytes()
    if not data:
        raise ModelError(f"onnx_path: file {str(path)!r} is empty; expected an ONNX model")
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
        sha256=model_sha256(path),
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
    return result


def prepare_model(model: LoadedModel, input_shapes: Mapping[str, Sequence[int]]) -> onnx.ModelProto:
    """Return a copy of the model ready for the engine.

    The copy is expressed at opset 13 at most (:func:`~maptools.quantization.opset.downgrade_to_opset13`),
    has every node named (unnamed nodes get ``<OpType>_<index>``, duplicates a ``_<n>`` suffix), no stale
    intermediate shape information, the shape arithmetic that the model's own fixed input dims make constant
    folded into initializers (:func:`fold_shape_computations`; done before the dynamic dims are resolved,
    so ``quant_model.onnx`` still runs at any size the float model takes), and the given input shapes
    written into its inputs (dynamic dims resolved).

    Args:
        model: The loaded model.
        input_shapes: Checked input shapes (see :func:`check_input_shapes`).

    Returns:
        The prepared model proto.
    """
    proto, _ = downgrade_to_opset13(model.proto)
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
    for vi in proto.graph.input:
        if vi.name in input_shapes:
            shape = vi.type.tensor_type.shape
            del shape.dim[:]
            for d in input_shapes[vi.name]:
                shape.dim.add().dim_value = int(d)
    return proto


#: Largest tensor (in elements) :func:`fold_shape_computations` turns into an initializer: shape arithmetic
#: yields a few integers; the bound keeps weights and activations out of the folding.
MAX_FOLDED_ELEMENTS = 1024
_NOT_FOLDED = {"Constant", "RandomNormal", "RandomNormalLike", "RandomUniform", "RandomUniformLike",
               "Multinomial", "Bernoulli"}


def _static_shapes(proto: onnx.ModelProto) -> dict[str, list[int]]:
    """Fully static shapes of the graph's tensors per ONNX shape inference (unknown or symbolic dims omitted).

    Inference runs on a light copy: initializers above :data:`MAX_FOLDED_ELEMENTS` elements are declared as
    graph inputs (type and dims, no data), so no weight is copied.
    """
    light = onnx.ModelProto()
    light.ir_version, light.producer_name = proto.ir_version, proto.producer_name
    light.opset_import.extend(proto.opset_import)
    graph = light.graph
    graph.node.extend(proto.graph.node)
    graph.input.extend(proto.graph.input)
    graph.output.extend(proto.graph.output)
    declared = {vi.name for vi in proto.graph.input}
    for init in proto.graph.initializer:
        if int(np.prod(init.dims)) <= MAX_FOLDED_ELEMENTS:
            graph.initializer.append(init)
        elif init.name not in declared:
            graph.input.append(onnx.helper.make_tensor_value_info(init.name, init.data_type, list(init.dims)))
    try:
        inferred = onnx.shape_inference.infer_shapes(light, strict_mode=False).graph
    except Exception as exc:  # a model onnx cannot infer: nothing is folded
        logger.debug("shape inference failed (%s): shape computations not folded", exc)
        return {}
    shapes: dict[str, list[int]] = {}
    for vi in [*inferred.input, *inferred.value_info, *inferred.output]:
        tensor_type = vi.type.tensor_type
        if tensor_type.HasField("shape") and all(d.HasField("dim_value") for d in tensor_type.shape.dim):
            shapes[vi.name] = [int(d.dim_value) for d in tensor_type.shape.dim]
    for init in proto.graph.initializer:
        shapes[init.name] = list(init.dims)
    return shapes


def _foldable(proto: onnx.ModelProto) -> tuple[set[int], dict[str, np.ndarray]]:
    """One pass of :func:`fold_shape_computations`: indices of the foldable nodes and their output values."""
    from onnx.reference import ReferenceEvaluator

    graph = proto.graph
    shapes = _static_shapes(proto) if any(n.op_type == "Shape" for n in graph.node) else {}
    graph_outputs = {vi.name for vi in graph.output}
    initializers = {init.name: init for init in graph.initializer}
    constants: dict[str, onnx.NodeProto] = {}  # Constant nodes by output, evaluated when needed
    values: dict[str, np.ndarray] = {}  # folded values and evaluated Constant outputs
    arrays: dict[str, np.ndarray] = {}  # initializers read as inputs of candidates
    folded: set[int] = set()

    def value(name: str) -> np.ndarray:
        if name in values:
            return values[name]
        if name in constants:
            values[name] = np.asarray(ReferenceEvaluator(constants[name]).run(None, {})[0])
            return values[name]
        if name not in arrays:
            arrays[name] = onnx.numpy_helper.to_array(initializers[name])
        return arrays[name]

    for index, node in enumerate(graph.node):
        if node.domain not in ("", "ai.onnx"):
            continue
        if node.op_type == "Constant":
            constants[node.output[0]] = node
            continue
        if node.op_type in _NOT_FOLDED or any(o in graph_outputs for o in node.output):
            continue
        if node.op_type == "Shape":
            dims = shapes.get(node.input[0])
            if dims is None:
                continue
            attrs = {a.name: a.i for a in node.attribute}
            outputs = [np.array(dims[attrs.get("start", 0):attrs.get("end", len(dims))], np.int64)]
        else:
            inputs = [name for name in node.input if name]
            if not inputs or not all(n in values or n in constants or n in initializers for n in inputs):
                continue
            if all(n in initializers for n in inputs):
                continue
            if any(n in initializers and int(np.prod(initializers[n].dims)) > MAX_FOLDED_ELEMENTS for n in inputs):
                continue
            single = onnx.helper.make_model(
                onnx.helper.make_graph(
                    [node], "fold",
                    [onnx.helper.make_tensor_value_info(n, onnx.TensorProto.UNDEFINED, None) for n in inputs],
                    [onnx.helper.make_tensor_value_info(n, onnx.TensorProto.UNDEFINED, None)
                     for n in node.output if n]),
                opset_imports=list(proto.opset_import))
            try:
                outputs = [np.asarray(o) for o in ReferenceEvaluator(single).run(None, {n: value(n) for n in inputs})]
            except Exception as exc:  # an operator the reference evaluator lacks: the node is kept
                logger.debug("node %r not folded: %s", node.name, exc)
                continue
            if any(o.size > MAX_FOLDED_ELEMENTS or o.dtype == object for o in outputs):
                continue
        for name, result in zip([n for n in node.output if n], outputs, strict=True):
            values[name] = result
        folded.add(index)
    return folded, values


def fold_shape_computations(proto: onnx.ModelProto, max_rounds: int = 8) -> int:
    """Replace, in place, the nodes that compute constants (shape arithmetic) by initializers.

    Exporters leave shape arithmetic in the graph, e.g. torch's ``scaled_dot_product_attention`` at opset 14:
    ``Shape -> Slice -> Cast -> Sqrt`` for the attention scale and ``Mod`` of two constants for a slice bound.
    PPQ executes every node on every calibration batch and cannot run some of them (it has no ``Mod``, and its
    ``Slice`` mishandles a missing ``axes`` input), although their values never change. A node is folded when

    * it is a ``Shape`` whose input has a fully static shape per ONNX shape inference from the graph's
      declared input shapes (a symbolic dim, such as a dynamic batch, keeps the ``Shape`` and what depends on
      it), or
    * all its inputs are constants (initializers, ``Constant`` outputs, folded values), at least one of them is
      not an initializer (so weight re-routing such as ``Identity`` or ``Transpose`` of a weight, which PPQ
      handles as parameters, is left alone), it is a deterministic default-domain operator, and each of its
      outputs has at most :data:`MAX_FOLDED_ELEMENTS` elements.

    Values are computed with :class:`onnx.reference.ReferenceEvaluator` (numpy) at the model's opset; a node
    it cannot evaluate is kept. Folded outputs still consumed become initializers of the same name, folded
    nodes and the ``Constant`` nodes and initializers left unused are removed, and the remaining nodes keep
    their names. Graph outputs are never folded, and a graph with control flow (subgraph attributes) is left
    unchanged. Shape inference is re-run after each round (a folded ``Reshape`` target can make further
    shapes static), at most ``max_rounds`` times.

    Args:
        proto: The model, modified in place; only the dims its graph inputs declare fixed count as known.
        max_rounds: Rounds of shape inference and folding.

    Returns:
        The number of nodes removed.
    """
    graph = proto.graph
    if any(attr.type in (onnx.AttributeProto.GRAPH, onnx.AttributeProto.GRAPHS)
           for node in graph.node for attr in node.attribute):
        return 0
    graph_outputs = {vi.name for vi in graph.output}
    removed = 0
    for _ in range(max_rounds):
        initializers = {init.name: init for init in graph.initializer}
        folded, values = _foldable(proto)
        if not folded:
            break
        kept = [node for index, node in enumerate(graph.node) if index not in folded]
        folded_outputs = {name for index in folded for name in graph.node[index].output if name}
        used = {name for node in kept for name in node.input} | graph_outputs
        fed = {name for index in folded for name in graph.node[index].input}
        # Constant nodes whose outputs only fed folded nodes are dropped with them
        kept = [node for node in kept
                if node.op_type != "Constant" or node.output[0] not in fed or node.output[0] in used]
        used = {name for node in kept for name in node.input} | graph_outputs
        removed += len(graph.node) - len(kept)
        new_initializers = [onnx.numpy_helper.from_array(values[name], name)
                            for name in sorted(folded_outputs & used)]
        # initializers that only fed folded nodes go too (others, even if unused, are left as they were)
        unused = {name for index in folded for name in graph.node[index].input
                  if name in initializers and name not in used}
        kept_initializers = [init for init in graph.initializer if init.name not in unused]
        del graph.node[:]
        graph.node.extend(kept)
        del graph.initializer[:]
        graph.initializer.extend(kept_initializers + new_initializers)
        graph_inputs = [vi for vi in graph.input if vi.name not in unused]
        if proto.ir_version < 4:  # initializers must also be graph inputs before IR version 4
            graph_inputs += [onnx.helper.make_tensor_value_info(init.name, init.data_type, list(init.dims))
                             for init in new_initializers]
        del graph.input[:]
        graph.input.extend(graph_inputs)
    return removed


#: Operators that multiply an input by a constant weight: the layers a crossbar holds.
MAC_TYPES = frozenset({"Conv", "ConvTranspose", "Gemm", "MatMul"})


def first_and_last_macs(proto: onnx.ModelProto) -> list[str]:
    """Names of the first and the last MAC operator with a constant weight (input 1 an initializer), in graph order.

    One name when the graph has a single such operator, none when it has none.
    """
    constants = {init.name for init in proto.graph.initializer}
    macs = [node.name for node in proto.graph.node
            if node.op_type in MAC_TYPES and len(node.input) > 1 and node.input[1] in constants]
    return list(dict.fromkeys(macs[:1] + macs[-1:]))


def elem_type_name(dtype: np.dtype) -> str:
    """ONNX element type name for a numpy dtype (for messages)."""
    return TensorProto.DataType.Name(onnx.helper.np_dtype_to_tensor_dtype(dtype))
