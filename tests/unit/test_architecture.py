"""The layering of the packages, read from the source: ``ast`` only, nothing is imported, so it runs in milliseconds.

Every ``import``/``from … import`` of every module of ours counts, at any depth (a lazy import inside a function
is a dependency too), and so does a package named in a string to ``importlib.import_module``, ``__import__`` or
``importlib.resources.files``. ``tests/`` and ``bench/`` sit above everything and are not checked.

``python -m tests.unit.test_architecture`` prints the package graph, its cycles and who imports redis-py.
"""

from __future__ import annotations

import ast
import sys
from collections.abc import Iterable, Mapping
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]

#: What each package may import of ours (besides itself), bottom up. Third-party libraries are not listed.
LAYERS: dict[str, frozenset[str]] = {
    "marketplace": frozenset(),  # the algorithm: no I/O, nothing of ours
    "model_store": frozenset(),  # versions as files (safetensors + JSON), pins, holdout sets
    "common": frozenset({"marketplace", "model_store"}),  # shared by both processes: loading, names, settings, logs
    "redis_io": frozenset({"common", "model_store", "marketplace"}),  # the only package that talks to Redis
    "server": frozenset({"redis_io", "common", "model_store", "marketplace"}),  # the API replicas
    "worker": frozenset({"redis_io", "common", "model_store", "marketplace"}),  # the reconciler
    "mpserve": frozenset({"server", "worker", "redis_io", "common", "model_store", "marketplace"}),  # the shell
}
#: Imports the layering does not want, tolerated until the change that removes them (then delete the line).
PENDING: dict[tuple[str, str], str] = {}
#: Above every package: they may import anything, and nothing of ours may import them.
TOP = frozenset({"tests", "bench", "scripts"})
#: redis-py, and the one package that may import it.
REDIS_PY, REDIS_OWNER = "redis", "redis_io"

_STRING_IMPORTERS = frozenset({"import_module", "__import__", "files"})


def packages(root: Path = ROOT) -> list[str]:
    """The top-level packages of the project (a folder with ``__init__.py``), ``tests`` and ``bench`` aside."""
    return sorted(p.name for p in root.iterdir() if (p / "__init__.py").is_file() and p.name not in TOP)


