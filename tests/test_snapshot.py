"""Tests for graph snapshots (``specpass graphs``, ``specpass.testing.assert_graphs_match``): a round trip, the
diffs a changed model, pipeline or plan gives, bad input, and snapshots identical across processes."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from conftest import tiny_llama
from test_exact_lowbit import grid_llama

from specpass import snapshot
from specpass.cli import main
from specpass.kernels import choice
from specpass.testing import assert_graphs_match
from specpass.tune.plan import SpecPlan


def saved(model, path: Path) -> str:
    model.save_pretrained(path)
    return str(path)


@pytest.fixture(scope="module")
def llama_dir(tmp_path_factory):
    return saved(tiny_llama(), tmp_path_factory.mktemp("llama"))


@pytest.fixture(scope="module")
def llama_snapshot(llama_dir, tmp_path_factory):
    out = tmp_path_factory.mktemp("snap") / "graphs"
    assert main(["graphs", llama_dir, "-o", str(out), "--no-speculate", "--max-cache-len", "32"]) == 0
    return out


def test_round_trip_is_unchanged(llama_dir, llama_snapshot, capsys):
    files = {p.relative_to(llama_snapshot).as_posix() for p in llama_snapshot.rglob("*") if p.is_file()}
    assert {"report.json", "graphs/capture.txt", "graphs/decode/signature.txt", "graphs/prefill/signature.txt"} <= files
    assert "graphs/decode/01-fold_gqa_heads.txt" in files and "plan.json" not in files
    report = json.loads((llama_snapshot / "report.json").read_text())
    assert report["options"] == {"max_cache_len": 32, "exact_lowbit": True}
    assert list(report["programs"]) == ["prefill", "decode"]
    decode = report["programs"]["decode"]["passes"]
    assert [s["pass"] for s in decode] == [
        "fold_gqa_heads",
        "fused_attention",
        "inline_attention",
        "exact_lowbit",
        "linear_operand_order",
    ]
    assert decode[1]["modified"] and decode[1]["ops"]["aten.scaled_dot_product_attention.default"] == [2, 0]
    assert decode[1]["ops"]["specpass.attention.default"] == [0, 2] and not decode[2]["modified"]
    assert decode[3] == {
        "pass": "exact_lowbit",
        "modified": False,
        "matches": 0,
        "nodes": decode[3]["nodes"],
        "ops": {},
    }
    assert (
        decode[4]["modified"]
        and decode[4]["ops"]["aten.linear.default"][1] < decode[4]["ops"]["aten.linear.default"][0]
    )
    assert report["recorded"]["versions"]["torch"] == torch.__version__

    capsys.readouterr()
    assert main(["graphs", llama_dir, "--check", str(llama_snapshot)]) == 0
    assert "unchanged" in capsys.readouterr().out


def test_one_more_layer_fails_with_a_diff(llama_snapshot, tmp_path, capsys):
    deeper = saved(tiny_llama(num_hidden_layers=3), tmp_path / "deeper")
    assert main(["graphs", deeper, "--check", str(llama_snapshot)]) == 1
    out = capsys.readouterr().out
    assert "captured graph: changed first in capture" in out
    assert "program decode: changed first in the output of pass fold_gqa_heads (1 of 5)" in out
    assert "+%linear_" in out and "model.model.layers.2" in out  # the new layer's lines, added
    assert "report.json: changed first in its compared entries" in out
    assert "+model.layers: 3" in out


def test_weight_bytes_per_decode_step(llama_snapshot):
    model = tiny_llama()
    embed = model.get_input_embeddings().weight
    assert model.get_output_embeddings().weight is not embed  # untied: the table is only looked up
    full = sum(p.numel() * p.element_size() for p in model.parameters())
    one_row = full - embed.numel() * 4 + embed.shape[1] * 4
    buffers = sum(b.numel() * b.element_size() for b in model.buffers())  # rotary frequencies
    report = json.loads((llama_snapshot / "report.json").read_text())
    assert one_row <= report["decode_weight_bytes_per_step"] <= one_row + buffers


def test_no_exact_lowbit_and_another_plan_show_in_the_diff(tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("SPECPASS_LOWBIT_CHOICE", "always")
    model_dir = saved(grid_llama(), tmp_path / "grid")
    out = tmp_path / "snap"
    assert main(["graphs", model_dir, "-o", str(out), "--no-speculate", "--max-cache-len", "32"]) == 0
    report = json.loads((out / "report.json").read_text())
    assert report["lowbit"]["matrices"]["lm_head.weight"]["format"] == "Q8_0"
    assert report["programs"]["decode"]["lowbit_calls"] > 0
    capsys.readouterr()

    assert main(["graphs", model_dir, "--check", str(out), "--no-exact-lowbit"]) == 1
    diff = capsys.readouterr().out
    # without the kernels the decode program loses its fused attention first, then its low-bit calls
    assert "program decode: changed first in the pipeline: pass 2 was fused_attention, is now inline_attention" in diff
    assert "-%lowbit_linear_0 = specpass.lowbit_linear.default(" in diff
    assert "program prefill: changed first in the pipeline: pass 3 was exact_lowbit, is now (none)" in diff

    plan = SpecPlan(speculate=True, exit_layer=0, max_draft=2)
    (tmp_path / "plan.json").write_text(plan.to_json())
    assert main(["graphs", model_dir, "--check", str(out), "--plan", str(tmp_path / "plan.json")]) == 1
    diff = capsys.readouterr().out
    assert "program draft: changed first in added (the plan now builds it)" in diff
    assert '-plan: "plain decoding"' in diff and "exit after layer 0" in diff

    # --update takes the plan in; the snapshot then checks clean, without the --plan
    assert main(["graphs", model_dir, "--check", str(out), "--plan", str(tmp_path / "plan.json"), "--update"]) == 0
    assert (out / "plan.json").is_file() and (out / "graphs" / "draft" / "signature.txt").is_file()
    assert main(["graphs", model_dir, "--check", str(out)]) == 0


def test_check_takes_the_snapshots_choices_and_times_nothing(tmp_path, monkeypatch):
    model = grid_llama()
    monkeypatch.setenv("SPECPASS_LOWBIT_CHOICE", "measure")
    # the first snapshot's choice, as if measured on a CPU where the kernel lost to fp32 for every kind of call
    monkeypatch.setattr(choice, "_time", lambda calls, tokens: (2.0, 1.0))
    monkeypatch.setattr(choice, "choices_path", lambda: tmp_path / "choices.json")
    choice._memo.clear()
    first = snapshot.take(model, max_cache_len=32)
    chosen = first.report["lowbit"]["choices"]
    lowbit = {k: v for k, v in chosen.items() if not k.startswith("order|")}
    assert lowbit and not any(lowbit.values())
    # beside them, the fp32 order of every shape left in fp32 (weight-stationary: too small to be timed)
    orders = {k: v for k, v in chosen.items() if k.startswith("order|")}
    assert "order|few_tokens|96x64" in orders and all(orders.values())
    assert "lm_head.weight" not in first.report["lowbit"]["matrices"]  # stays fp32 here
    snapshot.write(first, tmp_path / "snap")

    def untimed(calls, tokens):
        raise AssertionError("a check must not time the kernel")

    monkeypatch.setattr(choice, "_time", untimed)
    monkeypatch.setattr(choice, "_time_orders", untimed)
    monkeypatch.setattr(choice, "ORDER_MIN_BYTES", 0)  # would be timed, if the check did not take them as given
    choice._memo.clear()
    assert_graphs_match(model, tmp_path / "snap")


def test_assert_graphs_match_fails_with_the_diff(llama_snapshot):
    assert_graphs_match(tiny_llama(), llama_snapshot)
    with pytest.raises(AssertionError, match=r"(?s)differ from the snapshot .*program decode: changed first"):
        assert_graphs_match(tiny_llama(intermediate_size=96), llama_snapshot)


def test_two_processes_write_identical_snapshots(llama_dir, tmp_path):
    env = {**os.environ, "SPECPASS_LOWBIT_CHOICE": "always"}
    trees = []
    for name in ("a", "b"):
        out = tmp_path / name
        cmd = [sys.executable, "-m", "specpass", "graphs", llama_dir, "-o", str(out), "--no-speculate"]
        subprocess.run(cmd, check=True, env=env, capture_output=True, timeout=600)
        trees.append({p.relative_to(out).as_posix(): p.read_bytes() for p in sorted(out.rglob("*")) if p.is_file()})
    assert trees[0] == trees[1] and len(trees[0]) > 5


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["--check", "{tmp}/missing"], "no such snapshot directory"),
        (["--check", "{tmp}/empty"], "is not a specpass graph snapshot: it has no report.json"),
        (["--check", "{tmp}/bad"], "is not a specpass graph snapshot of version 1"),
        (["-o", "{tmp}/bad", "--update"], "--update goes with --check"),
        (["-o", "{tmp}/occupied"], "exists and is not a specpass graph snapshot"),
    ],
)
def test_bad_input_is_one_line_and_exit_2(llama_dir, tmp_path, capsys, argv, message):
    (tmp_path / "empty").mkdir()
    (tmp_path / "bad").mkdir()
    (tmp_path / "bad" / "report.json").write_text('{"snapshot": 99}')
    (tmp_path / "occupied").mkdir()
    (tmp_path / "occupied" / "notes.txt").write_text("mine")
    assert main(["graphs", llama_dir, *(a.format(tmp=tmp_path) for a in argv), "--no-speculate"]) == 2
    err = capsys.readouterr().err.strip()
    assert message in err and len(err.splitlines()) == 1
    assert (tmp_path / "occupied" / "notes.txt").read_text() == "mine"  # never overwritten
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]  # nothing half-written


def test_a_model_that_does_not_load_is_exit_2(llama_snapshot, tmp_path, capsys):
    (tmp_path / "config.json").write_text("{}")
    assert main(["graphs", str(tmp_path), "--check", str(llama_snapshot)]) == 2
    assert "could not load" in capsys.readouterr().err
