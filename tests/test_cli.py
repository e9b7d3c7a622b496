"""The `maptools` command line, run in-process through ``maptools.cli.main`` and once as a subprocess."""

from __future__ import annotations

import argparse
import json
import subprocess
import sys

import numpy as np
import onnx
import pytest
from conftest import write_images
from PIL import Image

from maptools.cli import main
from maptools.quantization import read_quantinfo


@pytest.fixture
def calib_npy(tmp_path):
    folder = tmp_path / "npy"
    folder.mkdir()
    rng = np.random.default_rng(0)
    for i in range(16):  # single samples, stacked into batches of 2
        np.save(folder / f"{i:02d}.npy", rng.normal(size=(3, 8, 8)).astype(np.float32))
    return folder


@pytest.mark.parametrize("source", ["random", "calib-dir", "calib-npy"])
def test_quantize_sources(source, tiny_onnx, tmp_path, calib_npy, capsys):
    mapsave = tmp_path / "mapsave"
    args = ["quantize", str(tiny_onnx), "--input", "input:2,3,8,8", "--mapname", "cli", "--bits", "4",
            "--calib-steps", "8", "--mapsave-dir", str(mapsave), "--recipe", "fast"]
    if source == "calib-dir":
        args += ["--calib-dir", str(write_images(tmp_path / "images", "RGB", (8, 8), per_class=8))]
    elif source == "calib-npy":
        args += ["--calib-npy", str(calib_npy)]
    layerwise = source == "random"
    if layerwise:
        args += ["--layerwise-analysis"]
    assert main(args) == 0
    out = capsys.readouterr().out
    for name in ("quantinfo.pkl", "quantparams.pkl", "quant_model.onnx"):
        assert str(mapsave / "cli" / name) in out
    manifest = json.loads((mapsave / "cli" / "manifest.json").read_text())
    assert manifest["settings"]["calibration"] == ("random" if source == "random" else "user")
    assert manifest["settings"]["weight_bits"] == 4
    assert manifest["settings"]["layerwise_analysis"] is layerwise
    report = json.loads((mapsave / "cli" / "report.json").read_text())
    assert [op["node"] for op in report["operators"]] == list(read_quantinfo("cli", mapsave))
    # the layer-wise (one operator quantized alone) figures are opt-in
    assert all(("layerwise_snr_db" in op and "layerwise_cosine" in op) is layerwise for op in report["operators"])
    png = Image.open(mapsave / "cli" / "report.png")
    assert png.format == "PNG" and png.size[0] > 300


@pytest.mark.slow
def test_inspect_lists_every_conv(resnet18_onnx, resnet18_maps, capsys):
    # the shared map of `maptools quantize resnet18.onnx --bits 4 --calib-steps 8 --recipe fast`
    result = resnet18_maps(4)
    mapsave, mapname = str(result.directory.parent), result.mapname
    assert main(["inspect", mapname, "--mapsave-dir", mapsave]) == 0
    table = capsys.readouterr().out
    convs = [n.name for n in onnx.load(str(resnet18_onnx)).graph.node if n.op_type == "Conv"]
    lines = table.splitlines()
    for name in convs:
        assert any(line.startswith(name + " ") and " Conv " in line for line in lines), name
    assert main(["inspect", mapname, "--json", "--mapsave-dir", mapsave]) == 0
    parsed = json.loads(capsys.readouterr().out)
    rows = {row["node"]: row for row in parsed["operators"]}
    assert set(convs) <= set(rows)
    assert all(rows[c]["weight_range"][0] >= -8 and rows[c]["weight_range"][1] <= 7 for c in convs)
    assert all(rows[c]["output_range"] == [-8, 7] for c in convs)  # the fast recipe keeps signed ranges
    assert "out range" in lines[0] and all("[-8,7]" in line for line in lines[2:2 + len(convs)])
    assert parsed["manifest"]["settings"]["weight_bits"] == 4


