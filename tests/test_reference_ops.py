"""Every handler of the integer reference executor on small tensors, without PPQ.

Each test builds a tiny ONNX graph whose operator sits between ``QuantizeLinear -> Clip ->
DequantizeLinear`` boundaries (opset 13 unless the operator needs another), with hand-made
``OperatorQuantConfig`` / ``TensorQuant`` records and integer weights, and runs it in the executor and
in onnxruntime (graph optimizations off, so that ORT computes exactly the QDQ graph). Integer operators
(layout, MaxPool, nearest Resize, Split, Concat of one quantization...) must give identical outputs; float
ones agree within one output quantization step (ORT computes in float32, the executor in float64 and
exact integers, so a rounding tie may fall the other way).
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper, numpy_helper

from maptools.errors import InvalidArgumentError, UnsupportedOperatorError
from maptools.quantization.artifacts import QUANTINFO, QUANTMODEL, QUANTPARAMS, dump_pickle, write_map
from maptools.quantization.cim import CIMSpec
from maptools.quantization.format import bias_key, weight_key
from maptools.quantization.records import OperatorQuantConfig, TensorQuant
from maptools.quantization.reference import SUPPORTED_OPS, ReferenceExecutor, simulate
from maptools.quantization.reference.backends import CrossbarBackend, MacBackend
from maptools.quantization.reference.generic import CANDIDATE_OPS, GENERIC_OPS
from maptools.quantization.reference.registry import HANDLERS

pytestmark = pytest.mark.stack  # also run on the oldest supported stack (make test): no PPQ, about a second

#: Operator types some test below runs (declared with @covers), checked against SUPPORTED_OPS at the end.
COVERED: set[str] = set()
RNG_SEED = 0


def covers(*op_types: str) -> Callable[[Callable[..., Any]], Callable[..., Any]]:
    """Declare the operator types a test runs."""
    COVERED.update(op_types)
    return lambda fn: fn


def tq(name: str, scale: float, bits: int = 8, signed: bool = True, zero_point: int = 0) -> TensorQuant:
    """A TensorQuant with a float32-representable scale."""
    qmin, qmax = (-(2 ** (bits - 1)), 2 ** (bits - 1) - 1) if signed else (0, 2**bits - 1)
    return TensorQuant(name=name, bits=bits, scale=float(np.float32(scale)), zero_point=zero_point, qmin=qmin,
                       qmax=qmax)


class QDQGraph:
    """A small QDQ graph with its quantinfo/quantparams records and feeds."""

    def __init__(self) -> None:
        self.nodes: list[onnx.NodeProto] = []
        self.initializers: list[onnx.TensorProto] = []
        self.inputs: list[onnx.ValueInfoProto] = []
        self.outputs: list[onnx.ValueInfoProto] = []
        self.quantinfo: dict[str, OperatorQuantConfig] = {}
        self.quantparams: dict[str, np.ndarray | None] = {}
        self.feeds: dict[str, np.ndarray] = {}
        self.count = 0

    def const(self, name: str, values: Any) -> str:
        self.initializers.append(numpy_helper.from_array(np.asarray(values), name))
        return name

    def qdq(self, tensor: str, t: TensorQuant) -> str:
        """QuantizeLinear -> integer Clip -> DequantizeLinear of ``tensor``; returns the dequantized name."""
        i, self.count = self.count, self.count + 1
        dtype = np.int8 if t.qmin < 0 else np.uint8
        scale, zp = self.const(f"s{i}", np.float32(t.scale)), self.const(f"z{i}", dtype(t.zero_point))
        lo, hi = self.const(f"lo{i}", dtype(t.qmin)), self.const(f"hi{i}", dtype(t.qmax))
        self.nodes += [
            helper.make_node("QuantizeLinear", [tensor, scale, zp], [f"{tensor}_q"], name=f"PPQ_Operation_{i}_q"),
            helper.make_node("Clip", [f"{tensor}_q", lo, hi], [f"{tensor}_c"], name=f"PPQ_Operation_{i}_c"),
            helper.make_node("DequantizeLinear", [f"{tensor}_c", scale, zp], [f"{tensor}_dq"],
                             name=f"PPQ_Operation_{i}_dq"),
        ]
        return f"{tensor}_dq"

    def feed(self, name: str, values: np.ndarray) -> str:
        """A graph input fed with ``values`` (its dtype)."""
        values = np.asarray(values)
        elem = helper.np_dtype_to_tensor_dtype(values.dtype)
        self.inputs.append(helper.make_tensor_value_info(name, elem, list(values.shape)))
        self.feeds[name] = values
        return name

    def act(self, name: str, values: np.ndarray, t: TensorQuant | None) -> str:
        """A float32 graph input, quantized with ``t`` (the record of tensor ``name``)."""
        self.feed(name, np.asarray(values, np.float32))
        return self.qdq(name, t) if t is not None else name

    def weight(self, name: str, q: np.ndarray, scale: np.ndarray, axis: int, dtype: type = np.int8) -> str:
        """An integer initializer dequantized per channel along ``axis``."""
        self.const(f"{name}_int", q.astype(dtype))
        self.const(f"{name}_scale", np.asarray(scale, np.float32))
        self.const(f"{name}_zp", np.zeros(np.size(scale), dtype))
        node_attrs = {"axis": axis} if np.size(scale) > 1 else {}
        self.nodes.append(helper.make_node("DequantizeLinear", [f"{name}_int", f"{name}_scale", f"{name}_zp"],
                                           [name], name=f"{name}_dq", **node_attrs))
        return name

    def op(self, op_type: str, inputs: list[str], outputs: list[str] | int = 1, name: str | None = None,
           ins: list[TensorQuant | None] | None = None, outs: list[TensorQuant | None] | None = None,
           **node_attrs: Any) -> list[str]:
        """Add an operator (with a record when ``ins``/``outs`` are given); returns its output names."""
        name = name or op_type.lower()
        names = [f"{name}_out{k}" for k in range(outputs)] if isinstance(outputs, int) else outputs
        self.nodes.append(helper.make_node(op_type, inputs, names, name=name, **node_attrs))
        if ins is not None or outs is not None:
            outs = [tq(n, o.scale, o.bits, o.qmin < 0, o.zero_point) if o is not None else None
                    for n, o in zip(names, outs or [None] * len(names), strict=True)]
            self.quantinfo[name] = OperatorQuantConfig(name=name, op_type=op_type, inputs=list(ins or []),
                                                       outputs=outs)
        return names

    def out(self, tensor: str, t: TensorQuant | None = None, elem: int = TensorProto.FLOAT) -> None:
        """Make ``tensor`` a graph output, through a boundary when ``t`` is given."""
        name = self.qdq(tensor, t) if t is not None else tensor
        self.outputs.append(helper.make_tensor_value_info(name, elem, None))

    def model(self, opset: int = 13) -> onnx.ModelProto:
        graph = helper.make_graph(self.nodes, "case", self.inputs, self.outputs, self.initializers)
        model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)])
        model.ir_version = 8 if opset <= 18 else 9 if opset <= 20 else 10
        return model


def run_both(g: QDQGraph, opset: int = 13) -> tuple[list[np.ndarray], list[np.ndarray], dict[str, np.ndarray]]:
    """(executor outputs, onnxruntime outputs, executor integers) of the graph."""
    model = g.model(opset)
    executor = ReferenceExecutor(model, g.quantinfo, g.quantparams)
    ours, integers = executor.run(g.feeds, return_integers=True)
    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    session = ort.InferenceSession(model.SerializeToString(), options, providers=["CPUExecutionProvider"])
    theirs = session.run(None, g.feeds)
    return [ours[o.name] for o in g.outputs], theirs, integers


def assert_exact(ours: list[np.ndarray], theirs: list[np.ndarray]) -> None:
    for a, b in zip(ours, theirs, strict=True):
        assert a.shape == b.shape
        np.testing.assert_array_equal(a, np.asarray(b, np.float32))


def assert_within_step(ours: list[np.ndarray], theirs: list[np.ndarray], step: float) -> None:
    for a, b in zip(ours, theirs, strict=True):
        assert a.shape == b.shape
        diff = np.abs(a.astype(np.float64) - np.asarray(b, np.float64))
        assert diff.max(initial=0.0) <= step * (1 + 1e-6), f"max difference {diff.max()} > one step {step}"
        assert np.mean(diff == 0) >= 0.9, f"only {np.mean(diff == 0):.0%} identical"


def rand(shape: tuple[int, ...] | list[int], low: float = -2.0, high: float = 2.0, seed: int = RNG_SEED) -> np.ndarray:
    return np.random.default_rng(seed).uniform(low, high, shape).astype(np.float32)


X, Y = tq("x", 2**-5), tq("y", 2**-4)  # input and output quantization of most cases


# -- MAC operators ----------------------------------------------------------------------------------------------
def _mac_graph(op_type: str, x_shape: tuple[int, ...], w_shape: tuple[int, ...], axis: int, bias: bool = True,
               x_t: TensorQuant = X, out_t: TensorQuant | None = Y, **node_attrs: Any) -> QDQGraph:
    """x -> op(x, W, b) -> y with per-channel integer weights along ``axis`` and an int32 bias."""
    rng = np.random.default_rng(1)
    g = QDQGraph()
    x = g.act("x", rand(x_shape, -3, 3), x_t)
    channels = w_shape[axis]
    q = rng.integers(-127, 128, w_shape)
    w_scale = rng.uniform(0.002, 0.01, channels).astype(np.float32)
    inputs = [x, g.weight("w", q, w_scale, axis)]
    g.quantparams[weight_key("mac", op_type)] = q.astype(np.int8)
    out_channels = channels * int(node_attrs.get("group", 1)) if op_type == "ConvTranspose" else channels
    bias_scale = (np.float32(x_t.scale) * np.tile(w_scale, out_channels // channels)).astype(np.float32)
    if bias:
        b = rng.integers(-2000, 2000, out_channels)
        g.const("b_int", b.astype(np.int32))
        g.const("b_scale", bias_scale)
        g.const("b_zp", np.zeros(out_channels, np.int32))
        g.nodes.append(helper.make_node("DequantizeLinear", ["b_int", "b_scale", "b_zp"], ["b"], name="b_dq", axis=0))
        inputs.append("b")
        g.quantparams[bias_key("mac", op_type)] = b.astype(np.int32)
    (y,) = g.op(op_type, inputs, name="mac", ins=[x_t, None, None], outs=[out_t], **node_attrs)
    record = g.quantinfo["mac"]
    record.weight_scale, record.weight_axis, record.weight_bits = w_scale, axis, 8
    record.bias_scale = bias_scale if bias else None
    g.out(y, out_t)
    return g


CONV_CASES = {
    "plain": ({}, (1, 3, 8, 8), (4, 3, 3, 3)),
    "pads_strides": ({"pads": [1, 0, 2, 1], "strides": [2, 1]}, (2, 3, 9, 7), (5, 3, 3, 2)),
    "dilations": ({"dilations": [2, 2], "pads": [2, 2, 2, 2]}, (1, 4, 8, 8), (4, 4, 3, 3)),
    "groups": ({"group": 2, "pads": [1, 1, 1, 1]}, (1, 4, 6, 6), (6, 2, 3, 3)),
    "depthwise": ({"group": 4, "strides": [2, 2]}, (1, 4, 7, 7), (4, 1, 3, 3)),
    "same_upper": ({"auto_pad": "SAME_UPPER", "strides": [2, 2]}, (1, 3, 7, 8), (4, 3, 4, 3)),
    "same_lower": ({"auto_pad": "SAME_LOWER"}, (1, 3, 6, 6), (4, 3, 2, 2)),
    "valid": ({"auto_pad": "VALID"}, (1, 3, 6, 6), (4, 3, 3, 3)),
    "conv1d": ({"pads": [1, 1], "strides": [2]}, (2, 3, 10), (4, 3, 3)),
}


@covers("Conv", "QuantizeLinear", "DequantizeLinear", "Clip")
@pytest.mark.parametrize("case", list(CONV_CASES))
def test_conv(case: str) -> None:
    node_attrs, x_shape, w_shape = CONV_CASES[case]
    ours, theirs, integers = run_both(_mac_graph("Conv", x_shape, w_shape, 0, **node_attrs))
    assert_within_step(ours, theirs, Y.scale)
    assert integers["mac"].dtype == np.int8


@covers("Conv")
def test_conv_asymmetric_input_without_bias() -> None:
    x_t = tq("x", 2**-5, signed=False, zero_point=100)
    ours, theirs, _ = run_both(_mac_graph("Conv", (1, 3, 6, 6), (4, 3, 3, 3), 0, bias=False, x_t=x_t, pads=[1] * 4))
    assert_within_step(ours, theirs, Y.scale)


@covers("Conv", "Sigmoid")
def test_conv_fused_activation_reads_the_accumulator() -> None:
    """A Conv without an output record hands its real accumulator to the activation."""
    g = _mac_graph("Conv", (1, 3, 6, 6), (4, 3, 3, 3), 0, out_t=None, pads=[1] * 4)
    g.outputs.clear()
    (s,) = g.op("Sigmoid", ["mac_out0"], ins=[None], outs=[tq("", 2**-7, signed=False)])
    g.out(s, tq("s", 2**-7, signed=False))
    ours, theirs, integers = run_both(g)
    assert "mac" not in integers and "sigmoid" in integers
    assert_within_step(ours, theirs, 2**-7)


CONV_TRANSPOSE_CASES = {
    "stride2": ({"strides": [2, 2]}, (1, 4, 4, 4), (4, 3, 3, 3)),
    "pads_output_padding": ({"strides": [2, 2], "pads": [1, 1, 1, 1], "output_padding": [1, 1]},
                            (1, 4, 5, 4), (4, 3, 3, 3)),
    "groups": ({"strides": [2, 2], "group": 2, "pads": [1, 0, 1, 0]}, (1, 4, 4, 4), (4, 3, 4, 4)),
    "dilations": ({"dilations": [2, 1], "strides": [1, 2], "pads": [0, 1, 2, 0]}, (2, 2, 4, 5), (2, 3, 3, 2)),
    "large_pads": ({"strides": [2, 2], "pads": [3, 3, 3, 3]}, (1, 2, 5, 5), (2, 2, 3, 3)),
    "conv1d": ({"strides": [3], "output_padding": [2]}, (1, 3, 5), (3, 2, 4)),
}


@covers("ConvTranspose")
@pytest.mark.parametrize("case", list(CONV_TRANSPOSE_CASES))
def test_conv_transpose(case: str) -> None:
    node_attrs, x_shape, w_shape = CONV_TRANSPOSE_CASES[case]
    ours, theirs, _ = run_both(_mac_graph("ConvTranspose", x_shape, w_shape, 1, **node_attrs))
    assert_within_step(ours, theirs, Y.scale)


GEMM_CASES = {
    "transB": ({"transB": 1}, (4, 6), (5, 6), 0),
    "plain": ({}, (4, 6), (6, 5), 1),
    "transA": ({"transA": 1}, (6, 4), (6, 5), 1),
    "alpha_beta": ({"transB": 1, "alpha": 0.5, "beta": 2.0}, (4, 6), (5, 6), 0),
}


@covers("Gemm")
@pytest.mark.parametrize("case", list(GEMM_CASES))
def test_gemm(case: str) -> None:
    node_attrs, x_shape, w_shape, axis = GEMM_CASES[case]
    ours, theirs, _ = run_both(_mac_graph("Gemm", x_shape, w_shape, axis, **node_attrs))
    assert_within_step(ours, theirs, Y.scale)


@covers("Gemm")
def test_gemm_float_bias_and_two_activations() -> None:
    """C left in float (not in quantparams) is added to the real values; B may be an activation."""
    g = _mac_graph("Gemm", (3, 4), (4, 5), 1, bias=False, alpha=0.5, beta=0.25)
    g.nodes[-4].input.append(g.const("c", rand((5,), seed=3)))  # the Gemm node, before the output boundary
    a2, b2 = g.act("a", rand((4, 3)), tq("a", 2**-5)), g.act("bb", rand((5, 4)), tq("bb", 2**-5))
    (y2,) = g.op("Gemm", [a2, b2, "c"], name="gemm2", ins=[tq("a", 2**-5), tq("bb", 2**-5)], outs=[Y],
                 transA=1, transB=1, alpha=0.75, beta=0.5)
    g.out(y2, Y)
    ours, theirs, _ = run_both(g)
    assert_within_step(ours, theirs, Y.scale)


@covers("MatMul")
def test_matmul_constant_weight_and_two_activations() -> None:
    g = _mac_graph("MatMul", (2, 3, 6), (6, 4), 1, bias=False)
    a_t, b_t = tq("a", 2**-4), tq("bm", 2**-5, signed=False, zero_point=128)
    a, b = g.act("a", rand((2, 3, 4, 5)), a_t), g.act("bm", rand((2, 1, 5, 6)), b_t)
    (y2,) = g.op("MatMul", [a, b], name="matmul2", ins=[a_t, b_t], outs=[Y])
    g.out(y2, Y)
    ours, theirs, integers = run_both(g)
    assert_within_step(ours, theirs, Y.scale)
    assert integers["matmul2"].shape == (2, 3, 4, 6)


# -- integer operators -------------------------------------------------------------------------------------------
def _unary(op_type: str, x_values: np.ndarray, extra: list[str] | None = None, x_t: TensorQuant | None = X,
           out_t: TensorQuant | None = Y, g: QDQGraph | None = None, outputs: int = 1, opset: int = 13,
           elem: int = TensorProto.FLOAT, **node_attrs: Any) -> tuple[list[np.ndarray], list[np.ndarray], dict]:
    """x -> op(x, *extra) -> outputs (each through a boundary with ``out_t`` when given)."""
    g = g or QDQGraph()
    x = g.act("x", x_values, x_t)
    ins = [x_t] + [None] * len(extra or [])
    names = g.op(op_type, [x, *(extra or [])], outputs, ins=ins, outs=[out_t] * outputs, **node_attrs)
    for k, name in enumerate(names):
        g.out(name, None if out_t is None else tq(f"o{k}", out_t.scale, out_t.bits, out_t.qmin < 0), elem)
    return run_both(g, opset)


@covers("Relu", "MaxPool")
@pytest.mark.parametrize(("op_type", "node_attrs"), [
    ("Relu", {}),
    ("MaxPool", {"kernel_shape": [3, 3], "strides": [2, 2], "pads": [1, 1, 1, 1], "ceil_mode": 1}),
    ("MaxPool", {"kernel_shape": [2, 3], "dilations": [2, 1], "pads": [1, 1, 0, 1]}),
    ("MaxPool", {"kernel_shape": [2, 3], "auto_pad": "SAME_UPPER"}),  # ORT ignores dilations in SAME pads
    ("MaxPool", {"kernel_shape": [3], "strides": [2]}),
])
def test_integer_operators_are_exact(op_type: str, node_attrs: dict[str, Any]) -> None:
    shape = (2, 3, 10) if len(node_attrs.get("kernel_shape", [1, 1])) == 1 else (2, 3, 9, 8)
    ours, theirs, integers = _unary(op_type, rand(shape, -4, 4), out_t=X, **node_attrs)
    assert_exact(ours, theirs)
    assert op_type.lower() in integers


def _ort_counts_ceil_overhang() -> bool:
    """Whether this onnxruntime divides a ceil_mode window that runs past the pads by the full kernel size
    with count_include_pad (fixed by microsoft/onnxruntime#29629): ONNX says [1, 1, 1] -> [1, 1]."""
    g = QDQGraph()
    g.feed("x", np.ones((1, 1, 3), np.float32))
    g.out(g.op("AveragePool", ["x"], kernel_shape=[2], strides=[2], ceil_mode=1, count_include_pad=1)[0])
    session = ort.InferenceSession(g.model(13).SerializeToString(), providers=["CPUExecutionProvider"])
    return not np.allclose(session.run(None, g.feeds)[0], 1.0)


@covers("AveragePool", "GlobalAveragePool")
@pytest.mark.parametrize(("op_type", "node_attrs"), [
    ("AveragePool", {"kernel_shape": [3, 3], "strides": [2, 2], "pads": [1, 1, 1, 1], "ceil_mode": 1}),
    ("AveragePool", {"kernel_shape": [3, 3], "strides": [2, 2], "pads": [1, 1, 1, 1], "ceil_mode": 1,
                     "count_include_pad": 1}),
    ("AveragePool", {"kernel_shape": [2, 2], "auto_pad": "SAME_LOWER"}),
    ("GlobalAveragePool", {}),
])
def test_average_pools(op_type: str, node_attrs: dict[str, Any]) -> None:
    if node_attrs.get("count_include_pad") and node_attrs.get("ceil_mode") and _ort_counts_ceil_overhang():
        pytest.skip("this onnxruntime counts the ceil_mode overhang in count_include_pad (onnxruntime#29629)")
    ours, theirs, _ = _unary(op_type, rand((2, 3, 9, 8), -4, 4), out_t=tq("", 2**-6), **node_attrs)
    assert_within_step(ours, theirs, 2**-6)


@covers("Identity", "Flatten", "Reshape", "Transpose", "Squeeze", "Unsqueeze")
@pytest.mark.parametrize(("op_type", "extra", "node_attrs", "opset"), [
    ("Identity", [], {}, 13),
    ("Flatten", [], {"axis": 2}, 13),
    ("Flatten", [], {"axis": -1}, 13),
    ("Reshape", [np.array([0, -1, 4], np.int64)], {}, 13),
    ("Transpose", [], {"perm": [0, 3, 1, 2]}, 13),
    ("Transpose", [], {}, 13),
    ("Squeeze", [np.array([-3], np.int64)], {}, 13),
    ("Squeeze", [], {"axes": [1]}, 12),
    ("Unsqueeze", [np.array([0, -1], np.int64)], {}, 13),
    ("Unsqueeze", [], {"axes": [1]}, 12),
])
def test_layout_operators_are_exact(op_type: str, extra: list[np.ndarray], node_attrs: dict[str, Any],
                                    opset: int) -> None:
    g = QDQGraph()
    names = [g.const(f"c{k}", value) for k, value in enumerate(extra)]
    ours, theirs, integers = _unary(op_type, rand((2, 1, 3, 4), -4, 4), names, out_t=None, g=g, opset=opset,
                                    **node_attrs)
    assert_exact(ours, theirs)
    assert op_type.lower() in integers  # integers passed through, quantization kept


@covers("Slice")
@pytest.mark.parametrize(("starts", "ends", "axes", "steps"), [
    ([1, 0], [3, 100], [1, -1], [1, 2]),
    ([-1], [-1000], [-2], [-2]),
    ([4, 1], [0, 5], [3, 2], [-1, 3]),
])
def test_slice(starts: list[int], ends: list[int], axes: list[int], steps: list[int]) -> None:
    g = QDQGraph()
    extra = [g.const(n, np.array(v, np.int64)) for n, v in (("st", starts), ("en", ends), ("ax", axes), ("sp", steps))]
    ours, theirs, _ = _unary("Slice", rand((2, 3, 6, 7), -4, 4), extra, out_t=None, g=g)
    assert_exact(ours, theirs)


@covers("Split")
@pytest.mark.parametrize(("split", "outputs", "axis", "opset", "node_attrs"), [
    ([2, 1, 3], 3, 1, 13, {}),
    (None, 2, -1, 13, {}),
    (None, 3, 1, 18, {"num_outputs": 3}),  # 7 = 3 + 3 + 1
    (None, 2, 2, 12, {"split": [2, 4]}),
])
def test_split(split: list[int] | None, outputs: int, axis: int, opset: int, node_attrs: dict[str, Any]) -> None:
    g = QDQGraph()
    extra = [g.const("sp", np.array(split, np.int64))] if split is not None else []
    ours, theirs, integers = _unary("Split", rand((2, 7, 6), -4, 4)[:, :6] if split else rand((2, 7, 6), -4, 4),
                                    extra, out_t=X, g=g, outputs=outputs, opset=opset, axis=axis, **node_attrs)
    assert_exact(ours, theirs)
    assert "split" in integers


@covers("Split")
def test_split_outputs_held_at_their_records() -> None:
    """Every output with a record is requantized to it (here a coarser one for the second part)."""
    g = QDQGraph()
    x = g.act("x", rand((1, 4, 3), -4, 4), X)
    a, b = g.op("Split", [x], 2, ins=[X], outs=[X, Y], axis=1)
    g.out(a, X)
    g.out(b, Y)
    ours, theirs, _ = run_both(g)
    assert_exact(ours, theirs)


@covers("Concat")
def test_concat_equal_and_different_quantization() -> None:
    g = QDQGraph()
    a, b = g.act("a", rand((1, 2, 3), -3, 3, seed=1), X), g.act("b", rand((1, 3, 3), -3, 3, seed=2), X)
    (same,) = g.op("Concat", [a, b], name="same", ins=[X, X], outs=[X], axis=1)
    g.out(same, X)
    c = g.act("c", rand((1, 2, 3), -3, 3, seed=3), tq("c", 2**-3))
    (mixed,) = g.op("Concat", [a, c], name="mixed", ins=[X, tq("c", 2**-3)], outs=[Y], axis=-1)
    g.out(mixed, Y)
    ours, theirs, integers = run_both(g)
    assert_exact(ours[:1], theirs[:1])
    assert_within_step(ours[1:], theirs[1:], Y.scale)
    assert {"same", "mixed"} <= set(integers)


@covers("Pad")
@pytest.mark.parametrize(("mode", "pads", "value", "opset"), [
    ("constant", [0, 0, 1, 2, 0, 0, 2, 1], 0.0, 13),
    ("constant", [0, 1, 1, 0, 0, 0, -1, 2], 0.5, 13),  # on the grid; a negative pad crops
    ("constant", [0, 0, 1, 1, 0, 0, 1, 1], 0.01, 13),  # off the grid: real values, requantized
    ("edge", [0, 0, 2, 1, 0, 0, 1, 3], None, 13),
    ("reflect", [0, 0, 1, 2, 0, 0, 2, 1], None, 13),
    ("wrap", [0, 0, 1, 2, 0, 0, 2, 1], None, 19),
])
def test_pad(mode: str, pads: list[int], value: float | None, opset: int) -> None:
    g = QDQGraph()
    extra = [g.const("pads", np.array(pads, np.int64))]
    if value is not None:
        extra.append(g.const("value", np.float32(value)))
    ours, theirs, _ = _unary("Pad", rand((1, 2, 4, 5), -3, 3), extra, out_t=X, g=g, opset=opset, mode=mode)
    assert_exact(ours, theirs)


@covers("Pad")
def test_pad_axes_opset18() -> None:
    g = QDQGraph()
    extra = [g.const("pads", np.array([1, 2, 0, 1], np.int64)), "", g.const("axes", np.array([-1, 1], np.int64))]
    ours, theirs, _ = _unary("Pad", rand((1, 2, 4, 5), -3, 3), extra, out_t=X, g=g, opset=18)
    assert_exact(ours, theirs)


RESIZE_CASES = {
    "nearest_scales": ({"mode": "nearest"}, [1, 1, 2, 2], None),
    "nearest_asymmetric_ties": ({"mode": "nearest", "coordinate_transformation_mode": "asymmetric"},
                                [1, 1, 2, 2], None),  # x / 2: every other coordinate is a tie, to the floor
    "nearest_down_ties_ceil": ({"mode": "nearest", "nearest_mode": "round_prefer_ceil"}, [1, 1, 0.5, 0.5], None),
    "nearest_asymmetric_floor": ({"mode": "nearest", "coordinate_transformation_mode": "asymmetric",
                                  "nearest_mode": "floor"}, [1, 1, 2, 3], None),
    "nearest_sizes_down": ({"mode": "nearest", "nearest_mode": "round_prefer_ceil"}, None, [2, 3, 3, 4]),
    "nearest_align_corners_ceil": ({"mode": "nearest", "coordinate_transformation_mode": "align_corners",
                                    "nearest_mode": "ceil"}, None, [2, 3, 9, 7]),
    "nearest_tf_half_pixel": ({"mode": "nearest", "coordinate_transformation_mode": "tf_half_pixel_for_nn"},
                              [1, 1, 1.5, 2], None),
    "linear_half_pixel": ({"mode": "linear"}, [1, 1, 2, 2], None),
    "linear_align_corners": ({"mode": "linear", "coordinate_transformation_mode": "align_corners"}, None,
                             [2, 3, 7, 11]),
    "linear_asymmetric": ({"mode": "linear", "coordinate_transformation_mode": "asymmetric"}, [1, 1, 0.5, 1.5],
                          None),
    "linear_pytorch_half_pixel": ({"mode": "linear", "coordinate_transformation_mode": "pytorch_half_pixel"},
                                  None, [2, 3, 1, 9]),
    "cubic_generic": ({"mode": "cubic"}, [1, 1, 2, 2], None),
}


@covers("Resize")
@pytest.mark.parametrize("case", list(RESIZE_CASES))
def test_resize(case: str) -> None:
    node_attrs, scales, sizes = RESIZE_CASES[case]
    g = QDQGraph()
    extra = [g.const("roi", np.zeros(0, np.float32)),
             g.const("scales", np.array(scales if scales else [], np.float32))]
    if sizes is not None:
        extra.append(g.const("sizes", np.array(sizes, np.int64)))
    ours, theirs, integers = _unary("Resize", rand((2, 3, 4, 5), -3, 3), extra, out_t=X, g=g, **node_attrs)
    if node_attrs["mode"] == "nearest":
        assert_exact(ours, theirs)
    else:
        assert_within_step(ours, theirs, X.scale)
    assert "resize" in integers


# -- dedicated float operators ---------------------------------------------------------------------------------------
@covers("Add", "Sub", "Mul", "Div")
@pytest.mark.parametrize("op_type", ["Add", "Sub", "Mul", "Div"])
def test_binary_arithmetic(op_type: str) -> None:
    g = QDQGraph()
    b_t = tq("b", 2**-4, signed=False)
    b = g.act("b", rand((1, 3, 1), 0.5, 3, seed=5), b_t)
    x = g.act("x", rand((2, 3, 4), -3, 3), X)
    (y,) = g.op(op_type, [x, b], ins=[X, b_t], outs=[Y])
    g.out(y, Y)
    ours, theirs, _ = run_both(g)
    assert_within_step(ours, theirs, Y.scale)


@covers("Add", "Mul", "Div", "Sub", "Clip")
def test_integer_shape_arithmetic() -> None:
    """Unquantized integer tensors stay integers: Div truncates toward zero, Clip keeps the dtype."""
    g = QDQGraph()
    a, b = g.feed("a", np.array([7, -7, 9, 0], np.int64)), g.feed("b", np.array([2, 2, -4, 3], np.int64))
    for op_type in ("Add", "Sub", "Mul", "Div"):
        g.out(g.op(op_type, [a, b])[0], elem=TensorProto.INT64)
    g.out(g.op("Clip", [a, g.const("lo", np.int64(-1)), g.const("hi", np.int64(5))])[0], elem=TensorProto.INT64)
    ours, theirs, _ = run_both(g)
    assert_exact(ours, theirs)


@covers("Sigmoid", "HardSigmoid", "HardSwish", "Tanh", "Clip")
@pytest.mark.parametrize(("op_type", "opset", "extra", "node_attrs"), [
    ("Sigmoid", 13, [], {}),
    ("HardSigmoid", 13, [], {"alpha": 0.25, "beta": 0.4}),
    ("HardSwish", 14, [], {}),
    ("Tanh", 13, [], {}),
    ("Clip", 13, [np.float32(-0.3), np.float32(1.1)], {}),
    ("Clip", 12, [np.float32(0.0)], {}),
])
def test_float_activations(op_type: str, opset: int, extra: list[np.ndarray], node_attrs: dict[str, Any]) -> None:
    g = QDQGraph()
    names = [g.const(f"c{k}", value) for k, value in enumerate(extra)]
    ours, theirs, _ = _unary(op_type, rand((2, 3, 5), -4, 4), names, g=g, out_t=tq("", 2**-6), opset=opset,
                             **node_attrs)
    assert_within_step(ours, theirs, 2**-6)


@covers("Constant")
@pytest.mark.parametrize("value", [
    {"value": numpy_helper.from_array(np.array([[0.5], [-1.0], [2.0]], np.float32))},
    {"value_float": 0.75},
    {"value_floats": [0.5, 1.5, -2.0, 0.25, 1.0]},
])
def test_constant(value: dict[str, Any]) -> None:
    g = QDQGraph()
    x = g.act("x", rand((2, 3, 5), -2, 2), X)
    (c,) = g.op("Constant", [], **value)
    (y,) = g.op("Mul", [x, c], ins=[X, None], outs=[Y])
    g.out(y, Y)
    ours, theirs, _ = run_both(g)
    assert_within_step(ours, theirs, Y.scale)


@covers("Constant", "Reshape")
def test_constant_ints_as_shape() -> None:
    g = QDQGraph()
    x = g.act("x", rand((2, 3, 4), -2, 2), X)
    (shape,) = g.op("Constant", [], value_ints=[2, 12])
    (y,) = g.op("Reshape", [x, shape])
    g.out(y)
    ours, theirs, _ = run_both(g)
    assert_exact(ours, theirs)


# -- the generic float handler ---------------------------------------------------------------------------------
def _act(shape: tuple[int, ...], low: float = -3.0, high: float = 3.0, seed: int = 0, scale: float = 2**-5,
         signed: bool = True) -> tuple[str, np.ndarray, TensorQuant]:
    return ("act", rand(shape, low, high, seed), tq("", scale, signed=signed))


def _const(values: Any) -> tuple[str, np.ndarray, None]:
    return ("const", np.asarray(values), None)


def _feed(values: Any) -> tuple[str, np.ndarray, None]:
    return ("feed", np.asarray(values), None)


A = _act((2, 3, 4))
B = _act((2, 3, 4), seed=1, scale=2**-4)
POS = _act((2, 3, 4), 0.25, 4.0, scale=2**-5, signed=False)
BOOL = _const(np.random.default_rng(3).integers(0, 2, (2, 3, 4)).astype(bool))
IDX = _feed(np.array([[2, 0], [1, 1]], np.int64))
IMG = _act((1, 4, 4, 4))

#: op type -> (inputs, attributes, opset, output quantization scale (None: a float/int/bool output), outputs).
GENERIC_CASES: dict[str, list[tuple[list[tuple[str, np.ndarray, TensorQuant | None]], dict[str, Any], int,
                                    float | None, int]]] = {
    "Abs": [([A], {}, 13, 2**-5, 1)],
    "Neg": [([A], {}, 13, 2**-5, 1)],
    "Exp": [([_act((2, 3, 4), -3, 1.5)], {}, 13, 2**-4, 1)],
    "Log": [([POS], {}, 13, 2**-5, 1)],
    "Sqrt": [([POS], {}, 13, 2**-6, 1)],
    "Reciprocal": [([POS], {}, 13, 2**-4, 1)],
    "Pow": [([POS, _const(np.float32(1.5))], {}, 13, 2**-3, 1), ([A, _const(np.float32(2.0))], {}, 13, 2**-3, 1)],
    "Erf": [([A], {}, 13, 2**-7, 1)],
    "Floor": [([A], {}, 13, 2**-5, 1)],
    "Ceil": [([A], {}, 13, 2**-5, 1)],
    "Round": [([A], {}, 13, 2**-5, 1)],
    "Sign": [([A], {}, 13, 2**-5, 1)],
    "Sin": [([A], {}, 13, 2**-7, 1)],
    "Cos": [([A], {}, 13, 2**-7, 1)],
    "Softplus": [([A], {}, 13, 2**-5, 1)],
    "Softsign": [([A], {}, 13, 2**-7, 1)],
    "Elu": [([A], {"alpha": 0.7}, 13, 2**-5, 1)],
    "Selu": [([A], {}, 13, 2**-5, 1)],
    "Celu": [([A], {"alpha": 1.5}, 13, 2**-5, 1)],
    "LeakyRelu": [([A], {"alpha": 0.1}, 13, 2**-5, 1)],
    "ThresholdedRelu": [([A], {"alpha": 0.5}, 13, 2**-5, 1)],
    "Mish": [([A], {}, 18, 2**-5, 1)],
    "Gelu": [([A], {}, 20, 2**-5, 1)],
    "PRelu": [
        ([IMG, _const(np.array([[[0.1]], [[0.2]], [[-0.3]], [[0.5]]], np.float32))], {}, 13, 2**-5, 1),  # [C,1,1]
        ([IMG, _const(np.array([0.1, 0.2, -0.3, 0.5], np.float32).reshape(1, 4, 1, 1))], {}, 13, 2**-5, 1),
        ([_act((3, 4)), _const(np.array([0.1, 0.2, -0.3, 0.5], np.float32))], {}, 13, 2**-5, 1),  # [C] on 2-D
        ([IMG, _const(np.float32(0.25))], {}, 13, 2**-5, 1),  # scalar
    ],
    "Max": [([A, B], {}, 13, 2**-4, 1), ([A, B, _const(np.float32(0.5))], {}, 13, 2**-4, 1)],
    "Min": [([A, B], {}, 13, 2**-4, 1)],
    "Mean": [([A, B, POS], {}, 13, 2**-5, 1)],
    "Sum": [([A, B], {}, 13, 2**-4, 1)],
    "Mod": [([A, _const(np.float32(0.75))], {"fmod": 1}, 13, 2**-6, 1)],
    "Dropout": [([A], {}, 13, 2**-5, 1)],
    "Equal": [([A, _const(np.float32(0.5))], {}, 13, None, 1)],
    "Greater": [([A, B], {}, 13, None, 1)],
    "GreaterOrEqual": [([A, B], {}, 13, None, 1)],
    "Less": [([A, B], {}, 13, None, 1)],
    "LessOrEqual": [([A, B], {}, 13, None, 1)],
    "And": [([BOOL, _const(np.array([True, False, True, True]))], {}, 13, None, 1)],
    "Or": [([BOOL, _const(np.array([True, False, False, True]))], {}, 13, None, 1)],
    "Xor": [([BOOL, _const(np.array([True, False, False, True]))], {}, 13, None, 1)],
    "Not": [([BOOL], {}, 13, None, 1)],
    "Where": [([BOOL, A, B], {}, 13, 2**-4, 1)],
    "IsNaN": [([A], {}, 13, None, 1)],
    "IsInf": [([A], {}, 13, None, 1)],
    "Softmax": [([A], {}, 13, 2**-8, 1), ([A], {"axis": 1}, 13, 2**-8, 1), ([A], {"axis": 1}, 12, 2**-8, 1)],
    "LogSoftmax": [([A], {"axis": -1}, 13, 2**-4, 1), ([A], {}, 12, 2**-4, 1)],
    "Hardmax": [([A], {"axis": 1}, 13, 2**-5, 1), ([A], {"axis": 1}, 12, 2**-5, 1)],
    "BatchNormalization": [([IMG, _const(np.float32([1.0, 0.5, 2.0, -1.0])), _const(np.float32([0.1, 0, -0.2, 0.3])),
                             _const(np.float32([0.2, -0.1, 0, 0.5])), _const(np.float32([1.0, 0.25, 2.0, 0.5]))],
                            {"epsilon": 1e-3}, 13, 2**-4, 1)],
    "InstanceNormalization": [([IMG, _const(np.float32([1.0, 0.5, 2.0, -1.0])),
                                _const(np.float32([0.1, 0, -0.2, 0.3]))], {}, 13, 2**-4, 1)],
    "LayerNormalization": [([A, _const(np.float32([1.0, 0.5, 2.0, -1.0])), _const(np.float32([0.1, 0, -0.2, 0.3]))],
                            {"axis": -1}, 17, 2**-4, 1)],
    "LpNormalization": [([A], {"axis": 1, "p": 2}, 13, 2**-7, 1)],
    "LRN": [([IMG], {"size": 3}, 13, 2**-5, 1)],
    "ReduceMean": [([A], {"axes": [1, -1]}, 13, 2**-6, 1), ([A], {"keepdims": 0}, 13, 2**-6, 1),
                   ([A, _const(np.array([2], np.int64))], {}, 18, 2**-6, 1)],
    "ReduceMax": [([A], {"axes": [1]}, 13, 2**-5, 1), ([A], {"axes": [-1], "keepdims": 0}, 13, 2**-5, 1)],
    "ReduceMin": [([A], {"axes": [2]}, 13, 2**-5, 1)],
    "ReduceSum": [([A, _const(np.array([1], np.int64))], {}, 13, 2**-3, 1)],
    "ReduceProd": [([A], {"axes": [1]}, 13, 2**-3, 1)],
    "ReduceL1": [([A], {"axes": [2]}, 13, 2**-3, 1)],
    "ReduceL2": [([A], {"axes": [2]}, 13, 2**-4, 1)],
    "ReduceSumSquare": [([A], {"axes": [1]}, 13, 2**-2, 1)],
    "ReduceLogSumExp": [([A], {"axes": [2]}, 13, 2**-4, 1)],
    "ArgMax": [([A], {"axis": 1}, 13, None, 1)],
    "ArgMin": [([A], {"axis": -1, "keepdims": 0}, 13, None, 1)],
    "GlobalMaxPool": [([IMG], {}, 13, 2**-5, 1)],
    "CumSum": [([A, _const(np.int64(2))], {}, 13, 2**-3, 1)],
    "TopK": [([A, _const(np.array([2], np.int64))], {"axis": -1}, 13, None, 2)],
    "Shape": [([A], {}, 13, None, 1)],
    "Size": [([A], {}, 13, None, 1)],
    "Gather": [([A, IDX], {"axis": 2}, 13, 2**-5, 1), ([_feed(np.array([2, 3, 4], np.int64)),
                                                       _const(np.int64(0))], {}, 13, None, 1)],
    "GatherElements": [([A, _feed(np.random.default_rng(4).integers(0, 3, (2, 3, 4)).astype(np.int64))],
                        {"axis": 1}, 13, 2**-5, 1)],
    "GatherND": [([A, _feed(np.array([[0, 2], [1, 0]], np.int64))], {}, 13, 2**-5, 1)],
    "ScatterElements": [([A, _feed(np.array([[[0, 1, 2, 0]]], np.int64)), _act((1, 1, 4), seed=7)],
                         {"axis": 1}, 13, 2**-5, 1)],
    "ScatterND": [([A, _feed(np.array([[1, 0]], np.int64)), _act((1, 4), seed=8)], {}, 13, 2**-5, 1),  # same grid
                  ([A, _feed(np.array([[1, 0], [0, 2]], np.int64)), _act((2, 4), seed=8, scale=2**-4)],
                   {"reduction": "add"}, 16, 2**-4, 1)],
    "Range": [([_feed(np.int64(1)), _feed(np.int64(9)), _const(np.int64(3))], {}, 13, None, 1),
              ([_const(np.float32(0.5)), _const(np.float32(2.0)), _const(np.float32(0.25))], {}, 13, 2**-4, 1)],
    "Expand": [([_act((3, 1)), _feed(np.array([2, 3, 4], np.int64))], {}, 13, 2**-5, 1)],
    "ConstantOfShape": [([_feed(np.array([2, 3], np.int64))],
                         {"value": numpy_helper.from_array(np.array([1.5], np.float32))}, 13, None, 1)],
    "Cast": [([A], {"to": TensorProto.INT64}, 13, None, 1), ([_feed(np.array([3, 4], np.int64))],
                                                            {"to": TensorProto.FLOAT}, 13, None, 1)],
    "CastLike": [([_feed(np.array([3, 4], np.int64)), _const(np.float32(0))], {}, 15, None, 1)],
    "Tile": [([A, _const(np.array([1, 2, 1], np.int64))], {}, 13, 2**-5, 1)],
    "NonZero": [([A], {}, 13, None, 1)],
    "DepthToSpace": [([IMG], {"blocksize": 2}, 13, 2**-5, 1), ([IMG], {"blocksize": 2, "mode": "CRD"}, 13, 2**-5, 1)],
    "SpaceToDepth": [([IMG], {"blocksize": 2}, 13, 2**-5, 1)],
    "Trilu": [([A, _const(np.int64(1))], {"upper": 0}, 14, 2**-5, 1)],
    "OneHot": [([IDX, _const(np.int64(4)), _const(np.float32([0.0, 1.5]))], {"axis": -1}, 13, None, 1)],
}


#: operators with a dedicated handler checked with the same harness
FLOAT_CASES = {op_type: GENERIC_CASES.pop(op_type) for op_type in ("BatchNormalization", "ScatterND")}
COVERED.update(FLOAT_CASES)


def _generic_params() -> list[Any]:
    return [pytest.param(op_type, k, id=f"{op_type}-{k}") for op_type, cases in (GENERIC_CASES | FLOAT_CASES).items()
            for k in range(len(cases))]


@pytest.mark.parametrize(("op_type", "index"), _generic_params())
def test_generic_operator(op_type: str, index: int) -> None:
    if op_type not in SUPPORTED_OPS:
        pytest.skip(f"the installed onnx.reference does not implement {op_type}")
    inputs, node_attrs, opset, out_scale, outputs = (GENERIC_CASES | FLOAT_CASES)[op_type][index]
    g = QDQGraph()
    names, records = [], []
    for k, (kind, values, t) in enumerate(inputs):
        name = f"in{k}"
        if kind == "act":
            t = tq(name, t.scale, t.bits, t.qmin < 0)
            names.append(g.act(name, values, t))
        elif kind == "feed":
            names.append(g.feed(name, values))
        else:
            names.append(g.const(name, values))
        records.append(t)
    out_t = None if out_scale is None else tq("", out_scale)
    ys = g.op(op_type, names, outputs, ins=records, outs=[out_t] * outputs if out_t else None, **node_attrs)
    session_types = []
    for k, y in enumerate(ys):
        if out_t is not None:
            g.out(y, tq(f"o{k}", out_scale))
        else:
            g.outputs.append(helper.make_value_info(y, onnx.TypeProto()))
            session_types.append(y)
    model = g.model(opset)
    if session_types:  # let onnxruntime's shape inference tell the element types of untyped outputs
        inferred = onnx.shape_inference.infer_shapes(model)
        types = {vi.name: vi for vi in list(inferred.graph.value_info) + list(inferred.graph.output)}
        g.outputs = [types.get(o.name, o) if o.name in session_types else o for o in g.outputs]
    ours, theirs, integers = run_both(g, opset)
    if out_scale is None:
        for a, b in zip(ours, theirs, strict=True):
            assert a.shape == np.shape(b)
            np.testing.assert_allclose(a, np.asarray(b, np.float64), rtol=1e-6, atol=1e-6)
    else:
        assert_within_step(ours, theirs, out_scale)
        assert op_type.lower() in integers


def test_generic_cases_cover_every_generic_operator() -> None:
    assert set(GENERIC_OPS) <= set(GENERIC_CASES) <= CANDIDATE_OPS


@covers("Shape", "Gather", "Unsqueeze", "Concat", "Reshape", "Mul", "Cast", "Range", "Equal", "Where",
        "ConstantOfShape", "Expand")
def test_dynamic_shape_arithmetic() -> None:
    """Shape -> Gather -> Unsqueeze -> Concat -> Reshape, as exporters leave for dynamic batch sizes."""
    g = QDQGraph()
    x = g.act("x", rand((3, 2, 4), -3, 3), X)
    (shape,) = g.op("Shape", [x])
    (batch,) = g.op("Gather", [shape, g.const("zero", np.int64(0))], name="gather", axis=0)
    (batch1,) = g.op("Unsqueeze", [batch, g.const("ax0", np.array([0], np.int64))], name="unsq")
    (target,) = g.op("Concat", [batch1, g.const("minus1", np.array([-1], np.int64))], name="cat", axis=0)
    (flat,) = g.op("Reshape", [x, target], name="reshape")
    (n,) = g.op("Mul", [batch, g.const("two", np.int64(2))], name="mul")
    (nf,) = g.op("Cast", [n], name="cast", to=TensorProto.FLOAT)
    (steps,) = g.op("Range", [g.const("r0", np.float32(0)), nf, g.const("r1", np.float32(1))], name="range")
    (mask,) = g.op("Equal", [target, g.const("neg", np.array([-1, -1], np.int64))], name="equal")
    (fill,) = g.op("ConstantOfShape", [g.const("two_shape", np.array([2], np.int64))], name="cos",
                   value=numpy_helper.from_array(np.array([7], np.int64)))
    (picked,) = g.op("Where", [mask, fill, target], name="where")
    (expanded,) = g.op("Expand", [g.const("one", np.float32([1.0])), picked], name="expand")
    g.out(flat)
    g.out(steps)
    g.out(expanded)
    ours, theirs, _ = run_both(g)
    assert_exact(ours, theirs)


# -- refusals ---------------------------------------------------------------------------------------------------
def _map_with(node: onnx.NodeProto, mapsave: Path, mapname: str) -> None:
    """Write a complete map ``x -> Relu -> node -> y`` (quantinfo empty) with write_map."""
    g = QDQGraph()
    x = g.act("x", rand((1, 4)), X)
    g.op("Relu", [x], ["r"], name="relu", ins=[X], outs=[X])
    g.nodes.append(node)
    g.out(node.output[0])
    files = {QUANTMODEL: g.model(13).SerializeToString(), QUANTINFO: dump_pickle(g.quantinfo),
             QUANTPARAMS: dump_pickle(g.quantparams)}
    write_map(mapsave / mapname, files, {"mapname": mapname})


def test_map_from_write_map_runs(tmp_path: Path) -> None:
    _map_with(helper.make_node("Softmax", ["r"], ["y"], name="softmax"), tmp_path, "softmax")
    x = rand((1, 4))
    expected = np.exp(np.maximum(x, 0) - np.maximum(x, 0).max())
    np.testing.assert_allclose(simulate("softmax", x, mapsave_dir=tmp_path)["y"], expected / expected.sum(),
                               atol=X.scale)


@pytest.mark.parametrize("node", [
    helper.make_node("If", ["cond"], ["y"], name="the_if", then_branch=helper.make_graph([], "t", [], []),
                     else_branch=helper.make_graph([], "e", [], [])),
    helper.make_node("Loop", ["", "cond"], ["y"], name="the_loop", body=helper.make_graph([], "b", [], [])),
    helper.make_node("RandomNormalLike", ["r"], ["y"], name="the_random"),
    helper.make_node("FusedGemm", ["r", "r"], ["y"], name="the_fused", domain="com.microsoft"),
    helper.make_node("Conv", ["r", "r"], ["y"], name="the_conv3d", kernel_shape=[1, 1, 1]),
])
def test_unsupported_operator_is_refused_at_load(node: onnx.NodeProto, tmp_path: Path, monkeypatch) -> None:
    """Refused when the map is loaded, naming the node, before any handler computes."""
    _map_with(node, tmp_path, "refused")
    computed = []
    for op_type, handler in list(HANDLERS.items()):
        monkeypatch.setitem(HANDLERS, op_type, handler.__class__(
            op_type, lambda *args, h=handler: computed.append(h.op_type) or h.run(*args), handler.prepare,
            handler.kind))
    with pytest.raises(UnsupportedOperatorError) as info:
        simulate("refused", rand((1, 4)), mapsave_dir=tmp_path)
    assert repr(node.name) in str(info.value) and node.op_type in str(info.value)
    assert not computed, "the executor computed before refusing the graph"


def test_supported_ops_are_derived_from_the_registry() -> None:
    assert set(HANDLERS) == SUPPORTED_OPS
    assert {op for op, h in HANDLERS.items() if h.kind == "generic"} == GENERIC_OPS
    assert not {"If", "Loop", "Scan", "RandomNormal", "SequenceConstruct", "QLinearConv"} & SUPPORTED_OPS
    needed = {"Split", "Softmax", "PRelu", "Neg", "Resize", "Sigmoid", "Mul", "ConvTranspose", "MatMul", "Gemm",
              "Shape", "Gather", "Range", "Expand", "ConstantOfShape", "Cast", "Equal", "Where", "Unsqueeze",
              "Concat", "Slice", "ReduceMean", "ReduceMax", "Pow", "Sqrt", "Exp", "Erf", "Div", "Sub", "Tile",
              "BatchNormalization", "LeakyRelu", "Max", "Min", "Pad", "Clip", "HardSwish"}
    assert needed <= SUPPORTED_OPS


def test_every_supported_operator_has_a_handler_test() -> None:
    assert set(SUPPORTED_OPS) - COVERED - set(GENERIC_CASES) == set()


@covers("Conv")
def test_the_macs_accumulate_through_the_backend_passed_in() -> None:
    """One executor class, its MAC backend one object given to it: a crossbar with an ideal ADC gives the exact
    integers, a coarse ADC does not, a hook sees every crossbar MAC, and a backend with ``cim`` is refused."""
    g = _mac_graph("Conv", (1, 3, 8, 8), (4, 3, 3, 3), 0)
    model = g.model()
    exact = ReferenceExecutor(model, g.quantinfo, g.quantparams)
    expected = exact.run(g.feeds, return_integers=True)[1]["mac"]
    ideal = ReferenceExecutor(model, g.quantinfo, g.quantparams, backend=CrossbarBackend(CIMSpec(rows=16, cell_bits=2)))
    assert ideal.cim is not None and ideal.cim.spec.rows == 16 and ideal.requant_mode == "float"
    np.testing.assert_array_equal(ideal.run(g.feeds, return_integers=True)[1]["mac"], expected)
    coarse = exact.with_backend(CrossbarBackend(CIMSpec(rows=16, cell_bits=2, adc_bits=2)))
    assert not np.array_equal(coarse.run(g.feeds, return_integers=True)[1]["mac"], expected)
    seen: list[tuple[str, tuple[int, ...]]] = []
    hooked = exact.with_backend(MacBackend(hook=lambda ops, w, cols: seen.append((ops.node, w.shape))))
    np.testing.assert_array_equal(hooked.run(g.feeds, return_integers=True)[1]["mac"], expected)
    assert seen == [("mac", (1, 4, 27))] and exact.cim is None and hooked.mac_hook is not None
    with pytest.raises(InvalidArgumentError, match="^backend"):
        ReferenceExecutor(model, g.quantinfo, g.quantparams, CIMSpec(), backend=MacBackend())
