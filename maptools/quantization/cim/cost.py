"""What a layer costs on crossbars: counts of arrays, cells, ADC conversions and DAC drives, and estimates.

A chip team sizes a design by its ADC conversions and energy, not by BitOps; the counts here are derived from
the tile layout the simulation uses (:func:`~maptools.quantization.cim.tiles.tile_layout`,
:func:`~maptools.quantization.cim.arithmetic.input_format`), so they describe the crossbar the arithmetic models.
Numpy only; :mod:`~maptools.quantization.cimmap.mapcost` counts the output positions of a map's MACs. Every
formula, the parameters and their sources: :doc:`/cim`, "Cost model".
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from maptools.errors import InvalidArgumentError, InvalidTypeError
from maptools.quantization.cim.arithmetic import input_format
from maptools.quantization.cim.spec import CIMSpec
from maptools.quantization.cim.tiles import TileLayout

__all__ = ["COUNT_FIELDS", "ENERGY_PARTS", "CIMCostParams", "LayerCost", "MapCost", "adc_area", "adc_energy",
           "adc_latency", "cell_read_energy", "cost_adc_bits", "layer_cost"]

#: The per-sample counts of :class:`LayerCost`, in the order they are listed.
COUNT_FIELDS: tuple[str, ...] = ("arrays", "weight_cells", "adc_conversions", "array_cycles", "dac_drives",
                                 "cell_reads", "shift_adds", "buffer_bits")
#: The parts of a layer's energy estimate, in :attr:`LayerCost.energy_j`.
ENERGY_PARTS: tuple[str, ...] = ("adc", "cell", "dac", "shift_add", "buffer")


@dataclass(frozen=True)
class CIMCostParams:
    """Per-component parameters of the cost estimates (SI units: joules, seconds, watts, ohms, square metres).

    Defaults: DNN+NeuroSim V1.3 (X. Peng, S. Huang, Y. Luo, X. Sun, S. Yu, "DNN+NeuroSim: An End-to-End
    Benchmarking Framework for Compute-in-Memory Accelerators with Versatile Device Technologies", IEDM 2019;
    github.com/neurosim/DNN_NeuroSim_V1.3, ``Param.cpp`` and ``SarADC.cpp``) at its default 22 nm LSTP node with
    1T1R RRAM, and M. Horowitz, "Computing's energy problem (and what we can do about it)", ISSCC 2014
    (45 nm) for the digital side; ``dac_j`` and ``transistor_area_m2`` are assumptions (see :doc:`/cim`).

    Attributes:
        adc_power_per_bit_w: ``p1`` of the SAR ADC power ``p1 * A + p0`` (NeuroSim ``SarADC.cpp``, 22 nm LP:
            0.538 uW per bit).
        adc_power_base_w: ``p0`` (0.538 A + 4.3753 uW: 4.3753 uW).
        adc_time_per_bit_s: ``t_bit``: a SAR conversion takes ``(A + 1) * t_bit`` (NeuroSim: 1 ns).
        adc_walden_fom_j: None for the SAR model; else a Walden figure of merit, ``E_ADC = FOM * 2^A``.
        column_power_w_ohm: ``k``: a column of resistance ``R`` read at 0.5 V draws ``k / R`` watts while its
            ADC converts (NeuroSim ``SarADC.cpp``, 22 nm LP: 0.072341 * exp(-2.303 log10 R) ~ 0.072341 / R).
        read_voltage_v: Cell read voltage (NeuroSim ``readVoltage``: 0.5 V; the column power scales with it
            as NeuroSim scales ``R`` by ``0.5 / V``).
        read_pulse_s: Read pulse, one array cycle (``readPulseWidth``: 10 ns).
        r_on_ohm: On resistance (``resistanceOn``: 6 kOhm).
        r_off_ohm: Off resistance (``resistanceOff``: 6 kOhm * 150).
        dac_j: Energy of driving one row for one plane of one DAC level (assumed 20 fJ: a word line of about
            20 fF at 1 V); a ``d``-bit DAC costs ``2^d - 1`` times.
        shift_add_j: One shift-and-add of an ADC code into the accumulator (Horowitz: a 32-bit add, 0.1 pJ).
        buffer_bit_j: One bit read from or written to the SRAM buffer (Horowitz: 10 pJ per 64-bit read of
            an 8 KB SRAM, 0.156 pJ per bit).
        columns_per_adc: Columns sharing one ADC (NeuroSim ``numColMuxed``: 8).
        cell_area_m2: One cell (NeuroSim 1T1R: 4 F x 12 F with F = 40 nm, 0.0768 um^2).
        transistor_area_m2: One ADC transistor with its wiring (assumed 0.05 um^2 at 22 nm).
    """

    adc_power_per_bit_w: float = 0.538e-6
    adc_power_base_w: float = 4.3753e-6
    adc_time_per_bit_s: float = 1e-9
    adc_walden_fom_j: float | None = None
    column_power_w_ohm: float = 0.072341
    read_voltage_v: float = 0.5
    read_pulse_s: float = 10e-9
    r_on_ohm: float = 6e3
    r_off_ohm: float = 6e3 * 150
    dac_j: float = 20e-15
    shift_add_j: float = 0.1e-12
    buffer_bit_j: float = 10e-12 / 64
    columns_per_adc: int = 8
    cell_area_m2: float = 4 * 12 * (40e-9) ** 2
    transistor_area_m2: float = 0.05e-12

    def __post_init__(self) -> None:
        for field in dataclasses.fields(self):
            value = getattr(self, field.name)
            if field.name == "adc_walden_fom_j" and value is None:
                continue
            kind = "an integer >= 1" if field.name == "columns_per_adc" else "a positive finite number"
            if isinstance(value, bool) or not isinstance(value, int | float):
                raise InvalidTypeError(f"CIMCostParams.{field.name}: got {value!r} ({type(value).__name__}), "
                                       f"expected {kind}")
            bad = (not isinstance(value, int) or value < 1) if field.name == "columns_per_adc" \
                else not (math.isfinite(value) and value > 0)
            if bad:
                raise InvalidArgumentError(f"CIMCostParams.{field.name}: got {value!r}, expected {kind}")

    def replace(self, **changes: Any) -> CIMCostParams:
        """A copy with some fields changed (validated like a new one)."""
        return dataclasses.replace(self, **changes)

    def to_dict(self) -> dict[str, Any]:
        """The fields as a JSON-serializable dict."""
        return dataclasses.asdict(self)


#: The widest conversion costed: an ideal ADC is costed at the spec's lossless bits, up to 32 on the largest arrays.
MAX_COSTED_ADC_BITS = 32


def _check_bits(bits: int) -> int:
    if isinstance(bits, bool) or not isinstance(bits, int) or not 1 <= bits <= MAX_COSTED_ADC_BITS:
        raise InvalidArgumentError(f"adc_bits: got {bits!r}, expected an integer in 1..{MAX_COSTED_ADC_BITS}")
    return bits


def adc_energy(bits: int, params: CIMCostParams | None = None) -> float:
    """Joules of one ``bits``-bit conversion: ``(p1 * A + p0) * (A + 1) * t_bit``, or ``FOM * 2^A`` (Walden)."""
    p = params or CIMCostParams()
    bits = _check_bits(bits)
    if p.adc_walden_fom_j is not None:
        return p.adc_walden_fom_j * 2.0 ** bits
    return (p.adc_power_per_bit_w * bits + p.adc_power_base_w) * adc_latency(bits, p)


def adc_latency(bits: int, params: CIMCostParams | None = None) -> float:
    """Seconds of one SAR conversion, ``(A + 1) * t_bit`` (a bit per cycle plus sampling)."""
    p = params or CIMCostParams()
    return (_check_bits(bits) + 1) * p.adc_time_per_bit_s


def adc_area(bits: int, params: CIMCostParams | None = None) -> float:
    """Square metres of one SAR ADC: NeuroSim's ``269 + 109 (A-1)`` NMOS and ``209 + 73 (A-1)`` PMOS transistors."""
    p = params or CIMCostParams()
    bits = _check_bits(bits)
    return p.transistor_area_m2 * ((269 + 109 * (bits - 1)) + (209 + 73 * (bits - 1)))