def test_report_lists_every_operator_and_the_worst(tiny_onnx, tmp_path):
    from maptools.quantization import quantize

    result = quantize({"input": [2, 3, 8, 8]}, "cpu", tiny_onnx, mapname="rep", calib_steps=8,
                      mapsave_dir=tmp_path, recipe="fast", layerwise_analysis=True)
    report = json.loads(result.report_path.read_text())
    assert len(report["operators"]) == len(result.operators) == 5
    assert all(isinstance(op["snr_db"], (float, str)) and -1.0 <= op["cosine"] <= 1.0 for op in report["operators"])
    # layer-wise: one operator quantized alone costs less than all of them together
    out_snr = result.output_snr_db["out"]
    assert all(op["layerwise_snr_db"] >= out_snr - 1.0 and -1.0 <= op["layerwise_cosine"] <= 1.0
               for op in report["operators"])
    assert set(report["timings_seconds"]) >= {"ppq_quantization", "error_analysis"}
    # the figure's left panel: every operator here (fewer than 30), lowest SNR first
    by_snr = sorted(report["operators"], key=lambda op: float(op["snr_db"]))
    assert report["worst_operators"] == [op["node"] for op in by_snr]
    assert Image.open(result.plot_path).size == (1200, 700)


def test_report_figure_has_a_fixed_size_for_any_network():
    import io
    import math

    from maptools.quantization.report import WORST_SHOWN, render_report

    names = [f"/backbone/stage{i // 40}/block{i % 40}/conv/Conv" for i in range(220)]
    snr = {name: 40.0 - 0.1 * i for i, name in enumerate(names)}
    snr[names[5]] = math.inf  # an exact operator
    files = render_report("big", {"weight_bits": 4, "activation_bits": 4}, {"ppq_quantization": 1.0},
                          {"out": 12.5, "boxes": 8.0}, {"out": 0.99, "boxes": 0.97}, snr, dict.fromkeys(names, 0.9),
                          dict.fromkeys(names, "Conv"))
    report = json.loads(files["report.json"])
    assert WORST_SHOWN == 30 and report["worst_operators"] == names[::-1][:30]
    assert report["operators"][5]["snr_db"] == "inf" and len(report["operators"]) == 220
    assert Image.open(io.BytesIO(files["report.png"])).size == (1200, 700)


def test_missing_model_exit_2_one_line_nothing_written(tmp_path):
    mapsave = tmp_path / "mapsave"
    proc = subprocess.run([sys.executable, "-m", "maptools", "quantize", str(tmp_path / "none.onnx"), "--input",
                           "input:1,3,8,8", "--mapname", "x", "--mapsave-dir", str(mapsave)],
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and "none.onnx" in lines[0] and "Traceback" not in proc.stderr
    assert not mapsave.exists()


def test_bad_usage_and_bad_input_exit_2(tiny_onnx, tmp_path, capsys):
    assert main(["quantize", str(tiny_onnx), "--input", "input=1,3", "--mapname", "x"]) == 2
    assert main(["quantize", str(tiny_onnx), "--input", "input:2,3,8,8", "--mapname", "../x",
                 "--mapsave-dir", str(tmp_path)]) == 2
    err = capsys.readouterr().err
    assert "--input" in err and "mapname" in err
    assert main(["inspect", "nothing", "--mapsave-dir", str(tmp_path)]) == 2
    assert "no map 'nothing'" in capsys.readouterr().err


@pytest.fixture(scope="module")
def scalar_input_onnx(tmp_path_factory):
    """Conv -> Mul by a rank-0 float input 'gain' -> Relu -> pool -> Gemm; inputs 'input' [N,3,8,8] and 'gain' []."""
    from onnx import TensorProto, helper, numpy_helper

    rng = np.random.default_rng(0)
    w = numpy_helper.from_array(rng.normal(0, 0.3, (4, 3, 3, 3)).astype(np.float32), "w")
    fw = numpy_helper.from_array(rng.normal(0, 0.3, (2, 4)).astype(np.float32), "fw")
    nodes = [helper.make_node("Conv", ["input", "w"], ["c"], name="conv", pads=[1, 1, 1, 1]),
             helper.make_node("Mul", ["c", "gain"], ["m"], name="mul"),
             helper.make_node("Relu", ["m"], ["r"], name="relu"),
             helper.make_node("GlobalAveragePool", ["r"], ["p"], name="pool"),
             helper.make_node("Flatten", ["p"], ["f"], name="flatten"),
             helper.make_node("Gemm", ["f", "fw"], ["out"], name="fc", transB=1)]
    inputs = [helper.make_tensor_value_info("input", TensorProto.FLOAT, ["N", 3, 8, 8]),
              helper.make_tensor_value_info("gain", TensorProto.FLOAT, [])]
    graph = helper.make_graph(nodes, "scalar", inputs,
                              [helper.make_tensor_value_info("out", TensorProto.FLOAT, ["N", 2])], [w, fw])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)])
    model.ir_version = 8
    path = tmp_path_factory.mktemp("models") / "scalar.onnx"
    onnx.save(model, str(path))
    return path


