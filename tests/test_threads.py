"""maptools.quantization.engine.threads: the thread pools limited while quantizing, and restored after."""

from __future__ import annotations

import numpy as np
import torch
from threadpoolctl import threadpool_info, threadpool_limits

from maptools.quantization.engine.threads import compute_threads


def _blas_threads() -> list[int]:
    return [pool["num_threads"] for pool in threadpool_info() if pool["user_api"] == "blas"]


def test_compute_threads_limits_torch_and_numpys_blas_and_restores_them() -> None:
    np.dot(np.ones((64, 64)), np.ones((64, 64)))  # numpy's BLAS is loaded
    assert _blas_threads(), "numpy has no BLAS thread pool threadpoolctl can see"
    with threadpool_limits(limits=2, user_api="blas"):
        torch.set_num_threads(2)
        with compute_threads(1):
            assert torch.get_num_threads() == 1
            assert set(_blas_threads()) == {1}
        assert torch.get_num_threads() == 2
        assert set(_blas_threads()) == {2}


def test_quantize_runs_with_one_blas_thread(tmp_path, monkeypatch) -> None:
    """While maptools computes (PPQ's calibration, where the weight scales are chosen, the extraction and export,
    the error analysis) torch and numpy's BLAS have one thread each (torch alone left numpy's OpenBLAS threads
    spinning beside other jobs, and torch's own pool at 2 outside the calibration); both are restored after."""
    from maptools.examples import digits
    from maptools.quantization import pipeline, quantize
    from maptools.quantization.engine import quantizer

    seen: dict[str, list[tuple[int, list[int]]]] = {}

    def recording(module, name):
        original = getattr(module, name)

        def wrapper(*args, **kwargs):
            seen.setdefault(name, []).append((torch.get_num_threads(), _blas_threads()))
            return original(*args, **kwargs)

        monkeypatch.setattr(module, name, wrapper)

    recording(quantizer, "weight_scales")  # inside PPQ's calibration
    for stage in ("run_engine", "extract", "analyse"):  # the pipeline's computing stages
        recording(pipeline, stage)
    with threadpool_limits(limits=2, user_api="blas"):
        torch.set_num_threads(2)
        quantize({"input": list(digits.INPUT_SHAPE)}, "cpu", digits.MODEL_PATH, mapname="t", calib_steps=8,
                 bit_width=8, mapsave_dir=tmp_path)
        assert torch.get_num_threads() == 2 and set(_blas_threads()) == {2}
    assert set(seen) == {"weight_scales", "run_engine", "extract", "analyse"}
    assert all(t == 1 and set(blas) == {1} for calls in seen.values() for t, blas in calls), seen
