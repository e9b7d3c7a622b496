"""The records maptools writes and returns: plain dataclasses, no PPQ types.

These are the only classes the restricted unpickler of :mod:`maptools.quantization.artifacts` accepts
besides numpy arrays and builtins, so the artifacts stay loadable (and safe to load) without PPQ.
"""

from __future__ import annotations

import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from maptools.quantization.placement import CrossbarPlacement

__all__ = ["ANALYSIS_SAMPLES", "OperatorQuantConfig", "QuantizationResult", "TensorQuant"]

#: Held-out samples the graph-wise error is measured on by default (``analysis_steps=None``). The SNR of a few
#: samples is far from the SNR of many (``bench/analysis_samples.py``, figures in the guide and in
#: ``docs/benchmarks_analysis_samples.json``).
ANALYSIS_SAMPLES = 32


def _fmt_scale(scale: float | np.ndarray | None) -> str:
    if scale is None:
        return "None"
    arr = np.asarray(scale)
    if arr.ndim == 0:
        return f"{float(arr):.6g}"
    return f"[{arr.size} per-channel, {float(arr.min()):.4g}..{float(arr.max()):.4g}]"


@dataclass
class TensorQuant:
    """Quantization of one activation tensor: ``real = scale * (integer - zero_point)``.

    Attributes:
        name: Tensor (ONNX value) name.
        bits: Bit width of the integer representation.
        scale: Quantization step: one float, or with :attr:`axis` a float32 array of one step per channel.
        zero_point: Integer zero point (0 when symmetric): one int, or with :attr:`axis` an int32 array.
        qmin: Smallest integer value.
        qmax: Largest integer value.
        axis: The tensor axis ``scale`` and ``zero_point`` run along (per-channel activation scales, format
            2.2: a tensor read only by depthwise Convs, see :mod:`maptools.quantization.engine.channelwise`);
            None for one scale per tensor. A record whose ``axis`` is None pickles without the field.
    """

    name: str
    bits: int
    scale: float | np.ndarray
    zero_point: int | np.ndarray
    qmin: int
    qmax: int
    axis: int | None = None

    def __getstate__(self) -> dict[str, Any]:
        """The pickled state: every field, ``axis`` only when set (per-tensor records pickle as before 2.2)."""
        state = dict(self.__dict__)
        if state.get("axis") is None:
            state.pop("axis", None)
        return state

    def __setstate__(self, state: dict[str, Any]) -> None:
        """Fields from a pickle (``axis`` None when the record has none); names interned as pickle's own
        ``BUILD`` does, so a map read and written again pickles to the same bytes."""
        self.__dict__.update({"axis": None, **{sys.intern(k): v for k, v in state.items()}})

    @property
    def per_channel(self) -> bool:
        """Whether the tensor has one scale per channel along :attr:`axis`."""
        return self.axis is not None

    @property
    def step(self) -> float | np.ndarray:
        """The real value of one integer step (same as :attr:`scale`)."""
        return self.scale


#: The fields older maps held as copies of the first quantized input (read from ``inputs`` now).
_INPUT_COPIES = ("input_bits", "input_scale", "input_zero_point")