def test_input_spec_rank_0():
    from maptools.cli import _input_spec

    assert _input_spec("sr:") == ("sr", []) and _input_spec("sr:scalar") == ("sr", [])
    assert _input_spec("a:b:1,2") == ("a:b", [1, 2]) and _input_spec("a:b:") == ("a:b", [])
    for bad in ("sr", ":1,2", "x:1,a"):
        with pytest.raises(Exception, match="NAME: or NAME:scalar for a rank-0 input"):
            _input_spec(bad)


def test_quantize_a_rank_0_input(scalar_input_onnx, tmp_path, capsys):
    from maptools import InvalidArgumentError
    from maptools.quantization import quantize, random_calibset, verify

    mapsave = tmp_path / "mapsave"
    assert main(["quantize", str(scalar_input_onnx), "--input", "input:2,3,8,8", "--input", "gain:scalar",
                 "--mapname", "sc", "--calib-steps", "8", "--mapsave-dir", str(mapsave), "--recipe", "fast"]) == 0
    manifest = json.loads((mapsave / "sc" / "manifest.json").read_text())
    assert manifest["settings"]["input_shapes"] == {"gain": [], "input": [2, 3, 8, 8]}
    assert random_calibset({"gain": []}, 1)[0]["gain"].shape == ()
    # user calibration with a 0-d array per batch, through quantize's own checks
    rng = np.random.default_rng(0)
    calib = [{"input": rng.normal(size=(2, 3, 8, 8)).astype(np.float32), "gain": np.array(1.5, np.float32)}
             for _ in range(8)]
    result = quantize({"input": [2, 3, 8, 8], "gain": []}, "cpu", scalar_input_onnx, mapname="sc2", calibset=calib,
                      calib_steps=8, mapsave_dir=mapsave, recipe="fast")
    assert result.output_snr_db["out"] > 10
    report = verify("sc2", [{"input": b["input"], "gain": b["gain"]} for b in calib[:2]], mapsave_dir=mapsave)
    assert report.samples == 4 and report.get("ppq", "integer").within_one_step == 1.0
    with pytest.raises(InvalidArgumentError, match=r"input_shapes\['gain'\]: rank 1 given \(\[1\]\), but the model's "
                                                   r"input has rank 0 \(\[\]\); give \[\] for this scalar input"):
        quantize({"input": [2, 3, 8, 8], "gain": [1]}, "cpu", scalar_input_onnx, mapname="x", mapsave_dir=mapsave)


