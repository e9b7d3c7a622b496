"""Fuzz: malformed JSON and pickles, made from a real map, through every reader and command (issue 22).

Each case replaces one file of a valid map (the bundled digits CNN quantized with ``cim=``, so every artifact
exists) by a malformed version: truncated at several offsets, a field swapped for another type, deleted,
nested deeply, a huge number, NaN, an array of the wrong dtype or shape. Every case runs twice: with the
manifest's SHA-256 and size left stale (the hash check must refuse it) and updated to match (the parse and
schema checks must). Every reader must then raise only :class:`~maptools.MaptoolsError`s, ``verify`` must
record only those as the reason an execution could not run, the command line must exit 0 or 2 (``verify`` also
3: a MaptoolsError kept an execution from running; never "internal error"), and nothing may run past
:data:`CASE_SECONDS`. The cases are drawn with a fixed seed.

The readers and ``maptools inspect`` run on every case, ``verify`` on every case of the files it reads (a
sample of the others and of the stale-hash cases, which all stop at the hash), ``maptools verify`` and
``maptools cim-sweep`` on a sample (:data:`VERIFY_EVERY`, :data:`SWEEP_EVERY`): the file runs in about 40 s
of CPU.
"""

from __future__ import annotations

import contextlib
import copy
import io
import json
import math
import shutil
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from conftest import deadline

import maptools.errors
from maptools.cli import main
from maptools.errors import MaptoolsError
from maptools.quantization import read_quantinfo, read_quantparams, verify
from maptools.quantization.artifacts import (
    CIM_FILE,
    MANIFEST,
    PPQSTATE,
    QUANTINFO,
    QUANTPARAMS,
    dump_pickle,
    read_manifest,
    read_pickle,
    read_ppq_state,
    resolve_map,
    sha256_of,
)
from maptools.quantization.cim.mapcalibration import read_map_calibration
from maptools.quantization.records import OperatorQuantConfig, TensorQuant

SEED = 22
#: A case running longer than this is a hang.
CASE_SECONDS = 30
#: Paths of each JSON file whose value is swapped (drawn with the seed), and records of quantinfo.pkl.
JSON_PATHS = 10
RECORDS = 2
#: Every how many cases ``maptools verify`` (and verify in stale-hash cases) runs, and ``maptools cim-sweep``.
VERIFY_EVERY = 8
SWEEP_EVERY = 16
#: The files ``verify`` reads (it runs on every case of these, from Python).
VERIFY_READS = frozenset({MANIFEST, QUANTINFO, QUANTPARAMS, PPQSTATE})
MAP = "m"
SWEEP = ["--adc-bits", "4", "--rows", "64", "--cell-bits", "2", "--jobs", "1", "--batches", "1"]
_MAPTOOLS_ERRORS = frozenset(maptools.errors.__all__)


@pytest.fixture(scope="module")
def pristine(digits_cim_map: Path) -> Path:
    """The mapsave directory of :func:`digits_cim_map` (map ``m``, every artifact file); never changed."""
    return digits_cim_map


# -- malformed JSON ---------------------------------------------------------------------------------------------
_HUGE_FLOAT = "__huge_float__"
#: What a swapped JSON value becomes (a value of another type, a huge number, NaN...).
JSON_REPLACEMENTS: list[tuple[str, Any]] = [
    ("null", None), ("a string", "x"), ("-1", -1), ("a list", [1, 2]), ("an object", {"a": 1}), ("true", True),
    ("10**400", 10 ** 400), ("2**63", 2 ** 63), ("NaN", math.nan), ("1e999", _HUGE_FLOAT), ("0.5", 0.5),
    ("nested 100 deep", json.loads("[" * 100 + "]" * 100)), ("an empty object", {}),
]


def _json_paths(value: Any, prefix: tuple = ()) -> Iterator[tuple]:
    """Every path to a value inside parsed JSON (keys and list indexes), at most 8 deep and 40 items wide."""
    if prefix:
        yield prefix
    if len(prefix) >= 8:
        return
    if isinstance(value, dict):
        for key in list(value)[:40]:
            yield from _json_paths(value[key], (*prefix, key))
    elif isinstance(value, list):
        for index in range(min(len(value), 40)):
            yield from _json_paths(value[index], (*prefix, index))


def _replaced(value: Any, path: tuple, new: Any, delete: bool = False) -> Any:
    value = copy.deepcopy(value)
    parent = value
    for step in path[:-1]:
        parent = parent[step]
    if delete:
        del parent[path[-1]]
    else:
        parent[path[-1]] = new
    return value


def _dump(value: Any) -> bytes:
    return json.dumps(value).replace(f'"{_HUGE_FLOAT}"', "1e999").encode()


