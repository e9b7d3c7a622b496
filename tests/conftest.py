"""Shared fixtures: small real models exported here (no downloads) and per-test mapsave directories.

Also how ``pytest -n 2 --dist loadgroup`` (``make test``) spreads the suite over processes: each test file runs
whole on one worker (its module fixtures are built once), the files sharing a session map (:data:`SHARED_MAPS`)
on the same worker, and every worker computes on one thread.
"""

from __future__ import annotations

import contextlib
import signal
import warnings
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import numpy as np
import onnx
import pytest
import torch
from onnx import TensorProto, helper, numpy_helper

from maptools.examples import digits
from maptools.quantization.records import QuantizationResult

#: The session fixtures that quantize a map: the test files using one of them run on one xdist worker, which builds
#: the map once for all of them.
SHARED_MAPS = ("resnet18_maps", "digits_w4a4_mapsave", "digits_cim_map")


def pytest_configure(config: pytest.Config) -> None:
    """On an xdist worker, torch and numpy's BLAS use one thread: the workers already fill the cores."""
    if hasattr(config, "workerinput"):
        from threadpoolctl import threadpool_limits

        torch.set_num_threads(1)
        threadpool_limits(limits=1, user_api="blas")


@pytest.hookimpl(tryfirst=True)
def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """Under ``--dist loadgroup``, mark the tests of files that share a :data:`SHARED_MAPS` map with one group."""
    if not getattr(config.option, "loadgroup", False):  # set on the workers of --dist loadgroup
        return
    files: dict[str, set[str]] = {}  # file -> the shared maps its tests use
    for item in items:
        files.setdefault(item.path.name, set()).update(set(getattr(item, "fixturenames", ())) & set(SHARED_MAPS))
    root: dict[str, str] = {}  # shared map -> another used in the same file (one group for both)

    def group(name: str) -> str:
        while root.get(name, name) != name:
            name = root[name]
        return name

    for maps in files.values():
        first, *others = sorted(maps) or [""]
        for name in others:
            root[group(name)] = group(first)
    for item in items:
        maps = files[item.path.name]
        if maps:
            item.add_marker(pytest.mark.xdist_group(group(min(maps))))


@pytest.hookimpl(optionalhook=True)
def pytest_xdist_make_scheduler(config: pytest.Config, log: Any) -> Any:
    """``--dist loadgroup`` by file: an unmarked test goes with its file (xdist alone would send it anywhere)."""
    if config.getvalue("dist") != "loadgroup":
        return None
    from xdist.scheduler import LoadScopeScheduling

    class FileGroupScheduling(LoadScopeScheduling):
        def _split_scope(self, nodeid: str) -> str:
            if nodeid.rfind("@") > nodeid.rfind("]"):
                return nodeid.split("@")[-1]
            return nodeid.split("::", 1)[0]

    return FileGroupScheduling(config, log)


@pytest.fixture(autouse=True)
def _torch_threads_restored() -> Iterator[None]:
    """A test that changes torch's thread count (the thread tests) leaves it as it found it."""
    threads = torch.get_num_threads()
    yield
    torch.set_num_threads(threads)


def export_onnx(module: torch.nn.Module, example: tuple[torch.Tensor, ...], path: Path, input_names: list[str],
                output_names: list[str], dynamic_batch: bool = False) -> Path:
    """Export a torch module with the legacy (TorchScript) exporter at opset 13."""
    axes = {name: {0: "batch"} for name in input_names + output_names} if dynamic_batch else None
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(module.eval(), example, str(path), input_names=input_names, output_names=output_names,
                          opset_version=13, dynamo=False, dynamic_axes=axes)
    return path


