"""Bringing a model from a newer opset down to opset 13, the newest PPQ 0.6.6 executes.

PPQ 0.6.6 implements the operators as opset 10 to 13 define them. Today's exporters write newer opsets:
torch's default (dynamo) exporter opset 18 and above, YOLO exports opset 17. ONNX's own
``version_converter`` has no down-conversion adapters for most operators (``No Adapter From Version 14 for
Relu``), so maptools rewrites each node itself:

* An operator unchanged since opset 13 (``Conv``, ``Softmax``...) is kept.
* An operator whose later versions only added types or attributes (``Relu``, ``Add``, ``Reshape``'s
  ``allowzero``, ``Cast``'s ``saturate``, ``Resize``'s ``antialias``...) is kept when every attribute and
  input that opset 13 lacks is absent or at its default value.
* Operators whose later versions moved an attribute into an input or changed a form are rewritten to the
  opset-13 form: the ``Reduce*`` family (constant ``axes`` input back to an attribute), ``Split``
  (``num_outputs``), ``Pad`` (``axes``), ``Shape`` (``start``/``end`` become a ``Slice``).
* Operators opset 13 does not have are decomposed into ones it has: ``HardSwish`` (``x * HardSigmoid(x)``,
  the form torch writes at opset 13 and maptools fuses into its MAC), ``Gelu``, ``Mish``,
  ``LayerNormalization``.

Anything else (a non-default attribute value with no opset-13 meaning, an operator with no decomposition) is
an :class:`~maptools.errors.UnsupportedOperatorError` naming the node, raised before any work is done.
Model-local functions are inlined first. The result declares opset 13 and IR version 8 (or the model's own,
if lower).
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np
import onnx
from onnx import helper, numpy_helper

from maptools.errors import UnsupportedOperatorError

__all__ = ["PPQ_MAX_OPSET", "default_opset", "downgrade_to_opset13"]

logger = logging.getLogger(__name__)

#: The newest opset PPQ 0.6.6 executes; newer models are brought down to it.
PPQ_MAX_OPSET = 13
#: IR version of a converted model: enough for opset 13, readable by every supported onnx.
CONVERTED_IR_VERSION = 8
_DEFAULT_DOMAINS = ("", "ai.onnx")
_REDUCE_OPS = frozenset({"ReduceMean", "ReduceMax", "ReduceMin", "ReduceProd", "ReduceL1", "ReduceL2",
                         "ReduceLogSum", "ReduceLogSumExp", "ReduceSumSquare"})
#: Attribute values added after opset 13 that opset 13 cannot express: (op type, attribute) -> values.
_NEW_VALUES = {("Resize", "coordinate_transformation_mode"): {"half_pixel_symmetric"},
               ("Pad", "mode"): {"wrap"}}


def default_opset(model: onnx.ModelProto) -> int:
    """The model's opset of the default (``ai.onnx``) domain (13 if it declares none)."""
    return max((o.version for o in model.opset_import if o.domain in _DEFAULT_DOMAINS), default=PPQ_MAX_OPSET)


@dataclass
class _Context:
    """What the rewrite rules may look up: constants, inferred shapes, names to create."""

    model: onnx.ModelProto
    opset: int
    constants: dict[str, np.ndarray] = field(default_factory=dict)
    new_initializers: list[onnx.TensorProto] = field(default_factory=list)
    _shapes: dict[str, list[int | None]] | None = None
    _types: dict[str, int] | None = None
    _counter: int = 0

    def constant(self, name: str) -> np.ndarray | None:
        """The value of a constant tensor (initializer or ``Constant`` output), None otherwise."""
        return self.constants.get(name)

    def _infer(self) -> None:
        inferred = onnx.shape_inference.infer_shapes(self.model, strict_mode=False)
        self._shapes, self._types = {}, {}
        for vi in [*inferred.graph.input, *inferred.graph.value_info, *inferred.graph.output]:
            tensor_type = vi.type.tensor_type
            self._types[vi.name] = tensor_type.elem_type
            if tensor_type.HasField("shape"):
                self._shapes[vi.name] = [d.dim_value if d.HasField("dim_value") else None
                                         for d in tensor_type.shape.dim]
        for init in self.model.graph.initializer:
            self._shapes[init.name] = list(init.dims)
            self._types[init.name] = init.data_type

    def shape(self, name: str) -> list[int | None] | None:
        """The inferred shape of a tensor (None for an unknown rank, None entries for unknown dims)."""
        if self._shapes is None:
            self._infer()
        return self._shapes.get(name)

    def elem_type(self, name: str) -> int | None:
        """The inferred ONNX element type of a tensor."""
        if self._types is None:
            self._infer()
        return self._types.get(name) or None

    def add_constant(self, base: str, value: np.ndarray) -> str:
        """Add an initializer and return its (unique) name."""
        self._counter += 1
        name = f"{base}__opset13_{self._counter}"
        self.new_initializers.append(numpy_helper.from_array(np.asarray(value), name))
        self.constants[name] = np.asarray(value)
        return name

    def name(self, base: str) -> str:
        """A fresh tensor or node name derived from ``base``."""
        self._counter += 1
        return f"{base}__opset13_{self._counter}"


