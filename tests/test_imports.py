"""The package's import graph (issue 28): no cycles, every import points down the layers, and `import compresslab`
is cheap (the rest on first use).

Walks every module's imports with ast — function-level (lazy) imports included — so a cycle hidden in a function
body is caught too."""

import ast
import subprocess
import sys
from pathlib import Path

PKG = Path(__file__).resolve().parents[1] / "shared" / "compresslab"
# The layers of compresslab/__init__.py's docstring: a module imports only from lower layers (a package may import
# its own submodules, and they the package's __init__; the package root is the facade and imports anything).
LAYERS = {
    0: "paths runtime packing kvformat data",
    1: "quant models checkpoint evaluation layerwise",
    2: "formats gptq smoothquant widgets deploy serve nvmodelopt kernels kernels.w4a16 kernels.kv_quant",
    3: "pruning awq actquant kvcompress results",
    4: "distill lowrank expected kvcache",
    5: "api scale_tuning stack kernels.bench",
    6: "checks checks.lab01 checks.lab02 checks.lab03 checks.lab04 checks.lab05 checks.lab06 checks.lab07 checks.lab08",
}
LAYER = {f"compresslab.{m}": n for n, names in LAYERS.items() for m in names.split()}
BOTTOM = {m for m, n in LAYER.items() if n == 0}


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
                # `from .. import packing` imports the submodule; `from ..runtime import X` the module itself
                deps |= {f"{target}.{a.name}" if f"{target}.{a.name}" in modules else target for a in node.names}
            elif isinstance(node, ast.ImportFrom) and (node.module or "").startswith("compresslab"):
                deps.add(node.module)
            elif isinstance(node, ast.Import):
                deps |= {a.name for a in node.names if a.name.startswith("compresslab")}
        # a submodule may use its own package's __init__ (kernels.w4a16 -> kernels), but not the facade's
        graph[name] = {d for d in deps if d in modules and d != name
                       and not (name.startswith(d + ".") and d != "compresslab")}
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
    assert "compresslab.kvformat" in graph["compresslab.kvcompress"]
    assert "compresslab.kvcompress" in graph["compresslab.kvcache"]
    assert "compresslab.kvformat" in graph["compresslab.kernels.kv_quant"]
    assert "compresslab.kernels.kv_quant" in graph["compresslab.kvcompress"]  # a lazy, function-level import


def test_no_import_cycles():
    assert _cycles(import_graph()) == []


def test_the_bottom_layer_imports_only_the_bottom_layer():
    graph = import_graph()
    upward = {m: sorted(graph[m] - BOTTOM) for m in BOTTOM if graph[m] - BOTTOM}
    assert upward == {}, f"bottom-layer modules importing upward: {upward}"


def test_every_module_has_a_layer():
    assert set(import_graph()) - {"compresslab"} == set(LAYER), "add the new module to LAYERS (and the docstring)"


def test_every_import_points_down():
    graph = import_graph()
    wrong = [f"{a} (layer {LAYER[a]}) imports {b} (layer {LAYER[b]})" for a in LAYER for b in graph[a]
             if b != "compresslab" and not b.startswith(a + ".") and LAYER[b] >= LAYER[a]]
    assert wrong == []
    assert [a for a in LAYER if "compresslab" in graph[a]] == [], "the package root is the facade: import modules"


def test_import_compresslab_is_cheap():
    """torch and three small modules; transformers, triton and the algorithms come on first use."""
    code = ("import sys, compresslab as cl; "
            "print(sorted(m for m in sys.modules if m.startswith('compresslab')), 'transformers' in sys.modules, "
            "'triton' in sys.modules); cl.gptq; cl.checks.check_qparams; print('compresslab.gptq' in sys.modules)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout.split("\n")
    assert out[0] == "['compresslab', 'compresslab.models', 'compresslab.paths', 'compresslab.runtime'] False False"
    assert out[1] == "True"


def test_the_kv_compression_maths_needs_no_transformers():
    """kvcompress is plain torch (the maths of lab 06, KVConfig included): importing it and compressing a block loads
    neither transformers nor triton; the transformers Cache around it is kvcache's."""
    code = ("import sys, torch; from compresslab import kvcompress as kv; "
            "blk = kv.KVConfig('gear', backend='torch').compress(torch.randn(1, 2, 64, 64), 'key', first=True); "
            "print(blk.reconstruct().shape == (1, 2, 64, 64), 'transformers' in sys.modules, 'triton' in sys.modules)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.split("\n")[0] == "True False False"


def test_a_cycle_is_found():
    assert _cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": set()}) == [["a", "b", "c", "a"]]
