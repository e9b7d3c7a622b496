"""The per-node rules that express a node of a newer opset at opset 13 (see :mod:`maptools.quantization.opset`).

Each rule takes a node and the :class:`RewriteContext` (constants, inferred shapes, fresh names) and returns
the opset-13 nodes that replace it (:data:`RULES`); :func:`keep_compatible` keeps a node whose newer version
only added what it does not use.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np
import onnx
from onnx import helper, numpy_helper

from maptools.errors import UnsupportedOperatorError

__all__ = ["DEFAULT_DOMAINS", "PPQ_MAX_OPSET", "RULES", "RewriteContext", "Rule", "attr", "keep_compatible",
           "unsupported"]

#: The newest opset PPQ 0.6.6 executes; newer models are brought down to it.
PPQ_MAX_OPSET = 13
DEFAULT_DOMAINS = ("", "ai.onnx")
_REDUCE_OPS = frozenset({"ReduceMean", "ReduceMax", "ReduceMin", "ReduceProd", "ReduceL1", "ReduceL2",
                         "ReduceLogSum", "ReduceLogSumExp", "ReduceSumSquare"})
#: Attribute values added after opset 13 that opset 13 cannot express: (op type, attribute) -> values.
_NEW_VALUES = {("Resize", "coordinate_transformation_mode"): {"half_pixel_symmetric"},
               ("Pad", "mode"): {"wrap"}}


@dataclass
class RewriteContext:
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


Rule = Callable[[onnx.NodeProto, RewriteContext], list[onnx.NodeProto]]


def _describe(node: onnx.NodeProto) -> str:
    return f"node {node.name or '(unnamed)'!r} ({node.op_type})"


def unsupported(node: onnx.NodeProto, ctx: RewriteContext, why: str) -> UnsupportedOperatorError:
    """The error for a node that cannot be expressed at opset 13, naming it, ``why`` and how to re-export."""
    return UnsupportedOperatorError(
        f"{_describe(node)}: {why}; the model is at opset {ctx.opset} and PPQ 0.6.6 executes opsets 10 to "
        f"{PPQ_MAX_OPSET} only, so it must be expressed at opset {PPQ_MAX_OPSET} (re-export at opset "
        f"{PPQ_MAX_OPSET}, e.g. torch.onnx.export(..., opset_version={PPQ_MAX_OPSET}, dynamo=False))"
    )


def attr(node: onnx.NodeProto, name: str, default: object = None) -> object:
    """A node attribute's value (strings decoded), or ``default`` when the node does not set it."""
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


def keep_compatible(node: onnx.NodeProto, ctx: RewriteContext, handled: frozenset[str] = frozenset()) -> onnx.NodeProto:
    """``node`` at opset 13: attributes opset 13 lacks must be at their default (they are dropped)."""
    new = onnx.defs.get_schema(node.op_type, ctx.opset, "")
    old = onnx.defs.get_schema(node.op_type, PPQ_MAX_OPSET, "")
    dropped = set()
    for attribute in node.attribute:
        name = attribute.name
        if name in old.attributes:
            value = attr(node, name)
            if isinstance(value, str) and value in _NEW_VALUES.get((node.op_type, name), set()):
                raise unsupported(node, ctx, f"{name}={value!r} does not exist at opset {PPQ_MAX_OPSET}")
            continue
        if name in handled:
            dropped.add(name)
            continue
        default = _schema_default(new, name) if name in new.attributes else None
        if default is None or attr(node, name) != default:
            raise unsupported(node, ctx, f"attribute {name}={attr(node, name)!r} has no opset-{PPQ_MAX_OPSET} "
                                          "equivalent")
        dropped.add(name)
    if len([i for i in node.input if i]) > old.max_input:
        raise unsupported(node, ctx, f"input {len(node.input)} has no opset-{PPQ_MAX_OPSET} equivalent")
    while node.input and not node.input[-1]:  # trailing empty optional inputs
        node = _without_attrs(node, set())
        del node.input[-1]
    return _without_attrs(node, dropped)


def _reduce(node: onnx.NodeProto, ctx: RewriteContext) -> list[onnx.NodeProto]:
    """``Reduce*`` of opset 18: constant ``axes`` input back to the attribute of opset 13."""
    noop = bool(attr(node, "noop_with_empty_axes", 0))
    rewritten = _without_attrs(node, {"noop_with_empty_axes"})
    axes = None
    if len(node.input) > 1 and node.input[1]:
        axes = ctx.constant(node.input[1])
        if axes is None:
            raise unsupported(node, ctx, "its axes are computed at run time")
        del rewritten.input[1:]
    if axes is not None and axes.size:
        rewritten.attribute.append(helper.make_attribute("axes", [int(a) for a in axes.reshape(-1)]))
    elif noop:  # no axes and noop_with_empty_axes: the input unchanged
        return [helper.make_node("Identity", [node.input[0]], list(node.output), name=node.name)]
    return [rewritten]


