"""Issue 22, part A: the swap replaces only a map, the lock file is never followed, OS errors while writing are
clear errors, readers see one consistent map, map names end where they seem to."""

from __future__ import annotations

import errno
import fcntl
import json
import os
import subprocess
import sys
import textwrap
import threading
import time
from pathlib import Path

import numpy as np
import pytest

import maptools
from maptools import InvalidArgumentError, MapWriteError, NotAMapError
from maptools.cli import main
from maptools.quantization import mapdir, quantize, read_map, read_quantinfo, read_quantparams
from maptools.quantization.artifacts import (
    MANIFEST,
    QUANTINFO,
    QUANTMODEL,
    QUANTPARAMS,
    REPORT_JSON,
    dump_json,
    dump_pickle,
    read_manifest,
    write_map,
)
from maptools.quantization.records import OperatorQuantConfig

REPO = Path(maptools.__file__).resolve().parents[1]
SHAPES = {"input": [2, 3, 8, 8]}


def _names(root: Path) -> list[str]:
    return sorted(p.name for p in root.iterdir())


def _info(value: int) -> dict[str, OperatorQuantConfig]:
    """A quantinfo of one record that carries ``value`` (readers check the records' schema)."""
    return {"v": OperatorQuantConfig("v", "Relu", output_scale=float(value))}


def _params(value: int) -> dict[str, np.ndarray]:
    return {"v": np.array([value], dtype=np.int64)}


def _value(contents: dict) -> int:
    """The value a map of :func:`_small_map` was written with (from its quantinfo or its quantparams)."""
    item = contents["v"]
    return int(item.output_scale) if isinstance(item, OperatorQuantConfig) else int(item[0])


def _small_map(root: Path, value: int, name: str = "m") -> None:
    write_map(root / name, {QUANTINFO: dump_pickle(_info(value)), QUANTPARAMS: dump_pickle(_params(value)),
                            QUANTMODEL: str(value).encode()}, {})


def _quantize(model: Path, root: Path, name: str = "m", **kwargs):
    return quantize(SHAPES, "cpu", model, mapname=name, calib_steps=8, analysis_steps=1, mapsave_dir=root,
                    recipe="fast", **kwargs)


def _cli_quantize(model: Path, root: Path, name: str) -> int:
    return main(["quantize", str(model), "--input", "input:2,3,8,8", "--mapname", name, "--calib-steps", "8",
                 "--recipe", "fast", "--mapsave-dir", str(root)])


def _snapshot(root: Path) -> dict[str, object]:
    """Every path under ``root`` (links not followed): a file's bytes, a link's target, a folder's mark."""
    found: dict[str, object] = {}
    for path in sorted(root.rglob("*")):
        key = str(path.relative_to(root))
        found[key] = (("link", os.readlink(path)) if path.is_symlink() else
                      path.read_bytes() if path.is_file() else "dir")
    return found


# -- 1. a folder that is not a map is never touched --------------------------------------------------------

def _user_folder(root: Path) -> None:
    (root / "m").mkdir(parents=True)
    (root / "m" / "main.py").write_text("print('my code')\n")


def _user_file(root: Path) -> None:
    root.mkdir(parents=True)
    (root / "m").write_text("my notes\n")


def _link_to_map(root: Path) -> None:
    _small_map(root / "elsewhere", 1)
    (root / "m").symlink_to(root / "elsewhere" / "m")


def _dangling_link(root: Path) -> None:
    root.mkdir(parents=True)
    (root / "m").symlink_to(root / "nowhere")


def _map_with_a_user_file(root: Path) -> None:
    _small_map(root, 1)
    (root / "m" / "notes.txt").write_text("mine\n")


def _folder_with_a_foreign_manifest(root: Path) -> None:
    (root / "m").mkdir(parents=True)
    (root / "m" / MANIFEST).write_text(json.dumps({"name": "my package", "version": "1.0"}))


def _manifest_that_is_a_link(root: Path) -> None:
    _small_map(root / "elsewhere", 1)
    (root / "m").mkdir()
    (root / "m" / MANIFEST).symlink_to(root / "elsewhere" / "m" / MANIFEST)


FOREIGN = {
    "folder": (_user_folder, "it has no manifest.json that maptools wrote"),
    "file": (_user_file, "it is a file, not a folder"),
    "link_to_a_map": (_link_to_map, "it is a symbolic link"),
    "dangling_link": (_dangling_link, "it is a symbolic link"),
    "map_with_a_user_file": (_map_with_a_user_file, "it holds 'notes.txt', which its manifest.json does not list"),
    "foreign_manifest": (_folder_with_a_foreign_manifest, "its manifest.json lacks maptools' format_version"),
    "manifest_link": (_manifest_that_is_a_link, "it has no manifest.json that maptools wrote"),
}


