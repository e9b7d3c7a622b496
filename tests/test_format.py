"""The artifact format and the integer arithmetic, each defined once (fmt.py, intmath.py)."""

from __future__ import annotations

import json
import re
from pathlib import Path

import numpy as np
import pytest

from maptools.errors import InvalidArgumentError
from maptools.examples import digits
from maptools.quantization import format as fmt
from maptools.quantization import intmath, quantize, read_quantinfo, read_quantparams
from maptools.quantization.verify import compare


def test_file_names_and_version_are_the_documented_ones() -> None:
    """The format's names, version and rounding are those the results page gives the readers of a map: its table
    of files, its example manifest and its legacy files."""
    page = (Path(__file__).resolve().parents[1] / "docs" / "results.rst").read_text()
    table = page.split(".. list-table::", 1)[1].split("To look at a map", 1)[0]
    assert re.findall(r"^   \* - ``([^`]+)``", table, flags=re.MULTILINE) == [
        fmt.QUANTINFO, fmt.QUANTPARAMS, fmt.QUANTMODEL, fmt.PPQSTATE, fmt.REPORT_JSON, fmt.REPORT_PNG, fmt.CIM_FILE,
        fmt.MANIFEST]
    assert f'"format_version": "{fmt.FORMAT_VERSION}"' in page and f'"rounding": "{intmath.ROUNDING}"' in page
    assert f"``{fmt.PPQGRAPH}`` (format 1.0 maps)" in page


@pytest.mark.parametrize(("op_type", "family"), [("Conv", "conv"), ("ConvTranspose", "conv"), ("Gemm", "gemm"),
                                                  ("MatMul", "gemm")])
def test_parameter_keys(op_type: str, family: str) -> None:
    assert fmt.weight_key("/a/b", op_type) == f"/a/b_{family}_weight"
    assert fmt.bias_key("/a/b", op_type) == f"/a/b_{family}_bias"


def test_integer_ranges_and_containers() -> None:
    assert intmath.int_range(4) == (-8, 7) and intmath.int_range(4, symmetric=False) == (0, 15)
    assert intmath.unsigned_range(8) == (0, 255) and intmath.bias_range() == (-(2**31) + 1, 2**31 - 1)
    assert [intmath.container_dtype(b) for b in (2, 8, 32)] == [np.int8, np.int8, np.int32]
    assert intmath.container_dtype(4, signed=False) == np.uint8
    assert intmath.container_dtype(32, signed=False) == np.int32
    assert intmath.smallest_int_dtype(0, 255) == np.uint8 and intmath.smallest_int_dtype(-1, 2**31) == np.int64
    assert intmath.round_half_even(np.array([-2.5, -1.5, -0.5, 0.5, 1.5, 2.5])).tolist() == [-2, -2, -0, 0, 2, 2]


def test_as_integers_keeps_whole_numbers_and_refuses_the_rest() -> None:
    assert intmath.as_integers(np.array([1.0, -2.0]), "x").tolist() == [1, -2]
    assert intmath.as_integers([3, 4], "x").dtype == np.int64
    for bad in ([0.5], [np.nan], [np.inf]):
        with pytest.raises(InvalidArgumentError, match=r"^x: expected integer values, got dtype float64$"):
            intmath.as_integers(np.array(bad), "x")


def test_snr_and_cosine() -> None:
    r = np.array([1.0, -2.0, 3.0])
    assert intmath.snr_db_of(r, r) == np.inf and intmath.cosine_of(r, r) == 1.0
    assert intmath.snr_db_of(r, r + 0.1) == pytest.approx(10 * np.log10(14 / 0.03))
    assert intmath.snr_db_of(np.zeros(3), r) == -np.inf and intmath.cosine_of(np.zeros(3), np.zeros(3)) == 0.0
    assert intmath.cosine_of(r, -r) == pytest.approx(-1.0)
    # sums of several arrays (batches, outputs) add up
    assert intmath.snr_db_of([r, 2 * r], [r + 0.1, 2 * r]) == pytest.approx(10 * np.log10(70 / 0.03))
    # verify's comparison is the same measure; equal outputs (all zeros too) agree fully
    assert compare(r, r + 0.1)["snr_db"] == intmath.snr_db_of(r, r + 0.1)
    assert compare(np.zeros(3), np.zeros(3))["cosine"] == 1.0 and compare(r, r)["cosine"] == 1.0


def test_a_map_follows_the_format(tmp_path) -> None:
    quantize({"input": list(digits.INPUT_SHAPE)}, "cpu", digits.MODEL_PATH, mapname="m", calib_steps=8,
             analysis_steps=1, mapsave_dir=tmp_path, recipe="fast")
    manifest = json.loads((tmp_path / "m" / fmt.MANIFEST).read_text())
    assert manifest["format_version"] == fmt.FORMAT_VERSION and manifest["rounding"] == intmath.ROUNDING
    assert sorted(manifest["files"]) == sorted([fmt.QUANTINFO, fmt.QUANTPARAMS, fmt.QUANTMODEL,
                                                fmt.PPQSTATE, fmt.REPORT_JSON, fmt.REPORT_PNG])
    info, params = read_quantinfo("m", tmp_path), read_quantparams("m", tmp_path)
    for name, record in info.items():
        if record.weight_bits is None:
            continue
        weight = params[fmt.weight_key(name, record.op_type)]
        assert weight.dtype == intmath.container_dtype(record.weight_bits)
        assert (record.weight_min, record.weight_max) == intmath.int_range(record.weight_bits)
        bias = params.get(fmt.bias_key(name, record.op_type))
        assert bias is None or bias.dtype == intmath.container_dtype(intmath.BIAS_BITS)