@pytest.mark.parametrize("std", ["0", "0.2,0,0.2", "-0.5"])
def test_std_must_be_positive(std, tiny_onnx, tmp_path, capsys):
    from maptools import InvalidArgumentError
    from maptools.quantization import imagefolder_calibset

    mapsave = tmp_path / "mapsave"
    images = write_images(tmp_path / "images", "RGB", (8, 8), per_class=4)
    code = main(["quantize", str(tiny_onnx), "--input", "input:2,3,8,8", "--mapname", "x", "--calib-dir", str(images),
                 f"--std={std}", "--mapsave-dir", str(mapsave)])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1 and "--std" in err[0] and "> 0" in err[0] and repr(std) in err[0]
    assert not mapsave.exists()
    with pytest.raises(InvalidArgumentError, match=r"std: expected standard deviations > 0"):
        imagefolder_calibset(images, {"input": [2, 3, 8, 8]}, std=[float(v) for v in std.split(",")])



@pytest.fixture(scope="module")
def shape_chain_onnx(tmp_path_factory):
    """Conv -> Relu -> pool -> Reshape to [Shape(x)[0], -1] (a Shape chain kept: dynamic batch) -> Gemm -> Softmax."""
    from onnx import TensorProto, helper, numpy_helper

    rng = np.random.default_rng(0)
    inits = [numpy_helper.from_array(rng.normal(0, 0.3, (4, 3, 3, 3)).astype(np.float32), "w"),
             numpy_helper.from_array(rng.normal(0, 0.3, (5, 4)).astype(np.float32), "fw"),
             numpy_helper.from_array(np.array(0, np.int64), "zero"),
             numpy_helper.from_array(np.array([0], np.int64), "axes0"),
             numpy_helper.from_array(np.array([-1], np.int64), "minus1")]
    nodes = [helper.make_node("Conv", ["input", "w"], ["c"], name="conv", pads=[1, 1, 1, 1]),
             helper.make_node("Relu", ["c"], ["r"], name="relu"),
             helper.make_node("GlobalAveragePool", ["r"], ["p"], name="pool"),
             helper.make_node("Shape", ["p"], ["s"], name="shape"),
             helper.make_node("Gather", ["s", "zero"], ["n"], name="gather", axis=0),
             helper.make_node("Unsqueeze", ["n", "axes0"], ["n1"], name="unsqueeze"),
             helper.make_node("Concat", ["n1", "minus1"], ["target"], name="concat", axis=0),
             helper.make_node("Reshape", ["p", "target"], ["f"], name="reshape"),
             helper.make_node("Gemm", ["f", "fw"], ["g"], name="fc", transB=1),
             helper.make_node("Softmax", ["g"], ["out"], name="softmax", axis=1)]
    graph = helper.make_graph(nodes, "shape_chain",
                              [helper.make_tensor_value_info("input", TensorProto.FLOAT, ["N", 3, 8, 8])],
                              [helper.make_tensor_value_info("out", TensorProto.FLOAT, ["N", 5])], inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)])
    model.ir_version = 8
    path = tmp_path_factory.mktemp("models") / "shape_chain.onnx"
    onnx.save(model, str(path))
    return path


def test_inspect_lists_operators_left_in_float(shape_chain_onnx, tmp_path, capsys):
    mapsave = tmp_path / "mapsave"
    assert main(["quantize", str(shape_chain_onnx), "--input", "input:2,3,8,8", "--mapname", "sc", "--calib-steps", "8",
                 "--recipe", "fast", "--mapsave-dir", str(mapsave)]) == 0
    capsys.readouterr()
    assert main(["inspect", "sc", "--mapsave-dir", str(mapsave)]) == 0
    lines = capsys.readouterr().out.splitlines()
    start = lines.index("operators left in float: 4")
    assert lines[start + 1].split() == ["node", "type"]
    assert [line.split() for line in lines[start + 2:start + 6]] == [
        ["shape", "Shape"], ["gather", "Gather"], ["unsqueeze", "Unsqueeze"], ["concat", "Concat"]]
    assert lines[start + 6] == "" and lines[start + 7].startswith("6 quantized operators")
    assert main(["inspect", "sc", "--json", "--mapsave-dir", str(mapsave)]) == 0
    parsed = json.loads(capsys.readouterr().out)
    assert parsed["float_operators"] == [{"node": "shape", "op_type": "Shape"}, {"node": "gather", "op_type": "Gather"},
                                         {"node": "unsqueeze", "op_type": "Unsqueeze"},
                                         {"node": "concat", "op_type": "Concat"}]
    assert [row["node"] for row in parsed["operators"]] == ["conv", "relu", "pool", "reshape", "fc", "softmax"]


