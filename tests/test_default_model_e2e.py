"""End to end on the real default model: specpass (Inductor) greedy output equals HF eager generate, plain and
speculative (``speculate=True``: the calibrated draft, verified)."""

from __future__ import annotations

import os

import pytest
import torch

import specpass
from specpass.bench import compare_outputs, load_questions, resolve_prompts, stratified_sample
from specpass.models import chat_ids
from specpass.tune.calibrate import CalibrationSettings

pytestmark = pytest.mark.slow

#: greedy equality with speculation over stratified Spec-Bench dev prompts, plain decoding on every 4th of them.
#: CI checks 12 (to stay under its 45 minutes: HF eager's references alone take 10-15 s per prompt on the 2-core
#: EPYC); issue 3's bar was 48: SPECPASS_E2E_PROMPTS=48 runs that. docs/benchmarks.md's benches check 24.
N_PROMPTS = int(os.environ.get("SPECPASS_E2E_PROMPTS", "12"))
PLAIN_EVERY = 4
NEW_TOKENS = 128
#: the KV cache of this file's programs, and of test_bench.py's default-model run, so that the second of the two
#: loads the first's compiled prefill and decode from the program cache (2-3 minutes of CI)
SHARED_CACHE_LEN = 960
#: A shorter full search than `specpass tune`'s (4-6 minutes on the 2-core EPYC): fewer candidates timed on fewer
#: tokens. It runs the same code and its plan drafts through a draft program (the quick search's plans have none),
#: which is what this test checks; how fast the searches' plans are, the benchmarks say (docs/benchmarks.md).
QUICK = CalibrationSettings(
    new_tokens=32,
    train_seconds=15.0,
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


def test_every_matched_weight_rebuilds_bit_for_bit():
    from test_exact_lowbit import assert_matches_rebuild_exactly

    from specpass.kernels import load_kernels
    from specpass.models import default_model

    load_kernels()
    model, _ = default_model(progress=False)
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
