"""The package's import graph (issue 28): no cycles, and the bottom layer imports nothing above it.

Walks every module's imports with ast — function-level (lazy) imports included — so a cycle hidden in a function
body is caught too."""

import ast
from pathlib import Path

PKG = Path(__file__).resolve().parents[1] / "shared" / "compresslab"
# storage formats, packing, paths, runtime setup and data: the layer every algorithm may import
BOTTOM = {"compresslab.kvformat", "compresslab.quant", "compresslab.paths", "compresslab.runtime", "compresslab.data",
          "compresslab.checkpoint"}


def _module_name(path: Path) -> str:
    parts = ("compresslab",) + path.relative_to(PKG).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def import_graph() -> dict[str, set[str]]:
    modules = {_module_name(p): p for p in PKG.rglob("*.py")}
    graph = {}
    for name, path in modules.items():
        package = name.split(".") if path.name == "__init__.py" else name.split(".")[:-1]
        deps = set()
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom) and node.level:
                base = package[: len(package) - (node.level - 1)]
                target = ".".join(base + ([node.module] if node.module else []))
                deps |= {f"{target}.{a.name}" for a in node.names} | {target}
            elif isinstance(node, ast.ImportFrom) and (node.module or "").startswith("compresslab"):
                deps.add(node.module)
            elif isinstance(node, ast.Import):
                deps |= {a.name for a in node.names if a.name.startswith("compresslab")}
        graph[name] = {d for d in deps if d in modules and d != name and not name.startswith(d + ".")}
    return graph


def _cycles(graph) -> list[list[str]]:
    found, done = [], set()

    def visit(node, path):
        for dep in sorted(graph[node]):
            if dep in path:
                found.append(path[path.index(dep):] + [dep])
            elif dep not in done:
                visit(dep, path + [dep])
        done.add(node)

    for n in sorted(graph):
        visit(n, [n])
    return found


def test_the_walker_sees_real_edges():
    graph = import_graph()
    assert "compresslab.kvformat" in graph["compresslab.kvcache"]
    assert "compresslab.kvformat" in graph["compresslab.kernels.kv_quant"]
    assert "compresslab.kernels.kv_quant" in graph["compresslab.kvcache"]  # a lazy, function-level import


def test_no_import_cycles():
    assert _cycles(import_graph()) == []


def test_the_bottom_layer_imports_only_the_bottom_layer():
    graph = import_graph()
    upward = {m: sorted(graph[m] - BOTTOM) for m in BOTTOM if graph[m] - BOTTOM}
    assert upward == {}, f"bottom-layer modules importing upward: {upward}"


def test_a_cycle_is_found():
    assert _cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": set()}) == [["a", "b", "c", "a"]]
