"""Augmentation and QDrop in learned rounding, each on and off, on the bundled mobile digits CNN.

Each configuration quantizes the CNN (``default`` recipe: MSE observer and weight scales, learned rounding of
every layer, 300 steps) from the first ``--images`` training digits, and compares the quantized network with
FP32 on 512 held-out test digits: top-1 agreement and the output SNR. Two seeds each.

* ``augmentation``: W4A8 from 16 digits, ``min_images`` 0 (off) against 64 (48 augmented views added);
* ``qdrop``: W4A4, ``qdrop`` 0 against 0.5, from 256 digits and from 16 (augmented to 64);
* ``scale_bias``: W4A8 from 256 digits, learned rounding of one layer (a depthwise 3x3 and a 1x1 Conv) alone,
  with the per-channel weight-scale search, with the learned bias, and with both; the layer's output MSE
  against FP32 on 256 held-out test digits (nearest rounding for reference);
* ``generalization``: Lite1 W4A8 from 64 calibration crops (of 7 photographs), nearest and learned rounding
  (60 steps per layer, several ways of reconstructing), the SNR against FP32 at seven points along the network on
  32 calibration crops and on 48 evaluation crops of other photographs (needs the corpus);
* ``lite1``: the corpus' EfficientNet-Lite1 at W4A8 from 32 calibration crops, learned rounding of its first
  four layers only (``min_images`` 0 against 64; nearest for reference), each layer's output MSE against FP32
  on 16 held-out crops (needs the corpus, ``make corpus``).

Usage::

    python bench/rounding_ablation.py                 # augmentation and qdrop; one line per run, writes nothing
    python bench/rounding_ablation.py --experiment qdrop --json /tmp/qdrop.json
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
import time
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from maptools.examples import digits  # noqa: E402
from maptools.quantization.engine import LowBitSpec, PPQSession  # noqa: E402
from maptools.quantization.engine.learned_rounding import RoundingSettings  # noqa: E402
from maptools.quantization.engine.recipes import build_setting  # noqa: E402
from maptools.quantization.model import check_input_shapes, load_model, prepare_model  # noqa: E402

MOBILE = digits.MODEL_PATH.parent / "digits_mobile.onnx"
SHAPES = {"input": list(digits.INPUT_SHAPE)}
SEEDS = (0, 1)


def quantized(rounding: RoundingSettings | None, images: int, activation_bits: int) -> PPQSession:
    """The mobile CNN at W4 and ``activation_bits``, calibrated on the first ``images`` training digits."""
    model = load_model(MOBILE)
    proto = prepare_model(model, check_input_shapes(SHAPES, model))
    spec = LowBitSpec(4, activation_bits, observer="mse", unsigned_nonnegative=True, weight_observer="mse")
    session = PPQSession.from_onnx(proto, spec, "cpu", build_setting("default", "cpu", 16))
    train, _ = digits.load_split("train")
    size = min(16, images // 8)  # PPQ calibrates on at least 8 batches
    session.quantize([{"input": torch.from_numpy(train[i:i + size])} for i in range(0, images, size)], rounding)
    return session


def score(session: PPQSession) -> dict[str, float]:
    """Top-1 agreement and SNR (dB) of the quantized output against FP32 on 512 test digits."""
    images = digits.load_split("test")[0][:512]
    name = next(iter(session.graph.outputs))
    feed = {"input": torch.from_numpy(images)}
    got = session.forward(feed, output_names=[name])[name].astype(np.float64)
    ref = session.forward(feed, quantized=False, output_names=[name])[name].astype(np.float64)
    return {"agreement": float(np.mean(got.argmax(1) == ref.argmax(1))),
            "snr_db": float(10 * np.log10(np.sum(ref ** 2) / np.sum((got - ref) ** 2)))}


#: Lite1's first four learnable layers and the variables they reconstruct (after the fused ReLU6).
LITE1_LAYERS = {"/_conv_stem/Conv": "/_swish/Clip_output_0",
                "/_blocks.0/_depthwise_conv/Conv": "/_blocks.0/_swish/Clip_output_0",
                "/_blocks.0/_project_conv/Conv": "/_blocks.0/_project_conv/Conv_output_0",
                "/_blocks.1/_expand_conv/Conv": "/_blocks.1/_swish/Clip_output_0"}


def lite1_layers() -> list[dict]:
    """Lite1 W4A8: each of the first four layers' held-out output MSE, nearest / learned / learned + augmented."""
    sys.path.insert(0, str(ROOT / "bench"))
    from corpus import registry

    model = registry.get("efficientnet_lite1")
    calib = [{k: torch.from_numpy(v) for k, v in f.items()} for f in registry.inputs_for(model, "calib", 32, seed=0)]
    held = [{k: torch.from_numpy(v) for k, v in f.items()} for f in registry.inputs_for(model, "eval", 16, seed=1)]
    rows = []
    for label, rounding in (("nearest", None),
                            ("learned, 32 crops", RoundingSettings(layers=tuple(LITE1_LAYERS), min_images=0)),
                            ("learned, 32 crops + 32 augmented views",
                             RoundingSettings(layers=tuple(LITE1_LAYERS), min_images=64))):
        started = time.perf_counter()
        loaded = load_model(model.path)
        session = PPQSession.from_onnx(prepare_model(loaded, check_input_shapes(model.input_shapes, loaded)),
                                       LowBitSpec(4, 8, observer="mse", unsigned_nonnegative=True,
                                                  weight_observer="mse"), "cpu", build_setting("default", "cpu", 32))
        session.quantize(calib, rounding)
        names = list(LITE1_LAYERS.values())
        errors = []
        for feed in held:
            got = session.forward(feed, output_names=names)
            ref = session.forward(feed, quantized=False, output_names=names)
            errors.append([float(np.mean((got[n].astype(np.float64) - ref[n]) ** 2)) for n in names])
        mse = dict(zip(LITE1_LAYERS, np.mean(errors, 0).tolist(), strict=True))
        seconds = round(time.perf_counter() - started, 1)
        row = {"experiment": "lite1", "run": label, "held_out_mse": mse, "seconds": seconds}
        rows.append(row)
        print(f"Lite1 W4A8, {label}: held-out MSE " + ", ".join(f"{e:.4g}" for e in row["held_out_mse"].values())
              + f", {row['seconds']} s", flush=True)
    return rows


