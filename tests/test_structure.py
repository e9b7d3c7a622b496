"""The structure of the package: one strict stack of layers, each importing only itself and those below, no cycle.

Every import counts: at module level, inside functions and under ``if TYPE_CHECKING``; ``from pkg import name``
counts as importing ``pkg.name`` when that is a module, else ``pkg`` (whose ``__init__`` counts as importing what
it imports). The import of a submodule is not counted as an import of its parent packages' ``__init__``.
"""

from __future__ import annotations

import ast
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
PACKAGE = REPO / "maptools"

#: The layers, bottom first: a module prefix -> its layer (the longest matching prefix decides).
LAYERS: dict[str, int] = {
    # 0: errors, the map format and its files, integer arithmetic, bounded reading, schemas, records
    "maptools": 0,
    "maptools.errors": 0,
    "maptools._lazy": 0,
    "maptools.quantization.format": 0,
    "maptools.quantization.intmath": 0,
    "maptools.quantization.boundedio": 0,
    "maptools.quantization.schemas": 0,
    "maptools.quantization.validation": 0,
    "maptools.quantization.mapdir": 0,
    "maptools.quantization.snapshot": 0,
    "maptools.quantization.artifacts": 0,
    "maptools.quantization.records": 0,
    "maptools.quantization.placement": 0,
    "maptools.quantization.progress": 0,
    "maptools.quantization.floatops": 0,
    "maptools.quantization.diagnostics": 0,
    "maptools.quantization.report": 0,
    # 1: crossbar arithmetic (numpy only), and a map's ADC calibration as data
    "maptools.quantization.cim": 1,
    # 2: the integer reference executor
    "maptools.quantization.reference": 2,
    # 3: the float model, its calibration data and PPQ (engine/ is its only door); verify replays PPQ
    "maptools.quantization.model": 3,
    "maptools.quantization.opset": 3,
    "maptools.quantization.opset_rules": 3,
    "maptools.quantization.folding": 3,
    "maptools.quantization.hardswish": 3,
    "maptools.quantization.affine": 3,
    "maptools.quantization.calibfolders": 3,
    "maptools.quantization.calibration": 3,
    "maptools.quantization.config": 3,
    "maptools.quantization.options": 3,
    "maptools.quantization.engine": 3,
    "maptools.quantization.lowbit": 3,
    "maptools.quantization.replay": 3,
    # 4: map-level features driving the executor
    "maptools.quantization.cimmap": 4,
    "maptools.quantization.verify": 4,
    "maptools.quantization.inspection": 4,
    "maptools.quantization.mapinputs": 4,
    # 5: the quantize pipeline, its API and the examples built on it
    "maptools.quantization": 5,
    "maptools.quantization.pipeline": 5,
    "maptools.quantization.api": 5,
    "maptools.quantization.search": 5,
    "maptools.examples": 5,
    # 6: the command line
    "maptools.cli": 6,
    "maptools.__main__": 6,
}

#: Layer 1 imports nothing but numpy and the standard library outside maptools.
NUMPY_ONLY_LAYER = 1


def modules() -> dict[str, Path]:
    """Every module of maptools by dotted name (a package by its own name)."""
    found = {}
    for path in PACKAGE.rglob("*.py"):
        parts = list(path.relative_to(REPO).with_suffix("").parts)
        if parts[-1] == "__init__":
            parts = parts[:-1]
        found[".".join(parts)] = path
    return found


def _import_nodes(tree: ast.Module) -> list[ast.Import | ast.ImportFrom]:
    return [node for node in ast.walk(tree) if isinstance(node, (ast.Import, ast.ImportFrom))]


def imports(path: Path, name: str, known: dict[str, Path]) -> tuple[set[str], set[str]]:
    """The maptools modules and the outside top-level packages that module ``name`` imports, anywhere in it."""
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    inside: set[str] = set()
    outside: set[str] = set()
    tree = ast.parse(path.read_text())
    for target in _lazy_modules(tree):
        inside.add(target)
        inside.update(_packages_run(target, name, known))
    for node in _import_nodes(tree):
        if isinstance(node, ast.Import):
            targets = [alias.name for alias in node.names]
        else:
            base = node.module or ""
            if node.level:
                parent = package
                for _ in range(node.level - 1):
                    parent = parent.rpartition(".")[0]
                base = parent + ("." + base if base else "")
            targets = [f"{base}.{a.name}" if f"{base}.{a.name}" in known else base for a in node.names]
        for target in targets:
            if target.split(".")[0] != "maptools":
                outside.add(target.split(".")[0])
                continue
            while target not in known:
                target = target.rpartition(".")[0]
            if target != name:
                inside.add(target)
            inside.update(_packages_run(target, name, known))
    return inside, outside


