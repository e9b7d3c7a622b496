"""Folding of shape arithmetic (:func:`maptools.quantization.folding.fold_shape_computations`) on a hand-made graph."""

from __future__ import annotations

import numpy as np
import onnx
import onnxruntime as ort
from onnx import TensorProto, helper, numpy_helper

from maptools.quantization.folding import fold_shape_computations
from maptools.quantization.model import check_input_shapes, load_model, prepare_model

SHAPE_OPS = {"Shape", "Gather", "Slice", "Mod", "Mul", "Concat"}


def shape_arithmetic_model(batch: int | str) -> onnx.ModelProto:
    """``Reshape(x, [2 * x.shape[0], x.shape[1], 8 % 5]) + bias`` as torch exports it: Shape -> Gather/Slice
    (without ``axes``), Mod of two Constants, Concat -> Reshape; ``x`` is [batch, 4, 6]."""
    const = [helper.make_node("Constant", [], [f"c{i}"], name=f"Constant_{i}", value=numpy_helper.from_array(
        np.array(v, np.int64))) for i, v in enumerate(([0], [1], [2], [1], [8], [5]))]
    nodes = const + [
        helper.make_node("Shape", ["x"], ["shape"], name="Shape"),
        helper.make_node("Slice", ["shape", "c0", "c1"], ["dim0"], name="Slice"),  # no axes input
        helper.make_node("Mul", ["dim0", "c2"], ["twice"], name="Mul"),
        helper.make_node("Gather", ["shape", "c3"], ["dim1"], name="Gather", axis=0),
        helper.make_node("Mod", ["c4", "c5"], ["three"], name="Mod"),
        helper.make_node("Concat", ["twice", "dim1", "three"], ["target"], name="Concat", axis=0),
        helper.make_node("Reshape", ["x", "target"], ["reshaped"], name="Reshape"),
        helper.make_node("Add", ["reshaped", "bias"], ["y"], name="Add"),
    ]
    graph = helper.make_graph(
        nodes, "shape_arithmetic",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [batch, 4, 6])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [None, 4, 3])],
        [numpy_helper.from_array(np.arange(3, dtype=np.float32), "bias")])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)])
    model.ir_version = 8
    onnx.checker.check_model(model)
    return model


def run(model: onnx.ModelProto, x: np.ndarray) -> np.ndarray:
    session = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    return session.run(None, {"x": x})[0]


def test_fold_static_shapes():
    model = shape_arithmetic_model(2)
    folded = onnx.ModelProto()
    folded.CopyFrom(model)

    removed = fold_shape_computations(folded)

    onnx.checker.check_model(folded)
    assert [(n.op_type, n.name) for n in folded.graph.node] == [("Reshape", "Reshape"), ("Add", "Add")]
    assert removed == len(model.graph.node) - 2
    inits = {i.name: numpy_helper.to_array(i) for i in folded.graph.initializer}
    assert inits["target"].tolist() == [4, 4, 3]
    x = np.random.default_rng(0).standard_normal((2, 4, 6)).astype(np.float32)
    reference = run(model, x)
    assert reference.shape == (4, 4, 3)
    np.testing.assert_array_equal(run(folded, x), reference)


def test_dynamic_dims_are_not_folded(tmp_path):
    """prepare_model folds before resolving dynamic dims: with a symbolic batch the Shape path stays, so the
    prepared (and the quantized) graph still runs at any batch size."""
    path = tmp_path / "dynamic.onnx"
    onnx.save(shape_arithmetic_model("N"), str(path))
    loaded = load_model(path)

    prepared = prepare_model(loaded, check_input_shapes({"x": [2, 4, 6]}, loaded))

    ops = [n.op_type for n in prepared.graph.node]
    assert "Shape" in ops and "Slice" in ops and "Mod" not in ops  # Mod of two constants folds regardless
    assert [d.dim_value for d in prepared.graph.input[0].type.tensor_type.shape.dim] == [2, 4, 6]
    x = np.random.default_rng(0).standard_normal((2, 4, 6)).astype(np.float32)
    np.testing.assert_array_equal(run(prepared, x), run(loaded.proto, x))


def test_prepare_model_folds_static_shapes(tmp_path):
    path = tmp_path / "static.onnx"
    onnx.save(shape_arithmetic_model(2), str(path))
    loaded = load_model(path)

    prepared = prepare_model(loaded, check_input_shapes({"x": [2, 4, 6]}, loaded))

    assert not {n.op_type for n in prepared.graph.node} & (SHAPE_OPS | {"Constant"})
