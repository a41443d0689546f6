"""The layout holds: packages import each other in one direction only (no cycles between
packages, none between modules), `domain/` imports nothing else of the project, and
`chatbot/` is a namespace of named subpackages with no loose modules (README, Layout)."""

from __future__ import annotations

import ast
from collections.abc import Iterator
from pathlib import Path

from chatbot.runtime.config import REPO_ROOT

PACKAGES = ("api", "chatbot", "domain", "projections", "web", "workers")


def modules() -> dict[str, Path]:
    found = {}
    for top in PACKAGES:
        for path in sorted((REPO_ROOT / top).rglob("*.py")):
            name = ".".join(path.relative_to(REPO_ROOT).with_suffix("").parts)
            found[name.removesuffix(".__init__")] = path
    return found


def imports(path: Path, known: dict[str, Path]) -> Iterator[str]:
    """The project modules `path` imports, at the top or inside functions."""
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            names = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names = [f"{node.module}.{alias.name}" for alias in node.names] + [node.module]
        else:
            continue
        for name in names:
            if name in known:
                yield name
            elif name.rpartition(".")[0] in known and isinstance(node, ast.ImportFrom):
                yield name.rpartition(".")[0]


def package_of(module: str) -> str:
    """`chatbot`'s subpackages count as packages of their own."""
    parts = module.split(".")
    return ".".join(parts[:2]) if parts[0] == "chatbot" and len(parts) > 1 else parts[0]


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components of more than one node (Tarjan)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    found: list[list[str]] = []

    def visit(node: str) -> None:
        index[node] = low[node] = len(index)
        stack.append(node)
        for other in graph.get(node, ()):
            if other not in index:
                visit(other)
                low[node] = min(low[node], low[other])
            elif other in stack:
                low[node] = min(low[node], index[other])
        if low[node] == index[node]:
            component = []
            while True:
                top = stack.pop()
                component.append(top)
                if top == node:
                    break
            if len(component) > 1:
                found.append(sorted(component))

    for node in sorted(graph):
        if node not in index:
            visit(node)
    return found


def graphs() -> tuple[dict[str, set[str]], dict[str, set[str]]]:
    known = modules()
    by_module: dict[str, set[str]] = {name: set() for name in known}
    by_package: dict[str, set[str]] = {}
    for name, path in known.items():
        for target in imports(path, known):
            if target != name:
                by_module[name].add(target)
            if package_of(target) != package_of(name):
                by_package.setdefault(package_of(name), set()).add(package_of(target))
    return by_module, by_package


def test_no_import_cycles_between_packages_or_modules() -> None:
    by_module, by_package = graphs()
    assert "chatbot.ops" in by_package and "api" in by_package["chatbot.ops"], "the graph was not read"
    assert cycles(by_package) == []
    assert cycles(by_module) == []


def test_domain_imports_nothing_else_of_the_project() -> None:
    _, by_package = graphs()
    assert by_package.get("domain", set()) == set()


def test_chatbot_is_a_namespace_of_named_subpackages() -> None:
    loose = [p.name for p in (REPO_ROOT / "chatbot").glob("*.py") if p.name != "__init__.py"]
    assert loose == []
    subpackages = sorted(p.parent.name for p in (REPO_ROOT / "chatbot").glob("*/__init__.py"))
    assert subpackages == ["bus", "eventstore", "inference", "ops", "runtime", "training"]


def test_the_cycle_finder_finds_a_cycle() -> None:
    assert cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]
    assert cycles({"a": {"b"}, "b": set()}) == []