def _lazy_modules(tree: ast.Module) -> set[str]:
    """The modules a package imports on first use: the values of the table it gives ``lazy_attributes``."""
    tables = {target.id: node.value for node in tree.body if isinstance(node, (ast.Assign, ast.AnnAssign))
              for target in (node.targets if isinstance(node, ast.Assign) else [node.target])
              if isinstance(target, ast.Name) and isinstance(node.value, ast.Dict)}
    found = set()
    for call in ast.walk(tree):
        if (isinstance(call, ast.Call) and isinstance(call.func, ast.Name) and call.func.id == "lazy_attributes"
                and len(call.args) == 3 and isinstance(call.args[2], ast.Name) and call.args[2].id in tables):
            found.update(value.value for value in tables[call.args[2].id].values
                         if isinstance(value, ast.Constant) and isinstance(value.value, str))
    return found


def _packages_run(target: str, importer: str, known: dict[str, Path]) -> set[str]:
    """The packages whose ``__init__`` importing ``target`` runs first: those above it, other than the two roots
    (their facades import everything) and the importer's own packages (already running)."""
    found = set()
    parts = target.split(".")
    for end in range(3, len(parts)):
        package = ".".join(parts[:end])
        if package in known and not (importer == package or importer.startswith(package + ".")):
            found.add(package)
    return found


def graph() -> dict[str, set[str]]:
    """Module -> the maptools modules it imports."""
    known = modules()
    return {name: imports(path, name, known)[0] for name, path in known.items()}


def layer(name: str) -> int:
    """The layer of a module, by the longest prefix of :data:`LAYERS` that names it or a package above it."""
    parts = name.split(".")
    for end in range(len(parts), 0, -1):
        prefix = ".".join(parts[:end])
        if prefix in LAYERS:
            return LAYERS[prefix]
    raise KeyError(name)


def test_every_module_has_a_layer() -> None:
    """Each module is named in :data:`LAYERS`, or lies in a named package other than the two roots."""
    roots = {"maptools", "maptools.quantization"}
    parts = {name: name.split(".") for name in modules()}
    assert [name for name, p in parts.items()
            if not any(".".join(p[:end]) in LAYERS and (end == len(p) or ".".join(p[:end]) not in roots)
                       for end in range(1, len(p) + 1))] == []