#: The digits CNN's layers of the ``scale_bias`` experiment and the variables they reconstruct (after the activation).
SCALE_BIAS_LAYERS = {"/block2/depthwise/depthwise.0/Conv": "/block2/depthwise/depthwise.2/Mul_output_0",
                     "/block1/expand/expand.0/Conv": "/block1/expand/expand.2/Clip_output_0"}
#: The ``scale_bias`` runs: label and the RoundingSettings fields (500 steps each).
SCALE_BIAS_RUNS = {"rounding alone": {"scale_candidates": 0, "bias_lr": 0.0}, "+ scale search": {"bias_lr": 0.0},
                   "+ learned bias": {"scale_candidates": 0}, "+ both": {}}


def scale_bias() -> list[dict]:
    """Digits W4A8: one layer's held-out output MSE with nearest rounding and each learned-rounding variant."""
    images = {"input": torch.from_numpy(digits.load_split("test")[0][:256])}
    rows = []
    for layer in SCALE_BIAS_LAYERS:
        for label, fields in {"nearest": None, **SCALE_BIAS_RUNS}.items():
            started = time.perf_counter()
            settings = None if fields is None else RoundingSettings(iterations=500, layers=(layer,), **fields)
            session = quantized(settings, 256, 8)
            target = (session.rounding_results[0].target if session.rounding_results
                      else SCALE_BIAS_LAYERS[layer])
            got = session.forward(images, output_names=[target])[target].astype(np.float64)
            ref = session.forward(images, quantized=False, output_names=[target])[target]
            row = {"experiment": "scale_bias", "layer": layer, "run": label,
                   "held_out_mse": float(np.mean((got - ref) ** 2)), "seconds": round(time.perf_counter() - started, 1)}
            rows.append(row)
            print(f"{layer}, {label}: held-out MSE {row['held_out_mse']:.5g}, {row['seconds']} s", flush=True)
    return rows


#: Lite1 variables where the ``generalization`` experiment compares the quantized network with FP32: the ends of
#: blocks 0, 2, 5, 10 and 15 (their projections), the head Conv and the logits.
LITE1_PROBES = ("/_blocks.0/_project_conv/Conv_output_0", "/_blocks.2/_project_conv/Conv_output_0",
                "/_blocks.5/_project_conv/Conv_output_0", "/_blocks.10/_project_conv/Conv_output_0",
                "/_blocks.15/_project_conv/Conv_output_0", "/_conv_head/Conv_output_0", "logits")
#: The ``generalization`` runs: (label, learned rounding's settings or None for nearest) at 60 steps per layer.
GENERALIZATION_RUNS = (("nearest", None),
                       ("learned, sampled positions only", {}),
                       ("learned, linear layers on the quadratic loss", {"quadratic": True}),
                       ("learned, every layer on the quadratic loss", {"quadratic": True,
                                                                       "quadratic_activations": True}),
                       ("learned, depthwise and 1x1 Convs in pairs", {"pairs": True}),
                       ("learned, a pair's biases tuned together", {"pair_biases": True}),
                       ("learned, QDrop at 8-bit activations 0.25", {"qdrop_below_bits": 9, "qdrop": 0.25}),
                       ("learned, QDrop at 8-bit activations 0.5", {"qdrop_below_bits": 9, "qdrop": 0.5}),
                       ("learned, ridge damping 0.3", {"damping": 0.3}),
                       ("learned, ridge damping 1", {"damping": 1.0}))


