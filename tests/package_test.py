"""The package as a whole: its import graph has no cycle; the suite cannot pass by skipping."""

from __future__ import annotations

import ast

from tests.conftest import REPO

PACKAGES = ("golf_jax", "kernels")


def import_graph() -> dict[str, set[str]]:
    """Module -> the package modules it imports, at the top or inside functions."""
    modules = {".".join(p.relative_to(REPO).with_suffix("").parts).removesuffix(".__init__"): p
               for pkg in PACKAGES for p in (REPO / pkg).rglob("*.py")}
    graph = {}
    for name, path in modules.items():
        deps = set()
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Import):
                deps.update(a.name for a in node.names)
            elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
                # `from golf_jax import model` imports golf_jax.model; `from golf_jax.model import X` too.
                deps.update(f"{node.module}.{a.name}" for a in node.names)
                deps.add(node.module)
        graph[name] = {d for d in deps if d in modules and d != name and d not in PACKAGES}
    return graph


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    state: dict[str, int] = {}  # 1: on the stack, 2: done
    stack: list[str] = []

    def visit(node: str) -> list[str] | None:
        state[node] = 1
        stack.append(node)
        for dep in sorted(graph[node]):
            if state.get(dep) == 1:
                return stack[stack.index(dep):] + [dep]
            if dep not in state and (cycle := visit(dep)):
                return cycle
        stack.pop()
        state[node] = 2
        return None

    for node in sorted(graph):
        if node not in state and (cycle := visit(node)):
            return cycle
    return None


def test_no_import_cycle():
    graph = import_graph()
    assert "golf_jax.train" in graph and "golf_jax.train_step" in graph["golf_jax.train"]  # real edges were read
    cycle = find_cycle(graph)
    assert cycle is None, " -> ".join(cycle)


def test_cycle_finder_finds_a_lazy_import_cycle():
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
    assert find_cycle({"a": {"b"}, "b": set()}) is None


def test_a_missing_fixture_fails_under_ci_and_skips_elsewhere(monkeypatch):
    import pytest

    from tests import conftest
    monkeypatch.setattr(conftest, "IN_CI", True)
    with pytest.raises(pytest.fail.Exception, match="not present"):
        conftest.fixture_path("no_such_fixture.npz")
    monkeypatch.setattr(conftest, "IN_CI", False)
    with pytest.raises(pytest.skip.Exception, match="not present"):
        conftest.fixture_path("no_such_fixture.npz")


def test_only_tooling_imports_the_tooling():
    """golf_jax/tools (bench, profiling) is outside the counted code, so the pipeline must not need it."""
    users = {m for m, deps in import_graph().items() if any(d.startswith("golf_jax.tools") for d in deps)}
    assert users and all(m.startswith("golf_jax.tools") for m in users), users


def test_functions_and_modules_stay_readable():
    """No function over 80 lines; a module over ~450 lines says why at its top."""
    long_functions, long_modules = [], []
    for pkg in PACKAGES:
        for path in (REPO / pkg).rglob("*.py"):
            source = path.read_text()
            tree = ast.parse(source)
            long_functions += [f"{path.name}:{node.name} ({node.end_lineno - node.lineno + 1} lines)"
                               for node in ast.walk(tree) if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef))
                               and node.end_lineno - node.lineno + 1 > 80]
            if len(source.splitlines()) > 460 and "over the ~450" not in (ast.get_docstring(tree) or ""):
                long_modules.append(path.name)
    assert not long_functions and not long_modules, (long_functions, long_modules)
