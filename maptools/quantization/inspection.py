"""What ``maptools inspect`` shows of a map: each quantized operator's bits, scales and integer ranges.

Reading a map imports neither torch nor PPQ (:func:`inspect_map`); :func:`listing_table` and
:func:`listing_json` render it for the command line. A map with ``cim.json`` (or any map given a crossbar)
also gets the crossbar cost of every MAC (:func:`~maptools.quantization.cimmap.mapcost.map_cost`).
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from typing import Any

import numpy as np

from maptools.errors import InvalidTypeError
from maptools.quantization.artifacts import operators_left_in_float, read_map
from maptools.quantization.cim.cost import MapCost
from maptools.quantization.cim.spec import CIMSpec
from maptools.quantization.format import bias_key, weight_key

__all__ = ["MapListing", "cost_table", "inspect_map", "listing_json", "listing_table"]


@dataclass
class MapListing:
    """A map as ``maptools inspect`` lists it.

    Attributes:
        manifest: The map's manifest.
        operators: One row per quantized operator (node, type, bits, scales, integer ranges), in graph order.
        float_operators: The operators of ``quant_model.onnx`` left in float (node, type).
        cim: The compute-in-memory crossbar of a map that stores one (``cim.json``): ``spec`` (the
            :class:`~maptools.quantization.cim.CIMSpec` fields), ``calibrated_macs`` (the MACs with calibrated
            ADC ranges), ``batches`` and ``method`` of the calibration; None for a map without ``cim.json``.
        cost: The crossbar cost of every MAC (the map's crossbar, or the one given to :func:`inspect_map`);
            None for a map without ``cim.json`` inspected without a crossbar.
    """

    manifest: dict[str, Any]
    operators: list[dict[str, Any]]
    float_operators: list[dict[str, str]]
    cim: dict[str, Any] | None = None
    cost: MapCost | None = None


def _range(values: np.ndarray | None) -> list[int] | None:
    if values is None or values.size == 0:
        return None
    return [int(values.min()), int(values.max())]


def _scale_text(scale: object) -> str:
    if scale is None:
        return "-"
    arr = np.asarray(scale, dtype=np.float64).reshape(-1)
    return f"{arr[0]:.4g}" if arr.size == 1 else f"{arr.min():.3g}..{arr.max():.3g}({arr.size})"


def _plain_scale(scale: object) -> float | list[float] | None:
    """A scale as JSON holds it: a number, or a list for per-channel activation scales (format 2.2)."""
    if scale is None or np.ndim(scale) == 0:
        return scale
    return [float(v) for v in np.asarray(scale).reshape(-1)]


def _range_text(values: list[int] | None) -> str:
    return "-" if values is None else f"[{values[0]},{values[1]}]"


def inspect_map(mapname: str, mapsave_dir: str | os.PathLike | None = None, cim: CIMSpec | None = None) -> MapListing:
    """Read a map's records, integers and manifest into a :class:`MapListing`.

    Args:
        mapname: The map.
        mapsave_dir: The mapsave directory.
        cim: A crossbar to cost the map on; None for the map's own (``cim.json``), or no cost without one.

    Raises:
        MapNotFoundError: no such map.
        ArtifactError: a file is missing, modified or unreadable.
        InvalidTypeError: ``cim`` is not a CIMSpec.
    """
    if cim is not None and not isinstance(cim, CIMSpec):
        raise InvalidTypeError(f"cim: got {type(cim).__name__}, expected a CIMSpec or None")
    contents = read_map(mapname, mapsave_dir, complete=True)  # every file of one map, read once
    info, params, manifest = contents.quantinfo, contents.quantparams, contents.manifest
    rows = []
    for name, cfg in info.items():
        first_in = next((t for t in cfg.inputs or [] if t is not None), None)
        first_out = cfg.outputs[0] if cfg.outputs else None
        rows.append({
            "node": name, "op_type": cfg.op_type, "input_bits": cfg.input_bits, "output_bits": cfg.output_bits,
            "input_scale": _plain_scale(cfg.input_scale), "output_scale": _plain_scale(cfg.output_scale),
            "input_range": None if first_in is None else [first_in.qmin, first_in.qmax],
            "output_range": None if first_out is None else [first_out.qmin, first_out.qmax],
            "weight_bits": cfg.weight_bits,
            "weight_scale": None if cfg.weight_scale is None else [float(v) for v in cfg.weight_scale],
            "weight_range": _range(params.get(weight_key(name, cfg.op_type))),
            "bias_range": _range(params.get(bias_key(name, cfg.op_type))),
        })
        if cfg.cim is not None:
            rows[-1]["crossbar_arrays"] = cfg.cim.layout.arrays
    summary = _cim_summary(contents.cim)
    cost = None
    if cim is not None or summary is not None:
        from maptools.quantization.cimmap.mapcost import map_cost

        cost = map_cost(contents, cim)
        by_node = {layer.node: layer for layer in cost.layers}
        for row in rows:
            if row["node"] in by_node:
                row["cim_cost"] = {k: v for k, v in by_node[row["node"]].to_dict().items() if k != "node"}
    floats = operators_left_in_float(mapname, info, contents.quant_model)
    return MapListing(manifest, rows, floats, summary, cost)


def _cim_summary(data: dict[str, Any] | None) -> dict[str, Any] | None:
    """The crossbar of a map's checked ``cim.json``, None when the map has none."""
    if data is None:
        return None
    return {"spec": data.get("spec"), "calibrated_macs": len(data.get("adc", {})), "batches": data.get("batches"),
            "method": data.get("method")}


def listing_json(listing: MapListing) -> str:
    """``maptools inspect --json``: the manifest, the operator rows and the float operators."""
    data = {"manifest": listing.manifest, "operators": listing.operators,
            "float_operators": listing.float_operators, "cim": listing.cim}
    if listing.cost is not None:
        data["cim_cost"] = {k: v for k, v in listing.cost.to_dict().items() if k != "layers"}
    return json.dumps(data, indent=2)


def listing_table(listing: MapListing) -> str:
    """``maptools inspect``: a table of the quantized operators, those left in float, and a summary line."""
    rows, floats, manifest = listing.operators, listing.float_operators, listing.manifest
    width = max([len("node")] + [len(row["node"]) for row in rows])
    header = f"{'node':{width}} {'type':18} {'in':>3} {'out':>3} {'in scale':>10} {'out scale':>10} " \
             f"{'in range':>10} {'out range':>10} {'w':>2} {'w scale':>22} {'w range':>12} {'bias range':>24}"
    lines = [header, "-" * len(header)]
    for row in rows:
        lines.append(f"{row['node']:{width}} {row['op_type'][:18]:18} {row['input_bits'] or '-':>3} "
                     f"{row['output_bits'] or '-':>3} {_scale_text(row['input_scale']):>10} "
                     f"{_scale_text(row['output_scale']):>10} {_range_text(row['input_range']):>10} "
                     f"{_range_text(row['output_range']):>10} {row['weight_bits'] or '-':>2} "
                     f"{_scale_text(row['weight_scale']):>22} {str(row['weight_range'] or '-'):>12} "
                     f"{str(row['bias_range'] or '-'):>24}")
    lines.append(f"\noperators left in float: {len(floats)}")
    if floats:
        float_width = max(len("node"), *(len(f["node"]) for f in floats))
        lines.append(f"{'node':{float_width}} type")
        lines.extend(f"{f['node']:{float_width}} {f['op_type']}" for f in floats)
    settings = manifest.get("settings", {})
    bits = f"W{settings.get('weight_bits')}A{settings.get('activation_bits')}"
    lines.append(f"\n{len(rows)} quantized operators; model {manifest['model']['path']} (sha256 "
                 f"{manifest['model']['sha256'][:12]}); {bits} recipe {settings.get('recipe')}; maptools "
                 f"{manifest['versions'].get('maptools', '?')}, ppq {manifest['versions'].get('ppq', '?')}")
    if listing.cim is not None:
        cim = listing.cim
        text = str(CIMSpec.from_dict(dict(cim["spec"] or {})))
        arrays = sum(row.get("crossbar_arrays", 0) for row in rows)
        calibrated = (f"ADC ranges of {cim['calibrated_macs']} MACs calibrated on {cim['batches']} batches "
                      f"({cim['method']})" if cim["calibrated_macs"] else "no calibrated ADC ranges")
        lines.append(f"CIM crossbar: {text}; {arrays or '-'} arrays; {calibrated} (cim.json)")
    if listing.cost is not None:
        lines.append(cost_table(listing.cost))
    return "\n".join(lines)


def cost_table(cost: MapCost) -> str:
    """The crossbar cost per MAC and its total, per input sample (``maptools inspect``)."""
    width = max([len("node"), len("total")] + [len(layer.node) for layer in cost.layers])
    header = (f"{'node':{width}} {'type':13} {'arrays':>6} {'cells':>9} {'ADC conv':>11} {'DAC drives':>11} "
              f"{'energy nJ':>10} {'ADC %':>5} {'latency us':>10}")
    lines = [f"\nCIM cost per input sample on {cost.spec} (ADC of {cost.layers[0].adc_bits if cost.layers else '-'} "
             f"bits costed; estimates: docs/cim.rst, Cost model)", header, "-" * len(header)]

    def line(name: str, op_type: str, arrays: int, cells: int, conv: int, dac: int, adc_j: float, total_j: float,
             latency: float) -> str:
        share = 100 * adc_j / total_j if total_j else 0.0
        return (f"{name:{width}} {op_type[:13]:13} {arrays:>6} {cells:>9} {conv:>11} {dac:>11} "
                f"{total_j * 1e9:>10.4g} {share:>5.1f} {latency * 1e6:>10.4g}")

    for layer in cost.layers:
        lines.append(line(layer.node, layer.op_type, layer.arrays, layer.weight_cells, layer.adc_conversions,
                          layer.dac_drives, layer.energy_j["adc"], layer.total_energy_j, layer.latency_s))
    lines.append(line("total", "", cost.total("arrays"), cost.total("weight_cells"), cost.total("adc_conversions"),
                      cost.total("dac_drives"), cost.total("adc"), cost.total("energy_j"), cost.total("latency_s")))
    lines.append(f"area {cost.total('area_m2') * 1e6:.4g} mm^2")
    return "\n".join(lines)
