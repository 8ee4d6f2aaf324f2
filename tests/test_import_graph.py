"""The package's import graph: no circle, and no arrow from a lower layer up to a higher one
(utils/models/stats < editing < evaluation, tracing < tuning < api/cli), counting imports inside functions
too; type-only imports (under TYPE_CHECKING) count as well: a circle through them is a
circle in the design, even if it never runs."""
from __future__ import annotations

import ast
from pathlib import Path

import memit

ROOT = Path(memit.__file__).parent
LAYERS = {"utils": 0, "errors": 0, "requests": 0, "prompt_format": 0, "models": 1, "stats": 1, "deltas": 1, "predict": 1, "editing": 2, "evaluation": 3, "tracing": 3, "tuning": 4}


def module_name(path: Path) -> str:
    return ".".join(("memit", *path.relative_to(ROOT).with_suffix("").parts)).removesuffix(".__init__")


def imports(path: Path, modules: set[str]) -> set[str]:
    found: set[str] = set()
    for node in ast.parse(path.read_text()).body:
        for sub in ast.walk(node):
            if isinstance(sub, ast.ImportFrom) and (sub.module or "").startswith("memit"):
                found.add(sub.module)
                found.update(f"{sub.module}.{a.name}" for a in sub.names)
            elif isinstance(sub, ast.Import):
                found.update(a.name for a in sub.names)
    return {m for m in found if m in modules}


def import_graph() -> dict[str, set[str]]:
    paths = {module_name(p): p for p in ROOT.rglob("*.py")}
    return {name: imports(path, set(paths)) - {name} for name, path in paths.items()}


def layer(module: str) -> int | None:
    return LAYERS.get(module.split(".")[1]) if module.count(".") else None


def test_no_circle():
    graph = import_graph()
    # A package importing its own submodules (re-exports) is not a circle through them.
    graph = {m: {d for d in deps if not d.startswith(m + ".")} for m, deps in graph.items()}
    state: dict[str, int] = {}
    circles: list[list[str]] = []

    def visit(module: str, path: list[str]) -> None:
        state[module] = 1
        for dep in graph[module]:
            if state.get(dep) == 1:
                circles.append(path[path.index(dep):] + [dep])
            elif dep not in state:
                visit(dep, path + [dep])
        state[module] = 2

    for module in graph:
        if module not in state:
            visit(module, [module])
    assert circles == []


def test_no_upward_arrow():
    upward = [
        f"{module} imports {dep}"
        for module, deps in import_graph().items()
        for dep in deps
        if layer(module) is not None and layer(dep) is not None and layer(dep) > layer(module)
    ]
    assert upward == []


def test_nothing_below_the_catalogue_imports_it():
    importers = [m for m, deps in import_graph().items() if "memit.editing.methods" in deps and m.startswith("memit.editing")]
    assert importers == []
