"""The package's layers hold: no import cycle, nothing imports a layer above its own, no stage imports another
stage, and the benchmarks import no test code. Read from the source (every import, inside functions too), so a
lazy import cannot hide an edge. `python -m tests.test_layers` prints the graph and what breaks it."""

from __future__ import annotations

import ast
from pathlib import Path

from lepton_tasks.config.settings import REPO_ROOT

PACKAGE = REPO_ROOT / "lepton_tasks"
# bottom to top: a module may import its own layer and those before it. The merge strategies sit below config,
# whose run params derive their allowed values, dropdown and descriptions from the strategy registry.
LAYERS = ("core", "data", "ml.strategies", "config", "ml", "infra", "stages", "orchestration", "tools")


def module_name(path: Path) -> str:
    parts = path.relative_to(REPO_ROOT).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def modules() -> dict[str, Path]:
    return {module_name(path): path for path in sorted(PACKAGE.rglob("*.py"))}


def imported(path: Path, known: set[str]) -> set[str]:
    """The package modules `path` imports anywhere in its body (relative imports resolved)."""
    package = module_name(path) if path.name == "__init__.py" else module_name(path).rpartition(".")[0]
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            names = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                base = ".".join([*package.split(".")[:len(package.split(".")) - node.level + 1], *filter(None, [base])])
            names = [base, *(f"{base}.{alias.name}" for alias in node.names)]
        else:
            continue
        found |= {name for name in names if name in known}
    return found - {module_name(path)}


def graph() -> dict[str, set[str]]:
    found = modules()
    return {name: imported(path, set(found)) - {"lepton_tasks"} for name, path in found.items()}


def layer(module: str) -> int | None:
    """The index in LAYERS of `module`'s layer (the longest that holds it); None for the package itself."""
    inner = module.removeprefix("lepton_tasks.")
    matches = [i for i, name in enumerate(LAYERS) if inner == name or inner.startswith(name + ".")]
    return max(matches, key=lambda i: len(LAYERS[i])) if matches else None


def cycles(edges: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected groups of more than one module (Tarjan)."""
    index, low, stack, on_stack, groups = {}, {}, [], set(), []

    def visit(node: str) -> None:
        index[node] = low[node] = len(index)
        stack.append(node)
        on_stack.add(node)
        for target in edges.get(node, ()):
            if target not in index:
                visit(target)
                low[node] = min(low[node], low[target])
            elif target in on_stack:
                low[node] = min(low[node], index[target])
        if low[node] == index[node]:
            group = []
            while True:
                member = stack.pop()
                on_stack.discard(member)
                group.append(member)
                if member == node:
                    break
            if len(group) > 1:
                groups.append(sorted(group))

    for node in sorted(edges):
        if node not in index:
            visit(node)
    return groups


def upward(edges: dict[str, set[str]]) -> list[tuple[str, str]]:
    return sorted((a, b) for a, targets in edges.items() for b in targets
                  if layer(a) is not None and layer(b) is not None and layer(b) > layer(a))


def stage_to_stage(edges: dict[str, set[str]]) -> list[tuple[str, str]]:
    stages = "lepton_tasks.stages."
    return sorted((a, b) for a, targets in edges.items() for b in targets
                  if a.startswith(stages) and b.startswith(stages))


def bench_imports_of_tests() -> list[str]:
    return sorted(f"{path.name}: {name}" for path in (REPO_ROOT / "bench").glob("*.py")
                  for name in _absolute_imports(path) if name == "tests" or name.startswith("tests."))


def _absolute_imports(path: Path) -> set[str]:
    names = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            names |= {alias.name for alias in node.names}
        elif isinstance(node, ast.ImportFrom) and not node.level and node.module:
            names.add(node.module)
    return names


def test_every_module_has_a_layer():
    assert [m for m in modules() if m != "lepton_tasks" and layer(m) is None] == []


def test_no_import_cycle():
    assert cycles(graph()) == []


def test_nothing_imports_a_layer_above_its_own():
    assert upward(graph()) == []


def test_no_stage_imports_another_stage():
    assert stage_to_stage(graph()) == []


def test_the_benchmarks_import_no_test_code():
    assert bench_imports_of_tests() == []


if __name__ == "__main__":
    edges = graph()
    for module in sorted(edges, key=lambda m: (layer(m) or 0, m)):
        print(f"{module} -> {', '.join(sorted(t.removeprefix('lepton_tasks.') for t in edges[module])) or '-'}")
    print(f"modules {len(edges)}, imports {sum(map(len, edges.values()))}, cycles {cycles(edges)}, "
          f"upward {upward(edges)}, stage-to-stage {stage_to_stage(edges)}, bench->tests {bench_imports_of_tests()}")
