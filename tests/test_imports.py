"""Light loaders: reading and simulating a map, and rejecting bad arguments, import neither torch nor PPQ.

Each check runs in a fresh interpreter and reports which of the heavy modules ended up in ``sys.modules``.
"""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np

from maptools.examples import digits
from maptools.quantization import quantize, simulate

HEAVY = ("torch", "ppq", "torchvision")


def run_python(code: str) -> dict:
    """Run ``code`` in a fresh interpreter; it prints one JSON object, to which the heavy modules loaded are added."""
    script = textwrap.dedent(code) + textwrap.dedent(f"""
        import json as _json, sys as _sys
        result["heavy"] = sorted(m for m in {HEAVY!r} if m in _sys.modules)
        print(_json.dumps(result))
    """)
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300, check=False)
    assert done.returncode == 0, done.stderr[-3000:]
    return json.loads(done.stdout.strip().splitlines()[-1])


def test_reading_and_simulating_a_map_imports_neither_torch_nor_ppq(tmp_path: Path) -> None:
    quantize({"input": list(digits.INPUT_SHAPE)}, "cpu", digits.MODEL_PATH, mapname="d", calib_steps=8,
             analysis_steps=1, mapsave_dir=tmp_path, recipe="fast")
    images, _ = digits.load_split("test")
    np.save(tmp_path / "images.npy", images[:16])
    expected = simulate("d", {"input": images[:16]}, mapsave_dir=tmp_path)["logits"]
    result = run_python(f"""
        import numpy as np
        from maptools.quantization import read_quantinfo, read_quantparams, simulate
        root = {str(tmp_path)!r}
        info, params = read_quantinfo("d", root), read_quantparams("d", root)
        logits = simulate("d", {{"input": np.load(root + "/images.npy")}}, mapsave_dir=root)["logits"]
        np.save(root + "/logits.npy", logits)
        result = {{"operators": len(info), "weights": len(params)}}
    """)
    assert result["heavy"] == []
    assert result["operators"] > 10 and result["weights"] == 18
    assert np.array_equal(np.load(tmp_path / "logits.npy"), expected)


def test_inspect_imports_neither_torch_nor_ppq(tmp_path: Path) -> None:
    quantize({"input": list(digits.INPUT_SHAPE)}, "cpu", digits.MODEL_PATH, mapname="d", calib_steps=8,
             analysis_steps=1, mapsave_dir=tmp_path, recipe="fast")
    result = run_python(f"""
        import contextlib, io
        from maptools.cli import main
        out = io.StringIO()
        with contextlib.redirect_stdout(out):
            code = main(["inspect", "d", "--mapsave-dir", {str(tmp_path)!r}])
        result = {{"code": code, "conv": "/stem/stem.0/Conv" in out.getvalue()}}
    """)
    assert result == {"code": 0, "conv": True, "heavy": []}


def test_cli_argument_errors_come_before_torch(tmp_path: Path) -> None:
    model = str(digits.MODEL_PATH)
    result = run_python(f"""
        import contextlib, io
        from maptools.cli import main
        cases = [["quantize", "missing.onnx", "--input", "x:1,3,8,8", "--mapname", "m"],
                 ["quantize", {model!r}, "--input", "x:1,3,8,8", "--mapname", "m"],
                 ["quantize", {model!r}, "--input", "input:16,1,8,8", "--mapname", "../m"],
                 ["quantize", {model!r}, "--input", "input:16,1,8,8", "--mapname", "m", "--bits", "9"],
                 ["quantize", {model!r}, "--input", "input:16,1,8,8", "--mapname", "m", "--device", "tpu"]]
        codes, errors = [], []
        for argv in cases:
            err = io.StringIO()
            with contextlib.redirect_stderr(err):
                codes.append(main(argv + ["--mapsave-dir", {str(tmp_path)!r}]))
            errors.append(err.getvalue().strip())
        result = {{"codes": codes, "errors": errors}}
    """)
    assert result["heavy"] == [], result
    assert result["codes"] == [2] * 5
    assert result["errors"][0] == ("maptools quantize: error: model: file 'missing.onnx' does not exist; expected an "
                                   ".onnx model file")
    # the command line's options, not quantize's argument names (input_shapes, bit_width...)
    assert "error: --input: names ['x'] are not inputs of the model; its inputs are ['input']" in result["errors"][1]
    # options of the table are checked as they are parsed, named as they were spelled (--bits, the older --bit-width)
    assert "argument --mapname: '../m' contains a path separator" in result["errors"][2]
    assert "argument --bits: expected a bit width from 2 to 8, got 9" in result["errors"][3]
    assert "argument --device: expected 'cpu' or 'cuda', got 'tpu'" in result["errors"][4]
    assert not (tmp_path / "m").exists()