@pytest.fixture(scope="session")
def resnet18_onnx(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """torchvision resnet18 with random weights (weights=None), input 'input' [1,3,224,224]."""
    import torchvision

    torch.manual_seed(0)
    model = torchvision.models.resnet18(weights=None)
    path = tmp_path_factory.mktemp("models") / "resnet18.onnx"
    return export_onnx(model, (torch.randn(1, 3, 224, 224),), path, ["input"], ["output"])


#: The input of :func:`resnet18_onnx`.
R18 = {"input": [1, 3, 224, 224]}


@pytest.fixture(scope="session")
def resnet18_maps(resnet18_onnx: Path, tmp_path_factory: pytest.TempPathFactory) -> Callable[..., QuantizationResult]:
    """Quantized maps of :func:`resnet18_onnx`, each made once per session and shared by the tests reading it.

    Returns ``get(bits=8, symmetrical=True, unsigned=False)``: the :class:`QuantizationResult` of a ``fast``
    map (8 random calibration batches, seed 0, one analysis batch) named ``resnet18_w<b>a<b>[_asym][_unsigned]``,
    in the session's mapsave directory (``result.directory.parent``). Tests must not change the map.
    """
    from maptools.quantization import quantize

    root = tmp_path_factory.mktemp("resnet18_maps")
    made: dict[str, QuantizationResult] = {}

    def get(bits: int = 8, symmetrical: bool = True, unsigned: bool = False) -> QuantizationResult:
        name = f"resnet18_w{bits}a{bits}" + ("" if symmetrical else "_asym") + ("_unsigned" if unsigned else "")
        if name not in made:
            made[name] = quantize(R18, "cpu", resnet18_onnx, mapname=name, calibset=None, calib_steps=8,
                                  bit_width=bits, symmetrical=symmetrical, mapsave_dir=root, recipe="fast",
                                  analysis_steps=1, unsigned_nonnegative=unsigned)
        return made[name]

    return get


class TwoInTwoOut(torch.nn.Module):
    """Two image inputs, two outputs: a shared trunk on the sum and a head per output."""

    def __init__(self) -> None:
        super().__init__()
        self.a = torch.nn.Conv2d(3, 8, 3, padding=1)
        self.b = torch.nn.Conv2d(1, 8, 3, padding=1)
        self.trunk = torch.nn.Conv2d(8, 16, 3, stride=2, padding=1)
        self.head1 = torch.nn.Linear(16, 5)
        self.head2 = torch.nn.Conv2d(16, 4, 1)

    def forward(self, x: torch.Tensor, y: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        t = torch.relu(self.trunk(torch.relu(self.a(x) + self.b(y))))
        return self.head1(t.mean(dim=(2, 3))), self.head2(t)


@pytest.fixture(scope="session")
def two_io_onnx(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A model with inputs 'x' [2,3,16,16], 'y' [2,1,16,16] and outputs 'cls', 'seg' (dynamic batch)."""
    torch.manual_seed(0)
    path = tmp_path_factory.mktemp("models") / "two_io.onnx"
    return export_onnx(TwoInTwoOut(), (torch.randn(2, 3, 16, 16), torch.randn(2, 1, 16, 16)), path,
                       ["x", "y"], ["cls", "seg"], dynamic_batch=True)


@pytest.fixture(scope="session")
def tiny_onnx(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A hand-built Conv -> Relu -> GlobalAveragePool -> Flatten -> Gemm model, input 'input' [N,3,8,8]."""
    rng = np.random.default_rng(0)
    w = numpy_helper.from_array(rng.normal(0, 0.3, (4, 3, 3, 3)).astype(np.float32), "w")
    b = numpy_helper.from_array(rng.normal(0, 0.1, (4,)).astype(np.float32), "b")
    fw = numpy_helper.from_array(rng.normal(0, 0.3, (2, 4)).astype(np.float32), "fw")
    fb = numpy_helper.from_array(rng.normal(0, 0.1, (2,)).astype(np.float32), "fb")
    nodes = [
        helper.make_node("Conv", ["input", "w", "b"], ["c"], name="conv", pads=[1, 1, 1, 1]),
        helper.make_node("Relu", ["c"], ["r"], name="relu"),
        helper.make_node("GlobalAveragePool", ["r"], ["p"], name="pool"),
        helper.make_node("Flatten", ["p"], ["f"], name="flatten"),
        helper.make_node("Gemm", ["f", "fw", "fb"], ["out"], name="fc", transB=1),
    ]
    graph = helper.make_graph(
        nodes, "tiny", [helper.make_tensor_value_info("input", TensorProto.FLOAT, ["N", 3, 8, 8])],
        [helper.make_tensor_value_info("out", TensorProto.FLOAT, ["N", 2])], [w, b, fw, fb])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)])
    model.ir_version = 8
    onnx.checker.check_model(model)
    path = tmp_path_factory.mktemp("models") / "tiny.onnx"
    onnx.save(model, str(path))
    return path


