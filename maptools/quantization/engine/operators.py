"""maptools' implementations of the operators PPQ 0.6.6 executes differently from ONNX, and the executor using them.

These are fixed at the operator, so the graph keeps its nodes (and their quantization points) as the model has
them:

* ``PRelu``: PPQ calls ``torch.nn.functional.prelu(x, slope)``, which takes only a 1-D (per channel 1) or
  0-D slope. ONNX broadcasts the slope to ``x`` unidirectionally, and exporters write ``[C, 1, 1]`` (torch's
  legacy exporter) or ``[1, C, 1, 1]`` (its dynamo exporter), which PPQ cannot execute. maptools computes
  ``where(x >= 0, x, x * slope)`` with ONNX broadcasting.

:class:`FixedOperatorExecutor` runs them: PPQ's ``TorchExecutor`` whose forward loop (PPQ's own code) looks
operators up in :data:`FIXED_OPERATORS` before PPQ's forward tables. PPQ's tables are never written to, so PPQ
used directly in the same process, in another thread too, executes as it always does.
"""

from __future__ import annotations

import types
from collections import ChainMap
from collections.abc import Callable, Iterator, Mapping

import torch

from maptools.quantization.engine.facade import (
    OPERATION_FORWARD_TABLE,
    TargetPlatform,
    TorchExecutor,
)

__all__ = ["FIXED_OPERATORS", "FixedOperatorExecutor", "prelu_forward"]


def prelu_forward(op, values: list[torch.Tensor], ctx=None, **kwargs) -> torch.Tensor:  # noqa: ARG001
    """ONNX ``PRelu``: ``x`` where ``x >= 0``, else ``slope * x``, the slope broadcast to ``x`` (numpy rules)."""
    x, slope = values
    return torch.where(x >= 0, x, x * slope.to(x.dtype))


#: Operator type -> maptools' forward function (PPQ's signature: ``(op, values, ctx, **kwargs)``).
FIXED_OPERATORS: dict[str, Callable[..., torch.Tensor]] = {"PRelu": prelu_forward}


class _FixedTables(Mapping):
    """PPQ's forward table of each platform, read through :data:`FIXED_OPERATORS` first (nothing is copied)."""

    def __getitem__(self, platform: TargetPlatform) -> ChainMap:
        return ChainMap(FIXED_OPERATORS, OPERATION_FORWARD_TABLE[platform])

    def __iter__(self) -> Iterator[TargetPlatform]:
        return iter(OPERATION_FORWARD_TABLE)

    def __len__(self) -> int:
        return len(OPERATION_FORWARD_TABLE)


def _reading(function: types.FunctionType, **names: object) -> types.FunctionType:
    """``function``'s own code, reading ``names`` as the given objects and its module's other globals as they were
    when this ran (a copy of the namespace: the module itself is not changed)."""
    clone = types.FunctionType(function.__code__, {**function.__globals__, **names}, function.__name__,
                               function.__defaults__, function.__closure__)
    clone.__kwdefaults__ = function.__kwdefaults__
    clone.__qualname__ = function.__qualname__
    clone.__doc__ = function.__doc__
    return clone


class FixedOperatorExecutor(TorchExecutor):
    """PPQ's ``TorchExecutor``, executing the operators of :data:`FIXED_OPERATORS` with maptools' implementations.

    Every public method is PPQ's; only the private forward loop they all share reads the forward tables through
    :data:`FIXED_OPERATORS` (PPQ's code, rebound by :func:`_reading`).
    """

    _TorchExecutor__forward = _reading(TorchExecutor._TorchExecutor__forward,
                                       OPERATION_FORWARD_TABLE=_FixedTables())