def json_cases(data: bytes, rng: np.random.Generator) -> list[tuple[str, bytes]]:
    """Malformed versions of a JSON file."""
    parsed = json.loads(data)
    cases = [(f"truncated at {cut}", data[:cut]) for cut in sorted({0, 1, len(data) // 3, len(data) - 2})]
    cases += [("top level []", b"[]"), ("top level a number", b"7"), ("top level a list of it", _dump([parsed])),
              ("nested 200000 deep", b"[" * 200_000 + b"]" * 200_000), ("not UTF-8", b"\xff\xfe{"),
              ("an integer of 5000 digits", b"1" * 5000)]
    paths = list(_json_paths(parsed))
    for index in rng.choice(len(paths), size=min(JSON_PATHS, len(paths)), replace=False):
        path = paths[int(index)]
        label = ".".join(map(str, path))
        if isinstance(path[-1], str):
            cases.append((f"{label} deleted", _dump(_replaced(parsed, path, None, delete=True))))
        for choice in rng.choice(len(JSON_REPLACEMENTS), size=2, replace=False):
            name, new = JSON_REPLACEMENTS[int(choice)]
            cases.append((f"{label} = {name}", _dump(_replaced(parsed, path, new))))
    return cases


# -- malformed pickles --------------------------------------------------------------------------------------------
def _bad_values() -> list[tuple[str, Any]]:
    return [("None", None), ("a string", "x"), ("-1", -1), ("10**30", 10 ** 30), ("NaN", math.nan), ("1.5", 1.5),
            ("a list", [1, 2, 3]), ("a dict", {"a": 1}), ("True", True),
            ("a float array with NaN", np.array([np.nan, 1.0], dtype=np.float32)),
            ("a 9-d array", np.zeros((1,) * 9, dtype=np.int8)), ("an empty array", np.zeros((0,), dtype=np.float32)),
            ("an object array", np.array([1, "a"], dtype=object)), ("a record", TensorQuant("t", 4, 1.0, 0, -8, 7))]


def _pickle_common(data: bytes) -> list[tuple[str, bytes]]:
    cases = [(f"truncated at {cut}", data[:cut]) for cut in sorted({0, 1, len(data) // 2, len(data) - 1})]
    deep = b"\x80\x04" + b"]" * 200_000 + b"a" * 199_999 + b"."  # 200,000 empty lists, each appended to the one below
    cases += [("top level [1, 2, 3]", dump_pickle([1, 2, 3])), ("top level None", dump_pickle(None)),
              ("top level a string", dump_pickle("x")), ("an int key", dump_pickle({1: None})),
              ("nested 200000 deep", deep)]
    return cases


def quantinfo_cases(data: bytes, rng: np.random.Generator) -> list[tuple[str, bytes]]:
    """Malformed versions of ``quantinfo.pkl``: every field of a few records swapped or deleted."""
    info: dict[str, OperatorQuantConfig] = read_pickle(data, QUANTINFO)
    cases = _pickle_common(data) + [("a value that is not a record", dump_pickle({**info, "x": {"name": "x"}}))]
    bad = _bad_values()
    weighted = [name for name, record in info.items() if record.weight_scale is not None]
    names = [weighted[0], *rng.choice(list(info), size=RECORDS - 1, replace=False)]
    fields = list(OperatorQuantConfig.__dataclass_fields__)
    for name in names:
        for field in fields:
            label, value = bad[int(rng.integers(len(bad)))]
            broken = copy.deepcopy(info)
            setattr(broken[name], field, value)
            cases.append((f"{name}.{field} = {label}", dump_pickle(broken)))
        broken = copy.deepcopy(info)
        del broken[name].__dict__[fields[int(rng.integers(len(fields)))]]
        cases.append((f"{name}: a field deleted", dump_pickle(broken)))
        record = broken[name]
        if record.outputs:
            broken = copy.deepcopy(info)
            tq = broken[name].outputs[0]
            if tq is not None:
                field = list(TensorQuant.__dataclass_fields__)[int(rng.integers(6))]
                label, value = bad[int(rng.integers(len(bad)))]
                setattr(tq, field, value)
                cases.append((f"{name}.outputs[0].{field} = {label}", dump_pickle(broken)))
    broken = copy.deepcopy(info)
    deep: list = []
    for _ in range(1000):
        deep = [deep]
    broken[weighted[0]].cim = {"layout": deep}
    cases.append((f"{weighted[0]}.cim nested 1000 deep", dump_pickle(broken)))
    return cases


def quantparams_cases(data: bytes, rng: np.random.Generator) -> list[tuple[str, bytes]]:
    """Malformed versions of ``quantparams.pkl``: arrays of other dtypes, shapes and values, keys missing."""
    params: dict[str, np.ndarray | None] = read_pickle(data, QUANTPARAMS)
    cases = _pickle_common(data)
    arrays = [key for key, value in params.items() if value is not None]
    for key in [arrays[0], *rng.choice(arrays, size=2, replace=False)]:
        value = params[key]
        variants = [("float32", value.astype(np.float32)), ("bool", value.astype(bool)),
                    ("flattened", value.reshape(-1)), ("one more axis", value[None]),
                    ("empty", value[:0]), ("int64 extremes", np.full(value.shape, np.iinfo(np.int64).max)),
                    ("None", None), ("a list", value.tolist()), ("transposed", value.T.copy()),
                    ("deleted", "__delete__")]
        for label, new in variants:
            broken = dict(params)
            if isinstance(new, str):
                del broken[key]
            else:
                broken[key] = new
            cases.append((f"{key} {label}", dump_pickle(broken)))
    return cases


# -- running one case ---------------------------------------------------------------------------------------------
def _readers(root: Path) -> dict[str, Callable[[], Any]]:
    return {
        "read_manifest": lambda: read_manifest(resolve_map(MAP, root)),
        "read_quantinfo": lambda: read_quantinfo(MAP, root),
        "read_quantparams": lambda: read_quantparams(MAP, root),
        "read_ppq_state": lambda: read_ppq_state(MAP, root),
        "read_map_calibration": lambda: read_map_calibration(MAP, root),
    }


def _cli(args: list[str], capsys: pytest.CaptureFixture) -> tuple[int, str]:
    with contextlib.redirect_stdout(io.StringIO()):
        code = main(args)
    return code, capsys.readouterr().err


def _write_case(pristine: Path, root: Path, filename: str, data: bytes, update_hash: bool) -> None:
    if root.exists():
        shutil.rmtree(root)
    shutil.copytree(pristine, root)
    directory = root / MAP
    (directory / filename).write_bytes(data)
    if update_hash and filename != MANIFEST:
        manifest = json.loads((directory / MANIFEST).read_text())
        manifest["files"][filename] = {"sha256": sha256_of(data), "bytes": len(data)}
        (directory / MANIFEST).write_text(json.dumps(manifest, indent=2))


def run_case(root: Path, case: str, capsys: pytest.CaptureFixture, run_verify: bool,
             commands: list[list[str]]) -> list[str]:
    """The readers, ``verify`` (if ``run_verify``) and ``commands`` on the map in ``root``: what went wrong."""
    problems = []
    with deadline(CASE_SECONDS, case):
        for name, reader in _readers(root).items():
            try:
                reader()
            except MaptoolsError:
                pass
            except Exception as exc:
                problems.append(f"{case}: {name} raised {type(exc).__name__}: {str(exc)[:160]}")
        try:
            if run_verify:
                report = verify(MAP, mapsave_dir=root, batches=1)
                for execution, reason in report.failures.items():
                    if reason.split(":")[0] not in _MAPTOOLS_ERRORS:
                        problems.append(f"{case}: verify's {execution} failed with {reason[:200]}")
        except MaptoolsError:
            pass
        except Exception as exc:
            problems.append(f"{case}: verify raised {type(exc).__name__}: {str(exc)[:160]}")
        for command in commands:
            code, err = _cli([*command, "--mapsave-dir", str(root)], capsys)
            # verify's 3: a clear report that an execution could not run (a MaptoolsError), not an internal error
            if code not in ((0, 2, 3) if command[0] == "verify" else (0, 2)) or "internal error" in err:
                problems.append(f"{case}: maptools {command[0]} exited {code}: {err.strip()[-200:]}")
    return problems


FILES: dict[str, Callable[[bytes, np.random.Generator], list[tuple[str, bytes]]]] = {
    MANIFEST: json_cases, PPQSTATE: json_cases, CIM_FILE: json_cases, QUANTINFO: quantinfo_cases,
    QUANTPARAMS: quantparams_cases,
}


@pytest.mark.parametrize("filename", list(FILES))
def test_malformed_artifacts_give_only_maptools_errors(filename, pristine, tmp_path, capsys):
    rng = np.random.default_rng([SEED, list(FILES).index(filename)])
    cases = FILES[filename]((pristine / MAP / filename).read_bytes(), rng)
    assert len(cases) >= 20
    modes = [True] if filename == MANIFEST else [True, False]  # the manifest has no hash of its own
    problems, started = [], time.monotonic()
    for number, (label, data) in enumerate(cases):
        for update_hash in modes:
            case = f"{filename}: {label} ({'hash updated' if update_hash else 'hash stale'})"
            _write_case(pristine, tmp_path / "mapsave", filename, data, update_hash)
            sample = number % VERIFY_EVERY == 0  # a stale hash fails the same way whatever the change: a sample
            commands = [["inspect", MAP]]  # maptools inspect runs inspect_map
            if update_hash and sample:
                commands.append(["verify", MAP, "--batches", "1"])
            if update_hash and number % SWEEP_EVERY == 0:
                commands.append(["cim-sweep", MAP, *SWEEP])
            run_verify = sample or (update_hash and filename in VERIFY_READS)
            problems += run_case(tmp_path / "mapsave", case, capsys, run_verify, commands)
    assert problems == [], "\n".join(problems)
    print(f"{filename}: {len(cases)} cases x {len(modes)} in {time.monotonic() - started:.1f} s")
