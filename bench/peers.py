"""The peers maptools is measured against: raw PPQ 0.6.6 and onnxruntime's ``quantize_static``.

Shared by the benchmarks (``bench/accuracy.py``, ``bench/real_models.py``):

* raw PPQ: PPQ's own API with its TensorRT quantizer at other bit widths (:class:`RawLowBitTRTQuantizer`),
  one of PPQ's settings (:func:`raw_setting`), evaluated by PPQ's ``TorchExecutor`` simulation (its ONNX
  export rounds to 8-bit integer types and is not faithful below 8 bits); :func:`run_raw_ppq`.
* onnxruntime: ``quantize_static`` (QDQ, per-channel weights; u8 asymmetric activations and s8 weights as
  its defaults, s4 weights at 4 bits) with a calibration method, evaluated by onnxruntime; :func:`run_ort`.

Each runner quantizes on ``calib`` (a list of feed dicts of numpy arrays) and returns the outputs on every
feed of ``evaluate`` (a list, one list of output arrays per feed, in the model's output order).
"""

from __future__ import annotations

import collections
import logging
import tempfile
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch

from maptools.quantization.engine.facade import import_ppq
from maptools.quantization.engine.quiet import ppq_silenced

import_ppq()

from ppq.api import dispatch_graph, load_onnx_graph  # noqa: E402
from ppq.api.setting import QuantizationSetting, QuantizationSettingFactory  # noqa: E402
from ppq.core import TargetPlatform  # noqa: E402
from ppq.executor import TorchExecutor  # noqa: E402
from ppq.IR import Operation  # noqa: E402
from ppq.quantization.quantizer import TensorRTQuantizer  # noqa: E402

logger = logging.getLogger(__name__)

__all__ = ["ORT_METHODS", "RAW_SETTINGS", "RawLowBitTRTQuantizer", "raw_setting", "run_ort", "run_raw_ppq"]

Feed = dict[str, np.ndarray]
#: PPQ's own settings measured: plain TensorRT, plus layer-wise equalization, plus LSQ.
RAW_SETTINGS = ("PPQ trt", "PPQ +equalization", "PPQ +LSQ")
#: onnxruntime calibration methods measured.
ORT_METHODS = ("MinMax", "Percentile", "Entropy")


class RawLowBitTRTQuantizer(TensorRTQuantizer):
    """PPQ's TensorRT quantizer at other bit widths: ``a_bits`` activations, ``w_bits`` weights.

    Everything else is PPQ's: per-tensor symmetric activations with the percentile observer, per-channel
    symmetric min-max weights, float bias, TensorRT's fusion and dispatching.
    """

    def __init__(self, graph, w_bits: int, a_bits: int) -> None:
        super().__init__(graph=graph)
        self._num_of_bits = a_bits
        self._quant_min, self._quant_max = -(2 ** (a_bits - 1)), 2 ** (a_bits - 1) - 1
        self._w_bits = w_bits

    def init_quantize_config(self, operation: Operation):
        config = super().init_quantize_config(operation)
        if operation.type in {"Conv", "ConvTranspose", "Gemm", "MatMul"} and operation.inputs[1].is_parameter:
            weight = config.input_quantization_config[1]
            weight.num_of_bits = self._w_bits
            weight.quant_min, weight.quant_max = -(2 ** (self._w_bits - 1)), 2 ** (self._w_bits - 1) - 1
        return config


def raw_setting(name: str) -> QuantizationSetting:
    """PPQ's own settings: ``trt_setting``, plus equalization, plus LSQ (PPQ defaults, CPU)."""
    setting = QuantizationSettingFactory.trt_setting()
    if name == "PPQ +equalization":
        setting.equalization = True
    elif name == "PPQ +LSQ":
        setting.lsq_optimization = True
        setting.lsq_optimization_setting.collecting_device = "cpu"
    return setting


def _tensors(feed: Feed) -> dict[str, torch.Tensor]:
    return {name: torch.from_numpy(np.ascontiguousarray(value)) for name, value in feed.items()}