def cell_read_energy(bits: int, params: CIMCostParams | None = None) -> float:
    """Joules of one cell read, at the mean of its levels, while a ``bits``-bit ADC converts its column.

    ``k * (V_read / 0.5 V) * (G_on + G_off) / 2 * t_ADC(A)``: NeuroSim's column term, split over the cells
    whose conductances add up to the column's.
    """
    p = params or CIMCostParams()
    mean_conductance = (1.0 / p.r_on_ohm + 1.0 / p.r_off_ohm) / 2.0
    return p.column_power_w_ohm * (p.read_voltage_v / 0.5) * mean_conductance * adc_latency(bits, p)


def cost_adc_bits(spec: CIMSpec) -> int:
    """The ADC bits costed for ``spec``: its ``adc_bits``, or the lossless width for an ideal ADC."""
    return spec.lossless_adc_bits if spec.adc_bits is None else spec.adc_bits


@dataclass(frozen=True)
class LayerCost:
    """The cost of one crossbar MAC per input sample (the counts and formulas of the module docstring).

    Attributes:
        node: The node name.
        op_type: The operator type.
        positions: Output positions per sample ``N``.
        input_planes: ``P``.
        adc_bits: The ADC bits costed (:func:`cost_adc_bits`).
        arrays, weight_cells, adc_conversions, array_cycles, dac_drives, cell_reads, shift_adds, buffer_bits:
            The counts (:data:`COUNT_FIELDS`).
        energy_j: Joules per part (:data:`ENERGY_PARTS`).
        latency_s: Seconds per sample.
        area_m2: Square metres of its arrays and their ADCs.
    """

    node: str
    op_type: str
    positions: int
    input_planes: int
    adc_bits: int
    arrays: int
    weight_cells: int
    adc_conversions: int
    array_cycles: int
    dac_drives: int
    cell_reads: int
    shift_adds: int
    buffer_bits: int
    energy_j: dict[str, float]
    latency_s: float
    area_m2: float

    @property
    def total_energy_j(self) -> float:
        """The sum of :attr:`energy_j`."""
        return float(sum(self.energy_j.values()))

    def to_dict(self) -> dict[str, Any]:
        """A JSON-serializable dict (the energy parts and their total under ``energy_j``)."""
        data = dataclasses.asdict(self)
        data["energy_j"] = {**self.energy_j, "total": self.total_energy_j}
        return data


