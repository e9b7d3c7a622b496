"""Operators left in float: why each one, and how the summary and ``report.json`` say it.

An operator PPQ does not quantize runs in float on the host, not on the chip: a user must learn it from
``quantize`` itself, not from ``inspect`` or from ``verify`` failing later. A recurrent layer (``LSTM``,
``GRU``, ``RNN``: PPQ 0.6.6 quantizes none) or an attention block left in float is a large part of the
network off the chip, so it is said at the top of the summary (:func:`float_blocks`). The engine finds the
operators and their reasons (:mod:`maptools.quantization.engine.floats`).
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterable, Mapping, Sequence

__all__ = ["ATTENTION_TYPES", "RECURRENT_TYPES", "float_blocks", "float_lines", "float_summary", "not_quantizable"]

#: Recurrent layers: PPQ 0.6.6 quantizes none of them.
RECURRENT_TYPES = frozenset({"LSTM", "GRU", "RNN"})
#: Operators that make an attention block left in float: a ``Softmax``, or a ``MatMul`` of two activations.
ATTENTION_TYPES = frozenset({"Softmax", "MatMul"})

#: The reasons an operator is left in float.
SHAPE = "shape or index arithmetic (runs on the host)"
FINAL_CONCAT = "a final Concat or the layout operators after it: each part keeps its own scale"
RECURRENT = "recurrent layer: PPQ 0.6.6 quantizes no LSTM, GRU or RNN"
FOLLOWS_FLOAT = "its input comes from an operator left in float"
DISPATCHED = "dispatched to float (PPQ's dispatcher or the setting's dispatching table)"


def not_quantizable(op_type: str) -> str:
    """The reason of an operator whose type PPQ does not quantize."""
    return f"PPQ 0.6.6 does not quantize {op_type} operators"


def float_blocks(operators: Iterable[Mapping[str, str]]) -> list[str]:
    """Sentences for the top of the summary: the recurrent layers and attention operators left in float."""
    operators = list(operators)
    lines = []
    recurrent = [op for op in operators if op["op_type"] in RECURRENT_TYPES]
    if recurrent:
        lines.append(f"{len(recurrent)} recurrent layer(s) left in float, run on the host and not on the chip: "
                     + _names(recurrent) + " (PPQ 0.6.6 quantizes no LSTM, GRU or RNN)")
    attention = [op for op in operators if op["op_type"] in ATTENTION_TYPES and op["reason"] != SHAPE]
    if attention:
        lines.append(f"attention left in float ({len(attention)} Softmax/MatMul operators), run on the host: "
                     + _names(attention))
    return lines


def _names(operators: Sequence[Mapping[str, str]], shown: int = 3, types: bool = True) -> str:
    names = ", ".join(f"{op['node']} ({op['op_type']})" if types else op["node"] for op in operators[:shown])
    return names + (f" and {len(operators) - shown} more" if len(operators) > shown else "")


def float_summary(operators: Iterable[Mapping[str, str]]) -> dict[str, object]:
    """``report.json``'s ``float_operators``: the count, the count per type and every operator with why."""
    operators = list(operators)
    return {"count": len(operators), "types": dict(Counter(op["op_type"] for op in operators)),
            "operators": [dict(op) for op in operators]}


def float_lines(operators: Iterable[Mapping[str, str]]) -> list[str]:
    """The summary's lines: the count, then one line per reason with the types and the first nodes."""
    operators = list(operators)
    if not operators:
        return ["operators left in float: 0"]
    lines = [f"operators left in float: {len(operators)}"]
    by_reason: dict[str, list[Mapping[str, str]]] = {}
    for op in operators:
        by_reason.setdefault(op["reason"], []).append(op)
    for reason, ops in by_reason.items():
        types = ", ".join(f"{t} x{n}" for t, n in Counter(op["op_type"] for op in ops).items())
        lines.append(f"  {types}: {reason} ({_names(ops, types=False)})")
    return lines
