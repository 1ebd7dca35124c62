"""Every HF causal-LM architecture: capture + greedy decode against HF; unsupported is fine, a crash is a bug.

The test enumerates ``MODEL_FOR_CAUSAL_LM_MAPPING_NAMES``, builds a tiny random config for each architecture and
runs ``specpass.coverage.check_architecture`` in two worker processes (a hang or a segfault costs one row). It
fails on any ``crash`` (an exception other than SpecPassError) or ``mismatch`` (different tokens without an
error), and when ``docs/coverage.md`` no longer tells the truth about which architectures are lossless.
Regenerate the report with ``specpass coverage``.
"""

from __future__ import annotations

import time
from pathlib import Path

import pytest

from specpass import coverage
from specpass.coverage import check

REPORT = Path(__file__).resolve().parent.parent / "docs" / "coverage.md"
#: the whole sweep must stay a small part of the 30-minute CI budget on two cores
BUDGET_S = 300


@pytest.fixture(scope="module")
def results() -> dict[str, coverage.CoverageResult]:
    t0 = time.perf_counter()
    done = coverage.run_architectures(coverage.all_model_types(), workers=2, timeout_s=120)
    elapsed = time.perf_counter() - t0
    print(f"coverage sweep: {len(done)} architectures in {elapsed:.0f}s: {coverage.summary_counts(done)}")
    return {r.model_type: r for r in done}


def test_every_architecture_is_checked(results):
    assert sorted(results) == coverage.all_model_types()


def test_no_crash_and_no_silent_mismatch(results):
    bugs = [f"{r.model_type}: {r.status}: {r.reason}" for r in results.values() if r.status in coverage.BUGS]
    assert not bugs, "specpass bugs (not SpecPassError):\n" + "\n".join(bugs)


def test_every_failure_says_why(results):
    for r in results.values():
        if r.status != coverage.LOSSLESS:
            assert r.reason.strip(), f"{r.model_type} is {r.status} without a reason"


def test_core_architectures_are_lossless(results):
    core = ["llama", "qwen2", "qwen3", "mistral", "gemma", "gemma2", "gemma3_text", "phi", "phi3", "gpt2"]
    core += ["gpt_neox", "opt", "olmo", "stablelm", "starcoder2", "falcon"]
    assert {m: results[m].status for m in core} == {m: coverage.LOSSLESS for m in core}


def test_report_is_up_to_date(results):
    # Robust to wording: the report lists the same architectures, and "lossless" in it means lossless now
    # (and the other way round). Reasons may differ in detail between machines; statuses may not.
    assert REPORT.exists(), "docs/coverage.md is missing; run `specpass coverage`"
    rows = coverage.parse_markdown(REPORT.read_text())
    stale = "docs/coverage.md is stale; run `specpass coverage` and commit the result"
    assert sorted(rows) == sorted(results), f"{stale}: it lists other architectures"
    claimed = {m for m, (status, _) in rows.items() if status == coverage.LOSSLESS}
    actual = {m for m, r in results.items() if r.status == coverage.LOSSLESS}
    assert claimed == actual, f"{stale}: lossless now but not in the report: {sorted(actual - claimed)}; " + (
        f"in the report but not lossless now: {sorted(claimed - actual)}"
    )
    assert not any(status in coverage.BUGS for status, _ in rows.values())


def test_markdown_round_trip():
    rows = [
        coverage.CoverageResult("a", coverage.LOSSLESS),
        coverage.CoverageResult("b", coverage.FAILED, "x | y: unsupported"),
    ]
    text = coverage.render_markdown(rows, versions="torch x, transformers y")
    assert "`specpass coverage`" in text
    assert coverage.parse_markdown(text) == {"a": ("lossless", ""), "b": ("failed", "x | y: unsupported")}


def test_speculative_output_is_judged_even_when_plain_decoding_hit_a_near_tie(monkeypatch):
    import importlib

    import torch

    class Fake:
        """HF's greedy tokens with the last one changed (plain decoding: a near-tie, below) or the first new one
        changed (speculative decoding: a real difference)."""

        def __init__(self, model):
            self.model = model

        def generate(self, prompt, max_new_tokens, speculate=None, **_):
            with torch.no_grad():
                out = self.model.generate(
                    prompt,
                    attention_mask=torch.ones_like(prompt),
                    max_new_tokens=max_new_tokens,
                    min_new_tokens=max_new_tokens,
                    do_sample=False,
                    eos_token_id=None,
                    pad_token_id=0,
                ).clone()
            at = -1 if speculate is False else check.PROMPT_LEN
            out[0, at] = (out[0, at] + 1) % 8
            return out

    def near_tie_only_at_the_end(model, expected, got):
        return 1e-7 if torch.equal(got[0, :-1], expected[0, :-1]) else None

    monkeypatch.setattr(importlib.import_module("specpass.optimize"), "optimize", lambda model, **_: Fake(model))
    monkeypatch.setattr(check, "_tie_gap", near_tie_only_at_the_end)
    result = coverage.check_architecture("llama")
    assert result.status == coverage.MISMATCH and result.reason.startswith("speculative decoding: specpass")