def layer_cost(layout: TileLayout, *, input_bits: int, positions: int, params: CIMCostParams | None = None,
               output_bits: int | None = None, node: str = "") -> LayerCost:
    """The cost of one MAC with layout ``layout`` (see the module docstring for every formula).

    Args:
        layout: The MAC's :func:`~maptools.quantization.cim.tiles.tile_layout` (it carries the spec).
        input_bits: Input bit width ``a``.
        positions: Output positions per input sample ``N`` (>= 1).
        params: The component parameters (default :class:`CIMCostParams`).
        output_bits: Output bit width written to the buffer (default ``input_bits``).
        node: The node name reported.

    Raises:
        InvalidArgumentError: ``positions`` below 1, or bit widths out of range.
    """
    p = params or CIMCostParams()
    if not isinstance(layout, TileLayout):
        raise InvalidTypeError(f"layout: got {type(layout).__name__}, expected a TileLayout (tile_layout)")
    if isinstance(positions, bool) or not isinstance(positions, int) or positions < 1:
        raise InvalidArgumentError(f"positions: got {positions!r}, expected an integer >= 1")
    out_bits = input_bits if output_bits is None else output_bits
    if isinstance(out_bits, bool) or not isinstance(out_bits, int) or not 1 <= out_bits <= 32:
        raise InvalidArgumentError(f"output_bits: got {output_bits!r}, expected an integer in 1..32")
    spec, fmt = layout.spec, layout.format
    row_tiles, slices, planes = layout.row_tiles, fmt.slices, input_format(input_bits, False, spec).planes
    g, m, k, u = layout.groups, layout.out_channels, layout.depth, layout.col_tiles
    columns = g * m * fmt.signs * slices  # used columns of one row tile
    conversions = positions * columns * row_tiles * planes
    cycles = positions * layout.num_arrays * planes
    dac = positions * g * k * u * planes
    cell_reads = positions * layout.used_cells * planes
    buffer_bits = positions * g * (k * input_bits + m * out_bits)
    bits = cost_adc_bits(spec)
    energy = {
        "adc": conversions * adc_energy(bits, p),
        "cell": cell_reads * cell_read_energy(bits, p),
        "dac": dac * p.dac_j * (2 ** spec.dac_bits - 1),
        "shift_add": conversions * p.shift_add_j,
        "buffer": buffer_bits * p.buffer_bit_j,
    }
    latency = positions * planes * (p.read_pulse_s + p.columns_per_adc * adc_latency(bits, p))
    area = layout.num_arrays * (spec.rows * spec.cols * p.cell_area_m2
                                + math.ceil(spec.cols / p.columns_per_adc) * adc_area(bits, p))
    return LayerCost(node=node, op_type=layout.op_type, positions=positions, input_planes=planes, adc_bits=bits,
                     arrays=layout.num_arrays, weight_cells=layout.used_cells, adc_conversions=conversions,
                     array_cycles=cycles, dac_drives=dac, cell_reads=cell_reads, shift_adds=conversions,
                     buffer_bits=buffer_bits, energy_j=energy, latency_s=latency, area_m2=area)