def cycles(edges: dict[str, set[str]]) -> list[list[str]]:
    """The strongly connected components of more than one module (Tarjan)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    found: list[list[str]] = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        for w in sorted(edges.get(v, ())):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while True:
                w = stack.pop()
                component.append(w)
                if w == v:
                    break
            if len(component) > 1:
                found.append(sorted(component))

    for v in sorted(edges):
        if v not in index:
            visit(v)
    return found


def upward(edges: dict[str, set[str]]) -> list[tuple[str, str]]:
    """The imports that run up the stack: ``(importer, imported)`` with the imported module in a higher layer."""
    return sorted((a, b) for a, targets in edges.items() for b in targets if layer(b) > layer(a))


def test_no_import_cycle_at_any_depth() -> None:
    assert cycles(graph()) == []


def test_every_import_runs_down_the_stack() -> None:
    assert upward(graph()) == []


def test_crossbar_arithmetic_imports_numpy_only() -> None:
    known = modules()
    outside = {name: imports(path, name, known)[1] - {"__future__", "numpy"} for name, path in known.items()
               if layer(name) == NUMPY_ONLY_LAYER}
    assert {name: sorted(found - sys.stdlib_module_names) for name, found in outside.items()
            if found - sys.stdlib_module_names} == {}


def test_the_checks_find_cycles_and_upward_imports() -> None:
    assert cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]
    assert upward({"maptools.errors": {"maptools.cli"}, "maptools.cli": {"maptools.errors"}}) == [
        ("maptools.errors", "maptools.cli")]


@pytest.mark.parametrize(("text", "expected"), [
    ("from typing import TYPE_CHECKING\nif TYPE_CHECKING:\n    from maptools import cli\n"
     "def f():\n    import maptools.quantization.reference\n", {"maptools.cli", "maptools.quantization.reference"}),
    ("from maptools._lazy import lazy_attributes\n_LAZY = {'f': 'maptools.cli'}\n"
     "__getattr__, __dir__ = lazy_attributes(__name__, globals(), _LAZY)\n", {"maptools.cli", "maptools._lazy"}),
], ids=["function-level-and-type-checking", "lazy-table"])
def test_every_kind_of_import_counts(tmp_path: Path, text: str, expected: set[str]) -> None:
    source = tmp_path / "m.py"
    source.write_text(text)
    known = {"maptools.cli": source, "maptools._lazy": source, "maptools.quantization.reference": source, "m": source}
    assert imports(source, "m", known)[0] == expected


def test_the_package_lazy_table_is_in_the_graph() -> None:
    assert "maptools.quantization.calibfolders" in graph()["maptools.quantization"]


def test_importing_a_submodule_runs_its_packages(tmp_path: Path) -> None:
    """``import a.b.c`` runs ``a.b``'s ``__init__`` first: the cycle cluster -> cimmap.pool -> cimmap/__init__ ->
    sweep -> cluster (an ImportError at run time) is one for the test too."""
    cluster = tmp_path / "cluster.py"
    cluster.write_text("from maptools.quantization.cimmap.pool import process_pool\n")
    package = tmp_path / "__init__.py"
    package.write_text("from maptools.quantization.cimmap.sweep import cim_sweep\n")
    sweep = tmp_path / "sweep.py"
    sweep.write_text("from maptools.quantization.cluster import task_pool\n"
                     "from maptools.quantization.cimmap.pool import process_pool\n")
    known = {"maptools.quantization.cluster": cluster, "maptools.quantization.cimmap": package,
             "maptools.quantization.cimmap.sweep": sweep, "maptools.quantization.cimmap.pool": tmp_path / "p.py"}
    edges = {name: imports(path, name, known)[0] for name, path in known.items() if path.name != "p.py"}
    assert edges["maptools.quantization.cluster"] == {"maptools.quantization.cimmap.pool",
                                                      "maptools.quantization.cimmap"}
    assert "maptools.quantization.cimmap" not in edges["maptools.quantization.cimmap.sweep"]  # its own package
    assert cycles(edges) == [["maptools.quantization.cimmap", "maptools.quantization.cimmap.sweep",
                              "maptools.quantization.cluster"]]


def test_only_the_engine_facade_imports_ppq() -> None:
    """PPQ sits behind one module: every other module takes its PPQ names from the facade."""
    known = modules()
    assert sorted(name for name, path in known.items() if "ppq" in imports(path, name, known)[1]) == [
        "maptools.quantization.engine.facade"]


#: Modules whose ``__all__`` lists names defined elsewhere, on purpose: PPQ's names behind the facade, the format's
#: and map directory's names where user code imports them, the digits example's helpers the mobile one shares.
REEXPORTING = {"maptools.quantization.engine.facade", "maptools.quantization.artifacts", "maptools.examples.mobile"}


def defined_elsewhere(path: Path) -> list[str]:
    """The names of a module's ``__all__`` that it does not define itself (it imports them)."""
    tree = ast.parse(path.read_text())
    listed: list[str] = []
    defined: set[str] = set()
    for node in tree.body:
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
            defined.add(node.name)
        elif isinstance(node, (ast.Assign, ast.AnnAssign)):
            targets = node.targets if isinstance(node, ast.Assign) else [node.target]
            names = {leaf.id for target in targets for leaf in ast.walk(target) if isinstance(leaf, ast.Name)}
            if "__all__" in names:
                listed = list(ast.literal_eval(node.value))
            defined |= names
    return [name for name in listed if name not in defined]


def test_a_module_exports_only_what_it_defines() -> None:
    """A name has one home: a module other than a package's ``__init__`` and :data:`REEXPORTING` does not
    re-export what another module defines (its users import it from there)."""
    assert {name: found for name, path in modules().items() if path.name != "__init__.py"
            and name not in REEXPORTING and (found := defined_elsewhere(path))} == {}
