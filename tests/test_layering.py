"""The import graph keeps STYLE.md's dependency rules: arrows point down, and nothing goes round.

The graph is read from the source, not from a running interpreter: every `import` and
`from ... import` anywhere in a module (an import inside a function is still an edge) that
names an epserve module. `from epserve.x import y` is an edge to `epserve.x.y` where y is a
module, else to `epserve.x`. A parent package's `__init__` that Python runs on the way is not
counted as an edge (it is not a dependency the importing file chose).
"""
from __future__ import annotations

import ast
import copy
from collections import defaultdict
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
SKIP = {"tests", "build", "dist", "benchmarks", "configs", "scripts"}

# Highest first. A module may import its own layer or any lower one; the longest matching
# prefix decides a module's layer. `placement/` (pure decisions, plus groups.py) and `fleet/`
# storage are leaves any layer may use; the ground floor holds the vocabulary every room shares.
LAYERS = [
    ("tools", ("epserve", "epserve.__main__", "epserve.cli", "epserve.llm", "epserve.plan", "epserve.bench",
               "epserve.examples", "epserve.fleet.report", "epserve.fleet.simulator", "epserve.fleet.simulate_cli",
               "epserve.fleet.eplb_stats")),
    ("serve", ("epserve.serve",)),
    ("actors", ("epserve.actors",)),
    ("pipelines", ("epserve.pipelines",)),
    ("model", ("epserve.model",)),
    ("kernels", ("epserve.kernels",)),
    ("leaves", ("epserve.placement", "epserve.fleet")),
    ("ground", ("epserve.config", "epserve.messages", "epserve.errors")),
]

# The actors modules serve/ may import, each for the one thing it must start or hold; everything
# else in actors/ (rank.py, rank_messages.py, unit.py, sink_routes.py, ...) is internal to the units.
SERVE_MAY_IMPORT_FROM_ACTORS = {
    "epserve.actors.cluster": "app.py joins or embeds Ray and gives its own actors control options",
    "epserve.actors.launch": "app.py starts the configured units (orders, start_units)",
    "epserve.actors.ledger": "app.py starts the LedgerActor",
    "epserve.actors.capacity_controller": "app.py starts the CapacityController when autoscale is on",
    "epserve.actors.stream_sink": "each ingress replica owns one StreamSink actor (delta_feed.py); "
                                  "generation.py reads the rejection it raises",
}
ENGINE_FILE = "epserve.pipelines.runner"   # the rank engine: serve/ never reaches into it (its types are in messages.py)
RAY_ALLOWED = ("epserve.serve", "epserve.actors", "epserve.placement.groups", "epserve.llm", "epserve.cli",
               "epserve.bench")


def module_files(root: Path = ROOT) -> dict[str, Path]:
    """Every epserve module in the tree -> its file."""
    out = {}
    for p in sorted(root.rglob("*.py")):
        rel = p.relative_to(root)
        if rel.parts[0] in SKIP or any(part.startswith(".") for part in rel.parts):
            continue
        parts = list(rel.with_suffix("").parts)
        if parts[-1] == "__init__":
            parts.pop()
        out[".".join(["epserve", *parts])] = p
    return out


def import_edges(mods: dict[str, Path]) -> list[tuple[str, int, str]]:
    """(importing module, line, imported module) for every epserve import in every module."""
    edges = []
    for name, path in mods.items():
        package = name if path.name == "__init__.py" else name.rpartition(".")[0]
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            if isinstance(node, ast.Import):
                targets = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom):
                base = node.module or ""
                if node.level:
                    up = package.split(".")[: len(package.split(".")) - node.level + 1]
                    base = ".".join(up + ([node.module] if node.module else []))
                targets = [f"{base}.{a.name}" if f"{base}.{a.name}" in mods else base for a in node.names]
            else:
                continue
            for t in targets:
                if (t == "epserve" or t.startswith("epserve.")) and (name, node.lineno, t) not in edges:
                    edges.append((name, node.lineno, t))
    return edges


def layer_of(module: str) -> int:
    best, index = -1, None
    for i, (_, prefixes) in enumerate(LAYERS):
        for p in prefixes:
            if (module == p or module.startswith(p + ".")) and len(p) > best:
                best, index = len(p), i
    assert index is not None, f"{module} is in no layer: add its folder to LAYERS"
    return index


def cycles(edges) -> list[list[str]]:
    """Strongly connected components with more than one module (or a self-import), by Tarjan's search."""
    graph: dict[str, set[str]] = {}
    for a, _, b in edges:
        graph.setdefault(a, set()).add(b)
        graph.setdefault(b, set())
    index, low, stack, on_stack, out = {}, {}, [], set(), []

    def visit(v):
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in graph[v]:
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                comp.append(w)
                if w == v:
                    break
            if len(comp) > 1 or v in graph[v]:
                out.append(sorted(comp))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return out


def where(mods, a, line, b) -> str:
    return f"{mods[a].relative_to(ROOT)}:{line} imports {b}"


