"""The layout of ``src/litune`` (docs/CONTRIBUTING.md): no import cycle between litune modules.

Every import counts, also one inside a function (a cycle hidden that way still ties the modules together) and one made
with ``importlib.import_module("a.b")`` (a module ``__getattr__`` that imports lazily is one); only
``if TYPE_CHECKING:`` blocks are left out, since they never run. Importing ``a.b.c`` also runs the packages ``a`` and
``a.b``, so those are edges too.
"""

from __future__ import annotations

import ast
from pathlib import Path

SRC = Path(__file__).resolve().parents[1] / "src"


def module_name(path: Path, root: Path) -> str:
    parts = list(path.relative_to(root).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def imported_names(tree: ast.AST) -> set[str]:
    """Absolute module names imported anywhere in ``tree`` except under ``if TYPE_CHECKING:``."""
    names: set[str] = set()

    def visit(node: ast.AST) -> None:
        for child in ast.iter_child_nodes(node):
            if isinstance(child, ast.If) and "TYPE_CHECKING" in ast.unparse(child.test):
                for stmt in child.orelse:
                    visit(stmt)
                continue
            if isinstance(child, ast.Import):
                names.update(alias.name for alias in child.names)
            elif isinstance(child, ast.ImportFrom) and child.module and child.level == 0:
                names.add(child.module)
                names.update(f"{child.module}.{alias.name}" for alias in child.names)  # `from pkg import module`
            elif (name := dynamic_import(child)) is not None:
                names.add(name)
            visit(child)

    visit(tree)
    return names


def dynamic_import(node: ast.AST) -> str | None:
    """The module named by ``importlib.import_module("a.b")`` or ``__import__("a.b")`` with a literal name."""
    if not isinstance(node, ast.Call) or not node.args:
        return None
    func = node.func
    called = func.attr if isinstance(func, ast.Attribute) else func.id if isinstance(func, ast.Name) else None
    first = node.args[0]
    if called in ("import_module", "__import__") and isinstance(first, ast.Constant) and isinstance(first.value, str):
        return first.value
    return None


def import_graph(root: Path, package: str) -> dict[str, set[str]]:
    """Module -> the modules of ``package`` that importing it runs."""
    modules = {module_name(p, root): p for p in (root / package).rglob("*.py")}
    graph: dict[str, set[str]] = {}
    for name, path in modules.items():
        deps: set[str] = set()
        for target in imported_names(ast.parse(path.read_text())):
            while target and target not in modules:  # `from pkg.mod import function` -> pkg.mod
                target = target.rpartition(".")[0]
            parent = target
            while parent:  # the module and the packages above it, except the importer's own packages
                if parent != name and not name.startswith(parent + "."):
                    deps.add(parent)
                parent = parent.rpartition(".")[0]
        graph[name] = deps
    return graph


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """The strongly connected components with more than one module (Tarjan), i.e. the import cycles."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    found: list[list[str]] = []

    def connect(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        for w in graph.get(v, ()):
            if w not in index:
                connect(w)
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

    for v in sorted(graph):
        if v not in index:
            connect(v)
    return found


def test_litune_has_no_import_cycle() -> None:
    graph = import_graph(SRC, "litune")
    assert "litune.errors" in graph["litune.models.transformer"]  # the graph is really read from the sources
    assert cycles(graph) == []


def test_the_check_finds_a_cycle_hidden_in_a_function(tmp_path) -> None:
    """What the structure pass removed (models/transformer.py <-> models/convert.py through an in-function import)
    is found, and a TYPE_CHECKING-only import is not."""
    pkg = tmp_path / "pkg"
    pkg.mkdir()
    (pkg / "__init__.py").write_text("")
    (pkg / "net.py").write_text("def save():\n    from pkg.convert import to_hf\n    return to_hf\n")
    (pkg / "convert.py").write_text("from pkg.net import save\n")
    (pkg / "hints.py").write_text("from typing import TYPE_CHECKING\nif TYPE_CHECKING:\n    from pkg.only import X\n")
    (pkg / "only.py").write_text("import pkg.hints\n")
    assert cycles(import_graph(tmp_path, "pkg")) == [["pkg.convert", "pkg.net"]]


def test_the_check_follows_importlib_and_module_getattr(tmp_path) -> None:
    """A lazy re-export (a module ``__getattr__`` that calls ``importlib.import_module``) hides a cycle from plain
    import statements, as ``litune.cli`` once did with ``litune.commands.fit``; the check finds it."""
    pkg = tmp_path / "pkg"
    pkg.mkdir()
    (pkg / "__init__.py").write_text("")
    (pkg / "cli.py").write_text(
        "import importlib\n\ndef __getattr__(name):\n    return getattr(importlib.import_module('pkg.fit'), name)\n"
    )
    (pkg / "fit.py").write_text("from pkg.cli import X\n")
    (pkg / "lone.py").write_text("import importlib\nmodule = importlib.import_module(NAME)\n")  # not a literal
    assert cycles(import_graph(tmp_path, "pkg")) == [["pkg.cli", "pkg.fit"]]