@pytest.fixture(scope="session")
def digits_test() -> tuple[np.ndarray, np.ndarray]:
    """Held-out digits (images, labels)."""
    return digits.load_split("test")


@pytest.fixture(scope="session")
def digits_cim_map(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A mapsave directory holding map ``m``: the digits CNN at W4A4 with a crossbar, so every artifact file exists.

    Made once per session (``fast`` recipe, 8 random calibration batches); tests copy it before changing it.
    """
    from maptools.quantization import quantize
    from maptools.quantization.cim import CIMSpec

    root = tmp_path_factory.mktemp("digits_cim_map")
    quantize({"input": list(digits.INPUT_SHAPE)}, "cpu", digits.MODEL_PATH, mapname="m", calib_steps=8, bit_width=4,
             mapsave_dir=root, recipe="fast", analysis_steps=1, cim=CIMSpec(rows=64, cell_bits=2, adc_bits=6))
    return root


@pytest.fixture(scope="session")
def digits_w4a4_mapsave(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A mapsave directory holding map ``digits_w4a4`` (the digits CNN at W4A4 on 128 training digits, ``fast``).

    Made once per session for the crossbar device, sweep and calibration tests, which only read it.
    """
    from maptools.quantization import quantize

    directory = tmp_path_factory.mktemp("digits_w4a4_mapsave")
    train, _ = digits.load_split("train")
    quantize({"input": list(digits.INPUT_SHAPE)}, "cpu", digits.MODEL_PATH, mapname="digits_w4a4", bit_width=4,
             calibset=[train[i:i + 16] for i in range(0, 128, 16)], calib_steps=8, recipe="fast",
             mapsave_dir=directory, analysis_steps=1)
    return directory


@pytest.fixture
def mapsave(tmp_path: Path) -> Path:
    """A fresh mapsave directory."""
    path = tmp_path / "mapsave"
    path.mkdir()
    return path


@contextlib.contextmanager
def deadline(seconds: float, what: str = "the block") -> Iterator[None]:
    """Raise TimeoutError in this thread after ``seconds``, and every second after until the block ends.

    SIGALRM interrupts a blocking ``open`` or ``read`` (a FIFO), so a reader that hangs fails its test instead of
    stopping the run; the repeats also interrupt a second blocking call after the first was caught.
    """
    def expire(signum: int, frame: Any) -> None:
        raise TimeoutError(f"{what}: still running after {seconds} s (a hang)")

    previous = signal.signal(signal.SIGALRM, expire)
    signal.setitimer(signal.ITIMER_REAL, seconds, 1.0)
    try:
        yield
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, previous)


def write_images(root: Path, mode: str, size: tuple[int, int], per_class: int = 12, classes: int = 2) -> Path:
    """Write an ImageFolder of random PNG images (``mode`` 'RGB' or 'L')."""
    from PIL import Image

    rng = np.random.default_rng(1)
    for c in range(classes):
        folder = root / f"class{c}"
        folder.mkdir(parents=True)
        for i in range(per_class):
            shape = (size[1], size[0], 3) if mode == "RGB" else (size[1], size[0])
            Image.fromarray(rng.integers(0, 256, shape, dtype=np.uint8), mode).save(folder / f"{i}.png")
    return root