def test_no_import_circles():
    mods = module_files()
    edges = import_edges(mods)
    found = cycles(edges)
    detail = [where(mods, a, line, b) for comp in found for a, line, b in edges if a in comp and b in comp]
    assert not found, f"import circles {found}:\n" + "\n".join(detail)


def test_imports_point_down():
    mods = module_files()
    bad = [where(mods, a, line, b) + f" ({LAYERS[layer_of(a)][0]} -> {LAYERS[layer_of(b)][0]})"
           for a, line, b in import_edges(mods) if layer_of(b) < layer_of(a)]
    assert not bad, "upward imports:\n" + "\n".join(bad)


def test_serve_reaches_no_actor_internals_and_not_the_rank_engine():
    mods = module_files()
    bad = [where(mods, a, line, b) for a, line, b in import_edges(mods) if a.startswith("epserve.serve")
           and (b == ENGINE_FILE or (b.startswith("epserve.actors") and b not in SERVE_MAY_IMPORT_FROM_ACTORS))]
    assert not bad, "serve/ reaches below its public doors:\n" + "\n".join(bad)


def test_ray_only_where_the_rules_allow():
    mods = module_files()
    bad = []
    for name, path in mods.items():
        if any(name == p or name.startswith(p + ".") for p in RAY_ALLOWED):
            continue
        for node in ast.walk(ast.parse(path.read_text())):
            names = ([a.name for a in node.names] if isinstance(node, ast.Import)
                     else [node.module or ""] if isinstance(node, ast.ImportFrom) else [])
            bad += [f"{path.relative_to(ROOT)}:{node.lineno} imports {n}" for n in names
                    if n == "ray" or n.startswith("ray.")]
    assert not bad, "Ray outside actors/, serve/, placement/groups.py, llm.py, cli.py, bench/:\n" + "\n".join(bad)


NEAR_COPY_NODES = 40     # smaller bodies (a free-port helper, a two-line wrapper) may repeat


class _Anonymise(ast.NodeTransformer):
    """Forget what a copy would rename: variable and argument names, literal values, annotations."""

    def visit_Name(self, node):
        return ast.copy_location(ast.Name(id="_", ctx=node.ctx), node)

    def visit_arg(self, node):
        return ast.copy_location(ast.arg(arg="_"), node)

    def visit_Constant(self, node):
        return ast.copy_location(ast.Constant(value=type(node.value).__name__), node)


def near_copies(mods: dict[str, Path], root: Path = ROOT) -> list[list[str]]:
    """Groups of functions whose bodies (docstring dropped) are the same once names and literals are
    anonymised, among bodies of at least NEAR_COPY_NODES syntax nodes."""
    seen = defaultdict(list)
    for path in mods.values():
        for node in ast.walk(ast.parse(path.read_text())):
            if not isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                continue
            body = node.body[1:] if ast.get_docstring(node) is not None else node.body
            shape = _Anonymise().visit(copy.deepcopy(ast.Module(body=body, type_ignores=[])))
            if sum(1 for _ in ast.walk(shape)) >= NEAR_COPY_NODES:
                seen[ast.dump(shape)].append(f"{path.relative_to(root)}:{node.lineno} {node.name}")
    return [group for group in seen.values() if len(group) > 1]


def test_no_near_copies():
    """A rule is never met by copying code to the other side of an arrow."""
    found = near_copies(module_files())
    assert not found, "functions that are copies of each other (share one instead):\n" + "\n".join(map(str, found))


def test_the_checks_see_what_they_guard(tmp_path):
    """The walk finds an import hidden in a function, a relative import and a two-module circle."""
    (tmp_path / "model").mkdir()
    (tmp_path / "model" / "a.py").write_text("def f():\n    from epserve.model import b\n")
    (tmp_path / "model" / "b.py").write_text("from . import a\nfrom epserve.serve import x\n")
    (tmp_path / "serve").mkdir()
    (tmp_path / "serve" / "x.py").write_text("")
    mods = module_files(tmp_path)
    edges = import_edges(mods)
    assert ("epserve.model.a", 2, "epserve.model.b") in edges and ("epserve.model.b", 1, "epserve.model.a") in edges
    assert cycles(edges) == [["epserve.model.a", "epserve.model.b"]]
    assert [(a, b) for a, _, b in edges if layer_of(b) < layer_of(a)] == [("epserve.model.b", "epserve.serve.x")]
    body = ("    total, seen = 0, []\n    for i in range(n):\n        if i % 3 and i not in seen:\n"
            "            total += i * {k}\n            seen.append(i // 2)\n    return total, len(seen), n\n")
    (tmp_path / "model" / "c.py").write_text("def f(n):\n" + body.format(k=2))
    (tmp_path / "model" / "d.py").write_text("def g(n):\n" + body.format(k=5).replace("total", "acc"))
    assert near_copies(module_files(tmp_path), tmp_path) == [["model/c.py:1 f", "model/d.py:1 g"]]
