"""Paddle2ONNX's hard-swish, ``Div(Mul(x, Clip(Add(x, 3), 0, 6)), 6)``, rewritten as ``Mul(x, HardSigmoid(x))``.

The two compute the same function (``clip(x + 3, 0, 6) / 6 == clip(x / 6 + 0.5, 0, 1)``). In the four-operator
form PPQ quantizes each intermediate tensor on its own, signed: ``x + 3``, the clip, the product ``x * clip``
(six times the activation's range) and the quotient. In the second form
:class:`~maptools.quantization.engine.fusion.LowBitFusionPass` fuses the activation into the Conv before it (as
the chip applies it to the accumulator) and :mod:`~maptools.quantization.engine.unsigned` puts its output on the
unsigned range: one quantized tensor instead of five, with twice the resolution. On the PicoDet layout detector
of the corpus (94 such activations) this is the difference between a collapsed and a working W8A8 map (see the
benchmarks).

Only the exact pattern is rewritten: constants 3 (added), 0 and 6 (clip bounds) and 6 (divisor, or a
multiplication by 1/6), ``x`` read by the ``Add`` and the ``Mul``, intermediate tensors read by nothing else
and not graph outputs. The ``HardSigmoid`` takes the ``Clip``'s name and the final ``Mul`` the first ``Mul``'s
name and the ``Div``'s output tensor, so the rest of the graph is untouched.
"""

from __future__ import annotations

import logging
from collections import defaultdict

import numpy as np
import onnx
from onnx import helper

from maptools.quantization.opset import constant_values

__all__ = ["fuse_paddle_hardswish"]

logger = logging.getLogger(__name__)


def _scalar(values: dict[str, np.ndarray], name: str) -> float | None:
    """The value of a one-element constant, None when ``name`` is not one."""
    value = values.get(name)
    return float(value.reshape(-1)[0]) if value is not None and value.size == 1 else None


def _other(node: onnx.NodeProto, name: str) -> str | None:
    """The input of a two-input ``node`` that is not ``name`` (None unless exactly one input is ``name``)."""
    if len(node.input) != 2 or list(node.input).count(name) != 1:
        return None
    return node.input[1] if node.input[0] == name else node.input[0]


def fuse_paddle_hardswish(model: onnx.ModelProto) -> int:
    """Rewrite every Paddle2ONNX hard-swish of ``model`` (in place) as ``x * HardSigmoid(x)``; return the count."""
    graph = model.graph
    values = constant_values(model)
    readers: dict[str, list[onnx.NodeProto]] = defaultdict(list)
    for node in graph.node:
        for name in node.input:
            readers[name].append(node)
    outputs = {vi.name for vi in graph.output}

    def only_reader(tensor: str) -> onnx.NodeProto | None:
        found = readers.get(tensor, [])
        return found[0] if len(found) == 1 and tensor not in outputs else None

    drop: set[int] = set()
    replace: dict[int, list[onnx.NodeProto]] = {}
    for add in graph.node:
        if add.op_type != "Add" or add.domain not in ("", "ai.onnx"):
            continue
        x = next((name for name in add.input if name not in values), None)
        if x is None or _scalar(values, _other(add, x) or "") != 3.0:
            continue
        clip = only_reader(add.output[0])
        if clip is None or clip.op_type != "Clip" or len(clip.input) != 3 or clip.input[0] != add.output[0] or \
                _scalar(values, clip.input[1]) != 0.0 or _scalar(values, clip.input[2]) != 6.0:
            continue
        mul = only_reader(clip.output[0])
        if mul is None or mul.op_type != "Mul" or _other(mul, clip.output[0]) != x:
            continue
        div = only_reader(mul.output[0])
        if div is None or len(div.input) != 2 or div.input[0] != mul.output[0]:
            continue
        divisor = _scalar(values, div.input[1])
        if not ((div.op_type == "Div" and divisor == 6.0) or
                (div.op_type == "Mul" and divisor is not None and np.isclose(divisor, 1.0 / 6.0, rtol=1e-6, atol=0))):
            continue
        gate = helper.make_node("HardSigmoid", [x], [clip.output[0]], name=clip.name or f"{clip.output[0]}_gate",
                                alpha=1.0 / 6.0, beta=0.5)
        product = helper.make_node("Mul", [x, clip.output[0]], [div.output[0]], name=mul.name or div.output[0])
        index = {id(n): i for i, n in enumerate(graph.node)}
        drop.update({index[id(add)], index[id(clip)], index[id(mul)]})
        replace[index[id(div)]] = [gate, product]
    if not replace:
        return 0
    dropped_inputs = {name for i in drop | set(replace) for name in graph.node[i].input}
    kept: list[onnx.NodeProto] = []
    for i, node in enumerate(graph.node):
        if i in replace:
            kept.extend(replace[i])
        elif i not in drop:
            kept.append(node)
    read = {name for node in kept for name in node.input} | outputs
    unused = dropped_inputs - read  # the constants only the removed nodes read
    kept = [n for n in kept if not (n.op_type == "Constant" and n.output and n.output[0] in unused)]
    del graph.node[:]
    graph.node.extend(kept)
    inits = [init for init in graph.initializer if init.name not in unused]
    del graph.initializer[:]
    graph.initializer.extend(inits)
    logger.debug("rewrote %d Paddle hard-swish activations as x * HardSigmoid(x)", len(replace))
    return len(replace)
