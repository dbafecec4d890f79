"""The package graph has no cycles and every import follows data -> models -> losses -> engine -> search/export.

Read from the AST of every module under src/lgur, imports at the top AND inside functions (a lazy
import is still a dependency). Names taken from a package face (`from lgur.search import Searcher`)
count as imports of the submodule they resolve to (lgur._lazy.TABLES). Two kinds of import are not
edges of the graph: those inside a module-level `__getattr__` (a re-export kept for users, resolved on
attribute access) and `if TYPE_CHECKING:` blocks.

Layers (a module may import its own layer and the ones below it):
    0 base: lgur, errors, config, _lazy, files, runtime
    1 data          2 models (+ lgur.checkpoint, its public name)
    3 losses, eval  4 engine          5 search, export
The command line sits on top: lgur.cli, lgur.__main__ and lgur.demo may import anything. An area's own
CLI module (`data/cli.py`, ...) is held to its area's layer (`lgur data-check` must not need models),
and nothing but a CLI module may import a CLI module.
"""
from __future__ import annotations

import ast
import importlib
from pathlib import Path

import pytest

import lgur
from lgur import _lazy

SRC = Path(lgur.__file__).resolve().parent
BASE = {"lgur", "lgur.errors", "lgur.config", "lgur._lazy", "lgur.files", "lgur.runtime"}
LAYER_OF_AREA = {"data": 1, "models": 2, "checkpoint": 2, "losses": 3, "eval": 3, "engine": 4, "search": 5,
                 "export": 5, "video": 6}
TOP = 7


def _modules(src: Path) -> dict[str, Path]:
    mods = {}
    for p in sorted(src.rglob("*.py")):
        parts = list(p.relative_to(src.parent).with_suffix("").parts)
        if parts[-1] == "__init__":
            parts.pop()
        mods[".".join(parts)] = p
    return mods


def is_cli(name: str) -> bool:
    return name in ("lgur.cli", "lgur.__main__", "lgur.demo") or name.endswith(".cli")


def layer(name: str) -> int:
    if name in ("lgur.cli", "lgur.__main__", "lgur.demo"):
        return TOP
    if name in BASE:
        return 0
    area = name.split(".")[1]
    if area not in LAYER_OF_AREA:
        raise AssertionError(f"{name}: not in any layer of tests/test_import_graph.py; add its area there")
    return LAYER_OF_AREA[area]


class _Imports(ast.NodeVisitor):
    def __init__(self):
        self.found: list[tuple[str, list[str], int, int]] = []  # (module, names, level, line)
        self.depth = 0

    def visit_FunctionDef(self, node):
        if self.depth == 0 and node.name == "__getattr__":
            return  # module-level lazy re-export: not a dependency of the module's own code
        self.depth += 1
        self.generic_visit(node)
        self.depth -= 1

    visit_AsyncFunctionDef = visit_FunctionDef

    def visit_ClassDef(self, node):
        self.depth += 1
        self.generic_visit(node)
        self.depth -= 1

    def visit_If(self, node):
        test = node.test
        if isinstance(test, ast.Name) and test.id == "TYPE_CHECKING" or \
                isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING":
            for n in node.orelse:
                self.visit(n)
            return
        self.generic_visit(node)

    def visit_Import(self, node):
        for a in node.names:
            self.found.append((a.name, [], 0, node.lineno))

    def visit_ImportFrom(self, node):
        self.found.append((node.module or "", [a.name for a in node.names], node.level, node.lineno))


def import_graph(src: Path = SRC) -> dict[str, dict[str, int]]:
    """module -> {imported lgur module: line of the first such import}."""
    mods = _modules(src)
    for pkg in mods:  # fill lgur._lazy.TABLES (package faces import no torch)
        if (mods[pkg].name == "__init__.py"):
            importlib.import_module(pkg)
    tables = _lazy.TABLES

    def resolve(target: str) -> str | None:
        while target and target not in mods:
            target = target.rpartition(".")[0]
        return target or None

    graph: dict[str, dict[str, int]] = {}
    for name, path in mods.items():
        package = name if path.name == "__init__.py" else name.rpartition(".")[0]
        visitor = _Imports()
        visitor.visit(ast.parse(path.read_text(), str(path)))
        edges = graph.setdefault(name, {})
        for module, names, level, line in visitor.found:
            if level:
                base = package.split(".")
                module = ".".join(base[: len(base) - level + 1] + ([module] if module else []))
            if not (module == "lgur" or module.startswith("lgur.")):
                continue
            targets = []
            for n in names:
                if f"{module}.{n}" in mods:
                    targets.append(f"{module}.{n}")
                elif module in tables and n in tables[module]:
                    entry = tables[module][n]
                    targets.append(f"{module}.{entry[0] if isinstance(entry, tuple) else entry}")
                else:
                    targets.append(module)
            for t in targets or [module]:
                t = resolve(t)
                if t and t != name:
                    edges.setdefault(t, line)
    return graph


