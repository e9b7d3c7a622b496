"""The exact folding of a Conv's affine constants and of decomposed hard-swish (issue 23, the PP-OCRv4 recognizer).

A small graph written the way Paddle2ONNX writes PP-LCNetV3 + SVTR: Conv -> Mul(c) -> Add(d) -> hard-swish as
Add/Clip/Mul/Div -> Mul(a) -> Add(b), three times, then tokens through a LayerNorm as ReduceMean/Sub/Pow/Sqrt/Div,
a self-attention MatMul/Softmax/MatMul and a classifier MatMul + Softmax.
"""

from __future__ import annotations

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper, numpy_helper

from maptools.quantization import quantize, verify
from maptools.quantization.affine import fold_affine_chains

SHAPE = [1, 3, 8, 32]
CHANNELS = 16
CLASSES = 24


def _block_graph(seed: int = 0) -> onnx.ModelProto:
    rng = np.random.default_rng(seed)
    nodes: list[onnx.NodeProto] = []
    inits: list[onnx.TensorProto] = []

    def const(name: str, value: np.ndarray | float) -> str:
        inits.append(numpy_helper.from_array(np.asarray(value, np.float32), name))
        return name

    def node(op: str, inputs: list[str], **attrs) -> str:
        out = f"t{len(nodes)}"
        nodes.append(helper.make_node(op, inputs, [out], name=f"{op}_{len(nodes)}", **attrs))
        return out

    x, channels = "x", SHAPE[1]
    for i in range(3):
        w = rng.normal(0, 1.0 / np.sqrt(9 * channels), (CHANNELS, channels, 3, 3))
        x = node("Conv", [x, const(f"w{i}", w), const(f"b{i}", rng.normal(0, 0.1, CHANNELS))], pads=[1, 1, 1, 1])
        # the learnable affine block after the Conv: one scale per tensor here, one shift per channel
        x = node("Mul", [const(f"c{i}", [rng.uniform(1.5, 2.5)]), x])
        x = node("Add", [x, const(f"d{i}", rng.normal(0.5, 0.3, (1, CHANNELS, 1, 1)))])
        gate = node("Clip", [node("Add", [x, const(f"three{i}", [3.0])]), const(f"lo{i}", 0.0), const(f"hi{i}", 6.0)])
        x = node("Div", [node("Mul", [x, gate]), const(f"six{i}", [6.0])])
        x = node("Add", [node("Mul", [const(f"a{i}", [rng.uniform(0.1, 0.3)]), x]), const(f"e{i}", [-0.2])])
        channels = CHANNELS
    tokens = node("Transpose", [node("Reshape", [x, const("flat", np.array([1, CHANNELS, -1]))])], perm=[0, 2, 1])
    inits[-1] = numpy_helper.from_array(np.array([1, CHANNELS, -1], np.int64), "flat")
    centred = node("Sub", [tokens, node("ReduceMean", [tokens], axes=[-1])])
    var = node("ReduceMean", [node("Pow", [centred, const("two", 2.0)])], axes=[-1])
    normed = node("Div", [centred, node("Sqrt", [node("Add", [var, const("eps", 1e-5)])])])
    normed = node("Add", [node("Mul", [normed, const("gamma", rng.uniform(0.5, 1.5, CHANNELS))]),
                          const("beta", rng.normal(0, 0.1, CHANNELS))])
    q = node("MatMul", [normed, const("wq", rng.normal(0, 0.3, (CHANNELS, CHANNELS)))])
    k = node("MatMul", [normed, const("wk", rng.normal(0, 0.3, (CHANNELS, CHANNELS)))])
    scores = node("MatMul", [q, node("Transpose", [k], perm=[0, 2, 1])])
    attended = node("MatMul", [node("Softmax", [scores], axis=-1), normed])
    logits = node("MatMul", [node("Add", [attended, normed]), const("wc", rng.normal(0, 0.5, (CHANNELS, CLASSES)))])
    nodes.append(helper.make_node("Softmax", [logits], ["probs"], name="Softmax_out", axis=-1))
    probs = helper.make_tensor_value_info("probs", TensorProto.FLOAT, [1, SHAPE[2] * SHAPE[3], CLASSES])
    graph = helper.make_graph(nodes, "lcnet_svtr", [helper.make_tensor_value_info("x", TensorProto.FLOAT, SHAPE)],
                              [probs], inits)
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)])


