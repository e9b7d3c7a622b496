"""Compute-in-memory features of a whole map, on the integer reference executor (numpy and onnx, no PPQ).

They sit above the executor (:mod:`maptools.quantization.reference`), which sits above the crossbar arithmetic
(:mod:`maptools.quantization.cim`):

* :mod:`~maptools.quantization.cimmap.mapcal`: the ADC calibration of every MAC of a map
  (:func:`~maptools.quantization.cimmap.mapcal.calibrate_map`), its storage in the map
  (:func:`~maptools.quantization.cimmap.mapcal.write_map_calibration`) and the weight slices of every MAC
  (:func:`~maptools.quantization.cimmap.mapcal.map_weight_slices`);
* :mod:`~maptools.quantization.cimmap.content`: the CIM files ``quantize(..., cim=spec)`` writes with a map;
* :mod:`~maptools.quantization.cimmap.mapcost`: the cost of every crossbar MAC of a map
  (:func:`~maptools.quantization.cimmap.mapcost.map_cost`);
* :mod:`~maptools.quantization.cimmap.sweep`: the agreement of a map on a grid of crossbars (``maptools cim-sweep``);
* :mod:`~maptools.quantization.cimmap.montecarlo`: a figure's distribution over simulated chips
  (:func:`~maptools.quantization.cimmap.montecarlo.monte_carlo`);
* :mod:`~maptools.quantization.cimmap.staticchip`: chips without read noise computed in torch, the Monte-Carlo's
  fast path (the only module here that imports torch, and only when a Monte-Carlo asks for it).
"""

from __future__ import annotations

from maptools.quantization.cimmap.mapcal import (
    MapHistograms,
    calibrate_map,
    collect_histograms,
    map_weight_slices,
    write_map_calibration,
)
from maptools.quantization.cimmap.mapcost import mac_positions, map_cost
from maptools.quantization.cimmap.montecarlo import MonteCarloResult, Top1Accuracy, Top1Agreement, monte_carlo
from maptools.quantization.cimmap.sweep import SweepResult, cim_sweep

__all__ = [
    "MapHistograms",
    "MonteCarloResult",
    "SweepResult",
    "Top1Accuracy",
    "Top1Agreement",
    "calibrate_map",
    "cim_sweep",
    "collect_histograms",
    "mac_positions",
    "map_cost",
    "map_weight_slices",
    "monte_carlo",
    "write_map_calibration",
]