@pytest.mark.parametrize("kind", sorted(FOREIGN))
def test_write_map_refuses_what_is_not_a_map_and_touches_nothing(tmp_path, kind):
    root = tmp_path / "proj"
    make, reason = FOREIGN[kind]
    make(root)
    before = _snapshot(tmp_path)
    with pytest.raises(NotAMapError, match=rf"^mapname: {root / 'm'} exists and is not a map written by maptools "
                                           rf"\({reason}") as caught:
        _small_map(root, 2)
    assert isinstance(caught.value, maptools.MaptoolsError) and isinstance(caught.value, FileExistsError)
    assert _snapshot(tmp_path) == before  # nothing moved, deleted or created (not even the lock file)


def test_quantize_refuses_a_folder_before_ppq_runs(tmp_path, tiny_onnx, monkeypatch):
    root = tmp_path / "proj"
    _user_folder(root)
    from maptools.quantization import pipeline

    def never(*args, **kwargs):
        raise AssertionError("the model was loaded: the check came too late")

    monkeypatch.setattr(pipeline, "load", never)
    with pytest.raises(NotAMapError, match="it has no manifest.json that maptools wrote"):
        _quantize(tiny_onnx, root)
    assert _names(root) == ["m"] and _names(root / "m") == ["main.py"]


@pytest.mark.parametrize("kind", ["folder", "file"])
def test_cli_exits_2_and_keeps_the_folder(tmp_path, tiny_onnx, capsys, kind):
    root = tmp_path / "proj"
    FOREIGN[kind][0](root)
    before = _snapshot(tmp_path)
    started = time.monotonic()
    assert _cli_quantize(tiny_onnx, root, "m") == 2
    assert time.monotonic() - started < 10
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith(f"maptools quantize: error: --mapname: {root / 'm'} exists and is not "
                                               "a map written by maptools")
    assert _snapshot(tmp_path) == before


def test_a_folder_appearing_during_the_run_is_refused_under_the_lock(tmp_path):
    root = tmp_path / "proj"
    _small_map(root, 1)

    def replace_by_user(staging: Path) -> None:  # after the early check, before the swap
        (root / "m" / "main.py").write_text("print('mine')\n")

    with pytest.raises(NotAMapError, match="it holds 'main.py'"):
        write_map(root / "m", {QUANTINFO: dump_pickle(_info(2))}, {}, before_swap=replace_by_user)
    assert _names(root) == [".m.lock", "m"]  # the staging folder is gone
    assert (root / "m" / "main.py").read_text() == "print('mine')\n"
    assert _value(read_quantinfo("m", root)) == 1


def test_a_map_is_still_replaced(tmp_path):
    root = tmp_path / "proj"
    _small_map(root, 1)
    (root / "m" / ".quantinfo.pkl.tmp-abcdefgh").write_bytes(b"left by a killed add_map_file")
    _small_map(root, 2)
    assert _value(read_quantinfo("m", root)) == 2 and _names(root) == [".m.lock", "m"]


def test_recovery_moves_and_removes_only_maptools_folders(tmp_path):
    root = tmp_path / "proj"
    root.mkdir()
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    (root / ".m.old-abcdefgh").mkdir()  # named like an earlier map, but the user's
    (root / ".m.old-abcdefgh" / "main.py").write_text("mine\n")
    (root / ".m.old-linklink").symlink_to(root / ".m.old-abcdefgh")  # a link of that name
    staging = root / f".m.tmp-{dead.pid}-abcdefgh"  # named like a dead writer's staging, holding a folder
    (staging / "sub").mkdir(parents=True)
    (root / f".m.tmp-{dead.pid}-abcdefgh\n").mkdir()  # not maptools' name at all (final newline)
    before = _snapshot(root)
    _small_map(root, 1)
    after = _snapshot(root)
    assert {k: v for k, v in after.items() if k in before} == before  # all left as they were
    assert _value(read_quantinfo("m", root)) == 1


# -- 6. disk full and other OS errors while writing ---------------------------------------------------------

def _fail_fsync(monkeypatch, at: int) -> None:
    """Make the ``at``-th ``os.fsync`` fail as a full disk does."""
    real, calls = os.fsync, []

    def fsync(fd: int) -> None:
        calls.append(fd)
        if len(calls) == at:
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        real(fd)

    monkeypatch.setattr(os, "fsync", fsync)


