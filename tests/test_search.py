"""Mixed-precision search: the walk, the front, the budget, the verification and the resumable cache (digits CNN)."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest

from maptools.errors import InvalidArgumentError, InvalidTypeError
from maptools.examples import digits
from maptools.quantization.search import evaluate, search
from maptools.quantization.search.front import greedy_walk, pareto, predicted, spread

SHAPES = {digits.INPUT_NAME: [16, *digits.INPUT_SHAPE[1:]]}


@pytest.fixture(scope="module")
def data() -> tuple[list[np.ndarray], list[np.ndarray]]:
    """8 calibration batches of training digits, 4 held-out batches of test digits (16 each)."""
    train, _ = digits.load_split("train")
    test, _ = digits.load_split("test")
    return [train[i:i + 16] for i in range(0, 128, 16)], [test[i:i + 16] for i in range(0, 64, 16)]


def _table() -> dict:
    # two layers, three candidates; layer b is cheap to lower, layer a is not
    return {"a": {(8, 8): {"nsr": 0.001, "adc_conversions": 100}, (4, 8): {"nsr": 0.1, "adc_conversions": 50},
                  (2, 8): {"nsr": 1.0, "adc_conversions": 25}},
            "b": {(8, 8): {"nsr": 0.001, "adc_conversions": 100}, (4, 8): {"nsr": 0.002, "adc_conversions": 50},
                  (2, 8): {"nsr": 0.5, "adc_conversions": 25}}}


def test_greedy_walk_lowers_the_best_saving_per_noise_first() -> None:
    walk = greedy_walk(_table(), "adc_conversions")
    # b to W4 first (50 saved for 0.001 noise), then a to W4 (50 / 0.099) before b to W2 (25 / 0.498)
    assert walk[0] == {"a": (8, 8), "b": (8, 8)}
    assert walk[1] == {"a": (8, 8), "b": (4, 8)}
    assert walk[2] == {"a": (4, 8), "b": (4, 8)}
    assert walk[-1] == {"a": (2, 8), "b": (2, 8)}
    costs = [predicted(a, _table(), "adc_conversions")[0] for a in walk]
    assert costs == sorted(costs, reverse=True) and costs[0] == 200 and costs[-1] == 50
    assert predicted(walk[1], _table(), "adc_conversions")[1] == pytest.approx(-10 * math.log10(0.003))
    assert costs == [200, 150, 100, 75, 50]
    assert spread(costs, 3) == [0, 1, 4]  # targets 200, 125 (150 and 100 tie: the earlier step), 50


def test_spread_measures_as_many_steps_as_asked_where_the_walk_crowds() -> None:
    # a walk whose cheap end crowds in cost: even cost targets land on 5 distinct steps of 12
    costs = [100.0, 80.0, 60.0, 40.0, 22.0, 21.0, 20.5, 20.2, 20.1, 20.05, 20.02, 20.0]
    assert spread(costs, 5) == [0, 1, 2, 3, 11]
    # 8 cost targets land on those 5 steps too; the gap of steps 3..11 is halved (7), then its halves (5, 9)
    assert spread(costs, 8) == [0, 1, 2, 3, 5, 7, 9, 11]
    assert spread(costs, 12) == list(range(12)) and spread(costs, 40) == list(range(12))
    assert spread([5.0], 3) == [0] and spread([], 3) == []


def test_pareto_keeps_the_non_dominated_points() -> None:
    points = [{"figure": 99.0, "adc_conversions": 10}, {"figure": 98.0, "adc_conversions": 12},
              {"figure": 99.5, "adc_conversions": 20}, {"figure": 99.0, "adc_conversions": 10}]
    assert pareto(points, "adc_conversions") == [True, False, True, True]


@pytest.fixture
def calls(monkeypatch) -> list[tuple]:
    """The arguments of every ``evaluate.measure`` call (each a quantization) while the test runs."""
    made: list[tuple] = []
    measure = evaluate.measure

    def counted(*args):
        made.append(args)
        return measure(*args)

    monkeypatch.setattr(evaluate, "measure", counted)
    return made


@pytest.mark.slow  # 8 quantizations of the digits CNN: about 25 s on a quiet 2-core machine
def test_search_front_budget_verification_and_resume(data, tmp_path: Path, calls: list[tuple]) -> None:
    calib, held_out = data
    cache, mapsave = tmp_path / "cache", tmp_path / "mapsave"
    settings = dict(weight_bits=(4, 8), activation_bits=(8,), points=3, budget_adc_fraction=0.75, jobs=1,
                    cache_dir=cache, recipe="fast")

    def stop_after_two_walk_points(done: int, total: int, stage: str) -> None:
        if stage == "walk" and done == 2:
            raise KeyboardInterrupt  # a killed search

    with pytest.raises(KeyboardInterrupt):
        search(digits.MODEL_PATH, SHAPES, calib, held_out, progress=stop_after_two_walk_points, **settings)
    assert len(calls) == 4 and len(list(cache.glob("*.json"))) == 4  # 2 uniform + 2 walk points, each cached
    calls.clear()
    result = search(digits.MODEL_PATH, SHAPES, calib, held_out, mapname="chosen", mapsave_dir=mapsave, **settings)
    # only the walk points not measured before the kill: 3 spread points and the budget's first fitting step
    assert result.cached == 4 and result.computed == len(calls) == len(result.points) - 2 >= 1
    assert all(call[2] is not None for call in calls)  # ... walk points (layer_bits), no uniform one again

    data_ = json.loads(result.to_json())
    # each MAC's sensitivity includes the noise of its input's producer (PPQ books the input quantization there):
    # every layer but the stem (fed by the graph input) has one, and the total is at least the MAC's own
    for layer, by_candidate in data_["sensitivity"].items():
        for entry in by_candidate.values():
            assert (entry["nsr_input"] > 0) == (layer != "/stem/stem.0/Conv") and entry["nsr"] >= entry["nsr_input"]
    reference = next(p for p in result.uniform if p["label"] == "W8A8")
    w4 = next(p for p in result.uniform if p["label"] == "W4A8")
    assert w4["adc_conversions"] == reference["adc_conversions"] // 2  # 2 weight slices of 2-bit cells, not 4
    assert len(result.points) in (3, 4) and result.points[0]["adc_conversions"] == reference["adc_conversions"]
    costs = [p["adc_conversions"] for p in result.points]
    assert costs == sorted(costs, reverse=True) and costs[-1] == w4["adc_conversions"]
    for p in result.points:  # every walk point: a full assignment of the crossbar MACs from the candidates
        assert sorted(p["layer_bits"]) == sorted(data_["layers"]) and len(data_["layers"]) == 9
        assert {tuple(c) for c in p["layer_bits"].values()} <= {(4, 8), (8, 8)}
        assert 0.0 <= p["figure"] <= 100.0
    chosen = result.chosen
    assert chosen is not None and chosen["adc_conversions"] <= 0.75 * reference["adc_conversions"]
    assert chosen["figure"] == max(p["figure"] for p in result.points if p["adc_conversions"] <= 0.75 *
                                   reference["adc_conversions"])
    verification = data_["verification"]
    assert verification["reproduced"] and verification["figure"] == chosen["figure"]
    assert (mapsave / "chosen" / "quant_model.onnx").is_file()
    # a third run: everything from the cache, the same JSON
    calls.clear()
    again = search(digits.MODEL_PATH, SHAPES, calib, held_out, **settings)
    assert not calls and again.computed == 0
    assert json.loads(again.to_json())["points"] == data_["points"]


def test_a_finer_front_figure_breaks_the_ties_of_the_task_figure() -> None:
    # five walk points that all keep the coarse figure (as Lite1's confident crops); the finer one tells them apart
    points = [{"figure": 100.0, "front_figure": fine, "adc_conversions": cost}
              for fine, cost in ((95.0, 100), (94.0, 90), (93.5, 80), (92.0, 70), (90.0, 60))]
    assert pareto(points, "adc_conversions") == [False, False, False, False, True]  # the cheapest dominates
    assert pareto(points, "adc_conversions", "front_figure") == [True] * 5
    points[2]["front_figure"] = 91.0  # worse than a cheaper point: dominated on the finer figure too
    assert pareto(points, "adc_conversions", "front_figure") == [True, True, False, True, True]


def test_output_snr_by_hand() -> None:
    fp32 = [[np.array([[3.0, 4.0]])], [np.array([[0.0, 0.0], [0.0, 0.0]])]]
    quantized = [[np.array([[3.0, 3.0]])], [np.array([[0.0, 1.0], [0.0, 0.0]])]]
    # signal 3^2 + 4^2 = 25 over every output of every batch; noise 1^2 + 1^2 = 2
    assert evaluate.output_snr(fp32, quantized) == pytest.approx(10 * math.log10(25 / 2))
    assert evaluate.output_snr(fp32, fp32) == math.inf


def test_a_front_point_that_does_not_reproduce_is_flagged() -> None:
    from maptools.quantization.search.run import _compare

    front = [{"step": 3, "figure": 100.0, "front_figure": 92.5, "adc_conversions": 10},
             {"label": "W6A8", "figure": 100.0, "front_figure": 91.0, "adc_conversions": 8}]
    again = [{"figure": 100.0, "front_figure": 92.5, "snr_db": 20.0, "adc_conversions": 10, "energy_j": 1.0},
             {"figure": 100.0, "front_figure": 90.75, "snr_db": 19.0, "adc_conversions": 8, "energy_j": 0.8}]
    summary = _compare(front, again, ("figure", "front_figure"))
    assert summary == {"points": 2, "reproduced": 1, "all_reproduced": False}
    assert front[0]["verification"]["reproduced"] and not front[1]["verification"]["reproduced"]
    assert front[1]["verification"]["front_figure"] == 90.75


@pytest.mark.slow  # 9 quantizations of the digits CNN: about 20 s on a quiet 2-core machine
def test_front_over_a_finer_figure_every_point_re_quantized(data, tmp_path: Path, calls: list[tuple]) -> None:
    calib, held_out = data
    settings = dict(weight_bits=(2, 8), activation_bits=(8,), points=3, budget_adc_fraction=0.75, jobs=1,
                    cache_dir=tmp_path / "cache", recipe="fast", metric=evaluate.top1_agreement,
                    front_metric=evaluate.output_snr, front_metric_name="output SNR (dB)", verify_front=True)
    result = search(digits.MODEL_PATH, SHAPES, calib, held_out, **settings)
    everything = result.points + result.uniform
    # the top-1 agreement of the 64 digits ties where the outputs' SNR does not: more points on the finer front
    coarse = sum(pareto(everything, "adc_conversions"))
    assert len(result.front) > coarse >= 2
    assert result.data["front_figure"] == "output SNR (dB)" and "front_metric" in result.data["settings"]
    for p in everything:
        assert p["front_figure"] == pytest.approx(p["snr_db"])
    # the choice stays on the task figure; its ties go to the finer figure
    within = [p for p in result.points if p["adc_conversions"] <= result.data["budget"]["limit_adc_conversions"]]
    assert result.chosen == max(within, key=lambda p: (p["figure"], p["front_figure"], -p["adc_conversions"]))
    # every front point quantized a second time from its bits alone: walk points from their layer_bits, uniform
    # ones from their weight and activation bits, never with the layer-wise analysis
    front = result.front
    verify_calls = calls[len(result.uniform) + len(result.points):]
    assert len(verify_calls) == len(front) and all(call[3] is False for call in verify_calls)
    assert sorted(str(call[2]) for call in verify_calls) == sorted(
        str(None if "step" not in p else {n: tuple(c) for n, c in p["layer_bits"].items()}) for p in front)
    for p in front:
        assert p["verification"]["reproduced"]
        assert (p["verification"]["figure"], p["verification"]["front_figure"]) == (p["figure"], p["front_figure"])
        assert p["verification"]["adc_conversions"] == p["adc_conversions"]
    assert all("verification" not in p for p in everything if not p["pareto"])
    assert result.data["front_verification"] == {"points": len(front), "reproduced": len(front),
                                                 "all_reproduced": True}
    # a rerun resumes from the cache, the verification included
    calls.clear()
    again = search(digits.MODEL_PATH, SHAPES, calib, held_out, **settings)
    assert not calls and again.to_json() == result.to_json()


def test_cache_key_follows_the_data(data, tmp_path: Path) -> None:
    from maptools.quantization.search.cache import PointCache, data_digest

    _, held_out = data
    batches = [{digits.INPUT_NAME: b} for b in held_out]
    identity = {"model": "m", "evalset": data_digest(batches)}
    task = {"weight_bits": 8, "activation_bits": 8, "layer_bits": None}
    cache = PointCache(tmp_path, identity)
    cache.put(task, {"figure": 1.0})
    assert cache.get(task) == {"figure": 1.0}
    changed = [{digits.INPUT_NAME: b[digits.INPUT_NAME].copy()} for b in batches]
    changed[0][digits.INPUT_NAME][0, 0, 0, 0] += 1.0
    assert PointCache(tmp_path, {"model": "m", "evalset": data_digest(changed)}).get(task) is None
    (tmp_path / f"{cache.key(task)}.json").write_text("{not json")  # a torn file: measured again, not trusted
    assert cache.get(task) is None


@pytest.mark.parametrize(("change", "error", "argument"), [
    ({"budget_adc_fraction": 0.0}, InvalidArgumentError, "budget_adc_fraction"),
    ({"weight_bits": (4, 9)}, InvalidArgumentError, "weight_bits"),
    ({"activation_bits": ()}, InvalidArgumentError, "activation_bits"),
    ({"points": 1}, InvalidArgumentError, "points"),
    ({"layerwise_batches": 0}, InvalidArgumentError, "layerwise_batches"),
    ({"objective": "bitops"}, InvalidArgumentError, "objective"),
    ({"spec": "256"}, InvalidTypeError, "spec"),
    ({"calibset": "calib/"}, InvalidTypeError, "calibset"),
    ({"first_last_bits": 8}, InvalidArgumentError, "quantize_options"),
    ({"front_metric": "top1"}, InvalidTypeError, "front_metric"),
    ({"verify_front": "yes"}, InvalidTypeError, "verify_front"),
])
def test_bad_arguments_are_refused_before_anything_runs(data, tmp_path: Path, change, error, argument) -> None:
    calib, held_out = data
    kwargs = {"calibset": calib, "evalset": held_out, "cache_dir": tmp_path / "cache", "jobs": 1,
              "mapname": "m", "mapsave_dir": tmp_path / "mapsave", **change}
    calibset, evalset = kwargs.pop("calibset"), kwargs.pop("evalset")
    with pytest.raises(error, match=argument):
        search(digits.MODEL_PATH, SHAPES, calibset, evalset, **kwargs)
    assert not (tmp_path / "mapsave").exists() and not list((tmp_path / "cache").glob("*.json"))


def test_too_few_calibration_batches(data, tmp_path: Path) -> None:
    calib, held_out = data
    with pytest.raises(InvalidArgumentError, match="calibset: got 3 batches"):
        search(digits.MODEL_PATH, SHAPES, calib[:3], held_out, cache_dir=None, jobs=1)


@pytest.mark.parametrize(("argv", "option"), [
    (["--act-bits", "4,9"], "--act-bits"),
    (["--budget-adc-fraction", "1.5"], "--budget-adc-fraction"),
    (["--points", "1"], "--points"),
    (["--layerwise-batches", "0"], "--layerwise-batches"),
    (["--out", "/nonexistent/front.json"], "--out"),
])
def test_cli_errors_name_the_option(tmp_path: Path, capsys, argv, option) -> None:
    from maptools.cli import main

    code = main(["search", str(digits.MODEL_PATH), "--input", "input:16,1,8,8", "--calib-steps", "8",
                 "--eval-steps", "1", "--cache", str(tmp_path / "cache"), "--mapsave-dir", str(tmp_path / "m"),
                 "--jobs", "1", *argv])
    assert code == 2
    err = capsys.readouterr().err
    assert err.startswith("maptools search: error: ") and option in err
    assert not (tmp_path / "m").exists() and not list((tmp_path / "cache").glob("*.json"))


def test_cli_front_figure_and_verify_front(tmp_path: Path, capsys) -> None:
    from maptools.cli import main

    out = tmp_path / "front.json"
    code = main(["search", str(digits.MODEL_PATH), "--input", "input:16,1,8,8", "--calib-steps", "8",
                 "--eval-steps", "2", "--weight-bits", "8", "--act-bits", "8", "--points", "2", "--recipe", "fast",
                 "--front-figure", "snr", "--verify-front", "--no-cache", "--jobs", "1", "--out", str(out),
                 "--plot", str(tmp_path / "front.png")])
    assert code == 0
    printed = capsys.readouterr().out
    assert "front over output SNR against FP32 (dB)" in printed and printed.count(" * reproduced") == 2
    assert (tmp_path / "front.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    data = json.loads(out.read_text())
    assert data["front_figure"] == "output SNR against FP32 (dB)"
    # one candidate: the walk is its one step, as costly as uniform W8A8 and as good; both on the front, both
    # quantized again and reproduced
    front = [p for p in data["points"] + data["uniform"] if p["pareto"]]
    assert len(front) == 2 and data["front_verification"] == {"points": 2, "reproduced": 2, "all_reproduced": True}
    for p in front:
        assert p["verification"]["front_figure"] == p["front_figure"] == pytest.approx(p["snr_db"])
        assert 10.0 < p["front_figure"] < 80.0


def _se_block(tmp_path: Path) -> tuple[Path, Path, dict[str, float]]:
    """A squeeze-excitation block as quant_model.onnx holds it, and a report of each operator's layer-wise SNR."""
    import onnx
    from onnx import TensorProto, helper

    nodes = [helper.make_node("Conv", ["x", "w1"], ["c1"], name="conv1"),
             helper.make_node("QuantizeLinear", ["c1", "s", "z"], ["q1"], name="q1"),
             helper.make_node("DequantizeLinear", ["q1", "s", "z"], ["d1"], name="dq1"),
             helper.make_node("HardSwish", ["d1"], ["h"], name="hswish"),
             helper.make_node("GlobalAveragePool", ["h"], ["p"], name="pool"),
             helper.make_node("Conv", ["p", "w2"], ["c2"], name="conv_se"),
             helper.make_node("HardSigmoid", ["c2"], ["g"], name="gate"),
             helper.make_node("Mul", ["h", "g"], ["m"], name="mul"),
             helper.make_node("Conv", ["m", "w3"], ["y"], name="conv2"),
             helper.make_node("Softmax", ["y"], ["out"], name="softmax")]
    graph = helper.make_graph(nodes, "se", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 4, 4, 4])],
                              [helper.make_tensor_value_info("out", TensorProto.FLOAT, None)])
    model = tmp_path / "quant_model.onnx"
    onnx.save(helper.make_model(graph), model)
    nsr = {"conv1": 1e-4, "hswish": 4e-3, "pool": 1e-3, "conv_se": 2e-4, "gate": 2e-3, "mul": 8e-3, "conv2": 3e-4,
           "softmax": 5e-2}
    report = tmp_path / "report.json"
    report.write_text(json.dumps({"operators": [{"node": n, "layerwise_snr_db": -10 * math.log10(v)}
                                                for n, v in nsr.items()]}))
    return report, model, nsr