def imported_modules(source: str) -> Iterable[tuple[int, str]]:
    """(line, absolute module name) of every import in ``source``; a relative import stays in its package."""
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Import):
            yield from ((node.lineno, alias.name) for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            yield node.lineno, node.module
        elif isinstance(node, ast.Call) and node.args and isinstance(node.args[0], ast.Constant) \
                and isinstance(node.args[0].value, str):
            func = node.func
            name = func.attr if isinstance(func, ast.Attribute) else func.id if isinstance(func, ast.Name) else ""
            if name in _STRING_IMPORTERS:
                yield node.lineno, node.args[0].value


def import_edges(root: Path = ROOT) -> dict[tuple[str, str], list[str]]:
    """(importing package, imported top-level name) -> the places (``path:line``), for every module of ours."""
    edges: dict[tuple[str, str], list[str]] = {}
    for pkg in packages(root):
        for path in sorted((root / pkg).rglob("*.py")):
            for line, module in imported_modules(path.read_text(encoding="utf-8")):
                top = module.split(".")[0]
                if top != pkg:
                    edges.setdefault((pkg, top), []).append(f"{path.relative_to(root)}:{line}")
    return edges


def package_graph(edges: Mapping[tuple[str, str], list[str]], ours: Iterable[str]) -> dict[str, set[str]]:
    ours = set(ours)
    graph: dict[str, set[str]] = {p: set() for p in ours}
    for src, dst in edges:
        if src in ours and dst in ours:
            graph[src].add(dst)
    return graph


def cycles(graph: Mapping[str, Iterable[str]]) -> list[list[str]]:
    """The strongly connected components with more than one package (Tarjan): each holds an import cycle."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    out: list[list[str]] = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        for w in graph.get(v, ()):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while True:
                w = stack.pop()
                component.append(w)
                if w == v:
                    break
            if len(component) > 1:
                out.append(sorted(component))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return out


def layering_violations(edges: Mapping[tuple[str, str], list[str]], layers: Mapping[str, frozenset[str]],
                        pending: Mapping[tuple[str, str], str] = PENDING) -> list[str]:
    """Imports of ours that the layering does not allow (and that are not pending), with their places."""
    ours = set(layers) | TOP
    return [f"{src} imports {dst}: {', '.join(places)}" for (src, dst), places in sorted(edges.items())
            if dst in ours and dst not in layers.get(src, frozenset()) and (src, dst) not in pending]


def redis_importers(edges: Mapping[tuple[str, str], list[str]], owner: str = REDIS_OWNER) -> list[str]:
    return [place for (src, dst), places in sorted(edges.items()) if dst == REDIS_PY and src != owner
            for place in places]


# ------------------------------------------------------------------------------------------------ the checks


def test_every_package_has_a_place_in_the_layering() -> None:
    assert packages() == sorted(LAYERS), "a new top-level package needs its line in LAYERS"


def test_the_layering_itself_has_no_cycle() -> None:
    assert cycles({p: set(allowed) for p, allowed in LAYERS.items()}) == []


def test_packages_import_only_what_their_layer_allows() -> None:
    violations = layering_violations(import_edges(), LAYERS)
    assert not violations, "imports against the layering (LAYERS):\n" + "\n".join(violations)


def test_no_import_cycle_between_packages() -> None:
    found = cycles(package_graph(import_edges(), LAYERS))
    assert not found, f"packages that import each other: {found}"


def test_only_redis_io_imports_redis_py() -> None:
    places = redis_importers(import_edges())
    assert not places, f"redis-py imported outside {REDIS_OWNER}/: " + ", ".join(places)


def test_every_pending_exception_is_still_needed() -> None:
    edges = import_edges()
    assert [edge for edge in PENDING if edge not in edges] == [], "an exception no longer needed: delete it"


def test_the_checks_catch_a_bad_import(tmp_path: Path) -> None:
    """A small tree with one import of each kind the checks exist for: each is reported, with its place."""
    files = {
        "marketplace/__init__.py": "",
        "marketplace/core.py": "def f():\n    from server.app import create_app  # upward, lazy\n",
        "server/__init__.py": "",
        "server/app.py": "import marketplace.core\nfrom . import app\n",
        "worker/__init__.py": "",
        "worker/io.py": "import importlib\nimport redis.asyncio\nimportlib.import_module('tests.helpers')\n",
        "redis_io/__init__.py": "import redis\n",
        "tests/__init__.py": "import worker.io\n",
    }
    for name, text in files.items():
        (tmp_path / name).parent.mkdir(exist_ok=True)
        (tmp_path / name).write_text(text)
    layers = {"marketplace": frozenset(), "redis_io": frozenset(), "server": frozenset({"marketplace"}),
              "worker": frozenset({"marketplace"})}
    edges = import_edges(tmp_path)
    assert packages(tmp_path) == ["marketplace", "redis_io", "server", "worker"]
    assert layering_violations(edges, layers, {}) == ["marketplace imports server: marketplace/core.py:2",
                                                      "worker imports tests: worker/io.py:3"]
    assert cycles(package_graph(edges, layers)) == [["marketplace", "server"]]
    assert redis_importers(edges) == ["worker/io.py:2"]


if __name__ == "__main__":
    found = import_edges(Path(sys.argv[1]) if len(sys.argv) > 1 else ROOT)
    ours = {src for src, _ in found}
    graph = package_graph(found, ours)
    for pkg in sorted(graph):
        print(f"{pkg} -> {', '.join(sorted(graph[pkg])) or '(nothing of ours)'}")
    print("cycles:", cycles(graph) or "none")
    print("redis-py imported at:", [p for (src, dst), places in sorted(found.items()) if dst == REDIS_PY
                                    for p in places])
