"""End to end on the real default model: specpass (Inductor) greedy output equals HF eager generate, plain and
speculative (``speculate=True``: the calibrated draft, verified)."""

from __future__ import annotations

import json
import os

import pytest
import torch

import specpass
from specpass import bench
from specpass.bench import compare_outputs, load_questions, resolve_prompts, stratified_sample
from specpass.tokenization import chat_ids
from specpass.tune.calibrate import CalibrationSettings

pytestmark = pytest.mark.slow

#: greedy equality with speculation over stratified Spec-Bench dev prompts, plain decoding on every 4th of them.
#: CI checks 12 (to stay under its 45 minutes: HF eager's references alone take 10-15 s per prompt on the 2-core
#: EPYC); issue 3's bar was 48: SPECPASS_E2E_PROMPTS=48 runs that. docs/benchmarks.md's benches check 24.
N_PROMPTS = int(os.environ.get("SPECPASS_E2E_PROMPTS", "12"))
PLAIN_EVERY = 4
NEW_TOKENS = 128
#: the KV cache of this file's programs, and of its bench run (the last test), so that the bench loads the compiled
#: prefill and decode from the program cache (2-3 minutes of CI)
SHARED_CACHE_LEN = 960
#: A shorter full search than `specpass tune`'s (4-6 minutes on the 2-core EPYC): fewer candidates, adapters trained
#: for seconds, timed on fewer tokens. It runs the same code on the real model (exit adapters trained, draft
#: programs compiled and timed); its plan is whichever candidate measured fastest, on some CPUs context lookup alone
#: (the 2-core Zen 4, 2026-12-06). How fast the searches' plans are, the benchmarks say (docs/benchmarks.md).
QUICK = CalibrationSettings(
    new_tokens=32,
    train_seconds=5.0,
    skip_candidates=1,
    timed_prompts=2,
    timed_tokens=32,
    finalists=1,
    lookup_tokens=(2,),
    lookup_min_ngrams=(1,),
    tree_budgets=(4,),
)