Rule = Callable[[onnx.NodeProto, _Context], list[onnx.NodeProto]]


def _describe(node: onnx.NodeProto) -> str:
    return f"node {node.name or '(unnamed)'!r} ({node.op_type})"


def _unsupported(node: onnx.NodeProto, ctx: _Context, why: str) -> UnsupportedOperatorError:
    return UnsupportedOperatorError(
        f"{_describe(node)}: {why}; the model is at opset {ctx.opset} and PPQ 0.6.6 executes opsets 10 to "
        f"{PPQ_MAX_OPSET} only, so it must be expressed at opset {PPQ_MAX_OPSET} (re-export at opset "
        f"{PPQ_MAX_OPSET}, e.g. torch.onnx.export(..., opset_version={PPQ_MAX_OPSET}, dynamo=False))"
    )


def _attr(node: onnx.NodeProto, name: str, default: object = None) -> object:
    for attribute in node.attribute:
        if attribute.name == name:
            value = helper.get_attribute_value(attribute)
            return value.decode() if isinstance(value, bytes) else value
    return default


def _without_attrs(node: onnx.NodeProto, names: set[str]) -> onnx.NodeProto:
    copy = onnx.NodeProto()
    copy.CopyFrom(node)
    kept = [a for a in copy.attribute if a.name not in names]
    del copy.attribute[:]
    copy.attribute.extend(kept)
    return copy


def _schema_default(schema: onnx.defs.OpSchema, name: str) -> object:
    """Default value of an attribute of ``schema``; None when it has none."""
    attribute = schema.attributes[name].default_value
    if not attribute.name:
        return None
    value = helper.get_attribute_value(attribute)
    return value.decode() if isinstance(value, bytes) else value


def _keep_compatible(node: onnx.NodeProto, ctx: _Context, handled: frozenset[str] = frozenset()) -> onnx.NodeProto:
    """``node`` at opset 13: attributes opset 13 lacks must be at their default (they are dropped)."""
    new = onnx.defs.get_schema(node.op_type, ctx.opset, "")
    old = onnx.defs.get_schema(node.op_type, PPQ_MAX_OPSET, "")
    dropped = set()
    for attribute in node.attribute:
        name = attribute.name
        if name in old.attributes:
            value = _attr(node, name)
            if isinstance(value, str) and value in _NEW_VALUES.get((node.op_type, name), set()):
                raise _unsupported(node, ctx, f"{name}={value!r} does not exist at opset {PPQ_MAX_OPSET}")
            continue
        if name in handled:
            dropped.add(name)
            continue
        default = _schema_default(new, name) if name in new.attributes else None
        if default is None or _attr(node, name) != default:
            raise _unsupported(node, ctx, f"attribute {name}={_attr(node, name)!r} has no opset-{PPQ_MAX_OPSET} "
                                          "equivalent")
        dropped.add(name)
    if len([i for i in node.input if i]) > old.max_input:
        raise _unsupported(node, ctx, f"input {len(node.input)} has no opset-{PPQ_MAX_OPSET} equivalent")
    while node.input and not node.input[-1]:  # trailing empty optional inputs
        node = _without_attrs(node, set())
        del node.input[-1]
    return _without_attrs(node, dropped)


def _reduce(node: onnx.NodeProto, ctx: _Context) -> list[onnx.NodeProto]:
    """``Reduce*`` of opset 18: constant ``axes`` input back to the attribute of opset 13."""
    noop = bool(_attr(node, "noop_with_empty_axes", 0))
    rewritten = _without_attrs(node, {"noop_with_empty_axes"})
    axes = None
    if len(node.input) > 1 and node.input[1]:
        axes = ctx.constant(node.input[1])
        if axes is None:
            raise _unsupported(node, ctx, "its axes are computed at run time")
        del rewritten.input[1:]
    if axes is not None and axes.size:
        rewritten.attribute.append(helper.make_attribute("axes", [int(a) for a in axes.reshape(-1)]))
    elif noop:  # no axes and noop_with_empty_axes: the input unchanged
        return [helper.make_node("Identity", [node.input[0]], list(node.output), name=node.name)]
    return [rewritten]