def test_noise_between_macs_is_shared_by_their_readers_and_producers(tmp_path: Path) -> None:
    report, model, nsr = _se_block(tmp_path)
    noise = evaluate._isolated_nsr(report, model, ["conv1", "conv_se", "conv2"])
    assert {n: v["own"] for n, v in noise.items()} == pytest.approx({n: nsr[n] for n in noise})
    # the HardSwish: produced from conv1, read by conv_se (through the pool) and conv2 (through the Mul): a third
    # each; the pool: conv1 -> conv_se; the gate: conv_se -> conv2; the Mul: conv1 and conv_se -> conv2
    hswish, pool, gate, mul = nsr["hswish"] / 3, nsr["pool"] / 2, nsr["gate"] / 2, nsr["mul"] / 3
    assert noise["conv1"]["input"] == 0.0  # fed by the graph input
    assert noise["conv1"]["output"] == pytest.approx(hswish + pool + mul)
    assert noise["conv_se"]["input"] == pytest.approx(hswish + pool)
    assert noise["conv_se"]["output"] == pytest.approx(gate + mul)
    assert noise["conv2"]["input"] == pytest.approx(hswish + gate + mul)
    assert noise["conv2"]["output"] == 0.0  # the Softmax after the last MAC is no MAC's input
    # every operator between MACs counted once
    total = sum(v["input"] + v["output"] for v in noise.values())
    assert total == pytest.approx(sum(nsr[n] for n in ("hswish", "pool", "gate", "mul")))


