"""The shape of the house: no import circle in the package, and config/ at the bottom of it.

Every ``import`` counts, those inside functions too: a lazy import is still a dependency."""

import ast
from pathlib import Path

PACKAGE = Path(__file__).parents[1] / "raytune_it"
#: What config/ may use: the modules below it, which import no part of raytune-it above them.
BELOW_CONFIG = {"raytune_it.builtins", "raytune_it.cache", "raytune_it.errors", "raytune_it.hardware",
                "raytune_it.models.folders", "raytune_it.storage"}


def _import_graph() -> dict[str, set[str]]:
    modules = {}
    for path in PACKAGE.rglob("*.py"):
        name = ".".join(path.relative_to(PACKAGE.parent).with_suffix("").parts).removesuffix(".__init__")
        modules[name] = path

    def owner(dotted: str) -> str | None:
        while dotted and dotted not in modules:
            dotted = dotted.rpartition(".")[0]
        return dotted or None

    graph: dict[str, set[str]] = {name: set() for name in modules}
    for name, path in modules.items():
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            if isinstance(node, ast.ImportFrom) and node.level == 0 and (node.module or "").startswith("raytune_it"):
                targets = [owner(node.module)] + [owner(f"{node.module}.{alias.name}") for alias in node.names]
            elif isinstance(node, ast.Import):
                targets = [owner(alias.name) for alias in node.names if alias.name.startswith("raytune_it")]
            else:
                continue
            # (a module importing its own package's __init__ is how Python loads it, not a circle)
            graph[name] |= {t for t in targets if t and t != name and not name.startswith(t + ".")}
    return graph


def _circles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components of more than one module (Tarjan)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    found: list[list[str]] = []

    def visit(module: str) -> None:
        index[module] = low[module] = len(index)
        stack.append(module)
        for target in graph[module]:
            if target not in index:
                visit(target)
                low[module] = min(low[module], low[target])
            elif target in stack:
                low[module] = min(low[module], index[target])
        if low[module] == index[module]:
            component = []
            while True:
                top = stack.pop()
                component.append(top)
                if top == module:
                    break
            if len(component) > 1:
                found.append(sorted(component))

    for module in graph:
        if module not in index:
            visit(module)
    return found


def test_the_package_has_no_import_circle():
    assert _circles(_import_graph()) == []


def test_config_imports_nothing_above_it():
    graph = _import_graph()
    above = {module: sorted(t for t in targets if not t.startswith("raytune_it.config") and t not in BELOW_CONFIG)
             for module, targets in graph.items() if module.startswith("raytune_it.config")}
    assert {m: t for m, t in above.items() if t} == {}
    for module in BELOW_CONFIG:
        assert all(t in BELOW_CONFIG for t in graph[module]), (module, graph[module])


def test_a_circle_is_found():
    assert _circles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]
