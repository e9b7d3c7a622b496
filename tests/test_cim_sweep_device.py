"""cim-sweep's device axes: every point on N seeded chips, mean ± std (worst), independent of the worker count."""

from __future__ import annotations

import contextlib
import io
import json
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from maptools.cli import main
from maptools.errors import InvalidArgumentError, InvalidTypeError
from maptools.examples import digits
from maptools.quantization.cim import CIMSpec, DeviceModel, child_seed
from maptools.quantization.cimmap import Top1Agreement, cim_sweep
from maptools.quantization.reference import simulate

MAP = "digits_w4a4"
GRID: dict[str, Any] = {"adc_bits": [6], "rows": [128], "cell_bits": [2]}


@pytest.fixture(scope="module")
def mapsave(digits_w4a4_mapsave: Path) -> Path:
    """The session's digits W4A4 map (``conftest.digits_w4a4_mapsave``)."""
    return digits_w4a4_mapsave


@pytest.fixture(scope="module")
def data() -> dict[str, np.ndarray]:
    test, labels = digits.load_split("test")
    return {"test": test[:32], "labels": labels[:32], "train": digits.load_split("train")[0][:64]}


def _sweep(mapsave: Path, data: dict[str, np.ndarray], **kwargs: Any) -> Any:
    return cim_sweep(MAP, [data["test"]], calib=[data["train"]], labels=data["labels"], mapsave_dir=mapsave,
                     **GRID, **kwargs)


def _record(result: Any) -> str:
    """The JSON record (without wall times or the worker count: those are in ``result.timings()``)."""
    return json.dumps(result.to_dict(), indent=1, allow_nan=False)


def test_device_points_run_on_seeded_chips_independent_of_jobs(mapsave: Path, data: dict[str, np.ndarray],
                                                                tmp_path: Path) -> None:
    kwargs = {"prog_error": "0,0.15", "chips": 3, "seed": 5}
    serial = _sweep(mapsave, data, jobs=1, **kwargs)
    assert _record(_sweep(mapsave, data, jobs=2, **kwargs)) == _record(serial)
    assert serial.chips == 3 and [d["prog_sigma_rel"] for d in serial.devices] == [0.0, 0.15]
    assert len(serial.points) == 2 * 2  # two ADC range kinds x two devices
    exact = simulate(MAP, data["test"], mapsave_dir=mapsave)["logits"]
    for point in serial.points:
        top1 = [chip["outputs"]["logits"]["vs_integer"]["top1"] for chip in point.chips]
        mean, std, worst = point.spread("integer", "top1")
        assert len(top1) == 3 and mean == pytest.approx(np.mean(top1)) == point.metric("integer", "top1")
        assert std == pytest.approx(np.std(top1, ddof=1)) and worst == min(top1)
        labels = [chip["top1_labels"] for chip in point.chips]
        assert point.top1_labels == pytest.approx(np.mean(labels)) and point.spread("labels", "top1")[2] == min(labels)
    # an error-free device: every chip is the exact crossbar; a noisy one: chips differ
    assert serial.point(128, 2, 6, "full", 0).spread("integer", "snr_db")[1] == 0
    noisy = serial.point(128, 2, 6, "full", 1)
    assert len({chip["outputs"]["logits"]["vs_integer"]["snr_db"] for chip in noisy.chips}) == 3
    # chip i is simulate(..., seed=child_seed(seed, i)), as in monte_carlo
    spec = CIMSpec(rows=128, cell_bits=2, adc_bits=6, adc_range="full")
    chip = simulate(MAP, data["test"], mapsave_dir=mapsave, cim=spec, device=DeviceModel(prog_sigma_rel=0.15),
                    seed=child_seed(5, 2))["logits"]
    assert Top1Agreement(exact)({"logits": chip}) == noisy.chips[2]["outputs"]["logits"]["vs_integer"]["top1"]
    table = serial.table()
    assert "over 3 chips" in table and "prog 15 %, t 20 s" in table and "±" in table
    assert serial.plot(tmp_path / "sweep.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_without_device_the_record_is_unchanged(mapsave: Path, data: dict[str, np.ndarray]) -> None:
    plain = _sweep(mapsave, data, jobs=1)
    record = plain.to_dict()
    assert list(record) == ["mapname", "samples", "inputs_data", "calibration_data", "method", "reference",
                            "fp32_error", "points", "ideal_from"]
    assert all(list(p) == ["rows", "cell_bits", "dac_bits", "weight_encoding", "adc_bits", "adc_range", "spec",
                           "lossless_adc_bits", "outputs", "top1_labels", "clipped"]
               for p in record["points"])
    assert all(list(entry) == ["rows", "cell_bits", "adc_range", "adc_bits"] for entry in record["ideal_from"])
    assert "±" not in plain.table() and "chips" not in plain.table()
    # an ideal device on any chip is the exact crossbar: the same metrics as without a device
    ideal = _sweep(mapsave, data, jobs=1, device=DeviceModel(), chips=2)
    for kind in ("calibrated", "full"):
        assert ideal.point(128, 2, 6, kind, 0).outputs == plain.point(128, 2, 6, kind).outputs


def test_bad_device_arguments_are_refused_naming_them(mapsave: Path, data: dict[str, np.ndarray]) -> None:
    for kwargs, error, name in (({"prog_error": "-0.1"}, InvalidArgumentError, "prog_error"),
                                ({"prog_error": "a"}, InvalidArgumentError, "prog_error"),
                                ({"drift_time": [20, 3600]}, InvalidArgumentError, "drift_time"),
                                ({"prog_error": [0.1], "chips": 0}, InvalidArgumentError, "chips"),
                                ({"device": "pcm"}, InvalidTypeError, "device"),
                                ({"device": DeviceModel(prog_sigma_abs=(0.1, 0.2))}, InvalidArgumentError,
                                 "prog_sigma_abs")):
        with pytest.raises(error, match=name):
            _sweep(mapsave, data, jobs=1, **kwargs)


def _cli(argv: list[str]) -> tuple[int, str, str]:
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        code = main(argv)
    return code, out.getvalue(), err.getvalue()


def test_cim_sweep_cli_device_axes(mapsave: Path, tmp_path: Path) -> None:
    result = tmp_path / "sweep.json"
    base = ["cim-sweep", MAP, "--mapsave-dir", str(mapsave), "--adc-bits", "6", "--rows", "128", "--cell-bits", "2",
            "--batches", "1", "--jobs", "1"]
    code, out, err = _cli([*base, "--prog-error", "0.05", "--drift-time", "20,86400", "--drift-nu", "0.05",
                           "--drift-compensation", "--chips", "2", "--seed", "4", "--out", str(result)])
    assert code == 0, err
    saved = json.loads(result.read_text())
    devices = [(d["prog_sigma_rel"], d["time"], d["drift_nu"], d["drift_compensation"]) for d in saved["devices"]]
    assert saved["chips"] == 2 and devices == [(0.05, 20.0, 0.05, True), (0.05, 86400.0, 0.05, True)]
    assert all(len(p["chips"]) == 2 for p in saved["points"]) and "over 2 chips" in out
    for argv, message in ((["--prog-error", "x"], "--prog-error"), (["--drift-time", "20,86400"], "drift_time"),
                          (["--chips", "0"], "--chips")):
        code, _, err = _cli([*base, *argv])
        assert code == 2 and message in err, err