@pytest.mark.parametrize("at", [1, 3])
def test_disk_full_while_writing_is_a_clear_error_and_keeps_the_earlier_map(tmp_path, monkeypatch, at):
    root = tmp_path / "mapsave"
    _small_map(root, 1)
    before = _snapshot(root)
    _fail_fsync(monkeypatch, at)
    with pytest.raises(MapWriteError, match=rf"^mapname: could not write map 'm' at {root / 'm'}: No space left on "
                                            r"device \(ENOSPC\); nothing of this write was kept") as caught:
        _small_map(root, 2)
    assert isinstance(caught.value, maptools.MaptoolsError) and isinstance(caught.value, OSError)
    monkeypatch.undo()
    assert _snapshot(root) == before  # no staging folder left, the earlier map whole
    assert _value(read_map("m", root).quantinfo) == 1


def test_a_failed_rename_puts_the_earlier_map_back(tmp_path, monkeypatch):
    root = tmp_path / "mapsave"
    _small_map(root, 1)
    real = os.replace

    def replace(src, dst):
        if Path(src).name.startswith(".m.tmp-"):  # the new map into place: refused
            raise OSError(errno.EIO, os.strerror(errno.EIO), str(src))
        real(src, dst)

    monkeypatch.setattr(os, "replace", replace)
    with pytest.raises(MapWriteError, match=r"could not write map 'm' .*: Input/output error \(EIO\) at "):
        _small_map(root, 2)
    monkeypatch.undo()
    assert _names(root) == [".m.lock", "m"] and _value(read_quantinfo("m", root)) == 1


def test_disk_full_adding_a_file_changes_nothing(tmp_path, monkeypatch):
    root = tmp_path / "mapsave"
    _small_map(root, 1)
    before = _snapshot(root)
    manifest = json.loads((root / "m" / MANIFEST).read_text())
    _fail_fsync(monkeypatch, 2)  # the new file staged, the new manifest not
    with pytest.raises(MapWriteError, match="could not write map 'm' .*No space left on device"):
        mapdir.add_map_file(root / "m", REPORT_JSON, dump_json({"x": 1}), manifest)
    monkeypatch.undo()
    assert _snapshot(root) == before
    mapdir.add_map_file(root / "m", REPORT_JSON, dump_json({"x": 1}), manifest)
    assert read_map("m", root).report == {"x": 1}


def test_cli_disk_full_exits_2(tmp_path, tiny_onnx, monkeypatch, capsys):
    root = tmp_path / "mapsave"
    _quantize(tiny_onnx, root)
    before = _snapshot(root)
    real = mapdir._write_map

    def full(*args, **kwargs):
        _fail_fsync(monkeypatch, 2)
        real(*args, **kwargs)

    monkeypatch.setattr(mapdir, "_write_map", full)
    assert _cli_quantize(tiny_onnx, root, "m") == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("maptools quantize: error: --mapname: could not write map 'm' at ")
    assert "No space left on device (ENOSPC)" in err[0]
    monkeypatch.undo()
    assert _snapshot(root) == before and read_quantinfo("m", root)["conv"].weight_bits == 8


# -- 9 (lock half). the lock file is never followed ---------------------------------------------------------

def _lock_link(root: Path) -> Path:
    (root / ".m.lock").symlink_to(root / "victim")
    return root / "victim"


def _lock_fifo(root: Path) -> Path:
    os.mkfifo(root / ".m.lock")
    return root / "victim"


def _lock_folder(root: Path) -> Path:
    (root / ".m.lock").mkdir()
    return root / "victim"


@pytest.mark.parametrize("make", [_lock_link, _lock_fifo, _lock_folder])
def test_a_lock_file_that_is_not_a_regular_file_is_refused(tmp_path, make):
    root = tmp_path / "mapsave"
    _small_map(root, 1)
    (root / ".m.lock").unlink()
    victim = make(root)
    before = _snapshot(root)
    started = time.monotonic()
    with pytest.raises(NotAMapError, match=rf"the lock file {root / '.m.lock'} of map 'm' is not a regular file"):
        _small_map(root, 2)
    with pytest.raises(NotAMapError, match=r"^mapname: the lock file .*\.m\.lock "), mapdir.map_lock(root / "m", 1.0):
        pass  # the lock itself refuses it too, past the early check
    assert _value(read_map("m", root).quantinfo) == 1  # readers neither hang nor fail
    assert time.monotonic() - started < 10
    assert not victim.exists() and _snapshot(root) == before


