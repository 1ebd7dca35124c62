"""examples/gpu_check.py, the one GPU check: its table from bench reports, its plan, its command line."""

from __future__ import annotations

import importlib.util
import subprocess
import sys
from pathlib import Path

import pytest

from specpass.tune.plan import SpecPlan

SCRIPT = Path(__file__).resolve().parents[1] / "examples" / "gpu_check.py"


@pytest.fixture(scope="module")
def gpu_check():
    spec = importlib.util.spec_from_file_location("gpu_check", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _report(speeds: dict[str, float], identical: dict[str, list[bool]], near_ties: dict[str, int]) -> dict:
    summary = {
        name: {"tokens_per_s": tps, "tau": 1.5 if name == "specpass" else None, "setup_s": 3.0, "mismatches": 0}
        for name, tps in speeds.items()
    }
    for name, s in summary.items():
        s["near_ties"] = near_ties.get(name, 0)
    prompts = [
        {"methods": {name: {"identical": identical[name][i]} for name in speeds}}
        for i in range(len(identical["hf_eager"]))
    ]
    return {"summary": summary, "prompts": prompts, "config": {"num_prompts": len(prompts)}, "skipped": {}}


def test_rows_give_ratios_to_the_compiled_static_cache_and_equal_outputs(gpu_check):
    data = _report(
        {"hf_eager": 40.0, "hf_static_compile": 200.0, "specpass": 400.0},
        {"hf_eager": [True, True], "hf_static_compile": [True, True], "specpass": [True, False]},
        {"specpass": 1},
    )
    rows = {row[0]: row for row in gpu_check.bench_rows("m", data)}
    assert rows["m: hf_static_compile"][2] == "1.00x" and rows["m: hf_eager"][2] == "0.20x"
    assert rows["m: specpass"][1:5] == ["400.0 tok/s", "2.00x", "1.50", "1/2 + 1 near-tie(s)"]
    assert rows["m: hf_eager"][4] == "(reference)"
    table = gpu_check.render(list(rows.values()))
    assert table.splitlines()[0].startswith("| check | result | vs hf_static_compile |")


def test_the_gpu_plan_fits_the_default_model_shape():
    plan = SpecPlan.load(SCRIPT.parent / "plans" / "smollm2-gpu.json")
    assert plan.speculate and plan.tree_budget == 16 and not plan.has_draft  # no draft program: nothing to train
    assert len(plan.tree_template) == plan.tree_budget - 1


def test_help_runs_without_a_gpu():
    done = subprocess.run([sys.executable, str(SCRIPT), "--help"], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0 and "--llama-layers" in done.stdout