def cycles(graph: dict[str, dict[str, int]]) -> list[list[str]]:
    """Strongly connected components with more than one node (Tarjan, iterative)."""
    index, low, on, stack, out, counter = {}, {}, set(), [], [], [0]
    for root in graph:
        if root in index:
            continue
        work = [(root, iter(graph[root]))]
        index[root] = low[root] = counter[0]; counter[0] += 1
        stack.append(root); on.add(root)
        while work:
            v, it = work[-1]
            for w in it:
                if w not in index:
                    index[w] = low[w] = counter[0]; counter[0] += 1
                    stack.append(w); on.add(w)
                    work.append((w, iter(graph.get(w, {}))))
                    break
                if w in on:
                    low[v] = min(low[v], index[w])
            else:
                work.pop()
                if work:
                    low[work[-1][0]] = min(low[work[-1][0]], low[v])
                if low[v] == index[v]:
                    comp = []
                    while True:
                        w = stack.pop(); on.discard(w); comp.append(w)
                        if w == v:
                            break
                    if len(comp) > 1:
                        out.append(sorted(comp))
    return out


def _path(p: Path) -> str:
    return str(p.relative_to(SRC.parent))


def test_no_import_cycles():
    graph = import_graph()
    mods = _modules(SRC)
    found = cycles(graph)
    detail = ["  " + " <-> ".join(c) + ": " + "; ".join(
        f"{_path(mods[a])}:{graph[a][b]} imports {b}" for a in c for b in graph[a] if b in c) for c in found]
    assert not found, "import cycles:\n" + "\n".join(detail)


def test_package_graph_has_no_cycles():
    """Areas (data, models, ..., search; their CLI modules included): no two areas import each other."""
    graph = import_graph()
    areas: dict[str, dict[str, int]] = {}
    for a, targets in graph.items():
        pa = a.split(".")[1] if a.count(".") else a
        for b in targets:
            pb = b.split(".")[1] if b.count(".") else b
            if pa != pb and b not in BASE and a not in BASE and pa not in ("cli", "demo", "__main__"):
                areas.setdefault(pa, {})[pb] = 0
            areas.setdefault(pb, {})
    assert not cycles(areas), f"areas import each other: {cycles(areas)}"


def test_imports_follow_the_layers():
    graph = import_graph()
    mods = _modules(SRC)
    wrong = [f"{_path(mods[a])}:{line} imports {b} ({'a CLI module' if is_cli(b) else f'layer {layer(b)}'} "
             f"above {a}'s layer {layer(a)})"
             for a, targets in graph.items() for b, line in targets.items()
             if (is_cli(b) and not is_cli(a)) or layer(b) > layer(a)]
    assert not wrong, "imports against data -> models -> losses -> engine -> search:\n  " + "\n  ".join(wrong)


def test_the_checker_sees_what_it_must(tmp_path):
    """Negative control: a function-level back edge and a relative-import cycle are both reported."""
    pkg = tmp_path / "lgur"
    for rel, text in {"__init__.py": "", "errors.py": "",
                      "data/__init__.py": "", "data/reader.py": "def f():\n    from lgur.models.net import N\n",
                      "models/__init__.py": "", "models/net.py": "from ..data import reader\nN = 1\n",
                      "search/__init__.py": "", "search/a.py": "from .b import x\n",
                      "search/b.py": "def g():\n    from lgur.search.a import y\n"}.items():
        (pkg / rel).parent.mkdir(parents=True, exist_ok=True)
        (pkg / rel).write_text(text)
    graph = import_graph(pkg)
    assert graph["lgur.data.reader"] == {"lgur.models.net": 2}
    assert graph["lgur.models.net"] == {"lgur.data.reader": 1}
    assert sorted(map(tuple, cycles(graph))) == [("lgur.data.reader", "lgur.models.net"),
                                                  ("lgur.search.a", "lgur.search.b")]
    assert layer("lgur.models.net") > layer("lgur.data.reader") and is_cli("lgur.search.cli")