def test_cli_dangling_lock_link_exits_2(tmp_path, tiny_onnx, capsys):
    root = tmp_path / "mapsave"
    root.mkdir()
    victim = _lock_link(root)
    assert _cli_quantize(tiny_onnx, root, "m") == 2
    assert "the lock file" in capsys.readouterr().err and not victim.exists()
    assert _names(root) == [".m.lock"]


# -- 8. map names end where they seem to --------------------------------------------------------------------

@pytest.mark.parametrize("name", ["abc\n", "abc\n\n", "a\nb"])
def test_a_mapname_with_a_newline_is_refused(tmp_path, tiny_onnx, capsys, name):
    with pytest.raises(InvalidArgumentError, match=r"mapname: 'abc\\n'|mapname: 'a\\nb'|mapname: 'abc\\n\\n'"):
        mapdir.check_mapname(name)
    with pytest.raises(InvalidArgumentError, match="mapname"):
        _quantize(tiny_onnx, tmp_path / "mapsave", name=name)
    assert _cli_quantize(tiny_onnx, tmp_path / "mapsave", name) == 2
    assert "argument --mapname:" in capsys.readouterr().err
    assert not (tmp_path / "mapsave").exists()


def test_exporter_node_names_end_where_they_seem_to():
    from maptools.quantization import artifacts

    assert artifacts._EXPORTER_NODE.match("PPQ_Operation_12")
    assert not artifacts._EXPORTER_NODE.match("PPQ_Operation_12\n")  # a node of the model, not the exporter's


# -- 7. readers see one consistent map ----------------------------------------------------------------------

SWAPPER = textwrap.dedent("""
    import sys, time
    from pathlib import Path
    import numpy as np
    from maptools.quantization.artifacts import QUANTINFO, QUANTMODEL, QUANTPARAMS, dump_pickle, write_map
    from maptools.quantization.records import OperatorQuantConfig

    root, seconds = Path(sys.argv[1]), float(sys.argv[2])
    pad = bytes(200_000)  # files big enough for reads to overlap swaps
    value, stop = 0, time.monotonic() + seconds
    while time.monotonic() < stop:
        value += 1
        info = {"v": OperatorQuantConfig("v", "Relu", output_scale=float(value))}
        params = {"v": np.array([value], dtype=np.int64), "pad": np.frombuffer(pad, dtype=np.int8)}
        write_map(root / "m", {QUANTINFO: dump_pickle(info), QUANTPARAMS: dump_pickle(params),
                               QUANTMODEL: str(value).encode() + pad}, {})
    print(value)
""")


def test_readers_racing_a_writer_see_one_map(tmp_path):
    root = tmp_path / "mapsave"
    _small_map(root, 0)
    script = tmp_path / "swapper.py"
    script.write_text(SWAPPER)
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")]))
    writer = subprocess.Popen([sys.executable, str(script), str(root), "4"], env=env, stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE, text=True)
    reads, seen = 0, set()
    try:
        while writer.poll() is None:
            contents = read_map("m", root)
            value = _value(contents.quantinfo)
            assert _value(contents.quantparams) == value  # both pickles of the same map
            assert contents.quant_model.split(b"\0")[0] == str(value).encode()
            assert _value(read_quantinfo("m", root)) >= value  # never a false "modified" or "missing" error
            assert _value(read_quantparams("m", root)) >= value
            reads, seen = reads + 1, seen | {value}
    finally:
        out, err = writer.communicate(timeout=60)
    assert writer.returncode == 0, err[-2000:]
    assert int(out) > 20 and len(seen) > 5, (out, len(seen), reads)  # the reads really overlapped many swaps
    assert _names(root) == [".m.lock", "m"]


INSPECT_SWAPPER = textwrap.dedent("""
    import sys, time
    from pathlib import Path
    from maptools.quantization.artifacts import QUANTINFO, dump_pickle, read_map, write_map

    root, seconds = Path(sys.argv[1]), float(sys.argv[2])
    base = read_map("m", root)
    node = next(name for name, record in base.quantinfo.items() if record.output_scale is not None)
    fields = {k: v for k, v in base.manifest.items() if k not in ("files", "format_version", "rounding")}
    value, stop = 0, time.monotonic() + seconds
    while time.monotonic() < stop:
        value += 1
        base.quantinfo[node].output_scale = float(value)  # the records and the manifest carry the same value
        fields["settings"] = dict(fields["settings"], seed=value)
        write_map(root / "m", {**base.files, QUANTINFO: dump_pickle(base.quantinfo)}, fields)
    print(value)
""")


