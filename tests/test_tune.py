"""Calibration's searches on tiny models: the quick plan of a first run, the full search's budget and resume,
``specpass tune``, and progress output fit for a log."""

from __future__ import annotations

import json

import pytest
import torch
from test_bench import tiny_chat_model

import specpass
from specpass import progress
from specpass.cli import main
from specpass.errors import SpecPassError
from specpass.tune import calibrate as calibrate_module
from specpass.tune import text as text_module
from specpass.tune.calibrate import CalibrationSettings, calibrate_compiled
from specpass.tune.plan import SpecPlan

#: a full search small enough for a tiny model in seconds (every stage runs)
SMALL = CalibrationSettings(
    new_tokens=12,
    train_seconds=0.5,
    skip_candidates=1,
    timed_prompts=2,
    timed_tokens=8,
    finalists=1,
    lookup_tokens=(1, 2),
    lookup_min_ngrams=(1,),
    tree_budgets=(2,),
    quick_prompts=2,
    quick_tokens=8,
)
PROMPTS = [list(range(3, 12)), list(range(20, 26)), list(range(40, 52)), list(range(60, 66))]


@pytest.fixture(autouse=True)
def _own_plan_cache(tmp_path, monkeypatch):
    """Each test starts without cached plans (tiny_chat_model is the same model in every test)."""
    from specpass.tune import plan

    monkeypatch.setattr(plan, "plan_cache_dir", lambda: tmp_path / "plans")


@pytest.fixture(scope="module")
def plain():
    """A tiny chat model compiled for plain decoding (eager backend)."""
    model, tok = tiny_chat_model()
    return specpass.optimize(model, speculate=False, backend="eager", max_cache_len=64, progress=False), tok


def _hf(model, ids, n):
    with torch.no_grad():
        return model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=n, do_sample=False)


def _fake_speeds(monkeypatch, speeds):
    """Make the searches' timing return ``speeds(plan)`` (None for plain decoding) and count the calls."""
    calls = []

    def fake(sm, plan, prompts, new_tokens):
        calls.append(plan)
        return speeds(plan)

    monkeypatch.setattr(calibrate_module, "tokens_per_s", fake)
    return calls


def test_optimize_uses_the_quick_search_without_a_cached_plan():
    """A first optimize() times context lookup against plain decoding, compiles no draft program, caches the
    plan and says which search chose it; generate still equals HF's."""
    model, tok = tiny_chat_model()
    sm = specpass.optimize(model, tokenizer=tok, backend="eager", max_cache_len=96, progress=False)
    plan = sm.plan
    assert plan.search == "quick" and plan.measurements["search"]["kind"] == "quick"
    assert [(t["lookup"], t["lookup_min_ngram"]) for t in plan.measurements["timed"]] == list(
        CalibrationSettings().quick_lookups
    )
    assert "adapter_train_s" not in plan.measurements
    assert set(sm.programs) == {"prefill", "decode"}
    ids = torch.tensor([[1, 5, 9, 14, 5, 9]])
    assert torch.equal(sm.generate(ids, max_new_tokens=10), _hf(model, ids, 10))
    assert specpass.optimize(model, backend="eager", max_cache_len=96, progress=False).plan.to_json() == plan.to_json()


@pytest.mark.parametrize(("lookup_tps", "speculates"), [(104.0, False), (111.0, True)])
def test_the_quick_plan_keeps_plain_decoding_unless_lookup_beats_it_by_min_gain(
    plain, monkeypatch, lookup_tps, speculates
):
    sm, tok = plain
    calls = _fake_speeds(monkeypatch, lambda plan: 100.0 if plan is None else lookup_tps)
    plan = calibrate_compiled(sm, PROMPTS, settings=SMALL, progress=False, search="quick")
    assert plan.speculate is speculates and plan.search == "quick"
    assert sum(p is None for p in calls) == 2  # plain before and after the candidates
    assert plan.lookup == (1 if speculates else 0)


def test_a_cached_full_plan_is_used_and_a_quick_one_is_replaced_by_calibrate_full(monkeypatch):
    model, tok = tiny_chat_model()
    searches = []
    real = calibrate_module.calibrate_compiled

    def counted(sm, prompts=None, **kw):
        searches.append(kw["search"])
        return real(sm, PROMPTS, **{**kw, "settings": SMALL})

    monkeypatch.setattr(calibrate_module, "calibrate_compiled", counted)
    kw = {"backend": "eager", "max_cache_len": 64, "progress": False}
    assert specpass.optimize(model, **kw).plan.search == "quick"
    assert specpass.optimize(model, **kw).plan.search == "quick" and searches == ["quick"]
    full = specpass.optimize(model, calibrate="full", **kw).plan
    assert full.search == "full" and searches == ["quick", "full"]
    assert full.measurements["search"]["complete"] and full.measurements["adapter_train_s"]
    assert specpass.optimize(model, **kw).plan.to_json() == full.to_json()
    assert specpass.optimize(model, calibrate="full", **kw).plan.to_json() == full.to_json()
    assert searches == ["quick", "full"]
    with pytest.raises(SpecPassError, match="calibrate must be one of quick, full"):
        specpass.optimize(model, calibrate="slow", **kw)


