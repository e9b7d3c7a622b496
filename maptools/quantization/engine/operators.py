"""Corrected PPQ operator implementations, installed only while maptools runs PPQ.

PPQ 0.6.6 executes some operators differently from ONNX. These are fixed at the operator, so the graph
keeps its nodes (and their quantization points) as the model has them:

* ``PRelu``: PPQ calls ``torch.nn.functional.prelu(x, slope)``, which takes only a 1-D (per channel 1) or
  0-D slope. ONNX broadcasts the slope to ``x`` unidirectionally, and exporters write ``[C, 1, 1]`` (torch's
  legacy exporter) or ``[1, C, 1, 1]`` (its dynamo exporter), which PPQ cannot execute. maptools computes
  ``where(x >= 0, x, x * slope)`` with ONNX broadcasting.

:func:`operator_fixes` installs them in PPQ's forward tables for the duration of a block and puts PPQ's own
back afterwards (PPQ's executor reads only those process-wide tables), so PPQ used directly in the same
process afterwards is not affected.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator

import torch

from maptools.quantization.engine.facade import (
    OPERATION_FORWARD_TABLE,
)

__all__ = ["FIXED_OPERATORS", "operator_fixes", "prelu_forward"]


def prelu_forward(op, values: list[torch.Tensor], ctx=None, **kwargs) -> torch.Tensor:  # noqa: ARG001
    """ONNX ``PRelu``: ``x`` where ``x >= 0``, else ``slope * x``, the slope broadcast to ``x`` (numpy rules)."""
    x, slope = values
    return torch.where(x >= 0, x, x * slope.to(x.dtype))


#: Operator type -> maptools' forward function (PPQ's signature: ``(op, values, ctx, **kwargs)``).
FIXED_OPERATORS: dict[str, Callable[..., torch.Tensor]] = {"PRelu": prelu_forward}


@contextlib.contextmanager
def operator_fixes() -> Iterator[None]:
    """Within the block, PPQ executes :data:`FIXED_OPERATORS` with maptools' implementations, on every platform."""
    saved = [(table, name, table.get(name)) for table in _tables() for name in FIXED_OPERATORS]
    for table, name, _ in saved:
        table[name] = FIXED_OPERATORS[name]
    try:
        yield
    finally:
        for table, name, original in saved:
            if original is None:
                table.pop(name, None)
            else:
                table[name] = original


def _tables() -> list[dict]:
    """PPQ's forward tables, each once (several platforms share one dict)."""
    unique: dict[int, dict] = {}
    for table in OPERATION_FORWARD_TABLE.values():
        unique.setdefault(id(table), table)
    return list(unique.values())