DIGITS_ARGS = ["quantize", "maptools/examples/data/digits_resnet.onnx", "--input", "input:16,1,8,8", "--calib-steps",
               "8", "--recipe", "fast"]


def test_quantize_progress_replace_notice_and_every_file(tmp_path, capsys, monkeypatch):
    import re
    from pathlib import Path

    from maptools import cli
    from maptools.examples import digits

    monkeypatch.chdir(Path(digits.__file__).parents[2])
    monkeypatch.setattr(cli, "HEARTBEAT_SECONDS", 0.2)
    mapsave = tmp_path / "mapsave"
    args = [*DIGITS_ARGS, "--mapname", "dg", "--mapsave-dir", str(mapsave)]
    assert main(args) == 0
    captured = capsys.readouterr()
    beats = [line for line in captured.err.splitlines() if re.match(r"^maptools quantize: \d+ s, ", line)]
    assert len(beats) >= 2 and captured.err.splitlines() == beats  # stderr is not a terminal: progress lines only
    assert any("quantizing" in line and "'dg': W8A8, fast, 8 random calibration batches" in line for line in beats)
    # counts, not only the stage's name: which loop, how far
    counts = [re.search(r"\[(calibration batch|error analysis batch)( pass \d+)?: (\d+)/(\d+)", line) for line in beats]
    assert any(counts) and all(int(m[3]) <= int(m[4]) for m in counts if m)
    # every file of the map directory is listed
    listed = {line.strip() for line in captured.out.splitlines() if line.startswith("  /")}
    assert listed == {str(p) for p in (mapsave / "dg").iterdir()} and len(listed) == 7
    snr_default = json.loads((mapsave / "dg" / "report.json").read_text())["outputs"]["logits"]["snr_db"]
    # the same map again, the error measured on one batch: a notice that the map was replaced
    assert main([*args, "--analysis-steps", "1"]) == 0
    err = capsys.readouterr().err.splitlines()
    assert f"maptools quantize: replaced the earlier map 'dg' in {mapsave / 'dg'}" in err
    snr_one = json.loads((mapsave / "dg" / "report.json").read_text())["outputs"]["logits"]["snr_db"]
    assert snr_one != snr_default  # --analysis-steps reached quantize(analysis_steps=1)
    assert main([*args, "--analysis-steps", "0"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err == ["maptools quantize: argument --analysis-steps: expected an int >= 1, got 0"]


def test_no_progress_lines_on_a_terminal(tmp_path, capsys, monkeypatch):
    import sys

    from maptools import cli
    from maptools.examples import digits
    from maptools.quantization.progress import show_progress

    monkeypatch.setattr(cli, "HEARTBEAT_SECONDS", 0.2)
    monkeypatch.setattr(sys.stderr, "isatty", lambda: True)
    try:
        assert main(["quantize", str(digits.MODEL_PATH), *DIGITS_ARGS[2:], "--mapname", "tty", "--mapsave-dir",
                     str(tmp_path)]) == 0
    finally:
        show_progress(False)
    assert "maptools quantize:" not in capsys.readouterr().err


def test_every_option_says_its_default():
    from maptools.cli import _build_parser

    parser = _build_parser()
    subparsers = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction)).choices
    checked = 0
    for name, sub in [("maptools", parser), *subparsers.items()]:
        for action in sub._actions:
            if not action.option_strings or isinstance(action, (argparse._HelpAction, argparse._SubParsersAction)):
                continue
            assert action.help and ("default" in action.help or "(required)" in action.help), (name, action.dest)
            checked += 1
    assert checked >= 30
    quantize_help = subparsers["quantize"].format_help()
    for option in ("--mean", "--std"):
        text = next(a.help for a in subparsers["quantize"]._actions if option in a.option_strings)
        assert "[0,1] pixel scale" in text and "ToTensor" in quantize_help
    calib_steps = next(a.help for a in subparsers["quantize"]._actions if "--calib-steps" in a.option_strings)
    assert calib_steps.endswith("(default 32)")
    steps = next(a.help for a in subparsers["quantize"]._actions if "--analysis-steps" in a.option_strings)
    assert steps.endswith("(default: enough for 32 samples, at least 4)")


