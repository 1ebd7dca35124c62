"""Tests for the ``specpass`` command line: help, usage errors and exit codes."""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
from pathlib import Path

import pytest

from specpass import bench
from specpass.cli import main
from specpass.errors import SpecPassError

ROOT = Path(__file__).resolve().parent.parent
SUBCOMMANDS = ("demo", "tune", "bench", "coverage", "compile", "run", "inspect", "graphs")


def test_help_exits_0(capsys):
    with pytest.raises(SystemExit) as e:
        main(["--help"])
    assert e.value.code == 0
    out = capsys.readouterr().out
    for name in SUBCOMMANDS:
        assert name in out


@pytest.mark.parametrize("command", SUBCOMMANDS)
def test_subcommand_help_exits_0(command, capsys):
    with pytest.raises(SystemExit) as e:
        main([command, "--help"])
    assert e.value.code == 0
    assert f"usage: specpass {command}" in capsys.readouterr().out


def test_no_subcommand_is_a_usage_error(capsys):
    assert main([]) == 2
    assert "usage: specpass" in capsys.readouterr().out


def test_unknown_option_is_a_usage_error(capsys):
    with pytest.raises(SystemExit) as e:
        main(["bench", "--no-such-option"])
    assert e.value.code == 2
    assert "unrecognized arguments" in capsys.readouterr().err


def test_specpass_error_in_a_command_exits_2_without_traceback(monkeypatch, capsys):
    def fail(args):
        raise SpecPassError("the model has no decoder layers")

    monkeypatch.setattr(bench, "run_bench", fail)
    assert main(["bench"]) == 2
    err = capsys.readouterr().err
    assert err == "specpass: error: the model has no decoder layers\n"


def test_entry_point_reports_errors_on_stderr(tmp_path):
    """The real process: a missing prompts file fails before any model is loaded, with exit code 2."""
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")]))}
    missing = tmp_path / "missing.jsonl"
    result = subprocess.run(
        [sys.executable, "-m", "specpass.cli", "bench", "--prompts", str(missing)],
        capture_output=True,
        text=True,
        env=env,
        cwd=tmp_path,
        timeout=120,
    )
    assert result.returncode == 2, result.stderr
    assert result.stderr.startswith("specpass: error: --prompts ")
    assert "Traceback" not in result.stderr
    assert result.stdout == ""


def test_demo_streams_and_reports(capsys):
    """``specpass demo`` on a tiny random model (eager backend): the answer is streamed and the outputs match."""
    import argparse
    import json

    from test_bench import tiny_chat_model

    from specpass import demo

    model, tok = tiny_chat_model()
    parser = argparse.ArgumentParser()
    demo.add_arguments(parser)

    args = parser.parse_args(["--backend", "eager", "--max-new-tokens", "6", "--prompt", "hi"])
    assert demo.run_demo(args, model=model, tokenizer=tok) == 0
    out = capsys.readouterr().out
    assert "tokens/s" in out and "speedup" in out and "identical  yes" in out

    args = parser.parse_args(["--backend", "eager", "--max-new-tokens", "6", "--prompt", "hi", "--json"])
    assert demo.run_demo(args, model=model, tokenizer=tok) == 0
    result = json.loads(capsys.readouterr().out)
    assert result["identical"] is True and result["mismatch"] is None
    assert result["specpass"]["new_tokens"] == result["hf_eager"]["new_tokens"] > 0
    assert result["speedup"] > 0 and result["compile_s"] > 0


def test_backend_and_threads_are_one_option_with_one_default():
    """demo, tune and bench take the same --backend and --threads (cli_args), with the same defaults."""
    from specpass.cli import build_parser

    sub = next(a for a in build_parser()._actions if isinstance(a, argparse._SubParsersAction))
    seen = {}
    for command in ("demo", "tune", "bench"):
        actions = {a.dest: a for a in sub.choices[command]._actions}
        seen[command] = {
            name: (actions[name].default, actions[name].choices, actions[name].help) for name in ("backend", "threads")
        }
    assert seen["demo"] == seen["tune"] == seen["bench"]
    assert seen["bench"]["threads"][0] is None and seen["bench"]["backend"][0] == "inductor"


def test_threads_below_one_is_refused():
    from specpass.cli_args import apply_threads

    with pytest.raises(SpecPassError, match="--threads must be >= 1, got 0"):
        apply_threads(0)


def test_output_paths_are_checked_before_the_work(tmp_path, monkeypatch):
    from specpass import output_paths

    deep = tmp_path / "new" / "folders" / "r.json"
    assert output_paths.check_output_file(deep, "--json") == deep  # folders the writer will make
    assert not (tmp_path / "new").exists()  # a check, not a write
    with pytest.raises(SpecPassError, match=r"^--json .* is a directory; give a file path"):
        output_paths.check_output_file(tmp_path, "--json")
    (tmp_path / "notes.txt").write_text("")
    with pytest.raises(SpecPassError, match=r"notes.txt is a file, not a folder"):
        output_paths.check_output_location(tmp_path / "notes.txt" / "r.md", "--markdown")
    monkeypatch.setattr(output_paths.os, "access", lambda path, mode: False)  # a folder of another user
    with pytest.raises(SpecPassError, match=rf"cannot write in {tmp_path}; give a path in a folder you can write"):
        output_paths.check_output_location(deep, "-o")