def _snr_db(session: PPQSession, feeds: list[dict[str, torch.Tensor]], names: tuple[str, ...]) -> list[float]:
    """The SNR (dB) of each of ``names`` against FP32 over ``feeds``."""
    signal, noise = np.zeros(len(names)), np.zeros(len(names))
    for feed in feeds:
        got = session.forward(feed, output_names=list(names))
        ref = session.forward(feed, quantized=False, output_names=list(names))
        for i, name in enumerate(names):
            signal[i] += np.sum(ref[name].astype(np.float64) ** 2)
            noise[i] += np.sum((got[name].astype(np.float64) - ref[name]) ** 2)
    return (10 * np.log10(signal / noise)).round(2).tolist()


def generalization(only: str | None = None) -> list[dict]:
    """Lite1 W4A8 (``default``, learned rounding at 60 steps per layer, 64 calibration crops of 7 photographs):
    the SNR along the network on 32 of the calibration crops and on 48 evaluation crops of other photographs
    (the runs whose label contains one of the comma-separated ``only``, else all)."""
    sys.path.insert(0, str(ROOT / "bench"))
    from corpus import registry

    model = registry.get("efficientnet_lite1")
    calib = [{k: torch.from_numpy(v) for k, v in f.items()} for f in registry.inputs_for(model, "calib", 64, seed=0)]
    held = [{k: torch.from_numpy(v) for k, v in f.items()} for f in registry.inputs_for(model, "eval", 48, seed=1)]
    loaded = load_model(model.path)
    rows = []
    for label, fields in GENERALIZATION_RUNS:
        if only is not None and not any(part and part in label for part in only.split(",")):
            continue
        started = time.perf_counter()
        session = PPQSession.from_onnx(prepare_model(loaded, check_input_shapes(model.input_shapes, loaded)),
                                       LowBitSpec(4, 8, observer="mse", unsigned_nonnegative=True,
                                                  weight_observer="mse"), "cpu", build_setting("default", "cpu", 64))
        session.quantize(calib, None if fields is None else RoundingSettings(iterations=60, depthwise_factor=1,
                                                                             **fields))
        row = {"experiment": "generalization", "run": label, "probes": list(LITE1_PROBES),
               "snr_db_calibration": _snr_db(session, calib[:32], LITE1_PROBES),
               "snr_db_evaluation": _snr_db(session, held, LITE1_PROBES),
               "seconds": round(time.perf_counter() - started, 1)}
        rows.append(row)
        print(f"Lite1 W4A8, {label}: SNR along the network, calibration crops {row['snr_db_calibration']}, "
              f"evaluation crops {row['snr_db_evaluation']}, {row['seconds']} s", flush=True)
    return rows


def configurations(experiment: str) -> list[tuple[str, int, int, dict]]:
    """(label, images, activation bits, RoundingSettings fields) of each run of ``experiment``."""
    if experiment == "augmentation":
        return [(f"W4A8, 16 digits, min_images={m}", 16, 8, {"min_images": m, "qdrop": 0.0}) for m in (0, 64)]
    return [(f"W4A4, {n} digits, qdrop={q}", n, 4, {"qdrop": q}) for n in (256, 16) for q in (0.0, 0.5)]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--experiment",
                        choices=("augmentation", "qdrop", "lite1", "scale_bias", "generalization", "both"),
                        default="both")
    parser.add_argument("--json", default=None, help="write the rows here")
    parser.add_argument("--only", default=None,
                        help="generalization: only the runs whose label contains one of these (comma-separated, e.g. "
                             "'sampled,pairs')")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.WARNING)
    torch.set_num_threads(1)
    experiments = ("augmentation", "qdrop") if args.experiment == "both" else (args.experiment,)
    rows = []
    for experiment in experiments:
        if experiment in ("lite1", "scale_bias", "generalization"):
            rows += {"lite1": lite1_layers, "scale_bias": scale_bias,
                     "generalization": lambda: generalization(args.only)}[experiment]()
            continue
        for label, images, bits, fields in configurations(experiment):
            for seed in SEEDS:
                started = time.perf_counter()
                session = quantized(RoundingSettings(iterations=300, seed=seed, **fields), images, bits)
                row = {"experiment": experiment, "run": label, "seed": seed, **score(session),
                       "seconds": round(time.perf_counter() - started, 1)}
                rows.append(row)
                print(f"{label}, seed {seed}: agreement {row['agreement']:.4f}, SNR {row['snr_db']:.2f} dB, "
                      f"{row['seconds']} s", flush=True)
    if args.json:
        Path(args.json).write_text(json.dumps(rows, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
