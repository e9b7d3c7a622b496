"""The one module of maptools that imports PPQ: every PPQ name the engine uses, imported once and quietly.

Importing this module imports PPQ (inside :func:`~maptools.quantization.engine.compat.ppq_import_bridges`
and :func:`~maptools.quantization.engine.quiet.ppq_silenced`); the engine's modules take their PPQ names
from here, and nothing outside the engine imports the engine before it quantizes (:ref:`architecture-layers`).
Nothing here changes PPQ: maptools passes its own subclasses and instances to PPQ.
"""

from __future__ import annotations

import functools
from types import ModuleType

from maptools.quantization.engine.quiet import ppq_logger, ppq_silenced


@functools.cache
def import_ppq() -> ModuleType:
    """Import PPQ once, silently, on the installed onnx and protobuf, and return the module.

    The import runs inside :func:`~maptools.quantization.engine.compat.ppq_import_bridges`, which lets PPQ
    0.6.6 import on onnx >= 1.16 and protobuf >= 4 and leaves nothing behind.
    """
    from maptools.quantization.engine.compat import ppq_import_bridges

    with ppq_silenced(), ppq_import_bridges() as bridges:
        import ppq
        import ppq.api  # noqa: F401  (registers platforms, quantizers and exporters)
    if bridges:
        ppq_logger.debug("PPQ imported with stand-ins for %s", ", ".join(bridges))
    return ppq


import_ppq()

from ppq.api import dispatch_graph, load_onnx_graph  # noqa: E402
from ppq.api.setting import DispatchingTable, QuantizationSetting, QuantizationSettingFactory  # noqa: E402
from ppq.core import (  # noqa: E402
    OBSERVER_MIN_SCALE,
    PASSIVE_OPERATIONS,
    PPQ_CONFIG,
    TYPES_FOR_ALIGNMENT,
    OperationQuantizationConfig,
    QuantizationPolicy,
    QuantizationProperty,
    QuantizationStates,
    QuantizationVisibility,
    RoundingPolicy,
    TargetPlatform,
    TensorQuantizationConfig,
)
from ppq.executor import TorchExecutor  # noqa: E402
from ppq.executor.base import OPERATION_FORWARD_TABLE  # noqa: E402
from ppq.executor.op import DEFAULT_BACKEND_TABLE  # noqa: E402
from ppq.IR import BaseGraph, Operation, QuantableOperation, Variable  # noqa: E402
from ppq.parser.onnxruntime_exporter import ONNXRUNTIMExporter, QDQHelper  # noqa: E402
from ppq.quantization.observer.range import TorchMSEObserver, TorchPercentileObserver  # noqa: E402
from ppq.quantization.optim import (  # noqa: E402
    ParameterBakingPass,
    ParameterQuantizePass,
    PassiveParameterQuantizePass,
    QuantizationOptimizationPass,
    QuantizationOptimizationPipeline,
    QuantizeFusionPass,
    RuntimeCalibrationPass,
)
from ppq.quantization.optim.training import LearnedStepSizePass  # noqa: E402
from ppq.quantization.qfunction import PPQuantFunction  # noqa: E402
from ppq.quantization.quantizer.TensorRTQuantizer import TensorRTQuantizer  # noqa: E402
from ppq.utils.round import ppq_tensor_round  # noqa: E402

__all__ = [
    "DEFAULT_BACKEND_TABLE",
    "OBSERVER_MIN_SCALE",
    "OPERATION_FORWARD_TABLE",
    "PASSIVE_OPERATIONS",
    "PPQ_CONFIG",
    "TYPES_FOR_ALIGNMENT",
    "BaseGraph",
    "DispatchingTable",
    "LearnedStepSizePass",
    "ONNXRUNTIMExporter",
    "Operation",
    "OperationQuantizationConfig",
    "PPQuantFunction",
    "ParameterBakingPass",
    "ParameterQuantizePass",
    "PassiveParameterQuantizePass",
    "QDQHelper",
    "QuantableOperation",
    "QuantizationOptimizationPass",
    "QuantizationOptimizationPipeline",
    "QuantizationPolicy",
    "QuantizationProperty",
    "QuantizationSetting",
    "QuantizationSettingFactory",
    "QuantizationStates",
    "QuantizationVisibility",
    "QuantizeFusionPass",
    "RoundingPolicy",
    "RuntimeCalibrationPass",
    "TargetPlatform",
    "TensorQuantizationConfig",
    "TensorRTQuantizer",
    "TorchExecutor",
    "TorchMSEObserver",
    "TorchPercentileObserver",
    "Variable",
    "dispatch_graph",
    "import_ppq",
    "load_onnx_graph",
    "ppq_tensor_round",
]
