"""The search's method: a greedy walk from the widest bits down, as AIMET's automatic mixed precision.

Every crossbar MAC ``l`` at candidate ``c = (weight bits, activation bits)`` has a cost ``C[l, c]`` (ADC
conversions or energy on the crossbar, from the uniform map at ``c``) and a sensitivity ``S[l, c]``: the
noise-to-signal power of the graph outputs when only ``l`` is quantized at ``c`` (PPQ's layer-wise analysis
on held-out data). An assignment's predicted noise is ``sum_l S[l, c_l]`` (independent noises add), its
predicted cost ``sum_l C[l, c_l]``. The walk starts with every layer at the costliest candidate and, at each
step, moves the one layer to the cheaper candidate with the largest cost saving per added noise, until every
layer is at the cheapest. Points spread evenly in predicted cost along the walk are then quantized and measured.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Any

__all__ = ["Assignment", "Candidate", "greedy_walk", "pareto", "predicted", "spread"]

#: ``(weight_bits, activation_bits)``.
Candidate = tuple[int, int]
#: Layer -> candidate.
Assignment = dict[str, Candidate]

#: The smallest added noise a step is divided by (a step that adds none is taken first).
_NOISE_FLOOR = 1e-15


def predicted(assignment: Mapping[str, Candidate], table: Mapping[str, Mapping[Candidate, Mapping[str, float]]],
              objective: str) -> tuple[float, float]:
    """``(cost, snr_db)`` predicted for an assignment: the sums of its layers' costs and noises."""
    cost = sum(table[layer][c][objective] for layer, c in assignment.items())
    noise = sum(table[layer][c]["nsr"] for layer, c in assignment.items())
    return float(cost), (math.inf if noise <= 0 else -10.0 * math.log10(noise))


def greedy_walk(table: Mapping[str, Mapping[Candidate, Mapping[str, float]]], objective: str) -> list[Assignment]:
    """Every assignment of the walk, from the costliest (all layers at their costliest candidate) to the cheapest.

    Args:
        table: Layer -> candidate -> ``{"nsr": ..., objective: ...}``.
        objective: The cost the walk lowers (``'adc_conversions'`` or ``'energy_j'``).

    Ties (equal ratios and savings) go to the earlier layer in the table's order (the search's: by name), then to
    the costlier candidate (the smaller step): the walk is a function of the table.
    """
    layers = list(table)

    def order(layer: str) -> list[Candidate]:  # costliest first; equal costs: more bits first
        return sorted(table[layer], key=lambda c: (-table[layer][c][objective], -c[0], -c[1]))

    current: Assignment = {layer: order(layer)[0] for layer in layers}
    walk = [dict(current)]
    while True:
        best: tuple[float, int, float, str, Candidate] | None = None
        for index, layer in enumerate(layers):
            here = table[layer][current[layer]]
            for c in order(layer):
                saving = here[objective] - table[layer][c][objective]
                if saving <= 0:
                    continue
                ratio = saving / max(table[layer][c]["nsr"] - here["nsr"], _NOISE_FLOOR)
                key = (ratio, -index, saving, layer, c)
                if best is None or key[:3] > best[:3]:
                    best = key
        if best is None:
            return walk
        current[best[3]] = best[4]
        walk.append(dict(current))


def spread(costs: Sequence[float], count: int) -> list[int]:
    """Indices of ``min(count, len(costs))`` walk steps: spread evenly in cost, the first and the last included.

    Where the walk's steps crowd in cost (the cheap end, where many layers are already at their cheapest), two
    cost targets can land on one step; the steps still missing then halve the widest gaps in walk steps between
    the chosen ones (the earliest gap on a tie), so asking for more points always measures more of the walk.
    """
    if not costs:
        return []
    high, low = costs[0], costs[-1]
    chosen: list[int] = []
    for k in range(count):
        target = high - (high - low) * k / max(count - 1, 1)
        index = min(range(len(costs)), key=lambda i: (abs(costs[i] - target), i))
        if index not in chosen:
            chosen.append(index)
    chosen.sort()
    while len(chosen) < min(count, len(costs)):
        gap = max(range(len(chosen) - 1), key=lambda g: (chosen[g + 1] - chosen[g], -g))
        chosen.insert(gap + 1, (chosen[gap] + chosen[gap + 1]) // 2)
    return chosen


def pareto(points: Sequence[Mapping[str, Any]], objective: str, figure: str = "figure") -> list[bool]:
    """Whether each point is on the front: no other point has a figure as high at a cost as low, one of them better.

    ``figure``: the key of the figure the front is drawn over (``'front_figure'``: the search's finer figure).
    """
    flags = []
    for p in points:
        dominated = any(q is not p and q[figure] >= p[figure] and q[objective] <= p[objective]
                        and (q[figure] > p[figure] or q[objective] < p[objective]) for q in points)
        flags.append(not dominated)
    return flags
