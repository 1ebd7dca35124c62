"""End to end on real Gemma 3 270M weights (the second bundled model): its conversion, and specpass's plain
compiled decoding equal to HF eager's greedy output, on prompts long enough that the sliding-window layers
really slide (the window is 512 tokens)."""

from __future__ import annotations

import pytest
import torch

import specpass
from specpass.bench import compare_outputs, load_questions, resolve_prompts, stratified_sample
from specpass.tokenization import chat_ids

pytestmark = pytest.mark.slow

NAME = "gemma-3-270m"
NEW_TOKENS = 32


@pytest.fixture(scope="module")
def gemma():
    from specpass import models

    return models.load(NAME)


def test_gemma_is_bundled_and_converted(gemma):
    from specpass import models

    model, tokenizer = gemma
    assert NAME in models.available()
    config = model.config
    assert config.model_type == "gemma3_text" and config.vocab_size == 262144 and config.num_hidden_layers == 18
    assert config.sliding_window == 512 and "sliding_attention" in config.layer_types
    assert model.config.tie_word_embeddings
    assert "Gemma Terms of Use" in models.BUNDLED[NAME].notice


@pytest.fixture(scope="module")
def compiled(gemma):
    """Three dev prompts and the two longest that fit in 900 tokens (past the 512-token window), and Gemma compiled
    for them plainly, every matrix on the low-bit kernels."""
    model, tokenizer = gemma
    questions = load_questions(resolve_prompts(None))
    prompts = [chat_ids(tokenizer, q["turns"][0]) for q in stratified_sample(questions, 3)]
    long_ones = sorted((chat_ids(tokenizer, q["turns"][0]) for q in questions), key=lambda ids: -ids.shape[1])
    window = model.config.sliding_window
    long_ones = [ids for ids in long_ones if window < ids.shape[1] <= 900][:2]
    assert len(long_ones) == 2, "the dev split should hold prompts longer than the sliding window"
    cases = prompts + long_ones
    # exact_lowbit="always": every matrix on the kernels whatever this CPU measures, so that they are what is tested
    sm = specpass.optimize(
        model,
        speculate=False,
        max_cache_len=max(ids.shape[1] for ids in cases) + NEW_TOKENS,
        progress=False,
        exact_lowbit="always",
    )
    return cases, sm


def test_every_matched_weight_rebuilds_bit_for_bit(gemma, compiled):
    """The blocks the compiled programs were given (the compile's packing) rebuild every weight they stand for."""
    from test_exact_lowbit import assert_matches_rebuild_exactly

    from specpass.passes.exact_lowbit import packing

    with packing(compiled[1].packs):
        # docs/benchmarks.md: 81 Q5_0, 27 Q4_K, 10 Q8_0 (the tied embedding and head once), 9 Q6_K
        assert assert_matches_rebuild_exactly(gemma[0]) == {"Q5_0": 81, "Q4_K": 27, "Q8_0": 10, "Q6_K": 9}


def test_greedy_equals_hf_plain_and_speculative_including_prompts_past_the_sliding_window(gemma, compiled):
    from specpass.tune.plan import SpecPlan

    model, _ = gemma
    cases, sm = compiled
    formats = {}
    for info in sm.lowbit.values():
        formats[info["format"]] = formats.get(info["format"], 0) + 1
    assert formats == {"Q5_0": 81, "Q4_K": 27, "Q8_0": 10, "Q6_K": 9}  # the pass is active, on every matrix
    assert sum(info["fp32_blocks"] for info in sm.lowbit.values()) == 295
    # context lookup drafts and the decode program verifies: speculation's path, without another compile
    sm.plan = SpecPlan(speculate=True, lookup=3)
    near_ties, drafted = [], 0
    for ids in cases:
        with torch.no_grad():
            ref = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=NEW_TOKENS, do_sample=False)
        for speculate in (False, True):
            out = sm.generate(ids, max_new_tokens=NEW_TOKENS, speculate=speculate)
            diff = compare_outputs(model, ids, ref, out)
            if diff is not None:
                assert diff["near_tie"], diff
                near_ties.append(diff)
            drafted += sum(sm.last_stats.drafted) if speculate else 0
    assert drafted > 0
    print(
        f"{len(cases)} prompts ({[ids.shape[1] for ids in cases]} tokens); near-ties tolerated: {near_ties or 'none'}"
    )
    assert len(near_ties) <= 2, f"{len(near_ties)} near-ties in {len(cases)} prompts x 2: {near_ties}"