def _split(node: onnx.NodeProto, ctx: _Context) -> list[onnx.NodeProto]:
    """``Split`` of opset 18: ``num_outputs`` becomes explicit split sizes (opset 13 splits equally otherwise)."""
    parts = _attr(node, "num_outputs")
    if parts is None:
        return [_keep_compatible(node, ctx)]
    rewritten = _without_attrs(node, {"num_outputs"})
    if len(node.input) > 1 and node.input[1]:
        return [rewritten]
    shape = ctx.shape(node.input[0])
    axis = int(_attr(node, "axis", 0))
    size = None if shape is None else shape[axis]
    if size is not None and size % parts:
        chunk = -(-size // parts)  # opset 18: equal chunks of ceil(size / n), the last one smaller
        sizes = [chunk] * (parts - 1) + [size - chunk * (parts - 1)]
        del rewritten.input[:]
        rewritten.input.extend([node.input[0], ctx.add_constant(node.name or "split", np.array(sizes, np.int64))])
    return [rewritten]


def _pad(node: onnx.NodeProto, ctx: _Context) -> list[onnx.NodeProto]:
    """``Pad`` of opset 18: a constant ``axes`` input is folded into full-rank ``pads``."""
    if len(node.input) < 4 or not node.input[3]:
        return [_keep_compatible(node, ctx)]
    axes, pads = ctx.constant(node.input[3]), ctx.constant(node.input[1])
    shape = ctx.shape(node.input[0])
    if axes is None or pads is None or shape is None:
        raise _unsupported(node, ctx, "its pads or axes are computed at run time")
    rank, axes, pads = len(shape), axes.reshape(-1), pads.reshape(-1)
    full = np.zeros(2 * rank, np.int64)
    for k, axis in enumerate(int(a) % rank for a in axes):
        full[axis], full[axis + rank] = pads[k], pads[k + axes.size]
    rewritten = onnx.NodeProto()
    rewritten.CopyFrom(node)
    del rewritten.input[:]
    rewritten.input.extend([node.input[0], ctx.add_constant(node.name or "pad", full), *node.input[2:3]])
    return [_keep_compatible(rewritten, ctx)]


def _shape(node: onnx.NodeProto, ctx: _Context) -> list[onnx.NodeProto]:
    """``Shape`` with ``start``/``end`` (opset 15): a full ``Shape`` followed by a ``Slice``."""
    start, end = _attr(node, "start"), _attr(node, "end")
    if start is None and end is None:
        return [_keep_compatible(node, ctx)]
    full = ctx.name(node.output[0])
    base = node.name or "shape"
    ends = ctx.add_constant(base, np.array([end if end is not None else np.iinfo(np.int64).max], np.int64))
    return [
        helper.make_node("Shape", [node.input[0]], [full], name=ctx.name(base)),
        helper.make_node("Slice", [full, ctx.add_constant(base, np.array([start or 0], np.int64)), ends,
                                   ctx.add_constant(base, np.array([0], np.int64))],
                         list(node.output), name=node.name),
    ]


def _reshape(node: onnx.NodeProto, ctx: _Context) -> list[onnx.NodeProto]:
    """``Reshape`` with ``allowzero=1`` (opset 14): the same as opset 13 unless the target shape holds a 0.

    A constant shape with a 0 is refused; a shape computed at run time holding a 0 would make an empty
    tensor, which no network quantized here computes, so the attribute is dropped.
    """
    if _attr(node, "allowzero", 0):
        shape = ctx.constant(node.input[1])
        if shape is not None and bool(np.any(shape == 0)):
            raise _unsupported(node, ctx, "allowzero=1 with a 0 in its target shape")
    return [_keep_compatible(node, ctx, frozenset({"allowzero"}))]


def _hard_swish(node: onnx.NodeProto, ctx: _Context) -> list[onnx.NodeProto]:
    """``HardSwish(x)`` = ``x * HardSigmoid(x, alpha=1/6, beta=0.5)``, as torch writes it at opset 13."""
    gate = ctx.name(node.output[0])
    return [
        helper.make_node("HardSigmoid", [node.input[0]], [gate], name=ctx.name(node.name or "hardswish"),
                         alpha=1.0 / 6.0, beta=0.5),
        helper.make_node("Mul", [node.input[0], gate], list(node.output), name=node.name),
    ]


def _mish(node: onnx.NodeProto, ctx: _Context) -> list[onnx.NodeProto]:
    """``Mish(x)`` = ``x * tanh(softplus(x))``."""
    soft, tanh = ctx.name(node.output[0]), ctx.name(node.output[0])
    base = node.name or "mish"
    return [
        helper.make_node("Softplus", [node.input[0]], [soft], name=ctx.name(base)),
        helper.make_node("Tanh", [soft], [tanh], name=ctx.name(base)),
        helper.make_node("Mul", [node.input[0], tanh], list(node.output), name=node.name),
    ]


def _gelu(node: onnx.NodeProto, ctx: _Context) -> list[onnx.NodeProto]:
    """``Gelu`` (opset 20): ``0.5 x (1 + erf(x / sqrt 2))``, or the tanh form with ``approximate='tanh'``."""
    x, base = node.input[0], node.name or "gelu"
    half, one = ctx.add_constant(base, np.float32(0.5)), ctx.add_constant(base, np.float32(1.0))
    names = [ctx.name(node.output[0]) for _ in range(5)]
    if _attr(node, "approximate", "none") == "tanh":
        cube, inner, scaled, tanh, plus = names
        c = ctx.add_constant(base, np.float32(0.044715))
        k = ctx.add_constant(base, np.float32(np.sqrt(2.0 / np.pi)))
        three = ctx.add_constant(base, np.float32(3.0))
        pow_out, mul_c, add_x = ctx.name(cube), ctx.name(cube), ctx.name(cube)
        return [
            helper.make_node("Pow", [x, three], [pow_out], name=ctx.name(base)),
            helper.make_node("Mul", [pow_out, c], [mul_c], name=ctx.name(base)),
            helper.make_node("Add", [x, mul_c], [add_x], name=ctx.name(base)),
            helper.make_node("Mul", [add_x, k], [scaled], name=ctx.name(base)),
            helper.make_node("Tanh", [scaled], [tanh], name=ctx.name(base)),
            helper.make_node("Add", [tanh, one], [plus], name=ctx.name(base)),
            helper.make_node("Mul", [x, plus], [inner], name=ctx.name(base)),
            helper.make_node("Mul", [inner, half], list(node.output), name=node.name),
        ]
    scaled, erf, plus, product, _ = names
    root = ctx.add_constant(base, np.float32(np.sqrt(2.0)))
    return [
        helper.make_node("Div", [x, root], [scaled], name=ctx.name(base)),
        helper.make_node("Erf", [scaled], [erf], name=ctx.name(base)),
        helper.make_node("Add", [erf, one], [plus], name=ctx.name(base)),
        helper.make_node("Mul", [x, plus], [product], name=ctx.name(base)),
        helper.make_node("Mul", [product, half], list(node.output), name=node.name),
    ]


def _layer_norm(node: onnx.NodeProto, ctx: _Context) -> list[onnx.NodeProto]:
    """``LayerNormalization`` (opset 17) from ``ReduceMean``, ``Sub``, ``Mul``, ``Sqrt``, ``Div``, ``Add``."""
    if len(node.output) > 1 and any(node.output[1:]):
        raise _unsupported(node, ctx, "its mean and inverse-deviation outputs are used")
    shape = ctx.shape(node.input[0])
    if shape is None:
        raise _unsupported(node, ctx, "the rank of its input is unknown")
    rank = len(shape)
    axis = int(_attr(node, "axis", -1)) % rank
    axes = list(range(axis, rank))
    x, base = node.input[0], node.name or "layernorm"
    eps = ctx.add_constant(base, np.float32(_attr(node, "epsilon", 1e-5)))
    mean, centred, square, var, shifted, dev, normed = (ctx.name(node.output[0]) for _ in range(7))
    nodes = [
        helper.make_node("ReduceMean", [x], [mean], name=ctx.name(base), axes=axes, keepdims=1),
        helper.make_node("Sub", [x, mean], [centred], name=ctx.name(base)),
        helper.make_node("Mul", [centred, centred], [square], name=ctx.name(base)),
        helper.make_node("ReduceMean", [square], [var], name=ctx.name(base), axes=axes, keepdims=1),
        helper.make_node("Add", [var, eps], [shifted], name=ctx.name(base)),
        helper.make_node("Sqrt", [shifted], [dev], name=ctx.name(base)),
    ]
    has_bias = len(node.input) > 2 and bool(node.input[2])
    scaled = ctx.name(node.output[0]) if has_bias else node.output[0]
    nodes += [helper.make_node("Div", [centred, dev], [normed], name=ctx.name(base)),
              helper.make_node("Mul", [normed, node.input[1]], [scaled],
                               name=node.name if not has_bias else ctx.name(base))]
    if has_bias:
        nodes.append(helper.make_node("Add", [scaled, node.input[2]], [node.output[0]], name=node.name))
    return nodes


_RULES: dict[str, Rule] = {
    **dict.fromkeys(_REDUCE_OPS, _reduce),
    "Split": _split,
    "Pad": _pad,
    "Shape": _shape,
    "Reshape": _reshape,
    "HardSwish": _hard_swish,
    "Mish": _mish,
    "Gelu": _gelu,
    "LayerNormalization": _layer_norm,
}


def _constants(model: onnx.ModelProto) -> dict[str, np.ndarray]:
    values = {init.name: numpy_helper.to_array(init) for init in model.graph.initializer
              if int(np.prod(init.dims)) <= 4096}
    for node in model.graph.node:
        if node.op_type == "Constant" and node.domain in _DEFAULT_DOMAINS:
            value = _attr(node, "value")
            if isinstance(value, onnx.TensorProto):
                values[node.output[0]] = numpy_helper.to_array(value)
            elif _attr(node, "value_ints") is not None:
                values[node.output[0]] = np.array(_attr(node, "value_ints"), np.int64)
            elif _attr(node, "value_int") is not None:
                values[node.output[0]] = np.array(_attr(node, "value_int"), np.int64)
    return values


def _rewrite(node: onnx.NodeProto, ctx: _Context) -> list[onnx.NodeProto]:
    if node.domain not in _DEFAULT_DOMAINS:
        return [node]
    try:
        schema = onnx.defs.get_schema(node.op_type, ctx.opset, "")
    except onnx.defs.SchemaError:
        return [node]  # not an ONNX operator: PPQ names it as unsupported later
    if schema.since_version <= PPQ_MAX_OPSET and node.op_type not in _RULES:
        return [node]
    if node.op_type in _RULES:
        return _RULES[node.op_type](node, ctx)
    try:
        onnx.defs.get_schema(node.op_type, PPQ_MAX_OPSET, "")
    except onnx.defs.SchemaError:
        raise _unsupported(node, ctx, f"{node.op_type} does not exist at opset {PPQ_MAX_OPSET} and maptools has "
                                      "no decomposition for it") from None
    return [_keep_compatible(node, ctx)]


def downgrade_to_opset13(model: onnx.ModelProto) -> tuple[onnx.ModelProto, int]:
    """Return ``model`` expressed at opset 13 and the number of nodes rewritten.

    A model at opset 13 or below is returned as is (the same object). Otherwise a copy is rewritten node by
    node (see the module documentation); its default-domain opset becomes 13.

    Raises:
        UnsupportedOperatorError: a node cannot be expressed at opset 13 (the message names it).
    """
    opset = default_opset(model)
    if opset <= PPQ_MAX_OPSET:
        return model, 0
    converted = onnx.ModelProto()
    converted.CopyFrom(model)
    if converted.functions:
        from onnx import inliner

        converted = inliner.inline_local_functions(converted)
    ctx = _Context(model=converted, opset=opset, constants=_constants(converted))
    nodes: list[onnx.NodeProto] = []
    changed = 0
    for node in converted.graph.node:
        rewritten = _rewrite(node, ctx)
        if rewritten != [node]:
            changed += 1
        nodes.extend(rewritten)
    graph = converted.graph
    del graph.node[:]
    graph.node.extend(nodes)
    graph.initializer.extend(ctx.new_initializers)
    kept_imports = [o for o in converted.opset_import if o.domain not in _DEFAULT_DOMAINS]
    del converted.opset_import[:]
    converted.opset_import.extend([helper.make_opsetid("", PPQ_MAX_OPSET), *kept_imports])
    converted.ir_version = min(converted.ir_version, CONVERTED_IR_VERSION) if converted.ir_version else \
        CONVERTED_IR_VERSION
    del graph.value_info[:]
    logger.info("brought the model from opset %d down to opset %d (%d nodes rewritten)", opset, PPQ_MAX_OPSET,
                changed)
    return converted, changed
