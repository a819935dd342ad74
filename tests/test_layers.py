"""The layer order of docs/ARCHITECTURE.md, enforced: every import inside ``src/steadylm`` points
down the order, and no modules import each other in a circle.

Read from the source text (``ast``), nothing is imported, so the check is fast (about 0.2 s for
the ~110 modules on an idle 2-core machine) and sees every import: at module level, inside functions (the lazy imports that used to
hide cycles) and under ``if TYPE_CHECKING:``.

Rules checked:

1. Layers (:data:`LAYERS`): a module of layer ``L`` imports from layer ``L`` itself or below.
   Packages that share a rank are siblings and must not import each other (``data`` and
   ``distributed``; ``integrations`` and ``scan``, which may use ``lab``; ``bench`` sits above them).
   ``errors`` and the package ``__init__`` import nothing of steadylm; ``config_fields`` (the
   flag generator) and ``plugins`` (the plug-in loader) import only ``errors``; all of them are
   importable from every layer.
2. No cycles: the graph "module A imports module B" over all of ``src/steadylm`` (a package's
   ``__init__`` counts as the module ``steadylm.x``) has no strongly connected component of more
   than one module, and no module imports itself. ``from steadylm.x import y`` where ``y`` is a
   submodule counts as importing ``steadylm.x.y``. Imports of a package from its own submodule
   (``steadylm.train.trainer`` importing ``steadylm.train``) count too.
"""

from __future__ import annotations

import ast
from collections.abc import Iterator
from pathlib import Path

SRC = Path(__file__).resolve().parents[1] / "src"
PACKAGE = SRC / "steadylm"

#: top-level module or package -> rank (lower = more basic). Equal ranks are siblings.
LAYERS: dict[str, int] = {
    "errors": 0,
    "__init__": 0,  # steadylm/__init__.py holds only __version__ (importable anywhere, imports nothing)
    "config_fields": 1,  # spec_field and the flag generator: imports errors only
    "plugins": 1,  # the plug-in loader: imports errors only
    "functional": 2,
    "kernels": 3,
    "nn": 4,
    "models": 5,
    "precision": 6,
    "probes": 7,
    "data": 8,
    "distributed": 8,
    "train": 9,
    "lab": 10,
    "integrations": 11,
    "scan": 11,
    "bench": 12,  # measures everything below it, the Hugging Face integration included
    "cli": 13,
    "__main__": 14,
}


def _module_name(path: Path) -> str:
    parts = list(path.relative_to(SRC).with_suffix("").parts)
    if parts[-1] == "__init__" and len(parts) > 1:
        parts = parts[:-1]
    return ".".join(parts)


def _modules() -> dict[str, Path]:
    return {_module_name(p): p for p in sorted(PACKAGE.rglob("*.py"))}


def _imports(path: Path, name: str, modules: dict[str, Path]) -> Iterator[tuple[str, int]]:
    """(imported steadylm module, line) for every import statement in the file."""
    is_package = path.name == "__init__.py"
    tree = ast.parse(path.read_text(encoding="utf-8"), filename=str(path))
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            for alias in node.names:
                if alias.name == "steadylm" or alias.name.startswith("steadylm."):
                    yield alias.name, node.lineno
        elif isinstance(node, ast.ImportFrom):
            if node.level:  # relative import
                base = name.split(".") if is_package else name.split(".")[:-1]
                base = base[: len(base) - (node.level - 1)]
                target = ".".join(base + ([node.module] if node.module else []))
            else:
                target = node.module or ""
            if not (target == "steadylm" or target.startswith("steadylm.")):
                continue
            for alias in node.names:
                sub = f"{target}.{alias.name}"
                yield (sub if sub in modules else target), node.lineno


def _layer(module: str) -> str:
    parts = module.split(".")
    return parts[1] if len(parts) > 1 else "__init__"


def _graph() -> tuple[dict[str, set[str]], list[str]]:
    modules = _modules()
    graph: dict[str, set[str]] = {m: set() for m in modules}
    problems: list[str] = []
    for name, path in modules.items():
        for target, line in _imports(path, name, modules):
            where = f"{path.relative_to(SRC)}:{line}"
            if target not in modules:
                problems.append(f"{where} imports {target}, which is not a module of src/steadylm")
                continue
            graph[name].add(target)
            src_layer, dst_layer = _layer(name), _layer(target)
            if src_layer not in LAYERS or dst_layer not in LAYERS:
                problems.append(f"{where}: layer of {name} or {target} is not in LAYERS")
                continue
            if src_layer == dst_layer:
                continue
            if LAYERS[dst_layer] > LAYERS[src_layer] or (LAYERS[dst_layer] == LAYERS[src_layer]):
                problems.append(f"{where}: {name} ({src_layer}, rank {LAYERS[src_layer]}) imports {target} "
                                f"({dst_layer}, rank {LAYERS[dst_layer]}): against the layer order")
    return graph, problems


def _cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components with more than one module, or a module importing itself (Tarjan)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    out: list[list[str]] = []
    counter = [0]

    def visit(v: str) -> None:  # recursion depth is bounded by the number of modules (~100)
        index[v] = low[v] = counter[0]
        counter[0] += 1
        stack.append(v)
        on_stack.add(v)
        for w in sorted(graph[v]):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                component.append(w)
                if w == v:
                    break
            if len(component) > 1 or v in graph[v]:
                out.append(sorted(component))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return out


def test_every_import_points_down_the_layer_order() -> None:
    _, problems = _graph()
    assert not problems, "\n".join(problems)


def test_no_module_imports_in_a_circle() -> None:
    graph, _ = _graph()
    cycles = _cycles(graph)
    assert not cycles, "import cycles:\n" + "\n".join(" <-> ".join(c) for c in cycles)


def test_every_top_level_module_has_a_layer() -> None:
    names = {p.stem if p.is_file() else p.name for p in PACKAGE.iterdir()
             if (p.suffix == ".py") or (p.is_dir() and (p / "__init__.py").exists())}
    assert names <= set(LAYERS), f"give these a rank in LAYERS: {sorted(names - set(LAYERS))}"


def test_the_checker_sees_a_violation_and_a_cycle() -> None:
    # the checks can fail: an upward import and a two-module cycle on a made-up graph
    assert _cycles({"a": {"b"}, "b": {"a"}, "c": set()}) == [["a", "b"]]
    assert _cycles({"a": {"a"}}) == [["a"]]
    assert _cycles({"a": {"b"}, "b": set()}) == []
    tree = ast.parse("def f():\n    from steadylm.lab import runner\n")
    node = next(n for n in ast.walk(tree) if isinstance(n, ast.ImportFrom))
    assert node.module == "steadylm.lab"  # a lazy import inside a function is visited by ast.walk
