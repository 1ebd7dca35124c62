"""The package's import graph: modules import downwards only, and ``import specpass`` stays light."""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import networkx as nx

PACKAGE = Path(__file__).resolve().parents[1] / "specpass"


def _module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def import_graph() -> nx.DiGraph:
    """specpass module -> the specpass modules it imports, at module level or inside functions."""
    modules = {_module_name(p): p for p in PACKAGE.rglob("*.py")}
    graph = nx.DiGraph()
    graph.add_nodes_from(modules)
    for name, path in modules.items():
        for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
            if isinstance(node, ast.ImportFrom) and node.level == 0 and node.module in modules:
                # `from pkg import sub` imports the submodule; `from pkg import name` the package's __init__
                targets = [
                    f"{node.module}.{a.name}" if f"{node.module}.{a.name}" in modules else node.module
                    for a in node.names
                ]
            elif isinstance(node, ast.Import):
                targets = [a.name for a in node.names if a.name in modules]
            else:
                continue
            graph.add_edges_from((name, t) for t in targets if t != name)
    return graph


def test_no_import_cycles():
    graph = import_graph()
    assert graph.number_of_edges() > 40  # the walk found the package's imports
    assert graph.has_edge("specpass.optimize", "specpass.tune.calibrate")  # function-level imports count too
    cycles = sorted(nx.simple_cycles(graph), key=len)
    assert not cycles, f"import cycles: {cycles[:5]}"


def test_a_planted_cycle_is_found(tmp_path):
    graph = import_graph()
    graph.add_edge("specpass.runtime.kv_cache", "specpass.capture")  # what capture <-> kv_cache was
    assert list(nx.simple_cycles(graph))


def test_models_reachable_after_a_bare_import_and_no_transformers_before():
    code = (
        "import sys, specpass\n"
        "assert 'transformers' not in sys.modules, 'import specpass loaded transformers'\n"
        "print(specpass.models.DEFAULT_MODEL_NAME, specpass.models.available())\n"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    assert done.stdout.startswith("SmolLM2-135M-Instruct")