@dataclass
class OperatorQuantConfig:
    """Quantization settings of one operator, as stored in ``quantinfo.pkl``.

    ``quantinfo.pkl`` maps the ONNX node name of the input model to one of these. Integer tensors
    relate to real ones by ``real = scale * (integer - zero_point)``.

    Attributes:
        name: ONNX node name in the input model.
        op_type: ONNX operator type (``Conv``, ``Gemm``, ``Relu``...).
        output_bits: Bit width of the output activation, None if it is not quantized: a ``Conv``/``Gemm``
            whose output feeds an activation fused into it that is not a clip (``Sigmoid``, ``HardSwish``,
            ``x * HardSigmoid(x)``...) hands its accumulator to that activation, and the tensors inside the
            activation are never integers (a fused ``Relu``/``Clip`` output is recorded on the MAC, exact).
        output_scale: Scale of the output activation (an array when per channel, as its ``outputs[0]``).
        output_zero_point: Zero point of the output activation (an array when per channel).
        io_bits: Activation bit width of this operator (input and output).
        io_min: Smallest integer an activation of this operator may take.
        io_max: Largest integer an activation of this operator may take.
        symmetric: Whether activations are quantized symmetrically (zero point 0).
        inputs: Quantization of every input, in ONNX input order (None where not quantized and at the
            weight and bias positions, whose quantization is in the ``weight_*`` and ``bias_*`` fields).
        outputs: Quantization of every output, in ONNX output order (None where not quantized).
        weight_bits: Weight bit width (Conv, ConvTranspose, Gemm, MatMul with constant weight).
        weight_min: Smallest integer weight value allowed.
        weight_max: Largest integer weight value allowed.
        weight_scale: Weight scale: an array with one entry per output channel when per-channel,
            else a one-element array.
        weight_axis: The weight axis that ``weight_scale`` runs along (the output channel axis).
        bias_bits: Bias bit width (32) when the operator has a bias.
        bias_scale: Bias scale, ``input_scale * weight_scale``.
        cim: For a crossbar MAC of a map quantized with ``cim=`` (format 2.1), its place on the crossbars
            (:class:`~maptools.quantization.placement.CrossbarPlacement`): the tile layout, the ADC gains of
            every (row tile, weight slice, input plane) and the ``quantparams.pkl`` keys of its weight slices
            and requantization multipliers, the spec and ADC ranges being in ``cim.json`` (see :doc:`/cim`);
            None otherwise. It pickles as plain data (:meth:`CrossbarPlacement.to_dict
            <maptools.quantization.placement.CrossbarPlacement.to_dict>`), checked back into its type when a
            record is unpickled. A record whose ``cim`` is None pickles without the field, and records of 1.x
            maps load with ``cim`` None.
    """

    name: str
    op_type: str
    output_bits: int | None = None
    output_scale: float | np.ndarray | None = None
    output_zero_point: int | np.ndarray = 0
    io_bits: int | None = None
    io_min: int | None = None
    io_max: int | None = None
    symmetric: bool = True
    inputs: list[TensorQuant | None] = field(default_factory=list)
    outputs: list[TensorQuant | None] = field(default_factory=list)
    weight_bits: int | None = None
    weight_min: int | None = None
    weight_max: int | None = None
    weight_scale: np.ndarray | None = None
    weight_axis: int | None = None
    bias_bits: int | None = None
    bias_scale: np.ndarray | None = None
    cim: CrossbarPlacement | None = None

    def __getstate__(self) -> dict[str, Any]:
        """The pickled state: every field, ``cim`` as plain data and only when set (maps without CIM pickle no
        such field)."""
        state = dict(self.__dict__)
        cim = state.get("cim")
        if cim is None:
            state.pop("cim", None)
        elif isinstance(cim, CrossbarPlacement):
            state["cim"] = cim.to_dict()
        return state

    def __setstate__(self, state: dict[str, Any]) -> None:
        """Fields from a pickle; the ``input_*`` copies of the first quantized input that older maps hold are
        dropped (:attr:`input_bits` and the others read ``inputs``), and ``cim`` is checked into its type.

        Raises:
            ArtifactError: the ``cim`` data is not a placement (naming the record and the key).
        """
        state = {sys.intern(k): v for k, v in state.items() if k not in _INPUT_COPIES}
        if state.get("cim") is not None:
            state["cim"] = CrossbarPlacement.from_dict(state["cim"], f"record {state.get('name')!r}: field 'cim'")
        self.__dict__.update(state)

    @property
    def first_input(self) -> TensorQuant | None:
        """The first quantized activation input (None when no input is quantized)."""
        return next((tq for tq in self.inputs if tq is not None), None)

    @property
    def input_bits(self) -> int | None:
        """Bit width of the first quantized activation input, None if none is."""
        first = self.first_input
        return None if first is None else first.bits

    @property
    def input_scale(self) -> float | np.ndarray | None:
        """Scale of the first quantized activation input."""
        first = self.first_input
        return None if first is None else first.scale

    @property
    def input_zero_point(self) -> int | np.ndarray:
        """Zero point of the first quantized activation input (0 when none is)."""
        first = self.first_input
        return 0 if first is None else first.zero_point

    @property
    def has_weight(self) -> bool:
        """True for operators with a constant, quantized weight."""
        return self.weight_scale is not None

    def __repr__(self) -> str:
        parts = [
            f"{self.op_type} {self.name!r}",
            f"in={self.input_bits}b@{_fmt_scale(self.input_scale)}",
            f"out={self.output_bits}b@{_fmt_scale(self.output_scale)}",
            f"io=[{self.io_min},{self.io_max}]",
        ]
        if not self.symmetric:
            parts.append(f"zp(in={self.input_zero_point},out={self.output_zero_point})")
        if self.has_weight:
            parts.append(
                f"w={self.weight_bits}b[{self.weight_min},{self.weight_max}]@{_fmt_scale(self.weight_scale)}"
            )
        if self.bias_bits is not None:
            parts.append(f"bias={self.bias_bits}b")
        return "OperatorQuantConfig(" + ", ".join(parts) + ")"


