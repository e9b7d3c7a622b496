"""The operator registry of the integer reference executor, and the node helpers its handlers share.

A handler module declares the operator types it executes with :func:`register`::

    @register("Relu", kind="integer")
    def relu(executor, node, args, state):
        ...

``run(executor, node, args, state) -> list of output values`` computes one node: ``args`` are the
node's input values in ONNX order (None for an omitted optional input), ``state`` is what the optional
``prepare(executor, node)`` hook returned when the executor loaded the map. ``prepare`` runs for every
node before anything is computed: it checks attributes, fetches weights or builds evaluators, and raises
:class:`~maptools.errors.UnsupportedOperatorError` (naming the node) for what the handler cannot run.

The ``kind`` of a handler says how it computes:

* ``"integer"``: on the integers themselves (MACs, Relu, MaxPool, layout operators...), exact;
* ``"float"``: a dedicated float64 implementation on the dequantized values (``Add``, ``Sigmoid``...);
* ``"generic"``: the generic float handler, :mod:`onnx.reference` on the dequantized values.

The executor's :data:`~maptools.quantization.reference.SUPPORTED_OPS` is the set of registered types.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Literal, Protocol

import numpy as np
import onnx

from maptools.quantization.records import OperatorQuantConfig, TensorQuant
from maptools.quantization.reference.values import Value, real

__all__ = ["HANDLERS", "Executor", "Handler", "OpHandler", "Prepare", "attrs", "describe", "int_list", "register",
           "string_attr"]


class Executor(Protocol):
    """What a handler uses of the executor running it, so that handlers sit below the executor that imports them
    (:class:`~maptools.quantization.reference.executor.ReferenceExecutor` is the one implementation)."""

    initializers: dict[str, np.ndarray]
    quantparams: dict[str, np.ndarray | None]
    dq_sources: dict[str, np.ndarray]

    @property
    def opset(self) -> int: ...
    @property
    def requant_mode(self) -> str: ...
    def record(self, node: onnx.NodeProto) -> OperatorQuantConfig | None: ...
    def resolve_boundary(self, node: onnx.NodeProto) -> TensorQuant: ...
    def mac_accumulator(self, node: onnx.NodeProto) -> Callable[[np.ndarray, np.ndarray], np.ndarray] | None: ...


#: ``run(executor, node, args, state) -> outputs``.
Handler = Callable[[Executor, onnx.NodeProto, list[Value | None], Any], list[Value]]
#: ``prepare(executor, node) -> state``, called once per node when the map is loaded.
Prepare = Callable[[Executor, onnx.NodeProto], Any]
Kind = Literal["integer", "float", "generic"]


@dataclass(frozen=True)
class OpHandler:
    """How the executor runs one operator type.

    Attributes:
        op_type: The ONNX operator type (default domain).
        run: Computes a node.
        prepare: Checks and prepares a node at load time (None: nothing to prepare).
        kind: ``"integer"``, ``"float"`` or ``"generic"`` (see the module documentation).
    """

    op_type: str
    run: Handler
    prepare: Prepare | None
    kind: Kind


#: Operator type -> its handler, filled by the operator modules as they are imported.
HANDLERS: dict[str, OpHandler] = {}


def register(*op_types: str, kind: Kind, prepare: Prepare | None = None) -> Callable[[Handler], Handler]:
    """Decorator registering ``run`` as the handler of ``op_types``.

    Args:
        op_types: ONNX operator types (default domain) the handler executes.
        kind: ``"integer"``, ``"float"`` or ``"generic"``.
        prepare: Optional load-time hook ``prepare(executor, node) -> state``.

    Raises:
        ValueError: an operator type already has a handler.
    """

    def decorate(run: Handler) -> Handler:
        for op_type in op_types:
            if op_type in HANDLERS:
                raise ValueError(f"operator type {op_type!r} already has a handler")
            HANDLERS[op_type] = OpHandler(op_type=op_type, run=run, prepare=prepare, kind=kind)
        return run

    return decorate


# -- node helpers -------------------------------------------------------------------------------------
def attrs(node: onnx.NodeProto) -> dict[str, Any]:
    """The node's attributes, name -> Python value."""
    return {a.name: onnx.helper.get_attribute_value(a) for a in node.attribute}


def string_attr(node_attrs: dict[str, Any], name: str, default: str) -> str:
    """A string attribute (stored as bytes) as ``str``."""
    value = node_attrs.get(name, default)
    return value.decode() if isinstance(value, bytes) else str(value)


def describe(node: onnx.NodeProto) -> str:
    """``node 'name' (OpType)``, for messages."""
    return f"node {node.name!r} ({node.op_type})"


def int_list(value: Value | None) -> list[int] | None:
    """The integers of a constant input (shape, axes, pads...) as a list, None when absent."""
    if value is None:
        return None
    return [int(v) for v in np.asarray(real(value)).astype(np.int64).reshape(-1)]
