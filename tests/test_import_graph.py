"""kiln's import graph has no cycles, between modules or between top-level packages.

Every import counts: module level, inside functions (a lazy import still ties the two modules together) and
under `if TYPE_CHECKING`. The packages form one chain, each importing only those before it:
ops -> backends -> models -> passes -> codegen -> compiler -> runtime. The root modules (`kiln/__init__.py`,
`__main__.py`, `commands.py`, `demo.py`) and the bench scripts may import anything and nothing imports them;
`version.py` imports nothing and anything may import it.
"""

from __future__ import annotations

import ast
from pathlib import Path

import networkx as nx
import pytest

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = ("ops", "backends", "models", "passes", "codegen", "compiler", "runtime")
LEAVES = ("version",)  # import nothing of kiln; anything may import them
ENTRY = ("__init__", "__main__", "commands", "demo", "bench")  # may import anything; nothing may import them
SKIP = {"tests", ".venv", "build", "dist"}


def _module_name(path: Path) -> str:
    parts = path.relative_to(ROOT).with_suffix("").parts
    if parts[-1] == "__init__":
        parts = parts[:-1]
    return ".".join(("kiln", *parts))


def _modules() -> dict[str, Path]:
    found = {}
    for path in ROOT.rglob("*.py"):
        rel = path.relative_to(ROOT).parts
        if rel[0] in SKIP or rel[0].startswith(".") or any(p.startswith(".") for p in rel):
            continue
        found[_module_name(path)] = path
    return found


def _imported(tree: ast.AST, module: str, is_package: bool, known: set[str]) -> set[str]:
    """The kiln modules `module` imports anywhere in its tree (a name imported from a package counts as its
    submodule when there is one, else as the package)."""
    package = module if is_package else module.rpartition(".")[0]
    out: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            out.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package.split(".")
                anchor = anchor[: len(anchor) - (node.level - 1)]
                base = ".".join(anchor + ([base] if base else []))
            for alias in node.names:
                sub = f"{base}.{alias.name}"
                out.add(sub if sub in known else base)
    return {name for name in out if name in known or name == "kiln"}


def import_graph() -> nx.DiGraph:
    modules = _modules()
    known = set(modules)
    graph = nx.DiGraph()
    graph.add_nodes_from(known)
    for name, path in modules.items():
        tree = ast.parse(path.read_text(), filename=str(path))
        for target in _imported(tree, name, path.name == "__init__.py", known):
            if target != name:
                graph.add_edge(name, target)
    return graph


def _top(module: str) -> str:
    parts = module.split(".")
    return "__init__" if len(parts) == 1 else parts[1]


def test_the_graph_sees_every_kind_of_import() -> None:
    graph = import_graph()
    assert graph.has_edge("kiln.runtime.llm", "kiln.compiler.api")  # inside a function
    assert graph.has_edge("kiln.passes.quant_config", "kiln.models.prequantized")  # under TYPE_CHECKING
    assert graph.has_edge("kiln.codegen.cross_compile", "kiln.codegen.render")  # relative
    assert graph.number_of_nodes() > 60


def test_no_cycle_between_modules() -> None:
    graph = import_graph()
    try:
        cycle = nx.find_cycle(graph)
    except nx.NetworkXNoCycle:
        return
    pytest.fail("import cycle: " + " -> ".join([a for a, _ in cycle] + [cycle[0][0]]))


def test_packages_import_only_packages_before_them() -> None:
    graph = import_graph()
    rank = {name: i for i, name in enumerate(PACKAGES)}
    tops = {_top(m) for m in graph}
    unknown = tops - set(PACKAGES) - set(LEAVES) - set(ENTRY)
    assert not unknown, f"top-level modules or packages outside the layering: {sorted(unknown)}"
    wrong = []
    for a, b in graph.edges:
        ta, tb = _top(a), _top(b)
        if ta == tb or tb in LEAVES or ta in ENTRY:
            continue
        if ta in LEAVES or tb in ENTRY or rank[tb] > rank[ta]:
            wrong.append(f"{a} -> {b}")
    assert not wrong, "imports against the package order " + " -> ".join(PACKAGES) + ":\n" + "\n".join(wrong)
    packages = nx.DiGraph((_top(a), _top(b)) for a, b in graph.edges if _top(a) != _top(b))
    assert nx.is_directed_acyclic_graph(packages)
