"""The package's layering, read from the source: no import cycle, no import from a lower layer into a
higher one, Dagster only in the Dagster skin. Function-level imports count too (they must not dodge a
cycle). The README's "Layout" section describes the same layers."""

import ast
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[1] / "indexer_dagster"

# Lowest first. A module may import modules of its own layer or of a lower one.
LAYERS: list[tuple[str, tuple[str, ...]]] = [
    ("foundations", ("block_range", "urls", "parse")),
    ("configuration", ("config",)),
    ("storage", ("state", "persist")),
    ("chain access", ("chain",)),
    ("reorg detection", ("reorg",)),
    ("derivation and operations", ("dex.derive", "dex.tokens", "dex.sources", "dex.incremental", "dex.build", "health")),
    ("pipelines", ("sync",)),
    ("query", ("query", "dex.queries", "api")),
    ("Dagster skin", ("resources", "assets", "jobs", "sensors", "dex.assets", "definitions")),
    ("entry points", ("launch", "cli", "devnet", "__init__")),
]
# The only modules that may import Dagster: the skin and the launcher that runs its jobs.
DAGSTER_SKIN = ("resources", "assets", "jobs", "sensors", "dex.assets", "definitions", "launch")
# Plain modules: they name jobs and tags, but import no Dagster.
PLAIN_IN_SKIN = ("jobs.names",)


def _module_name(path: Path) -> str:
    rel = path.relative_to(PACKAGE).with_suffix("")
    parts = [p for p in rel.parts if p != "__init__"] or ["__init__"]
    return ".".join(parts)


def _modules() -> dict[str, Path]:
    return {_module_name(p): p for p in sorted(PACKAGE.rglob("*.py"))}


def _imports(path: Path, known: set[str]) -> set[str]:
    """The package's modules that `path` imports anywhere (module level or inside functions)."""
    out: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        names: list[str] = []
        if isinstance(node, ast.Import):
            names = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names = [node.module] + [f"{node.module}.{a.name}" for a in node.names]
        for name in names:
            if not name.startswith("indexer_dagster."):
                continue
            target = name.removeprefix("indexer_dagster.")
            # `from pkg import module` names a module; `from module import function` names the module.
            while target and target not in known:
                target = target.rpartition(".")[0]
            if target:
                out.add(target)
    return out


def _graph() -> dict[str, set[str]]:
    modules = _modules()
    known = set(modules)
    return {m: _imports(p, known) - {m} for m, p in modules.items()}


def _layer(module: str) -> int:
    best, best_len = None, -1
    for i, (_, prefixes) in enumerate(LAYERS):
        for prefix in prefixes:
            if (module == prefix or module.startswith(prefix + ".")) and len(prefix) > best_len:
                best, best_len = i, len(prefix)
    assert best is not None, f"indexer_dagster.{module} is in no layer: add it to LAYERS (and the README's layout)"
    return best


def _imports_dagster(path: Path) -> bool:
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import) and any(a.name.split(".")[0] == "dagster" for a in node.names):
            return True
        if isinstance(node, ast.ImportFrom) and node.module and node.module.split(".")[0] == "dagster":
            return True
    return False


def test_every_module_has_a_layer():
    for module in _modules():
        _layer(module)


def test_no_import_points_up():
    upward = []
    for module, targets in _graph().items():
        for target in targets:
            if _layer(target) > _layer(module):
                upward.append(f"{module} ({LAYERS[_layer(module)][0]}) imports {target} ({LAYERS[_layer(target)][0]})")
    assert not upward, "imports from a lower layer into a higher one:\n" + "\n".join(sorted(upward))


def test_no_import_cycle():
    graph = _graph()
    state: dict[str, int] = {}  # 1: on the current path, 2: done
    cycles: list[list[str]] = []

    def visit(node: str, path: list[str]) -> None:
        state[node] = 1
        for nxt in sorted(graph[node]):
            if state.get(nxt) == 1:
                cycles.append([*path[path.index(nxt):], nxt])
            elif nxt not in state:
                visit(nxt, [*path, nxt])
        state[node] = 2

    for module in sorted(graph):
        if module not in state:
            visit(module, [module])
    assert not cycles, "import cycles:\n" + "\n".join(" -> ".join(c) for c in cycles)


def test_dagster_only_in_the_skin():
    outside = [
        m for m, p in _modules().items()
        if _imports_dagster(p)
        and not any(m == s or m.startswith(s + ".") for s in DAGSTER_SKIN)
    ]
    assert not outside, f"modules outside the Dagster skin that import dagster: {outside}"
    plain = [m for m in PLAIN_IN_SKIN if _imports_dagster(_modules()[m])]
    assert not plain, f"plain modules that import dagster: {plain}"


def test_the_rules_see_imports():
    """The checks above would pass on a graph they failed to read: make sure they read this one."""
    graph = _graph()
    assert "persist.lake" in graph["persist.catalog"]
    assert "state" in graph["sync.repair"] or "state.models" in graph["sync.repair"]
    assert "sync.historical" in graph["sync.supplement"]  # `from indexer_dagster.sync import historical`
    assert _layer("sync.repair") > _layer("persist.catalog") > _layer("parse.abi")
