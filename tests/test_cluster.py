"""Scale-out: the search and cim-sweep on a Dask LocalCluster of 2 worker processes give the local pool's JSON."""

from __future__ import annotations

import json
import time
from pathlib import Path

import numpy as np
import pytest

from maptools.errors import InvalidArgumentError
from maptools.examples import digits
from maptools.quantization.cimmap import cim_sweep
from maptools.quantization.search import evaluate, search

SHAPES = {digits.INPUT_NAME: [16, *digits.INPUT_SHAPE[1:]]}


@pytest.fixture(scope="module")
def cluster():
    """Two worker processes of one thread each, on this machine."""
    from distributed import LocalCluster  # not on the oldest stack, which runs none of these tests

    with LocalCluster(n_workers=2, processes=True, threads_per_worker=1, dashboard_address=None,
                      silence_logs=40) as local:
        yield local


@pytest.mark.slow
def test_search_on_a_dask_cluster_gives_the_pool_json(cluster, tmp_path: Path) -> None:
    train, _ = digits.load_split("train")
    test, _ = digits.load_split("test")
    calib, held_out = [train[i:i + 16] for i in range(0, 128, 16)], [test[i:i + 16] for i in range(0, 32, 16)]
    settings = dict(weight_bits=(4, 8), activation_bits=(8,), points=2, cache_dir=None, recipe="fast",
                    front_metric=evaluate.output_snr, verify_front=True)
    pool = search(digits.MODEL_PATH, SHAPES, calib, held_out, jobs=2, **settings)
    dask = search(digits.MODEL_PATH, SHAPES, calib, held_out, cluster=cluster.scheduler_address, **settings)
    # the front's second quantizations run on the cluster too
    assert pool.computed == dask.computed == len(pool.uniform) + len(pool.points) + len(pool.front)
    assert pool.data["front_verification"]["all_reproduced"]
    assert pool.to_json() == dask.to_json()  # byte for byte
    assert pool.save(tmp_path / "pool.json").read_bytes() == dask.save(tmp_path / "dask.json").read_bytes()
    assert b'"seconds"' not in (tmp_path / "pool.json").read_bytes()
    assert len(pool.points) >= 2 and all(np.isfinite(p["figure"]) for p in pool.points)


def test_sweep_on_a_dask_cluster_gives_the_pool_json(cluster, digits_w4a4_mapsave: Path, tmp_path: Path) -> None:
    test, labels = digits.load_split("test")
    kwargs = dict(inputs=[test[:32]], labels=labels[:32], adc_bits="4-5", rows="64", cell_bits="2",
                  mapsave_dir=digits_w4a4_mapsave)
    pool = cim_sweep("digits_w4a4", jobs=2, **kwargs)
    dask = cim_sweep("digits_w4a4", cluster=cluster, **kwargs)
    assert len(pool.points) == 4 and pool.jobs == 2
    first, second = pool.save(tmp_path / "pool.json").read_bytes(), dask.save(tmp_path / "dask.json").read_bytes()
    assert first == second  # byte for byte: the timings are not in the JSON
    assert len(pool.timings()["points"]) == 4 and pool.timings()["seconds"] > 0 and b'"seconds"' not in first
    assert all(0 <= p["outputs"]["logits"]["vs_integer"]["top1"] <= 1 for p in json.loads(first)["points"])


def test_no_scheduler_is_a_clear_error(monkeypatch) -> None:
    from maptools.quantization.cimmap import cluster as module
    from maptools.quantization.cimmap.cluster import task_pool

    monkeypatch.setattr(module, "CONNECT_TIMEOUT_S", 2)
    started = time.perf_counter()
    expected = "cluster: no Dask scheduler answered at 'tcp://127.0.0.1:9' within 2 s"
    with pytest.raises(InvalidArgumentError, match=expected), task_pool(1, print, (), "tcp://127.0.0.1:9"):
        pass
    assert time.perf_counter() - started < 30


def test_multi_threaded_workers_are_refused_for_the_search() -> None:
    from distributed import LocalCluster

    from maptools.quantization.cimmap.cluster import task_pool

    with LocalCluster(n_workers=1, processes=False, threads_per_worker=2, dashboard_address=None) as local, \
            pytest.raises(InvalidArgumentError, match=r"cluster: workers with \[2\] threads"), \
            task_pool(1, print, (), local.scheduler_address, one_thread=True):
        pass