def _split(node: onnx.NodeProto, ctx: RewriteContext) -> list[onnx.NodeProto]:
    """``Split`` of opset 18: ``num_outputs`` becomes explicit split sizes (opset 13 splits equally otherwise)."""
    parts = attr(node, "num_outputs")
    if parts is None:
        return [keep_compatible(node, ctx)]
    rewritten = _without_attrs(node, {"num_outputs"})
    if len(node.input) > 1 and node.input[1]:
        return [rewritten]
    shape = ctx.shape(node.input[0])
    axis = int(attr(node, "axis", 0))
    size = None if shape is None else shape[axis]
    if size is not None and size % parts:
        chunk = -(-size // parts)  # opset 18: equal chunks of ceil(size / n), the last one smaller
        sizes = [chunk] * (parts - 1) + [size - chunk * (parts - 1)]
        del rewritten.input[:]
        rewritten.input.extend([node.input[0], ctx.add_constant(node.name or "split", np.array(sizes, np.int64))])
    return [rewritten]


def _pad(node: onnx.NodeProto, ctx: RewriteContext) -> list[onnx.NodeProto]:
    """``Pad`` of opset 18: a constant ``axes`` input is folded into full-rank ``pads``."""
    if len(node.input) < 4 or not node.input[3]:
        return [keep_compatible(node, ctx)]
    axes, pads = ctx.constant(node.input[3]), ctx.constant(node.input[1])
    shape = ctx.shape(node.input[0])
    if axes is None or pads is None or shape is None:
        raise unsupported(node, ctx, "its pads or axes are computed at run time")
    rank, axes, pads = len(shape), axes.reshape(-1), pads.reshape(-1)
    full = np.zeros(2 * rank, np.int64)
    for k, axis in enumerate(int(a) % rank for a in axes):
        full[axis], full[axis + rank] = pads[k], pads[k + axes.size]
    rewritten = onnx.NodeProto()
    rewritten.CopyFrom(node)
    del rewritten.input[:]
    rewritten.input.extend([node.input[0], ctx.add_constant(node.name or "pad", full), *node.input[2:3]])
    return [keep_compatible(rewritten, ctx)]


def _shape(node: onnx.NodeProto, ctx: RewriteContext) -> list[onnx.NodeProto]:
    """``Shape`` with ``start``/``end`` (opset 15): a full ``Shape`` followed by a ``Slice``."""
    start, end = attr(node, "start"), attr(node, "end")
    if start is None and end is None:
        return [keep_compatible(node, ctx)]
    full = ctx.name(node.output[0])
    base = node.name or "shape"
    ends = ctx.add_constant(base, np.array([end if end is not None else np.iinfo(np.int64).max], np.int64))
    return [
        helper.make_node("Shape", [node.input[0]], [full], name=ctx.name(base)),
        helper.make_node("Slice", [full, ctx.add_constant(base, np.array([start or 0], np.int64)), ends,
                                   ctx.add_constant(base, np.array([0], np.int64))],
                         list(node.output), name=node.name),
    ]


def _reshape(node: onnx.NodeProto, ctx: RewriteContext) -> list[onnx.NodeProto]:
    """``Reshape`` with ``allowzero=1`` (opset 14): the same as opset 13 unless the target shape holds a 0.

    A constant shape with a 0 is refused; a shape computed at run time holding a 0 would make an empty
    tensor, which no network quantized here computes, so the attribute is dropped.
    """
    if attr(node, "allowzero", 0):
        shape = ctx.constant(node.input[1])
        if shape is not None and bool(np.any(shape == 0)):
            raise unsupported(node, ctx, "allowzero=1 with a 0 in its target shape")
    return [keep_compatible(node, ctx, frozenset({"allowzero"}))]


def _hard_swish(node: onnx.NodeProto, ctx: RewriteContext) -> list[onnx.NodeProto]:
    """``HardSwish(x)`` = ``x * HardSigmoid(x, alpha=1/6, beta=0.5)``, as torch writes it at opset 13."""
    gate = ctx.name(node.output[0])
    return [
        helper.make_node("HardSigmoid", [node.input[0]], [gate], name=ctx.name(node.name or "hardswish"),
                         alpha=1.0 / 6.0, beta=0.5),
        helper.make_node("Mul", [node.input[0], gate], list(node.output), name=node.name),
    ]


def _mish(node: onnx.NodeProto, ctx: RewriteContext) -> list[onnx.NodeProto]:
    """``Mish(x)`` = ``x * tanh(softplus(x))``."""
    soft, tanh = ctx.name(node.output[0]), ctx.name(node.output[0])
    base = node.name or "mish"
    return [
        helper.make_node("Softplus", [node.input[0]], [soft], name=ctx.name(base)),
        helper.make_node("Tanh", [soft], [tanh], name=ctx.name(base)),
        helper.make_node("Mul", [node.input[0], tanh], list(node.output), name=node.name),
    ]


def _gelu(node: onnx.NodeProto, ctx: RewriteContext) -> list[onnx.NodeProto]:
    """``Gelu`` (opset 20): ``0.5 x (1 + erf(x / sqrt 2))``, or the tanh form with ``approximate='tanh'``."""
    x, base = node.input[0], node.name or "gelu"
    half, one = ctx.add_constant(base, np.float32(0.5)), ctx.add_constant(base, np.float32(1.0))
    names = [ctx.name(node.output[0]) for _ in range(5)]
    if attr(node, "approximate", "none") == "tanh":
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


def _layer_norm(node: onnx.NodeProto, ctx: RewriteContext) -> list[onnx.NodeProto]:
    """``LayerNormalization`` (opset 17) from ``ReduceMean``, ``Sub``, ``Mul``, ``Sqrt``, ``Div``, ``Add``."""
    if len(node.output) > 1 and any(node.output[1:]):
        raise unsupported(node, ctx, "its mean and inverse-deviation outputs are used")
    shape = ctx.shape(node.input[0])
    if shape is None:
        raise unsupported(node, ctx, "the rank of its input is unknown")
    rank = len(shape)
    axis = int(attr(node, "axis", -1)) % rank
    axes = list(range(axis, rank))
    x, base = node.input[0], node.name or "layernorm"
    eps = ctx.add_constant(base, np.float32(attr(node, "epsilon", 1e-5)))
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


RULES: dict[str, Rule] = {
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