def run_raw_ppq(model_path: Path, w_bits: int, a_bits: int, setting: QuantizationSetting, calib: Sequence[Feed],
                evaluate: Sequence[Feed]) -> list[list[np.ndarray]]:
    """Quantize with raw PPQ on ``calib``; its simulated outputs on each feed of ``evaluate``."""
    with ppq_silenced():
        graph = load_onnx_graph(onnx_import_file=str(model_path))
        graph = dispatch_graph(graph=graph, platform=TargetPlatform.TRT_INT8, dispatcher=setting.dispatcher,
                               dispatching_table=setting.dispatching_table)
        quantizer = RawLowBitTRTQuantizer(graph, w_bits, a_bits)
        quantizer._verbose = False
        executor = TorchExecutor(graph=graph, device="cpu")
        batches = [_tensors(feed) for feed in calib]
        quantizer.quantize(inputs=batches[0], calib_dataloader=batches, executor=executor, setting=setting,
                           calib_steps=len(batches), collate_fn=lambda batch: batch)
        outputs = [executor.forward(inputs=_tensors(feed)) for feed in evaluate]
    return [[out.detach().cpu().numpy() for out in result] for result in outputs]


def ort_weight_bits(path: Path) -> dict[str, int]:
    """How many Conv/Gemm/MatMul weights a QDQ model holds at each type (its weight zero point's), ``float`` where
    no DequantizeLinear feeds the weight: onnxruntime quantizes a weight that is not an initializer (a computed
    tensor) as an activation, at 8 bits, whatever ``weight_type`` asks."""
    import onnx

    model = onnx.load(str(path))
    initializers = {init.name: init for init in model.graph.initializer}
    producers = {out: node for node in model.graph.node for out in node.output}
    counts: collections.Counter[str] = collections.Counter()
    for node in model.graph.node:
        if node.op_type not in ("Conv", "Gemm", "MatMul") or len(node.input) < 2:
            continue
        dq = producers.get(node.input[1])
        point = dq.input[2] if dq is not None and dq.op_type == "DequantizeLinear" and len(dq.input) > 2 else None
        counts[onnx.TensorProto.DataType.Name(initializers[point].data_type).lower()
               if point in initializers else "float"] += 1
    return dict(counts)


def run_ort(model_path: Path, w_bits: int, a_bits: int, method: str, calib: Sequence[Feed],
            evaluate: Sequence[Feed]) -> list[list[np.ndarray]]:
    """onnxruntime's ``quantize_static`` with ``method`` on ``calib``; outputs of the QDQ model on ``evaluate``.

    Its defaults: QDQ format, per-channel weights, u8 asymmetric activations (a_bits 8) and s8 symmetric
    weights (s4 when ``w_bits`` is 4). Other widths are not offered by onnxruntime.
    """
    import onnxruntime as ort
    from onnxruntime.quantization import (
        CalibrationDataReader,
        CalibrationMethod,
        QuantFormat,
        QuantType,
        quantize_static,
    )

    if a_bits != 8 or w_bits not in (4, 8):
        raise ValueError(f"onnxruntime quantizes W8A8 and W4A8 only, not W{w_bits}A{a_bits}")

    class Reader(CalibrationDataReader):
        def __init__(self) -> None:
            self._feeds = iter(calib)

        def get_next(self) -> Feed | None:
            return next(self._feeds, None)

    with tempfile.TemporaryDirectory(prefix="maptools-ort-") as tmp:
        out = Path(tmp) / "quant.onnx"
        quantize_static(str(model_path), str(out), Reader(), quant_format=QuantFormat.QDQ, per_channel=True,
                        activation_type=QuantType.QUInt8,
                        weight_type=QuantType.QInt8 if w_bits == 8 else QuantType.QInt4,
                        calibrate_method=getattr(CalibrationMethod, method),
                        calibration_providers=["CPUExecutionProvider"],
                        extra_options={"CalibMaxIntermediateOutputs": 4} if method == "Entropy" else None)
        kinds = ort_weight_bits(out)
        wanted = "int8" if w_bits == 8 else "int4"
        if set(kinds) != {wanted}:
            logger.warning("onnxruntime W%dA%d %s: MAC weights by type %s (asked: all %s)", w_bits, a_bits, method,
                           kinds, wanted)
        options = ort.SessionOptions()
        options.log_severity_level = 3
        session = ort.InferenceSession(str(out), options, providers=["CPUExecutionProvider"])
        return [session.run(None, feed) for feed in evaluate]
