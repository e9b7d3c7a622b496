"""The API of the original ``ppq_lowbit`` extension, for its users.

``quantize_onnx_model_lowbit`` and ``quantize_native_model_lowbit`` take the parameters of PPQ's
``quantize_onnx_model`` / ``quantize_native_model`` plus ``bit_width``, ``symmetrical`` and ``per_channel``,
and return the quantized PPQ ``BaseGraph``. Unlike the original, nothing is registered globally into PPQ:
the low-bit quantizer is used directly, so PPQ's own TensorRT quantizer stays untouched.
:func:`export_lowbit_onnx` writes the faithful QDQ model (PPQ's ONNX Runtime exporter keeps low-bit values
in int8 without clipping them; this one clips).

Importing this module imports PPQ (through :mod:`maptools.quantization.engine.facade`): its functions take
and return PPQ graphs. New code should use :func:`maptools.quantization.quantize`, which also checks its
inputs and writes the mapsave artifacts.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import Any

import onnx
import torch

from maptools.quantization.engine.exporter import FaithfulQDQExporter
from maptools.quantization.engine.facade import (
    BaseGraph,
    QuantizationSetting,
    QuantizationSettingFactory,
    TargetPlatform,
    dispatch_graph,
    load_onnx_graph,
)
from maptools.quantization.engine.operators import FixedOperatorExecutor
from maptools.quantization.engine.quantizer import LowBitQuantizer, LowBitSpec
from maptools.quantization.engine.quiet import ppq_silenced
from maptools.quantization.validation import check_bits, check_bool

__all__ = ["export_lowbit_onnx", "quantize_native_model_lowbit", "quantize_onnx_model_lowbit"]


def quantize_native_model_lowbit(
    model: BaseGraph,
    calib_dataloader: Iterable[Any],
    calib_steps: int,
    input_shape: list[int] | None,
    platform: TargetPlatform = TargetPlatform.TRT_INT8,
    input_dtype: torch.dtype = torch.float,
    inputs: Any = None,
    setting: QuantizationSetting | None = None,
    collate_fn: Callable[[Any], Any] | None = None,
    device: str = "cuda",
    verbose: int = 0,
    do_quantize: bool = True,
    bit_width: int = 8,
    symmetrical: bool = True,
    per_channel: bool = True,
) -> BaseGraph:
    """Quantize a PPQ graph already in memory at ``bit_width`` bits (the ppq_lowbit API).

    Args:
        model: The float PPQ graph.
        calib_dataloader: Calibration batches.
        calib_steps: Number of calibration batches.
        input_shape: Shape of a dummy input for tracing (None when ``inputs`` is given).
        platform: Dispatch platform; the low-bit quantizer targets ``TRT_INT8``.
        input_dtype: dtype of the dummy input.
        inputs: Explicit tracing inputs (for several inputs).
        setting: PPQ setting (default: PPQ's TensorRT setting).
        collate_fn: Batch pre-processing.
        device: Execution device.
        verbose: PPQ verbosity; PPQ's output is forwarded to the ``maptools.ppq`` logger either way.
        do_quantize: False only traces the graph.
        bit_width: Bit width of every quantized tensor.
        symmetrical: Symmetric (signed) or asymmetric (unsigned) activations.
        per_channel: Per-output-channel weight scales.

    Returns:
        The quantized graph.
    """
    bits = check_bits(bit_width, "bit_width")
    spec = LowBitSpec(bits, bits, check_bool(symmetrical, "symmetrical"), check_bool(per_channel, "per_channel"))
    setting = setting if setting is not None else QuantizationSettingFactory.trt_setting()
    dummy = inputs if inputs is not None else torch.zeros(size=input_shape, device=device, dtype=input_dtype)
    with ppq_silenced():
        graph = dispatch_graph(graph=model, platform=platform, dispatcher=setting.dispatcher,
                               dispatching_table=setting.dispatching_table)
        quantizer = LowBitQuantizer(graph=graph, spec=spec)
        quantizer._verbose = bool(verbose)
        executor = FixedOperatorExecutor(graph=graph, device=device)
        if do_quantize:
            quantizer.quantize(inputs=dummy, calib_dataloader=calib_dataloader, executor=executor, setting=setting,
                               calib_steps=calib_steps, collate_fn=collate_fn)
        else:
            executor.tracing_operation_meta(inputs=dummy)
    return graph


def quantize_onnx_model_lowbit(
    onnx_import_file: str,
    calib_dataloader: Iterable[Any],
    calib_steps: int,
    input_shape: list[int] | None,
    platform: TargetPlatform = TargetPlatform.TRT_INT8,
    input_dtype: torch.dtype = torch.float,
    inputs: Any = None,
    setting: QuantizationSetting | None = None,
    collate_fn: Callable[[Any], Any] | None = None,
    device: str = "cuda",
    verbose: int = 0,
    do_quantize: bool = True,
    bit_width: int = 8,
    symmetrical: bool = True,
    per_channel: bool = True,
) -> BaseGraph:
    """Load an ONNX model into PPQ and quantize it at ``bit_width`` bits (the ppq_lowbit API).

    Takes the parameters of :func:`quantize_native_model_lowbit`, with the path of an ONNX file instead of
    a graph.
    """
    with ppq_silenced():
        graph = load_onnx_graph(onnx_import_file=str(onnx_import_file))
    return quantize_native_model_lowbit(
        graph, calib_dataloader, calib_steps, input_shape, platform, input_dtype, inputs, setting, collate_fn,
        device, verbose, do_quantize, bit_width, symmetrical, per_channel)


def export_lowbit_onnx(graph: BaseGraph, path: str, opset: int = 13) -> onnx.ModelProto:
    """Export a quantized graph as a QDQ ONNX model that stays faithful below 8 bits, and return it."""
    with ppq_silenced():
        exporter = FaithfulQDQExporter()
        exporter.opset = opset
        exporter.export(file_path=str(path), graph=graph.copy(), quantized_param=True)
    model = onnx.load(str(path))
    onnx.checker.check_model(model)
    return model
