"""What import-linter's contracts (pyproject.toml, run by tests/test_lint.py) cannot express: no module takes a
private name (one leading underscore) from another, whether imported or read off an imported module."""

from __future__ import annotations

import ast
from pathlib import Path

PACKAGE = Path(__file__).parents[1] / "numprune"


def module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


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
    modules = {module_name(p) for p in PACKAGE.rglob("*.py")}
    files = [*PACKAGE.rglob("*.py"), *(ROOT / "tests").glob("*.py"), *(ROOT / "benchmarks").glob("*.py")]
    offenders = {str(path.relative_to(ROOT)): names for path in sorted(files)
                 if (names := private_names_taken(path, modules))}
    assert offenders == {}