@pytest.fixture(scope="module")
def reference():
    """The default model, the prompts, HF eager's greedy outputs for them, and the model compiled with
    speculation (``speculate=True``: the calibrated plan's drafts, verified)."""
    from specpass.models import default_model

    model, tokenizer = default_model(progress=False)
    questions = stratified_sample(load_questions(resolve_prompts(None)), N_PROMPTS)
    prompts = [chat_ids(tokenizer, q["turns"][0]) for q in questions]
    with torch.no_grad():
        refs = [
            model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=NEW_TOKENS, do_sample=False)
            for ids in prompts
        ]
    longest = max(p.shape[1] for p in prompts)
    cache_len = max(SHARED_CACHE_LEN, -(-(longest + NEW_TOKENS) // 64) * 64)
    # One compile serves both tests: plain decoding is generate(speculate=False) on the same programs.
    plan = specpass.calibrate(model, tokenizer=tokenizer, max_cache_len=cache_len, settings=QUICK)
    fast = specpass.optimize(model, speculate=True, plan=plan, backend="inductor", max_cache_len=cache_len)
    return model, tokenizer, questions, prompts, refs, fast


#: HF's own near-ties (top-2 logits within 1e-3) this file tolerates per test: each is printed; more than this
#: many means the compiled programs round differently far more often than rounding explains
MAX_NEAR_TIES = 2


def test_every_matched_weight_rebuilds_bit_for_bit(reference):
    """The blocks the compiled programs were given (the compile's packing) rebuild every weight they stand for."""
    from test_exact_lowbit import assert_matches_rebuild_exactly

    from specpass.passes.exact_lowbit import packing

    model, *_, fast = reference
    with packing(fast.packs):
        # 210 Q4_1 layers and the tied embedding/head as Q8_0 (one parameter)
        assert assert_matches_rebuild_exactly(model) == {"Q4_1": 210, "Q8_0": 1}


@pytest.mark.parametrize("speculate", [False, True], ids=["plain", "speculative"])
def test_inductor_greedy_equals_hf_on_default_model(reference, speculate, tmp_path):
    model, tokenizer, questions, prompts, refs, fast = reference
    cases = list(zip(questions, prompts, refs, strict=True))
    if not speculate:
        cases = cases[::PLAIN_EVERY]
    assert fast.speculative
    near_ties, outputs, drafted = [], [], 0
    for q, ids, ref in cases:
        out = fast.generate(ids, max_new_tokens=NEW_TOKENS, speculate=speculate)
        outputs.append(out)
        diff = compare_outputs(model, ids, ref, out)
        if diff is not None:
            # Compiled kernels may round differently: tolerated only where HF's own top-2 logits nearly tie.
            assert diff["near_tie"], f"question {q['question_id']} ({q['category']}): {diff}"
            near_ties.append((q["question_id"], diff))
        assert fast.last_stats.new_tokens == out.shape[1] - ids.shape[1]
        drafted += sum(fast.last_stats.drafted)
    assert (drafted > 0) == speculate
    print(f"{len(cases)} prompts; near-ties tolerated: {near_ties or 'none'}")
    assert len(near_ties) <= MAX_NEAR_TIES, f"{len(near_ties)} near-ties in {len(cases)} prompts: {near_ties}"
    if speculate:
        # The engine file of this model reproduces it token for token (issue 4), from the same programs.
        from specpass.engine import load_engine, write_engine

        path = tmp_path / "default.specpass"
        manifest = write_engine(fast, path, tokenizer=tokenizer)
        # every matrix is stored as its GGUF blocks (exact_lowbit): 111.5 MB of weights instead of 538 MB
        assert {info["format"] for info in manifest["lowbit"].values()} == {"Q4_1", "Q8_0"}
        assert sum(info["fp32_blocks"] for info in manifest["lowbit"].values()) == 0
        # plus the fp32 weights of any kind of call this CPU measured faster in fp32 (a close prefill call can go
        # either way: kernels/choice.py)
        assert path.stat().st_size < 150e6 + _fp32_bytes(fast.lowbit_choices), (
            path.stat().st_size,
            fast.lowbit_choices,
        )
        engine = load_engine(path)
        for (q, ids, _), want in list(zip(cases, outputs, strict=True))[:6]:
            assert torch.equal(engine.chat_ids(q["turns"][0]), ids)
            assert torch.equal(engine.generate(ids, max_new_tokens=NEW_TOKENS), want), q["question_id"]


def _fp32_bytes(choices: dict) -> int:
    """Bytes of the fp32 matrices of the kinds of call kept in fp32 (kind: regime|storage|NxK+NxK|xCOUNT)."""
    total = 0
    for kind, result in choices.items():
        if not result["lowbit"]:
            _, _, shapes, count = kind.split("|")
            total += 4 * int(count[1:]) * sum(int(n) * int(k) for n, k in (s.split("x") for s in shapes.split("+")))
    return total


def test_bench_on_the_default_model(tmp_path):
    """``specpass bench`` with every method but hf_static_compile on the real model. specpass runs a given
    context-lookup plan: the default calibration (about 20 minutes on 2 cores) is what benchmarks measure, not what
    this test checks. It lives in this file so that it runs after the tests above in the same xdist worker:
    specpass's prefill and decode (SHARED_CACHE_LEN) then come from the program cache. hf_static_compile's
    torch.compile of this model would add 2-4 minutes to CI's longest worker; test_bench.py runs it on a tiny
    model."""
    from specpass.cli import main
    from specpass.tune.plan import SpecPlan

    out_json, plan = tmp_path / "r.json", tmp_path / "plan.json"
    SpecPlan(speculate=True, lookup=3, max_draft=0).save(plan)
    methods = [n for n in bench.DEFAULT_METHODS if n != "hf_static_compile"]
    args = ["--max-new-tokens", "8", "--max-cache-len", str(SHARED_CACHE_LEN), "--plan", str(plan)]
    rc = main(["bench", "--num-prompts", "1", "--methods", ",".join(methods), *args, "--json", str(out_json)])
    data = json.loads(out_json.read_text())
    assert rc == 0, data["mismatches"]
    assert data["config"]["methods"] == [n for n in methods if n not in data["skipped"]]
    # peers that are not installed (CI does not build llama.cpp: pip install 'specpass[peers]' takes ~10 minutes)
    assert set(data["skipped"]) <= {"economize_layer_skip", "flashspec_lookup", "llamacpp", "llamacpp_lookup"}
    assert data["config"]["lowbit"]["isa"] == data["machine"]["isa"].lower().replace("-", "")
    assert data["config"]["lowbit"]["choices"]  # what was timed against fp32 on this CPU
    for name, s in data["summary"].items():
        assert s["identical"] or not s["lossless"], name
        assert s["new_tokens"] == data["summary"]["hf_eager"]["new_tokens"] > 0
