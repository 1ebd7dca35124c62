"""The README's first commands are what a newcomer runs and what CI runs: keep them true."""

import ast
import importlib
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def _readme_commands() -> list[str]:
    text = (ROOT / "README.md").read_text()
    block = text.split("```bash", 1)[1].split("```", 1)[0]
    return [line for line in block.splitlines() if line.strip() and not line.startswith("#")]


def test_readme_starts_with_install_demo_and_test_commands():
    install, test = _readme_commands()
    assert "pip install torch==2.13.0" in install and install.endswith("specpass demo")
    assert "pytest" in test


def test_ci_runs_the_readme_test_command():
    _, test = _readme_commands()
    ci = (ROOT / ".ci" / "run").read_text().splitlines()
    assert test in ci, "the README's test command and .ci/run have drifted apart"


def test_the_readmes_python_imports_what_exists():
    """A newcomer pastes the README's Python: every name it imports from specpass is there."""
    blocks = [b.split("```", 1)[0] for b in (ROOT / "README.md").read_text().split("```python")[1:]]
    imported = [
        (node.module, alias.name)
        for block in blocks
        for node in ast.walk(ast.parse(block))
        if isinstance(node, ast.ImportFrom) and node.module.startswith("specpass")
        for alias in node.names
    ]
    assert imported
    for module, name in imported:
        assert hasattr(importlib.import_module(module), name), f"README: from {module} import {name} fails"