def test_layerwise_error_is_accumulated_over_batches(data, tmp_path: Path) -> None:
    from maptools.quantization import quantize

    calib, held_out = data

    def layerwise(evalset: list[np.ndarray], batches: int) -> dict[str, float]:
        result = quantize(SHAPES, "cpu", digits.MODEL_PATH, mapname="lw", calibset=calib, calib_steps=8,
                          evalset=evalset, mapsave_dir=tmp_path, recipe="fast", weight_bits=4, activation_bits=4,
                          layerwise_analysis=True, layerwise_batches=batches)
        report = json.loads(result.report_path.read_text())
        return {op["node"]: 10.0 ** (-op["layerwise_snr_db"] / 10.0) for op in report["operators"]}

    single = [layerwise([batch, *held_out], 1) for batch in held_out[:2]]
    both = layerwise(held_out, 2)
    # the noise-to-signal of the summed errors of two batches lies between each batch's own (a mediant)
    # and differs from the first batch's alone on some operator
    for node, value in both.items():
        low, high = sorted(s[node] for s in single)
        assert low * (1 - 1e-6) <= value <= high * (1 + 1e-6), node
    assert any(abs(both[n] - single[0][n]) > 1e-3 * single[0][n] for n in both)
    with pytest.raises(InvalidArgumentError, match="layerwise_batches"):
        quantize(SHAPES, "cpu", digits.MODEL_PATH, mapname="lw", calibset=calib, calib_steps=8, evalset=held_out,
                 mapsave_dir=tmp_path, layerwise_analysis=True, layerwise_batches=0)