def _inputs(count: int, seed: int) -> list[dict[str, np.ndarray]]:
    rng = np.random.default_rng(seed)
    # smooth pictures in [-1, 1] (a text line after (x/255 - 0.5) / 0.5), not white noise
    base = rng.uniform(-1, 1, (count, SHAPE[1], SHAPE[2] // 4, SHAPE[3] // 4)).astype(np.float32)
    pictures = base.repeat(4, axis=2).repeat(4, axis=3) + rng.normal(0, 0.05, (count, *SHAPE[1:]))
    return [{"x": p[None].astype(np.float32)} for p in pictures]


def _run(model: onnx.ModelProto | str, feeds) -> list[np.ndarray]:
    options = ort.SessionOptions()
    options.log_severity_level = 3
    source = model if isinstance(model, str) else model.SerializeToString()
    session = ort.InferenceSession(source, options, providers=["CPUExecutionProvider"])
    return [session.run(None, feed)[0] for feed in feeds]


def test_folding_keeps_the_function_and_removes_the_rounding_points():
    model = _block_graph()
    folded = onnx.ModelProto()
    folded.CopyFrom(model)
    removed = fold_affine_chains(folded)
    onnx.checker.check_model(folded)
    # per block: Mul and Add into the Conv (2), hard-swish's Add/Clip/Div (3) less the HardSigmoid added (1)
    assert removed == 3 * 4
    types = [n.op_type for n in folded.graph.node]
    assert types.count("HardSigmoid") == 3 and types.count("Clip") == 0
    assert len(model.graph.node) - len(folded.graph.node) == 3 * 4
    feeds = _inputs(4, seed=1)
    diff = max(float(np.abs(a - b).max()) for a, b in zip(_run(model, feeds), _run(folded, feeds), strict=True))
    assert diff < 1e-5


def test_a_tensor_read_elsewhere_is_not_folded():
    model = _block_graph()
    conv_out = model.graph.node[0].output[0]
    model.graph.output.append(helper.make_tensor_value_info(conv_out, TensorProto.FLOAT, [1, CHANNELS, *SHAPE[2:]]))
    removed = fold_affine_chains(model)
    assert removed == 3 * 4 - 2  # the first Conv keeps its Mul and Add: its output is a graph output
    assert model.graph.node[0].output[0] == conv_out


@pytest.mark.parametrize(("fold", "min_snr", "max_snr"), [(True, 22.5, 99.0), (False, 0.0, 21.0)])
def test_w8a8_with_folding_keeps_the_outputs(tmp_path, monkeypatch, fold, min_snr, max_snr):
    """Quantized at W8A8, the folded graph's outputs keep a higher SNR and argmax than the graph as written
    (measured: 24.6 dB and 96.1 % of the 4096 token argmaxes folded, 19.7 dB and 93.3 % as written)."""
    path = tmp_path / "m.onnx"
    onnx.save(_block_graph(), str(path))
    if not fold:  # the graph as PPQ would see it without the rewrite
        monkeypatch.setattr("maptools.quantization.model.fold_affine_chains", lambda proto: 0)
    calib, feeds = _inputs(16, seed=2), _inputs(16, seed=3)
    result = quantize({"x": SHAPE}, "cpu", str(path), mapname="m", calibset=calib, calib_steps=16,
                      mapsave_dir=tmp_path, evalset=feeds, recipe="default")
    types = {cfg.op_type for cfg in result.operators.values()}
    assert ("Clip" in types) is not fold
    ref, got = np.stack(_run(str(path), feeds)), np.stack(_run(str(result.model_path), feeds))
    snr = 10 * np.log10(np.sum(ref ** 2) / np.sum((ref - got) ** 2))
    agreement = float(np.mean(ref.argmax(-1) == got.argmax(-1)))
    assert min_snr <= snr <= max_snr, snr
    assert (agreement >= 0.95) if fold else (agreement < 0.95), agreement
    if fold:  # verify rebuilds PPQ's graph from the float model through the same folding
        report = verify("m", feeds[:2], mapsave_dir=tmp_path)
        assert report.failures == {}
        assert all(pair.not_run is None and pair.snr_db is not None for pair in report.pairs)


def _weights_in_constant_nodes(model: onnx.ModelProto) -> onnx.ModelProto:
    """``model`` with its initializers written as Constant nodes, as Paddle2ONNX writes weights."""
    constants = [helper.make_node("Constant", [], [init.name], value=init) for init in model.graph.initializer]
    nodes = constants + list(model.graph.node)
    del model.graph.initializer[:]
    del model.graph.node[:]
    model.graph.node.extend(nodes)
    return model


def test_first_and_last_macs_of_weights_in_constant_nodes():
    """Paddle2ONNX writes weights as Constant nodes: the last MAC of PP-OCRv4 is its classifier MatMul, which
    ``first_last_bits`` must reach (it found the last Conv before)."""
    from maptools.quantization.model import first_and_last_macs

    model = _weights_in_constant_nodes(_block_graph())
    onnx.checker.check_model(model)
    macs = [n.name for n in model.graph.node if n.op_type in ("Conv", "MatMul") and n.input[1] in ("w0", "wc")]
    assert first_and_last_macs(model) == macs and macs[-1].startswith("MatMul")


def test_output_operators_stop_at_the_last_mac_before_each_output():
    """The operators that write the outputs (``best`` keeps them at 8-bit activations below 8 bits): the classifier
    MatMul (weight in a Constant node) and the Softmax after it, not the attention MatMuls of two activations."""
    from maptools.quantization.model import output_operators

    model = _weights_in_constant_nodes(_block_graph())
    classifier = next(n.name for n in model.graph.node if n.op_type == "MatMul" and n.input[1] == "wc")
    assert output_operators(model) == [classifier, "Softmax_out"]
    # an output read off the residual Add before the classifier: back through the attention and the layer norm
    # (no constant weight there) to the last Conv, which writes it too; the two Convs before it do not
    residual = next(n for n in model.graph.node if n.op_type == "MatMul" and n.input[1] == "wc").input[0]
    model.graph.output.append(helper.make_tensor_value_info(residual, TensorProto.FLOAT, None))
    walked = output_operators(model)
    convs = [n.name for n in model.graph.node if n.op_type == "Conv"]
    assert {classifier, "Softmax_out", convs[-1]} <= set(walked) and not set(convs[:-1]) & set(walked)
    assert sum(name.startswith("Softmax") for name in walked) == 2  # the attention's Softmax and the output's