@dataclass
class QuantizationResult:
    """What :func:`maptools.quantization.quantize` returns.

    Attributes:
        mapname: The map name.
        directory: ``<mapsave>/<mapname>``, where the files were written.
        quantinfo_path: Path of ``quantinfo.pkl``.
        quantparams_path: Path of ``quantparams.pkl``.
        model_path: Path of ``quant_model.onnx``.
        manifest_path: Path of ``manifest.json``.
        operators: Per-operator summary: node name -> its :class:`OperatorQuantConfig`.
        output_snr_db: Graph-wise error: SNR in dB of each graph output, quantized vs FP32, on
            calibration data.
        output_cosine: Cosine similarity of each graph output, quantized vs FP32.
        layer_snr_db: SNR in dB of every quantized operator's output, quantized vs FP32.
        seconds: Wall time of the whole call.
        report_path: Path of ``report.json`` (settings, timings, per-operator error).
        plot_path: Path of ``report.png`` (the worst operators' SNR and the SNR along the graph).
        warnings: Outputs (or parts of outputs) that are too noisy or collapsed, with the operators to blame
            (see :mod:`maptools.quantization.diagnostics`).
        analysis_data: What the errors were measured on: ``'held-out'`` (calibset batches after the first
            ``calib_steps``), ``'evalset'``, ``'random (held-out)'`` or ``'in-sample'`` (the calibration
            batches themselves, which overstates the accuracy).
        part_snr_db: Outputs built by a final Concat -> each part's SNR in dB.
        cim_path: Path of ``cim.json`` for a map quantized with ``cim=``, else None.
        analysis_samples: Samples the errors were measured on.
        float_operators: The operators left in float, in graph order: ``{"node", "op_type", "reason"}``
            (see :mod:`maptools.quantization.floatops`).
    """

    mapname: str
    directory: Path
    quantinfo_path: Path
    quantparams_path: Path
    model_path: Path
    manifest_path: Path
    operators: dict[str, OperatorQuantConfig]
    output_snr_db: dict[str, float]
    output_cosine: dict[str, float]
    layer_snr_db: dict[str, float] = field(default_factory=dict)
    seconds: float = 0.0
    report_path: Path | None = None
    plot_path: Path | None = None
    warnings: list[str] = field(default_factory=list)
    analysis_data: str = "in-sample"
    part_snr_db: dict[str, dict[str, float]] = field(default_factory=dict)
    cim_path: Path | None = None
    float_operators: list[dict[str, str]] = field(default_factory=list)
    analysis_samples: int = 0

    @property
    def files(self) -> list[Path]:
        """Every file written in :attr:`directory`.

        The three artifacts for the mapper, ``ppq_state.json``, the report (``report.json``, ``report.png``),
        ``cim.json`` (with ``cim=``) and ``manifest.json``, in that order.
        """
        from maptools.quantization.format import PPQSTATE

        paths = [self.quantinfo_path, self.quantparams_path, self.model_path, self.directory / PPQSTATE,
                 self.report_path, self.plot_path, self.cim_path, self.manifest_path]
        return [path for path in paths if path is not None]

    def summary(self) -> str:
        """A few human-readable lines: every file written and the output error."""
        from maptools.quantization.floatops import float_blocks, float_lines

        lines = [f"map {self.mapname!r} in {self.directory}"]
        lines += [f"  LEFT IN FLOAT: {line}" for line in float_blocks(self.float_operators)]
        for path in self.files:
            lines.append(f"  {path}")
        samples = f", {self.analysis_samples} samples" if self.analysis_samples else ""
        for name, snr in self.output_snr_db.items():
            lines.append(f"  output {name}: SNR {snr:.2f} dB, cosine {self.output_cosine[name]:.5f} "
                         f"({self.analysis_data} data{samples})")
            for part, part_snr in self.part_snr_db.get(name, {}).items():
                lines.append(f"    part {part}: SNR {part_snr:.2f} dB")
        if 0 < self.analysis_samples < ANALYSIS_SAMPLES:
            lines.append(f"  NOTE: the error was measured on only {self.analysis_samples} samples; the SNR of so few "
                         f"can be several dB from that of many: measure on {ANALYSIS_SAMPLES} or more (more held-out "
                         "data, more analysis steps)")
        lines += [f"  {line}" for line in float_lines(self.float_operators)]
        lines += [f"  WARNING: {warning}" for warning in self.warnings]
        return "\n".join(lines)
