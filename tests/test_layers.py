"""The package's layering, read from the source with `ast` (nothing is imported): which packages may import
which, that nothing reaches for the package root (`import headlab`) but the facade, and that the module-level
imports of headlab form no cycle.

An import counts where it stands at module level (inside `if TYPE_CHECKING:` it does not run, so it does not
count); for the package rules, imports inside functions count too (a lazy import is still a dependency).
`from headlab import x` counts as importing `headlab.x` when x is a module, and as the root otherwise.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).parent.parent / "headlab"

# package -> packages (or top-level modules) of headlab it must never import
FORBIDDEN = {
    "store": ("probe", "runs", "reports", "analyses", "dashboards", "interventions", "inputs", "datasets"),
    "dashboards": ("probe", "kernels", "runs", "interventions"),
    "runs": ("analyses", "reports", "dashboards", "commands", "cli"),
    "reports": ("commands", "cli"),
    "analyses": ("reports", "dashboards", "commands", "cli"),
}


def _module_name(path: Path) -> str:
    parts = ["headlab", *path.relative_to(ROOT).with_suffix("").parts]
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


MODULES = {_module_name(p): p for p in sorted(ROOT.rglob("*.py"))}


def _is_type_checking(node: ast.If) -> bool:
    test = node.test
    return (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING") or (
        isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING"
    )


def _targets(node: ast.Import | ast.ImportFrom, module: str) -> list[str]:
    """The headlab modules an import statement of `module` names."""
    if isinstance(node, ast.Import):
        return [a.name for a in node.names if a.name.split(".")[0] == "headlab"]
    base = node.module or ""
    if node.level:  # relative: resolved against the importing module's package
        package = module.split(".") if MODULES[module].name == "__init__.py" else module.split(".")[:-1]
        base = ".".join(package[: len(package) - node.level + 1] + ([base] if base else []))
    if base.split(".")[0] != "headlab":
        return []
    return [f"{base}.{a.name}" if f"{base}.{a.name}" in MODULES else base for a in node.names]


def imports(module: str, *, module_level: bool) -> set[str]:
    """The headlab modules `module` imports (only at module level, outside TYPE_CHECKING, if asked)."""
    tree = ast.parse(MODULES[module].read_text(encoding="utf-8"))
    found: set[str] = set()

    def skipped(node: ast.AST) -> bool:
        if isinstance(node, ast.If) and _is_type_checking(node):
            return True
        return module_level and isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef | ast.ClassDef)

    def visit(nodes) -> None:
        for node in nodes:
            if isinstance(node, ast.Import | ast.ImportFrom):
                found.update(_targets(node, module))
            elif not skipped(node):
                visit(ast.iter_child_nodes(node))

    visit(tree.body)
    return found


def _package(module: str) -> str:
    return module.split(".")[1] if module.count(".") else ""


@pytest.mark.parametrize("package", sorted(FORBIDDEN))
def test_packages_import_only_below_them(package):
    bad = [
        f"{module} imports {target}"
        for module in MODULES
        if _package(module) == package
        for target in sorted(imports(module, module_level=False))
        if _package(target) in FORBIDDEN[package]
    ]
    assert not bad, "\n".join(bad)


def test_nothing_imports_the_package_root():
    bad = [
        module
        for module in MODULES
        if module != "headlab" and "headlab" in imports(module, module_level=False)
    ]
    assert not bad, f"these import the package root `headlab` (import the module itself): {bad}"


def test_no_import_cycle():
    graph = {m: {t for t in imports(m, module_level=True) if t in MODULES and t != m} for m in MODULES}
    for module in list(graph):  # importing a.b.c runs a/b/__init__ first, unless the importer lies in a.b
        for target in list(graph[module]):
            parts = target.split(".")
            packages = {".".join(parts[:i]) for i in range(2, len(parts))}
            graph[module] |= {p for p in packages if p != module and not module.startswith(p + ".")}
    state: dict[str, int] = {}  # 1: on the current path, 2: done
    path: list[str] = []

    def visit(node: str) -> list[str] | None:
        state[node] = 1
        path.append(node)
        for nxt in sorted(graph[node]):
            if state.get(nxt) == 1:
                return [*path[path.index(nxt) :], nxt]
            if nxt not in state and (cycle := visit(nxt)):
                return cycle
        path.pop()
        state[node] = 2
        return None

    for module in sorted(graph):
        if module not in state and (cycle := visit(module)):
            pytest.fail("import cycle: " + " -> ".join(cycle))


def test_the_rules_see_imports():
    """The reader finds what it must: a module-level import, a lazy one, and `from headlab import x`."""
    assert "headlab.store.store" in imports("headlab.store", module_level=True)
    assert "headlab.runs.batch" in imports("headlab.commands.models", module_level=False)
    assert "headlab.runs.batch" not in imports("headlab.commands.models", module_level=True)