@dataclass(frozen=True)
class MapCost:
    """The cost of every crossbar MAC of a map per input sample, and the totals (sums over the layers).

    Attributes:
        spec: The crossbar.
        params: The component parameters.
        layers: One :class:`LayerCost` per crossbar MAC, in graph order.
        samples: The input samples the positions were counted on (the per-sample counts are divided by it).
    """

    spec: CIMSpec
    params: CIMCostParams
    layers: Sequence[LayerCost]
    samples: int = 1

    def total(self, name: str) -> float:
        """The sum over the layers of a count, ``'latency_s'``, ``'area_m2'``, ``'energy_j'`` or an energy part."""
        if name == "energy_j":
            return float(sum(layer.total_energy_j for layer in self.layers))
        if name in ENERGY_PARTS:
            return float(sum(layer.energy_j[name] for layer in self.layers))
        if name in (*COUNT_FIELDS, "latency_s", "area_m2"):
            return sum(getattr(layer, name) for layer in self.layers)
        raise InvalidArgumentError(f"name: got {name!r}, expected one of {', '.join(COUNT_FIELDS)}, latency_s, "
                                   f"area_m2, energy_j, {', '.join(ENERGY_PARTS)}")

    def totals(self) -> dict[str, Any]:
        """Every count, the energy parts and their total, the latency and the area, summed over the layers."""
        data: dict[str, Any] = {name: self.total(name) for name in COUNT_FIELDS}
        data["energy_j"] = {**{part: self.total(part) for part in ENERGY_PARTS}, "total": self.total("energy_j")}
        data.update(latency_s=self.total("latency_s"), area_m2=self.total("area_m2"))
        return data

    def to_dict(self) -> dict[str, Any]:
        """A JSON-serializable dict: ``spec``, ``params``, ``samples``, ``per`` (what a count is of),
        ``totals`` and ``layers``."""
        return {"spec": self.spec.to_dict(), "params": self.params.to_dict(), "samples": self.samples,
                "per": "input sample", "totals": self.totals(), "layers": [layer.to_dict() for layer in self.layers]}