def test_inspect_racing_a_writer_reads_one_map(tmp_path, tiny_onnx):
    """inspect reads the manifest, records and integers of one snapshot (before: three reads, two maps mixed)."""
    from maptools.quantization.inspection import inspect_map

    root = tmp_path / "mapsave"
    _quantize(tiny_onnx, root)
    script = tmp_path / "swapper.py"
    script.write_text(INSPECT_SWAPPER)
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")]))
    writer = subprocess.Popen([sys.executable, str(script), str(root), "4"], env=env, stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE, text=True)
    seen: set[int] = set()
    try:
        while writer.poll() is None:
            listing = inspect_map("m", root)
            seed = listing.manifest["settings"]["seed"]
            scales = {row["output_scale"] for row in listing.operators if row["output_scale"] is not None}
            if seed != 0:  # a swapped map: its record's scale is its seed, from the same snapshot
                assert float(seed) in scales, (seed, scales)
            seen.add(seed)
    finally:
        out, err = writer.communicate(timeout=60)
    assert writer.returncode == 0, err[-2000:]
    assert int(out) > 10 and len(seen) > 3, (out, seen)  # the reads overlapped many swaps


def test_read_map_returns_every_artifact(tmp_path, tiny_onnx):
    root = tmp_path / "mapsave"
    result = _quantize(tiny_onnx, root)
    contents = read_map("m", root)
    assert contents.directory == result.directory
    assert contents.quantinfo.keys() == read_quantinfo("m", root).keys() >= {"conv", "fc"}
    assert contents.quantparams.keys() == read_quantparams("m", root).keys()
    assert sorted(contents.files) == sorted(contents.manifest["files"])
    assert contents.quant_model == (root / "m" / QUANTMODEL).read_bytes()
    assert contents.report == json.loads((root / "m" / REPORT_JSON).read_text())
    assert contents.ppq_state is not None and contents.cim is None


def test_read_map_still_detects_a_modified_file(tmp_path):
    root = tmp_path / "mapsave"
    _small_map(root, 1)
    (root / "m" / QUANTPARAMS).write_bytes(dump_pickle(_params(9)))
    with pytest.raises(maptools.ArtifactError, match="quantparams.pkl was modified after quantize wrote it"):
        read_map("m", root)
    manifest = json.loads((root / "m" / MANIFEST).read_text())
    manifest["files"]["../outside"] = manifest["files"].pop(QUANTPARAMS)
    (root / "m" / MANIFEST).write_text(json.dumps(manifest))
    with pytest.raises(maptools.ArtifactError, match="lists '../outside', which is not a file name inside the map"):
        read_map("m", root)


def test_read_manifest_waits_for_a_swap_in_progress(tmp_path):
    root = tmp_path / "mapsave"
    _small_map(root, 1)
    _small_map(root / "next", 2)
    fd = os.open(root / ".m.lock", os.O_RDWR)
    fcntl.flock(fd, fcntl.LOCK_EX)  # a writer between its two renames
    os.replace(root / "m", root / ".m.old-abcdefgh")

    def finish() -> None:
        time.sleep(0.3)
        os.replace(root / "next" / "m", root / "m")
        os.close(fd)

    writer = threading.Thread(target=finish)
    writer.start()
    try:
        manifest = read_manifest(root / "m")  # the path the reader resolved before the swap began
    finally:
        writer.join()
    assert manifest == json.loads((root / "m" / MANIFEST).read_text())


def test_simulate_loads_one_map_while_it_is_replaced(tmp_path, tiny_onnx, monkeypatch):
    import onnx

    from maptools.quantization.reference import ReferenceExecutor

    root = tmp_path / "mapsave"
    _quantize(tiny_onnx, root, bit_width=8)
    _quantize(tiny_onnx, root / "next", bit_width=4)
    real = onnx.load_from_string

    def swap_then_parse(data: bytes):  # another quantize swaps the map in while the loader is at work
        if (root / "next" / "m").exists():
            os.replace(root / "m", root / ".m.old-abcdefgh")
            os.replace(root / "next" / "m", root / "m")
        return real(data)

    monkeypatch.setattr(onnx, "load_from_string", swap_then_parse)
    executor = ReferenceExecutor.load("m", root)
    assert not (root / "next" / "m").exists()  # the swap did happen meanwhile
    assert {cfg.weight_bits for cfg in executor.quantinfo.values() if cfg.has_weight} == {8}  # the 8-bit map's
    assert abs(executor.quantparams["conv_conv_weight"]).max() > 8  # its 8-bit weights, not the 4-bit ones