def test_vv_no_image_chunk_lines_traceback_once(tmp_path, capsys, monkeypatch):
    import maptools.quantization
    from maptools.examples import digits

    root = digits.write_imagefolder(tmp_path / "images", split="train", limit_per_class=13)
    assert main(["-vv", "quantize", str(digits.MODEL_PATH), *DIGITS_ARGS[2:], "--mapname", "vv", "--calib-dir",
                 str(root), "--mean", "0.5", "--std", "0.5", "--mapsave-dir", str(tmp_path / "m")]) == 0
    err = capsys.readouterr().err
    assert "DEBUG maptools.ppq:" in err and "INFO maptools.quantization.api: quantizing" in err
    assert " PIL" not in err and "STREAM b'" not in err and "matplotlib" not in err

    def broken(*args, **kwargs):
        raise RuntimeError("boom")

    monkeypatch.setattr(maptools.quantization, "quantize", broken)
    args = ["quantize", str(digits.MODEL_PATH), "--input", "input:16,1,8,8", "--mapname", "x", "--mapsave-dir",
            str(tmp_path / "m")]
    assert main(["-vv", *args]) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert sum("Traceback (most recent call last)" in line for line in err) == 1
    assert err[-1] == "maptools quantize: internal error: RuntimeError: boom"
    assert main(args) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert err == ["maptools quantize: internal error: RuntimeError: boom (run with -vv for details)"]


def test_progress_count_and_estimate():
    from maptools.quantization.progress import counted, progress_line, reset_progress

    reset_progress()
    assert progress_line() is None
    batches = counted("calibration batch", range(4))
    seen = []
    for index, _ in enumerate(batches):
        seen.append(progress_line())
        if index == 1:
            break
    assert seen == ["calibration batch: 0/4", "calibration batch: 1/4, about 0 s left of it"]
    # 1 of 4 done in 10 s: about 30 s left; a second pass says so
    assert batches.line(now=batches.started + 10.0) == "calibration batch: 1/4, about 30 s left of it"
    list(batches)
    assert batches.passes == 2 and progress_line() == "calibration batch pass 2: 4/4"


@pytest.mark.parametrize(("option", "folder", "expected"), [
    ("--calib-dir", "missing", "--calib-dir: '{path}' is not a directory; expected an ImageFolder root"),
    ("--calib-dir", "empty", "--calib-dir: no images under '{path}'"),
    ("--calib-npy", "missing", "--calib-npy: '{path}' is not a directory; expected a folder of .npy files"),
    ("--calib-npy", "few", "--calib-npy: holds 2 batches"),
])
def test_calibration_folder_errors_name_the_option(option, folder, expected, tiny_onnx, tmp_path, capsys):
    """The --calib-dir error named the Python argument ('root: ...')."""
    import numpy as np

    path = tmp_path / folder
    if folder == "empty":
        path.mkdir()
    if folder == "few":
        path.mkdir()
        for index in range(2):
            np.save(path / f"{index}.npy", np.zeros((2, 3, 8, 8), np.float32))
    mapsave = tmp_path / "mapsave"
    code = main(["quantize", str(tiny_onnx), "--input", "input:2,3,8,8", "--mapname", "x", option, str(path),
                 "--mapsave-dir", str(mapsave)])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1 and not mapsave.exists()
    assert err[0].startswith("maptools quantize: error: " + expected.format(path=path)), err[0]
