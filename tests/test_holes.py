"""close_quantization_holes: the fan-out tensors PPQ leaves in float are quantized after its passes."""

from __future__ import annotations

import numpy as np
import pytest

from maptools.examples import digits
from maptools.quantization import random_calibset
from maptools.quantization.engine import LowBitSpec, PPQSession
from maptools.quantization.engine import session as session_module
from maptools.quantization.engine.holes import close_quantization_holes
from maptools.quantization.model import check_input_shapes, load_model, prepare_model

SHAPES = {"input": list(digits.INPUT_SHAPE)}
#: The residual digits CNN: two ReLUs feed both a Conv and a residual Add, and the Flatten before the Gemm.
HOLES = ["/stem/stem.2/Relu -> /block1/conv1/Conv", "/block2/relu2/Relu -> /block3/conv1/Conv",
         "/flatten/Flatten -> /fc/Gemm"]


def _quantized(monkeypatch: pytest.MonkeyPatch, close: bool) -> PPQSession:
    if not close:
        monkeypatch.setattr(session_module, "close_quantization_holes", lambda graph: [])
    model = load_model(digits.MODEL_PATH)
    shapes = check_input_shapes(SHAPES, model)
    session = PPQSession.from_onnx(prepare_model(model, shapes), LowBitSpec(4, 4), "cpu")
    session.quantize(random_calibset(shapes, 8, seed=0))
    return session


def test_holes_are_closed_once(monkeypatch: pytest.MonkeyPatch) -> None:
    session = _quantized(monkeypatch, close=False)
    batch = random_calibset({"input": digits.INPUT_SHAPE}, 1, seed=5)[0]
    open_holes = session.forward(batch)["logits"]
    assert close_quantization_holes(session.graph) == HOLES
    assert close_quantization_holes(session.graph) == []  # nothing left to close
    closed = session.forward(batch)["logits"]
    assert not np.array_equal(open_holes, closed)  # the Convs now read the integers a chip holds
    for name in HOLES:
        producer = session.graph.operations[name.split(" -> ")[0]]
        config = producer.config.output_quantization_config[0]
        assert config.state.name == "ACTIVATED" and config.num_of_bits == config.dominated_by.num_of_bits


def test_quantize_leaves_no_hole(monkeypatch: pytest.MonkeyPatch) -> None:
    session = _quantized(monkeypatch, close=True)
    assert close_quantization_holes(session.graph) == []
