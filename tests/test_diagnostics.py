"""The advice of a warning applies to the map, in the syntax of the interface that ran."""

from __future__ import annotations

import onnx
import onnx.helper

from maptools.quantization.diagnostics import (
    FIT_GAP_DB,
    FIT_WARNING_DB,
    Advice,
    advice_syntax,
    fit_warnings,
    output_warnings,
)


def _warn(advice: Advice, isolated: dict[str, float]) -> str:
    (warning,) = output_warnings({"out": 6.0}, {}, {"out": 1.0}, {"out": 1.0}, isolated, "held-out", advice)
    return warning


def test_no_bits_suggested_that_the_map_already_has():
    warning = _warn(Advice(weight_bits=8, activation_bits=8), {"conv1": 12.0, "conv2": 20.0})
    assert "output 'out': SNR 6.0 dB" in warning and "conv1 (12.0 dB), conv2 (20.0 dB)" in warning
    assert "activation_bits" not in warning and "layer_bits" not in warning
    assert warning.endswith(". Try recipe='best'. Check the task metric (accuracy, detections, decoded text) on "
                            "real held-out inputs: the SNR is only a proxy")
    # W4A8: the weights of the worst operators can go to 8, the activations are there already
    warning = _warn(Advice(weight_bits=4, activation_bits=8, recipe="best"), {"conv1": 12.0, "conv2": 20.0})
    assert "Try layer_bits={'conv1': 8, 'conv2': 8}. Check the task metric" in warning
    assert "activation_bits" not in warning and "recipe" not in warning
    # an operator already at 8 bits in a W4A4 map is not suggested again
    warning = _warn(Advice(weight_bits=4, activation_bits=4, layer_bits={"conv1": (8, 8)}), {"conv1": 9.0, "fc": 11.0})
    assert "layer_bits={'fc': 8}, activation_bits=8, recipe='best'" in warning


def test_first_last_bits_when_the_first_or_last_mac_is_worst():
    advice = Advice(weight_bits=4, activation_bits=4, first_and_last=("stem", "head"), random_calibration=True)
    warning = _warn(advice, {"stem": 5.0, "mid": 15.0})
    assert "Try first_last_bits=8, layer_bits={'mid': 8}, activation_bits=8, recipe='best', calibration data like " \
           "the inputs the model will see (calibset=)" in warning
    assert "first_last_bits" not in _warn(advice, {"mid": 5.0, "stem": 15.0})  # the worst is in the middle
    with advice_syntax("cli"):
        warning = _warn(advice, {"stem": 5.0, "mid": 15.0})
    assert "Try --first-last-bits 8, --layer-bits mid=8, --activation-bits 8, --recipe best, calibration data like " \
           "the inputs the model will see (--calib-dir or --calib-npy)" in warning
    assert "first_last_bits=8" in _warn(advice, {"stem": 5.0, "mid": 15.0})  # back to Python after the block


def test_a_sequence_of_class_probabilities_is_held_to_a_higher_snr():
    """A CTC recognizer's output loses strings at SNRs a classifier's would pass (issue 23: PP-OCRv4 lost 7 of 32
    lines at 11.6 dB, none at 15.5 dB)."""
    import onnx
    from onnx import TensorProto, helper

    from maptools.quantization.diagnostics import SEQUENCE_WARNING_DB, sequence_outputs

    nodes = [helper.make_node("Softmax", ["x"], ["steps"], axis=2), helper.make_node("Softmax", ["v"], ["classes"]),
             helper.make_node("Softmax", ["x"], ["channels"], axis=1)]
    graph = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", "T", 66]),
                                           helper.make_tensor_value_info("v", TensorProto.FLOAT, ["N", 10])],
                              [helper.make_tensor_value_info("steps", TensorProto.FLOAT, ["N", "T", 66]),
                               helper.make_tensor_value_info("classes", TensorProto.FLOAT, ["N", 10]),
                               helper.make_tensor_value_info("channels", TensorProto.FLOAT, ["N", "T", 66])], [])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)])
    onnx.checker.check_model(model)
    assert sequence_outputs(model) == ["steps"]
    assert SEQUENCE_WARNING_DB == 14.0
    snr = {"steps": 12.9, "classes": 12.9, "channels": 12.9}
    spans = dict.fromkeys(snr, 1.0)
    (warning,) = output_warnings(snr, {}, spans, spans, {"mm": 20.0}, "held-out", Advice(), ["steps"])
    assert warning.startswith("output 'steps': SNR 12.9 dB against FP32, below the 14 dB under which")
    assert output_warnings({"steps": 15.5}, {}, spans, spans, {}, "held-out", Advice(), ["steps"]) == []