def test_the_full_search_times_every_kind_of_candidate(plain, monkeypatch):
    sm, _ = plain
    plan = calibrate_compiled(sm, PROMPTS, settings=SMALL, progress=False, search="full")
    timed = plan.measurements["timed"]
    assert [t["lookup"] for t in timed if set(t) == {"lookup", "lookup_min_ngram", "plan", "tokens_per_s"}] == [1, 2]
    assert any("tree_budget" in t for t in timed)
    assert sum("vocab" in t for t in timed) == 2  # one draft program, two policies
    assert plan.measurements["search"] == {
        "kind": "full",
        "complete": True,
        "budget_s": None,
        "timed": len(timed),
        "not_timed": [],
        "resumed": False,
    }


def test_a_budget_leaves_candidates_for_the_next_run_which_resumes(plain, monkeypatch):
    """With no time left, nothing is timed but plain decoding, the plan does not speculate and the search is
    incomplete; the next run keeps the text, adapters and plain timing and times the rest."""
    sm, _ = plain
    generated = []
    real_generate = calibrate_module.generate_text

    def counted(*args):
        generated.append(1)
        return real_generate(*args)

    monkeypatch.setattr(calibrate_module, "generate_text", counted)
    calls = _fake_speeds(monkeypatch, lambda plan: 100.0 if plan is None else 120.0 + plan.lookup)
    first = calibrate_compiled(sm, PROMPTS, settings=SMALL, progress=False, budget_s=1e-9, resume=True)
    search = first.measurements["search"]
    assert not search["complete"] and search["timed"] == 0 and len(search["not_timed"]) >= 3
    assert not first.speculate and calls == [None] and generated == [1]

    second = calibrate_compiled(sm, PROMPTS, settings=SMALL, progress=False, resume=True)
    assert second.measurements["search"]["complete"] and second.measurements["search"]["resumed"]
    assert generated == [1] and calls.count(None) == 1  # text and plain timing kept from the first run
    assert second.speculate and second.lookup == 2
    # finished: the next search starts anew
    calibrate_compiled(sm, PROMPTS, settings=SMALL, progress=False, resume=True)
    assert generated == [1, 1]


def test_an_interrupted_search_resumes_without_timing_again(plain, monkeypatch):
    sm, _ = plain
    n = []

    def speeds(plan):
        n.append(plan)
        if len(n) == 3:
            raise KeyboardInterrupt
        return 100.0 if plan is None else 110.0

    _fake_speeds(monkeypatch, speeds)
    with pytest.raises(KeyboardInterrupt):
        calibrate_compiled(sm, PROMPTS, settings=SMALL, progress=False, resume=True)
    assert len(n) == 3  # plain and the first lookup were measured and kept
    n.clear()
    calls = _fake_speeds(monkeypatch, lambda plan: 100.0 if plan is None else 110.0)
    plan = calibrate_compiled(sm, PROMPTS, settings=SMALL, progress=False, resume=True)
    assert plan.measurements["search"]["complete"]
    assert None not in calls  # none timed twice: plain decoding, nor lookup 1 alone
    assert not [p for p in calls if p.lookup == 1 and not p.tree_budget and not p.has_draft]
    # other prompts: what was measured is not this search's
    calls.clear()
    calibrate_compiled(sm, PROMPTS[1:], settings=SMALL, progress=False, resume=True)
    assert None in calls


def test_specpass_tune_caches_the_full_plan_and_reports_both(tmp_path, capsys, monkeypatch):
    model, tok = tiny_chat_model()
    model.save_pretrained(tmp_path / "model")
    tok.save_pretrained(tmp_path / "model")
    monkeypatch.setattr(text_module, "DEFAULT_PROMPTS", ("hi there", "tell me more", "and then?", "why not"))
    monkeypatch.setattr(calibrate_module, "CalibrationSettings", lambda: SMALL)
    path = str(tmp_path / "model")
    loaded, tokenizer = specpass.models.load(path)
    quick = specpass.optimize(loaded, tokenizer=tokenizer, backend="eager", max_cache_len=256, progress=False).plan
    assert quick.search == "quick"
    assert main(["tune", path, "--backend", "eager", "--max-cache-len", "256", "--budget-s", "120", "--json"]) == 0
    result = json.loads(capsys.readouterr().out)
    assert result["complete"] and result["candidates_timed"] >= 4 and result["previous_search"] == "quick"
    assert result["plain_tokens_per_s"] > 0 and result["tokens_per_s"] > 0
    again = specpass.optimize(loaded, backend="eager", max_cache_len=256, progress=False).plan
    assert again.search == "full" and again.to_json() == SpecPlan.load(result["plan_file"]).to_json()
    assert main(["tune", path, "--budget-s", "0"]) == 2
    assert "--budget-s must be > 0" in capsys.readouterr().err


def test_progress_off_a_terminal_is_one_line_per_stage(monkeypatch, capsys):
    monkeypatch.delenv("SPECPASS_PROGRESS", raising=False)
    assert progress.style() == "lines"  # pytest's captured stderr is not a terminal
    for _ in progress.progress_bar(range(3), desc="stage one", unit="prompt"):
        pass
    with progress.progress_bar(total=5, desc="stage two") as bar:
        bar.update(2)
        bar.set_postfix(loss="0.5")
    err = capsys.readouterr().err.splitlines()
    assert len(err) == 2
    assert err[0].startswith("stage one: 3/3 prompt in ") and err[1].endswith("s (loss=0.5)")
    monkeypatch.setenv("SPECPASS_PROGRESS", "off")
    for _ in progress.progress_bar(range(3), desc="quiet"):
        pass
    assert capsys.readouterr().err == ""
    monkeypatch.setenv("SPECPASS_PROGRESS", "bar")
    assert progress.style() == "bar"
