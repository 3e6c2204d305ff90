"""The import contract: numprune's modules form no cycle, and only the command line knows the command line.

Every import counts, at module level or inside a function, so a cycle cannot hide behind a late
import. ``from package import name`` counts as an import of ``package.name`` where that is a module.
"""

from __future__ import annotations

import ast
from pathlib import Path

PACKAGE = Path(__file__).parents[1] / "numprune"


def module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def import_graph() -> dict[str, set[str]]:
    """module -> the numprune modules it imports."""
    modules = {module_name(p): p for p in PACKAGE.rglob("*.py")}
    graph = {}
    for name, path in modules.items():
        package = name if path.name == "__init__.py" else name.rpartition(".")[0]
        targets = set()
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            if isinstance(node, ast.Import):
                targets |= {alias.name for alias in node.names}
            elif isinstance(node, ast.ImportFrom):
                base = node.module or ""
                if node.level:
                    anchor = package.split(".")[:len(package.split(".")) - node.level + 1]
                    base = ".".join(anchor + ([base] if base else []))
                for alias in node.names:
                    targets.add(f"{base}.{alias.name}" if f"{base}.{alias.name}" in modules else base)
        graph[name] = {t for t in targets if t in modules and t != name}
    return graph


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """The strongly connected components with more than one module (Tarjan's algorithm)."""
    index, low, stack, on_stack, found = {}, {}, [], set(), []

    def visit(node: str) -> None:
        index[node] = low[node] = len(index)
        stack.append(node)
        on_stack.add(node)
        for target in sorted(graph[node]):
            if target not in index:
                visit(target)
                low[node] = min(low[node], low[target])
            elif target in on_stack:
                low[node] = min(low[node], index[target])
        if low[node] == index[node]:
            component = []
            while not component or component[-1] != node:
                component.append(stack.pop())
                on_stack.discard(component[-1])
            if len(component) > 1:
                found.append(sorted(component))

    for node in sorted(graph):
        if node not in index:
            visit(node)
    return found


def test_the_contract_checker_finds_a_cycle_and_relative_imports():
    assert cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]
    assert cycles({"a": {"b"}, "b": set()}) == []
    graph = import_graph()
    assert "numprune.errors" in graph["numprune.pipeline"]  # sanity: the graph is read at all


def test_no_import_cycles():
    assert cycles(import_graph()) == []


def test_only_the_command_line_imports_the_command_line():
    graph = import_graph()
    offenders = {name for name, targets in graph.items() if not name.startswith("numprune.cli")
                 and name != "numprune.__main__" and any(t.startswith("numprune.cli") for t in targets)}
    assert offenders == set()


ROOT = PACKAGE.parent


def is_private(name: str) -> bool:
    """One leading underscore: the module's own business (dunders such as ``__version__`` are not private)."""
    return name.startswith("_") and not name.startswith("__")


def private_names_taken(path: Path, modules: set[str]) -> list[str]:
    """Each ``module.name`` that ``path`` takes from a numprune module although the name is private: imported
    (``from numprune.api import _x``) or read off an imported module (``api._x``, ``numprune.api._x``)."""
    tree = ast.parse(path.read_text(), str(path))
    own = module_name(path) if path.is_relative_to(PACKAGE) else None
    package = (own if path.name == "__init__.py" else own.rpartition(".")[0]) if own else ""
    aliases, taken = {}, []  # aliases: local name -> the numprune module it stands for
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package.split(".")[:len(package.split(".")) - node.level + 1]
                base = ".".join(anchor + ([base] if base else []))
            if base not in modules:
                continue
            for alias in node.names:
                if is_private(alias.name):
                    taken.append(f"{base}.{alias.name}")
                elif f"{base}.{alias.name}" in modules:
                    aliases[alias.asname or alias.name] = f"{base}.{alias.name}"
        elif isinstance(node, ast.Import):
            for alias in node.names:
                if alias.name.split(".")[0] == "numprune":
                    taken += [alias.name for part in alias.name.split(".") if is_private(part)]
                    aliases[alias.asname or "numprune"] = alias.name if alias.asname else "numprune"
    for node in ast.walk(tree):
        if isinstance(node, ast.Attribute) and is_private(node.attr):
            chain, value = [], node.value
            while isinstance(value, ast.Attribute):
                chain.insert(0, value.attr)
                value = value.value
            if isinstance(value, ast.Name) and value.id in aliases:
                module = ".".join([aliases[value.id], *chain])
                if module in modules and module != own:
                    taken.append(f"{module}.{node.attr}")
    return taken


def test_the_private_name_checker_finds_imports_and_attributes(tmp_path):
    probe = tmp_path / "probe.py"
    probe.write_text("import numprune.api\nfrom numprune import api as a\nfrom numprune.api import _x, prune\n"
                     "from numprune.data import corpora\n"
                     "numprune.api._y\na._z\ncorpora._w\ncorpora.token_ids\nnumprune.__version__\nself._v\n")
    modules = {"numprune", "numprune.api", "numprune.data", "numprune.data.corpora"}
    assert sorted(private_names_taken(probe, modules)) == ["numprune.api._x", "numprune.api._y", "numprune.api._z",
                                                           "numprune.data.corpora._w"]


def test_no_module_takes_a_private_name_from_another():
    modules = set(import_graph())
    files = [*PACKAGE.rglob("*.py"), *(ROOT / "tests").glob("*.py"), *(ROOT / "benchmarks").glob("*.py")]
    offenders = {str(path.relative_to(ROOT)): names for path in sorted(files)
                 if (names := private_names_taken(path, modules))}
    assert offenders == {}
