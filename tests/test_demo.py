"""The demo and the digits helpers on a plain install: the bundled split, no scikit-learn."""

from __future__ import annotations

import fnmatch
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from maptools.examples import digits

ROOT = Path(__file__).resolve().parent.parent


def test_demo_runs_without_scikit_learn(tmp_path):
    script = (
        "import sys\n"
        "sys.modules['sklearn'] = None  # any import of scikit-learn fails\n"
        "from maptools.examples import digits\n"
        "from maptools.examples.demo import run_demo\n"
        "images, labels = digits.load_split('test')\n"
        "print(images.shape, labels.shape, labels[:8].tolist())\n"
        f"outcome = run_demo(bits=8, recipe='fast', calib_steps=8, mapsave_dir={str(tmp_path)!r})\n"
        "print('\\n'.join(outcome.lines()))\n"
        "print('loaded:', sorted(m for m in sys.modules if m.split('.')[0] == 'sklearn' and sys.modules[m]))\n"
    )
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    lines = proc.stdout.splitlines()
    assert lines[0] == "(540, 1, 8, 8) (540,) [1, 4, 5, 6, 9, 1, 2, 2]"
    assert lines[1] == "FP32 top-1 on held-out digits: 99.44%"  # the figure of the scikit-learn version
    assert lines[2].startswith("W8A8 top-1 (onnxruntime on quant_model.onnx): ")
    assert lines[-1] == "loaded: []"


def test_bundled_split_is_small_and_packaged():
    tomllib = pytest.importorskip("tomllib")  # Python 3.11+
    assert digits.DATA_PATH.stat().st_size < 100_000
    with np.load(digits.DATA_PATH) as data:
        assert {k: (data[k].shape, data[k].dtype.name) for k in data.files} == {
            "train_images": ((1257, 8, 8), "uint8"), "train_labels": ((1257,), "uint8"),
            "test_images": ((540, 8, 8), "uint8"), "test_labels": ((540,), "uint8")}
    patterns = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]["package-data"]["maptools"]
    for path in (ROOT / "maptools" / "examples" / "data").iterdir():
        relative = str(path.relative_to(ROOT / "maptools"))
        assert any(fnmatch.fnmatch(relative, p) for p in patterns), relative


def test_bundled_split_is_scikit_learns():
    sklearn_datasets = pytest.importorskip("sklearn.datasets")
    from sklearn.model_selection import train_test_split

    data = sklearn_datasets.load_digits()
    images = np.round(data.images.astype(np.float64) * 255.0 / 16).astype(np.uint8)
    x_train, x_test, y_train, y_test = train_test_split(images, data.target, test_size=0.3, random_state=0,
                                                        stratify=data.target)
    for split, x, y in (("train", x_train, y_train), ("test", x_test, y_test)):
        loaded, labels = digits.load_split(split)
        np.testing.assert_array_equal(loaded, ((x[:, None].astype(np.float32) / 255 - 0.5) / 0.5).astype(np.float32))
        np.testing.assert_array_equal(labels, y)
