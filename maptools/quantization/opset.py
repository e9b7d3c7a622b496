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

import numpy as np
import onnx
from onnx import helper, numpy_helper

from maptools.quantization.opset_rules import (
    DEFAULT_DOMAINS,
    PPQ_MAX_OPSET,
    RULES,
    RewriteContext,
    attr,
    keep_compatible,
    unsupported,
)

__all__ = ["constant_values", "default_opset", "downgrade_to_opset13"]

logger = logging.getLogger(__name__)

#: IR version of a converted model: enough for opset 13, readable by every supported onnx.
CONVERTED_IR_VERSION = 8


def default_opset(model: onnx.ModelProto) -> int:
    """The model's opset of the default (``ai.onnx``) domain (13 if it declares none)."""
    return max((o.version for o in model.opset_import if o.domain in DEFAULT_DOMAINS), default=PPQ_MAX_OPSET)


def constant_values(model: onnx.ModelProto, max_values: int | None = 4096) -> dict[str, np.ndarray]:
    """The constants of a graph (initializers of up to ``max_values`` values, all with None; ``Constant``
    outputs): name -> value."""
    values = {init.name: numpy_helper.to_array(init) for init in model.graph.initializer
              if max_values is None or int(np.prod(init.dims)) <= max_values}
    for node in model.graph.node:
        if node.op_type == "Constant" and node.domain in DEFAULT_DOMAINS:
            value = attr(node, "value")
            if isinstance(value, onnx.TensorProto):
                values[node.output[0]] = numpy_helper.to_array(value)
            elif attr(node, "value_ints") is not None:
                values[node.output[0]] = np.array(attr(node, "value_ints"), np.int64)
            elif attr(node, "value_int") is not None:
                values[node.output[0]] = np.array(attr(node, "value_int"), np.int64)
    return values


def _rewrite(node: onnx.NodeProto, ctx: RewriteContext) -> list[onnx.NodeProto]:
    if node.domain not in DEFAULT_DOMAINS:
        return [node]
    try:
        schema = onnx.defs.get_schema(node.op_type, ctx.opset, "")
    except onnx.defs.SchemaError:
        return [node]  # not an ONNX operator: PPQ names it as unsupported later
    if schema.since_version <= PPQ_MAX_OPSET and node.op_type not in RULES:
        return [node]
    if node.op_type in RULES:
        return RULES[node.op_type](node, ctx)
    try:
        onnx.defs.get_schema(node.op_type, PPQ_MAX_OPSET, "")
    except onnx.defs.SchemaError:
        raise unsupported(node, ctx, f"{node.op_type} does not exist at opset {PPQ_MAX_OPSET} and maptools has "
                                      "no decomposition for it") from None
    return [keep_compatible(node, ctx)]


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
    ctx = RewriteContext(model=converted, opset=opset, constants=constant_values(converted))
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
    kept_imports = [o for o in converted.opset_import if o.domain not in DEFAULT_DOMAINS]
    del converted.opset_import[:]
    converted.opset_import.extend([helper.make_opsetid("", PPQ_MAX_OPSET), *kept_imports])
    converted.ir_version = min(converted.ir_version, CONVERTED_IR_VERSION) if converted.ir_version else \
        CONVERTED_IR_VERSION
    del graph.value_info[:]
    logger.info("brought the model from opset %d down to opset %d (%d nodes rewritten)", opset, PPQ_MAX_OPSET,
                changed)
    return converted, changed