def test_quantize_checks_its_arguments_before_importing_torch(tmp_path: Path) -> None:
    model = str(digits.MODEL_PATH)
    result = run_python(f"""
        from maptools.quantization import quantize
        shapes = {{"input": [16, 1, 8, 8]}}
        cases = [dict(bit_width=9), dict(bit_width="4"), dict(weight_bits=1), dict(mapname="a/b"),
                 dict(mapname=3), dict(device="tpu"), dict(onnx_path="missing.onnx"), dict(calib_steps=0),
                 dict(layer_bits={{"nope": 4}}), dict(observer="median"), dict(recipe="slow"),
                 dict(unsigned_nonnegative="yes"), dict(input_shapes={{"input": [16, 1, 8]}}),
                 dict(setting={{"equalization": True}}), dict(symmetrical=False, unsigned_nonnegative=True)]
        errors = []
        for case in cases:
            kwargs = dict(input_shapes=shapes, device="cpu", onnx_path={model!r}, mapname="m",
                          mapsave_dir={str(tmp_path)!r})
            kwargs.update(case)
            try:
                quantize(**kwargs)
                errors.append(None)
            except Exception as exc:
                errors.append(type(exc).__name__ + ": " + str(exc))
        result = {{"errors": errors}}
    """)
    assert result["heavy"] == [], result
    errors = result["errors"]
    assert all(error is not None for error in errors), errors
    expected_starts = ["InvalidArgumentError: bit_width:", "InvalidTypeError: bit_width:",
                       "InvalidArgumentError: weight_bits:", "InvalidArgumentError: mapname:",
                       "InvalidTypeError: mapname:", "DeviceError: device:", "ModelNotFoundError: onnx_path:",
                       "InvalidArgumentError: calib_steps:", "InvalidArgumentError: layer_bits:",
                       "InvalidArgumentError: observer:", "InvalidArgumentError: recipe:",
                       "InvalidTypeError: unsigned_nonnegative:", "InvalidArgumentError: input_shapes",
                       "InvalidTypeError: setting:", "InvalidArgumentError: unsigned_nonnegative: True needs"]
    for error, start in zip(errors, expected_starts, strict=True):
        assert error.startswith(start), (error, start)
    assert not (tmp_path / "m").exists()


def test_calibration_helpers_are_imported_on_first_use() -> None:
    result = run_python("""
        import maptools.quantization as q
        before = sorted(m for m in ("torch", "ppq") if m in __import__("sys").modules)
        names = dir(q)
        batches = q.random_calibset({"x": [1, 2]}, 2, seed=0)
        result = {"before": before, "listed": "npy_calibset" in names, "shape": list(batches[0]["x"].shape)}
    """)
    assert result == {"before": [], "listed": True, "shape": [1, 2], "heavy": ["torch"]}


def test_no_module_outside_the_engine_imports_ppq() -> None:
    """PPQ is imported by the engine's facade only, when quantize runs: importing every other module, and the
    command line's help and argument errors, leave it unloaded (lowbit, the PPQ-graph API, imports it)."""
    package = Path(__file__).resolve().parents[1] / "maptools"
    names = sorted(".".join(path.relative_to(package.parent).with_suffix("").parts).removesuffix(".__init__")
                   for path in package.rglob("*.py"))
    light = [n for n in names if not n.startswith(("maptools.quantization.engine", "maptools.quantization.lowbit"))
             and not n.endswith("__main__")]  # that one runs the command line
    result = run_python(f"""
        import contextlib, importlib, io
        for name in {light!r}:
            importlib.import_module(name)
        from maptools.cli import main
        codes = []
        for argv in (["--help"], ["quantize", "--help"], ["inspect", "--help"], ["verify", "--help"],
                     ["verify", "missing_map", "--mapsave-dir", "no_such_dir"]):
            with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(io.StringIO()):
                try:
                    codes.append(main(argv))
                except SystemExit as exc:
                    codes.append(exc.code)
        result = {{"codes": codes, "modules": len({light!r})}}
    """)
    assert result["modules"] > 60
    assert result["codes"] == [0, 0, 0, 0, 2]
    assert "ppq" not in result["heavy"], result
