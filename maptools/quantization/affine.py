"""Exact rewrites of elementwise chains that would each be requantized: fewer rounding points, same FP32 function.

Paddle2ONNX writes PP-LCNetV3 (the backbone of PP-OCRv4's recognizer) with a learnable affine block after
every Conv (``Conv -> Mul(c) -> Add(d)``) and hard-swish as ``Div(Mul(x, Clip(Add(x, 3), 0, 6)), 6)``. PPQ
quantizes the output of each of those operators, so every block rounds its activations six times at 8 bits;
kept in float, those elementwise operators take a 32-line W8A8 run from 23 to 32 strings read as FP32 reads them
(docs/benchmarks.rst). :func:`fold_affine_chains` puts them in the form maptools already quantizes once:

* ``Conv -> Mul(c) -> Add(d)`` with constant per-tensor or per-output-channel ``c``, ``d`` (either may be
  missing) becomes one Conv of weight ``W * c`` and bias ``b * c + d``;
* ``Div(Mul(x, Clip(Add(x, 3), 0, 6)), 6)`` becomes ``Mul(x, HardSigmoid(x))``
  (:func:`~maptools.quantization.hardswish.fuse_paddle_hardswish`), the hard-swish
  :mod:`~maptools.quantization.engine.fusion` quantizes only at its result.

A tensor read by another operator or a graph output is never folded away. The folded weights are new
initializers; constants left unused are removed.
"""

from __future__ import annotations

import logging
from collections import defaultdict

import numpy as np
import onnx
from onnx import numpy_helper

from maptools.quantization.hardswish import fuse_paddle_hardswish
from maptools.quantization.opset import constant_values

__all__ = ["fold_affine_chains"]

logger = logging.getLogger(__name__)


class _Graph:
    """A copy of the node list with who reads each tensor, rewritten and then written back by :meth:`commit`."""

    def __init__(self, proto: onnx.ModelProto) -> None:
        self.graph = proto.graph
        self.nodes = [onnx.NodeProto.FromString(node.SerializeToString()) for node in self.graph.node]
        self.constants = constant_values(proto, max_values=None)
        self.outputs = {vi.name for vi in self.graph.output}
        self.removed: set[int] = set()
        self.readers: dict[str, list[onnx.NodeProto]] = defaultdict(list)
        for node in self.nodes:
            for name in node.input:
                self.readers[name].append(node)

    def only_reader(self, tensor: str) -> onnx.NodeProto | None:
        """The single node reading ``tensor`` when nothing else (no other node, no graph output) does."""
        readers = [n for n in self.readers.get(tensor, []) if id(n) not in self.removed]
        return readers[0] if len(readers) == 1 and tensor not in self.outputs else None

    def constant_operand(self, node: onnx.NodeProto, variable: str) -> np.ndarray | None:
        """The constant other input of a two-input node reading ``variable``, if it is one."""
        if len(node.input) != 2 or list(node.input).count(variable) != 1:
            return None
        other = node.input[1] if node.input[0] == variable else node.input[0]
        return self.constants.get(other)

    def new_initializer(self, base: str, value: np.ndarray) -> str:
        name, n = base, 1
        while name in self.constants:
            name, n = f"{base}_{n}", n + 1
        self.graph.initializer.append(numpy_helper.from_array(value, name))
        self.constants[name] = value
        return name

    def drop(self, node: onnx.NodeProto) -> None:
        self.removed.add(id(node))


def _per_channel(value: np.ndarray, channels: int, rank: int) -> np.ndarray | None:
    """``value`` as a ``[channels]`` vector when it broadcasts per output channel of an NC... tensor (or is a
    scalar), else None."""
    if value.size == 1:
        return np.full(channels, float(value.ravel()[0]))
    shape = list(value.shape)
    if len(shape) > rank or value.size != channels:
        return None
    shape = [1] * (rank - len(shape)) + shape
    return value.reshape(-1).astype(np.float64) if shape[1] == channels else None


def _fold_conv_affine(g: _Graph, conv: onnx.NodeProto) -> int:
    """Fold the ``Mul``/``Add`` constants after ``conv`` into it; the number of nodes folded."""
    if len(conv.input) < 2 or conv.input[1] not in g.constants:
        return 0
    weight = g.constants[conv.input[1]]
    if weight.dtype != np.float32:
        return 0
    channels, rank = weight.shape[0], weight.ndim
    bias = g.constants.get(conv.input[2]) if len(conv.input) > 2 and conv.input[2] else np.zeros(channels)
    if bias is None:
        return 0
    w, b = weight.astype(np.float64), bias.astype(np.float64).reshape(-1)
    folded = 0
    while True:
        node = g.only_reader(conv.output[0])
        if node is None or node.op_type not in ("Mul", "Add"):
            break
        value = g.constant_operand(node, conv.output[0])
        vector = None if value is None else _per_channel(value, channels, rank)
        if vector is None:
            break
        if node.op_type == "Mul":
            w = w * vector.reshape([-1] + [1] * (rank - 1))
            b = b * vector
        else:
            b = b + vector
        conv.output[0] = node.output[0]
        g.drop(node)
        folded += 1
    if folded:
        inputs = [conv.input[0], g.new_initializer(f"{conv.name}.folded_weight", w.astype(np.float32)),
                  g.new_initializer(f"{conv.name}.folded_bias", b.astype(np.float32))]
        del conv.input[:]
        conv.input.extend(inputs)
    return folded


def _commit(g: _Graph) -> None:
    """Write the kept nodes back; constants nothing reads any more are removed."""
    used = ({name for node in g.nodes if id(node) not in g.removed for name in node.input} | g.outputs
            | {vi.name for vi in g.graph.input})
    kept_nodes = [node for node in g.nodes if id(node) not in g.removed
                  and not (node.op_type == "Constant" and node.output[0] not in used)]
    del g.graph.node[:]
    g.graph.node.extend(kept_nodes)
    kept_inits = [init for init in g.graph.initializer if init.name in used]
    del g.graph.initializer[:]
    g.graph.initializer.extend(kept_inits)


def fold_affine_chains(proto: onnx.ModelProto) -> int:
    """Fold ``Conv -> Mul(c) -> Add(d)`` into the Conv and rewrite ``x * Clip(x + 3, 0, 6) / 6`` as
    ``x * HardSigmoid(x)``, in place; the number of nodes removed."""
    g = _Graph(proto)
    removed = 0
    for node in list(g.nodes):
        if node.op_type == "Conv" and id(node) not in g.removed:
            removed += _fold_conv_affine(g, node)
    if removed:
        _commit(g)
    removed += 2 * fuse_paddle_hardswish(proto)  # four operators become two
    if removed:
        logger.info("folded %d elementwise nodes (affine constants into Convs, hard-swish as x * HardSigmoid(x))",
                    removed)
    return removed