def test_a_cnn_transformer_below_8_bit_weights_is_told_to_keep_its_convs():
    """Issue 23: at W4A8 PP-OCRv4's recognizer read 1/32 lines with its 8 worst operators at 8 bits, 32/32 with every
    Conv and the last MAC at 8 bits (its attention and MLP MatMuls at 4): the advice names that set."""
    from test_affine import _block_graph

    from maptools.quantization.diagnostics import cnn_transformer_convolutions

    model = _block_graph()
    convs = cnn_transformer_convolutions(model)
    assert convs == [n.name for n in model.graph.node if n.op_type == "Conv"] and len(convs) == 3
    # a grouped Conv is named, and left out of the smaller set the bench measures (+ungrouped8)
    with_dw = onnx.ModelProto()
    with_dw.CopyFrom(model)
    with_dw.graph.node.insert(1, onnx.helper.make_node("Conv", [model.graph.node[0].output[0], "w_dw"], ["dw"],
                                                       name="Conv_dw", group=8))
    assert cnn_transformer_convolutions(with_dw) == [convs[0], "Conv_dw", *convs[1:]]
    assert cnn_transformer_convolutions(with_dw, grouped=False) == convs
    no_attention = [n for n in model.graph.node if n.op_type != "Softmax" or n.output[0] == "probs"]
    del model.graph.node[:]
    model.graph.node.extend(no_attention)
    assert cnn_transformer_convolutions(model) == []  # no MatMul reads a Softmax: not a transformer
    advice = Advice(weight_bits=4, activation_bits=8, first_and_last=(convs[0], "head"), convolutions=convs)
    warning = _warn(advice, {"MatMul_9": 3.0, convs[1]: 12.0})
    expected = "{" + ", ".join(f"'{name}': 8" for name in convs) + "}"
    assert "Try first_last_bits=8, every Conv at 8 bits (the transformer's MatMuls hold 4-bit weights" in warning
    assert f"8 worst operators at 8 bits): layer_bits={expected}, recipe='best'. Check" in warning
    with advice_syntax("cli"):
        warning = _warn(advice, {"MatMul_9": 3.0})
    assert "Try --first-last-bits 8 and every Conv at 8 bits (" in warning
    flags = ",".join(f"{name}=8" for name in convs)
    assert f"--layer-bits {flags}, --recipe best" in warning
    # a map whose Convs are all at 8 bits already is not told so again
    done = Advice(weight_bits=4, activation_bits=8, layer_bits={n: (8, 8) for n in [*convs, "head"]},
                  first_and_last=(convs[0], "head"), convolutions=convs, recipe="best")
    assert "every Conv" not in _warn(done, {"MatMul_9": 3.0})


def test_a_held_out_snr_far_below_the_calibration_datas_is_a_fit_warning():
    (warning,) = fit_warnings({"out": 22.0, "other": 30.0}, {"out": 13.9, "other": 25.0}, "held-out", 32)
    assert warning.startswith("output 'out': SNR 13.9 dB on held-out data but 22.0 dB on the calibration data")
    assert fit_warnings({"out": 22.0}, {"out": 22.0 - FIT_GAP_DB}, "evalset", 32) == []  # at the threshold: nothing
    assert fit_warnings({"out": 22.0}, {"out": 13.9}, "evalset", 31) == []  # too few samples to tell
    assert fit_warnings({"out": float("inf")}, {"out": 10.0}, "evalset", 32) == []  # exact on calibration: no figure
    assert fit_warnings({"out": 45.0}, {"out": FIT_WARNING_DB}, "evalset", 32) == []  # the map holds on held-out data
