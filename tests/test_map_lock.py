"""One writer per map at a time: the swap holds a lock, staging directories of live writers are kept, readers
rename nothing."""

from __future__ import annotations

import fcntl
import json
import os
import re
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

from maptools import MapBusyError
from maptools.cli import main
from maptools.examples import digits
from maptools.quantization import mapdir, read_quantinfo, read_quantparams
from maptools.quantization.artifacts import MANIFEST, QUANTINFO, dump_pickle, sha256_of, write_map
from maptools.quantization.records import OperatorQuantConfig

WRITER = textwrap.dedent("""
    import os, sys, time
    from pathlib import Path
    from maptools.quantization import artifacts, quantize

    root, seed, sync = sys.argv[1], int(sys.argv[2]), Path(sys.argv[3])
    real = artifacts.write_map

    def write_map(target, files, manifest, before_swap=None, **kwargs):
        def together(staging):  # both writers have their map staged: they swap at the same moment
            (sync / f"ready-{os.getpid()}").write_text("")
            deadline = time.monotonic() + 120
            while len(list(sync.glob("ready-*"))) < 2 and time.monotonic() < deadline:
                time.sleep(0.005)
        return real(target, files, manifest, before_swap=together, **kwargs)

    artifacts.write_map = write_map
    quantize({"input": [16, 1, 8, 8]}, "cpu", sys.argv[4], mapname="m", calib_steps=8, analysis_steps=1,
             mapsave_dir=root, recipe="fast", seed=seed)
""")


def _info(bits: int) -> dict[str, OperatorQuantConfig]:
    """A one-record quantinfo.pkl (what the reader's schema accepts) that tells two writers apart."""
    return {"x": OperatorQuantConfig("x", "Relu", output_bits=bits)}


def _names(root: Path) -> list[str]:
    return sorted(p.name for p in root.iterdir())


@pytest.mark.slow
def test_two_processes_writing_the_same_map(tmp_path):
    script = tmp_path / "writer.py"
    script.write_text(WRITER)
    root, sync = tmp_path / "mapsave", tmp_path / "sync"
    sync.mkdir()
    writers = [subprocess.Popen([sys.executable, str(script), str(root), str(seed), str(sync), str(digits.MODEL_PATH)],
                                stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True) for seed in (0, 1)]
    for writer in writers:
        _, err = writer.communicate(timeout=300)
        assert writer.returncode == 0, err[-3000:]
    assert len(list(sync.glob("ready-*"))) == 2
    assert _names(root) == [".m.lock", "m"]  # no staging or earlier map left behind
    manifest = json.loads((root / "m" / MANIFEST).read_text())
    assert manifest["settings"]["seed"] in (0, 1)
    assert sorted(manifest["files"]) == sorted(set(_names(root / "m")) - {MANIFEST})
    for name, entry in manifest["files"].items():  # one writer's map, whole
        assert sha256_of((root / "m" / name).read_bytes()) == entry["sha256"], name
    assert read_quantinfo("m", root) and read_quantparams("m", root)


def _dead_pid() -> int:
    child = subprocess.Popen([sys.executable, "-c", "pass"])
    child.wait()
    return child.pid


def test_only_staging_directories_of_writers_that_are_gone_are_removed(tmp_path):
    root = tmp_path / "mapsave"
    root.mkdir()
    hour_ago = time.time() - 2 * mapdir.STALE_SECONDS
    folders = {
        f".m.tmp-{os.getpid()}-abcdefgh": True,  # a live writer (this process): kept
        f".m.tmp-{_dead_pid()}-abcdefgh": False,  # its writer is gone
        f".m.tmp-{os.getpid()}-oldoldol": False,  # a live PID, but hours old: a reused PID
        ".m.tmp-abcdefgh": True,  # maptools 0.1 (no PID), recent: may be a live writer
        ".m.tmp-zyxwvuts": False,  # maptools 0.1, hours old
        f".m.tmp-1.tmp-{_dead_pid()}-abcdefgh": True,  # of map 'm.tmp-1', not of 'm'
    }
    for name in folders:
        (root / name).mkdir()
    for name in (f".m.tmp-{os.getpid()}-oldoldol", ".m.tmp-zyxwvuts"):
        os.utime(root / name, (hour_ago, hour_ago))
    write_map(root / "m", {QUANTINFO: dump_pickle(_info(1))}, {})
    kept = {name for name, keep in folders.items() if keep}
    assert set(_names(root)) == kept | {".m.lock", "m"}
    assert read_quantinfo("m", root) == _info(1)


@pytest.fixture
def held_lock(tmp_path):
    """Hold the exclusive lock of map 'm' in ``tmp_path / 'mapsave'`` (as a writer mid-swap would)."""
    root = tmp_path / "mapsave"
    root.mkdir()
    fd = os.open(root / ".m.lock", os.O_RDWR | os.O_CREAT)
    fcntl.flock(fd, fcntl.LOCK_EX)
    yield root
    os.close(fd)


def test_a_busy_map_makes_the_second_writer_give_up(held_lock, tiny_onnx, monkeypatch, capsys):
    root = held_lock
    started = time.monotonic()
    with pytest.raises(MapBusyError, match=r"mapname: map 'm' at .* is being written by another process \(it held "
                                           r".*\.m\.lock for 0\.2 s\)"):
        write_map(root / "m", {QUANTINFO: dump_pickle(_info(1))}, {}, lock_timeout=0.2)
    assert 0.2 <= time.monotonic() - started < 5
    assert _names(root) == [".m.lock"]  # nothing written, its staging directory removed
    monkeypatch.setattr(mapdir, "LOCK_TIMEOUT", 0.2)
    code = main(["quantize", str(tiny_onnx), "--input", "input:2,3,8,8", "--mapname", "m", "--calib-steps", "8",
                 "--recipe", "fast", "--mapsave-dir", str(root)])
    assert code == 2
    # the progress lines of a slow run (every 5 s when stderr is not a terminal) aside, one error line
    err = [line for line in capsys.readouterr().err.strip().splitlines()
           if not re.match(r"maptools quantize: \d+ s, ", line)]
    assert len(err) == 1 and err[0].startswith("maptools quantize: error: --mapname: map 'm' at ") and \
        "is being written by another process" in err[0]
    assert _names(root) == [".m.lock"]


def test_readers_rename_nothing_and_wait_for_a_swap(tmp_path, monkeypatch):
    root = tmp_path / "mapsave"
    write_map(root / "m", {QUANTINFO: dump_pickle(_info(1))}, {})
    os.replace(root / "m", root / ".m.old-abcdefgh")  # a writer between its two renames
    assert read_quantinfo("m", root) == _info(1)  # read where it lies
    assert _names(root) == [".m.lock", ".m.old-abcdefgh"]  # and nothing renamed
    fd = os.open(root / ".m.lock", os.O_RDWR)
    fcntl.flock(fd, fcntl.LOCK_EX)  # the writer is still at it
    monkeypatch.setattr(mapdir, "READ_WAIT", 0.2)
    try:
        with pytest.raises(MapBusyError, match="map 'm' at .* is being written by another process"):
            read_quantinfo("m", root)
    finally:
        os.close(fd)
    write_map(root / "m", {QUANTINFO: dump_pickle(_info(2))}, {})  # the next writer finishes the swap first
    assert read_quantinfo("m", root) == _info(2) and _names(root) == [".m.lock", "m"]
